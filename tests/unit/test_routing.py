"""Router: exact and template paths, 404 and 405, HEAD on GET routes."""

from __future__ import annotations

import pytest

from runnel.errors import HTTPError
from runnel.routing import Route, Router


async def list_models(request):  # pragma: no cover - never called
    return None


async def get_model(request):  # pragma: no cover
    return None


async def create(request):  # pragma: no cover
    return None


def router_with(*routes) -> Router:
    router = Router()
    for method, template, handler in routes:
        router.add(method, template, handler)
    return router


def raises_http(router, method, path) -> HTTPError:
    with pytest.raises(HTTPError) as info:
        router.match(method, path)
    return info.value


# --- matching ------------------------------------------------------------------


def test_exact_route():
    router = router_with(("GET", "/v1/models", list_models))
    route, params = router.match("GET", "/v1/models")
    assert isinstance(route, Route)
    assert (route.method, route.template, route.handler) == ("GET", "/v1/models", list_models)
    assert params == {}


def test_exact_route_does_not_match_a_prefix_or_a_longer_path():
    router = router_with(("GET", "/v1/models", list_models))
    assert raises_http(router, "GET", "/v1/model").status == 404
    assert raises_http(router, "GET", "/v1/models/").status == 404
    assert raises_http(router, "GET", "/v1/models/x").status == 404


def test_template_route_captures_one_segment():
    router = router_with(("GET", "/v1/models/{model}", get_model))
    route, params = router.match("GET", "/v1/models/gpt-x")
    assert route.handler is get_model
    assert params == {"model": "gpt-x"}


def test_template_segment_does_not_span_slashes_or_match_empty():
    router = router_with(("GET", "/v1/models/{model}", get_model))
    assert raises_http(router, "GET", "/v1/models/a/b").status == 404
    assert raises_http(router, "GET", "/v1/models/").status == 404


def test_template_with_several_params_and_literal_text_around_them():
    router = router_with(("POST", "/apps/{app}/fn/{name}.json", create))
    route, params = router.match("POST", "/apps/echo/fn/run.json")
    assert route.handler is create
    assert params == {"app": "echo", "name": "run"}
    # The "." is literal, not a regex wildcard.
    assert raises_http(router, "POST", "/apps/echo/fn/runXjson").status == 404


def test_path_param_spans_slashes():
    router = router_with(("GET", "/files/{rest:path}", get_model))
    _, params = router.match("GET", "/files/a/b/c.txt")
    assert params == {"rest": "a/b/c.txt"}
    assert raises_http(router, "GET", "/files/").status == 404


def test_path_param_in_the_middle():
    router = router_with(("GET", "/models/{name:path}/info", get_model))
    _, params = router.match("GET", "/models/org/model-7b/info")
    assert params == {"name": "org/model-7b"}


def test_params_are_percent_decoded():
    router = router_with(("GET", "/v1/models/{model}", get_model), ("GET", "/f/{p:path}", list_models))
    assert router.match("GET", "/v1/models/my%20model")[1] == {"model": "my model"}
    assert router.match("GET", "/v1/models/caf%C3%A9")[1] == {"model": "café"}
    # An encoded slash stays inside the one segment it was sent in.
    assert router.match("GET", "/v1/models/org%2Fmodel")[1] == {"model": "org/model"}
    assert router.match("GET", "/f/a%2Fb/c%3F")[1] == {"p": "a/b/c?"}


def test_exact_routes_win_over_templates():
    router = router_with(("GET", "/v1/models/{model}", get_model), ("GET", "/v1/models/default", list_models))
    assert router.match("GET", "/v1/models/default")[0].handler is list_models
    assert router.match("GET", "/v1/models/other")[0].handler is get_model


def test_templates_are_tried_in_registration_order():
    router = router_with(("GET", "/x/{a}", get_model), ("GET", "/x/{b:path}", list_models))
    route, params = router.match("GET", "/x/one")
    assert route.handler is get_model
    assert params == {"a": "one"}
    route, params = router.match("GET", "/x/one/two")
    assert route.handler is list_models
    assert params == {"b": "one/two"}


def test_methods_are_upper_cased_on_add():
    router = Router()
    route = router.add("post", "/v1/chat", create)
    assert route.method == "POST"
    assert router.match("POST", "/v1/chat")[0] is route


def test_route_options_are_kept():
    router = Router()

    def errors(error):  # pragma: no cover
        return None

    route = router.add("GET", "/healthz", list_models, public=True, errors=errors)
    assert route.public is True
    assert route.errors is errors
    assert router.add("GET", "/other", list_models).public is False


# --- 404 / 405 ----------------------------------------------------------------------


def test_unknown_path_is_404():
    router = router_with(("GET", "/v1/models", list_models))
    error = raises_http(router, "GET", "/nope")
    assert error.status == 404
    assert error.code == "route_not_found"
    assert error.message == "No route for /nope"
    assert error.headers == ()


def test_wrong_method_on_exact_route_is_405_with_allow():
    router = router_with(("POST", "/v1/chat", create))
    error = raises_http(router, "GET", "/v1/chat")
    assert error.status == 405
    assert error.code == "method_not_allowed"
    assert error.headers == ((b"allow", b"POST"),)
    assert error.message == "Method GET is not allowed for /v1/chat; allowed: POST"


def test_allow_lists_head_when_get_is_registered_and_is_sorted():
    router = router_with(("POST", "/items", create), ("GET", "/items", list_models), ("DELETE", "/items", create))
    error = raises_http(router, "PUT", "/items")
    assert error.status == 405
    assert error.headers == ((b"allow", b"DELETE, GET, HEAD, POST"),)


def test_wrong_method_on_template_route_is_405():
    router = router_with(("GET", "/v1/models/{model}", get_model))
    error = raises_http(router, "DELETE", "/v1/models/x")
    assert error.status == 405
    assert error.headers == ((b"allow", b"GET, HEAD"),)


def test_head_falls_back_to_get():
    router = router_with(("GET", "/v1/models", list_models), ("GET", "/v1/models/{m}", get_model))
    assert router.match("HEAD", "/v1/models")[0].handler is list_models
    route, params = router.match("HEAD", "/v1/models/x")
    assert route.handler is get_model
    assert params == {"m": "x"}


def test_explicit_head_route_wins_over_get():
    router = router_with(("GET", "/r", list_models), ("HEAD", "/r", get_model))
    assert router.match("HEAD", "/r")[0].handler is get_model
    assert router.match("GET", "/r")[0].handler is list_models


def test_head_on_a_post_only_route_is_405():
    router = router_with(("POST", "/v1/chat", create))
    error = raises_http(router, "HEAD", "/v1/chat")
    assert error.status == 405
    assert error.headers == ((b"allow", b"POST"),)


# --- registration ----------------------------------------------------------------------


def test_duplicate_exact_registration_is_an_error():
    router = router_with(("GET", "/v1/models", list_models))
    with pytest.raises(ValueError, match="GET /v1/models is registered twice"):
        router.add("GET", "/v1/models", get_model)
    # Case does not dodge the check.
    with pytest.raises(ValueError, match="registered twice"):
        router.add("get", "/v1/models", get_model)
    # The first registration is still the one that answers.
    assert router.match("GET", "/v1/models")[0].handler is list_models


def test_duplicate_template_registration_is_an_error():
    router = router_with(("GET", "/v1/models/{model}", get_model))
    with pytest.raises(ValueError, match=r"GET /v1/models/\{model\} is registered twice"):
        router.add("GET", "/v1/models/{model}", list_models)


def test_same_template_with_another_method_shares_the_path():
    router = router_with(("GET", "/v1/models/{model}", get_model), ("DELETE", "/v1/models/{model}", create))
    route, params = router.match("DELETE", "/v1/models/a")
    assert route.handler is create
    assert params == {"model": "a"}
    assert router.match("GET", "/v1/models/a")[0].handler is get_model
    assert raises_http(router, "PUT", "/v1/models/a").headers == ((b"allow", b"DELETE, GET, HEAD"),)


def test_template_must_start_with_a_slash():
    with pytest.raises(ValueError, match="must start with '/'"):
        Router().add("GET", "v1/models", list_models)


def test_iterating_yields_every_route():
    router = router_with(("GET", "/a", list_models), ("POST", "/a", create), ("GET", "/b/{x}", get_model))
    assert sorted((r.method, r.template) for r in router) == [("GET", "/a"), ("GET", "/b/{x}"), ("POST", "/a")]


def test_two_templates_that_fit_one_path_each_serve_their_method():
    # /v4/p/a/{function}/embedding (POST) and /v4/p/a/runs/{run_id} (GET) both fit
    # /v4/p/a/runs/embedding: the GET must reach the run, whatever the order of registration.
    router = Router()
    router.add("POST", "/v4/{project}/{app}/{function}/embedding", "embed")
    router.add("GET", "/v4/{project}/{app}/runs/{run_id}", "run")
    route, params = router.match("GET", "/v4/p/a/runs/embedding")
    assert (route.handler, params) == ("run", {"project": "p", "app": "a", "run_id": "embedding"})
    assert router.match("POST", "/v4/p/a/runs/embedding")[0].handler == "embed"
    with pytest.raises(HTTPError) as info:
        router.match("DELETE", "/v4/p/a/runs/embedding")
    assert info.value.status == 405
    assert dict(info.value.headers)[b"allow"] == b"GET, HEAD, POST"
