"""Authentication end to end: api_key keys (inline, keys_file, RUNNEL_API_KEYS) and custom plugins."""

from __future__ import annotations

import hashlib

import orjson
import pytest

import runnel
from runnel import HTTPError, Principal, hookimpl, json_response
from runnel.config import apply_environment
from runnel.testing import H11Client, error_body, raw_exchange, request

CHALLENGE = b'Bearer realm="runnel"'


MISSING = error_body("Missing API key: send 'Authorization: Bearer <key>'", "authentication_error", "invalid_api_key")
INVALID = error_body("Invalid API key", "authentication_error", "invalid_api_key")


class WhoAmI:
    """GET /whoami answers with the principal dispatch attached to the request."""

    @hookimpl
    def runnel_register_routes(self, register, server):
        async def whoami(request):
            principal = request.principal
            return json_response(
                {"subject": principal.subject, "kind": principal.kind, "claims": dict(principal.claims)}
            )

        register("GET", "/whoami", whoami)


def bearer(key: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {key}")]


def key_subject(key: str) -> str:
    return "key:" + hashlib.sha256(key.encode()).digest()[:4].hex()


@pytest.fixture
def keys_file(tmp_path):
    path = tmp_path / "keys.txt"
    path.write_text(
        "# team keys, one per line\n"
        "\n"
        "file-key-plain-02\n"
        "   file-key-indented-03   \n"
        "file-key-annotated-04   # alice, laptop\n"
        "# revoked: file-key-revoked-05\n"
    )
    return path


@pytest.fixture
def keyed_server(start_server, keys_file):
    config = {"auth": {"kind": "api_key", "keys": ["inline-key-0001"], "keys_file": str(keys_file)},
              "apps": {"echo": {"backend": "echo"}}}
    return start_server(config, plugins=[WhoAmI()])


def test_missing_key_is_401_with_challenge(keyed_server):
    data = raw_exchange(keyed_server.port, b"GET /whoami HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 401 Unauthorized"
    assert b"www-authenticate: " + CHALLENGE in lines
    assert orjson.loads(body) == MISSING


def test_wrong_key_or_scheme_is_401(keyed_server):
    with H11Client(keyed_server.port) as client:
        reply = client.request("GET", "/whoami", headers=bearer("not-a-real-key"))
        assert reply.status == 401
        assert reply.header(b"www-authenticate") == CHALLENGE
        assert reply.json() == INVALID
        # A prefix of a valid key is not a valid key.
        assert client.request("GET", "/whoami", headers=bearer("inline-key-000")).json() == INVALID
        reply = client.request("GET", "/whoami", headers=[("authorization", "Basic aW5saW5lLWtleS0wMDAx")])
        assert (reply.status, reply.json()) == (401, MISSING)
        reply = client.request("GET", "/whoami", headers=[("authorization", "Bearer")])
        assert (reply.status, reply.json()) == (401, MISSING)
        # The connection survives refusals.
        reply = client.request("GET", "/whoami", headers=bearer("inline-key-0001"))
        assert reply.status == 200


def test_right_key_is_200_and_principal_reaches_handler(keyed_server):
    reply = request(keyed_server.port, "GET", "/whoami", headers=bearer("inline-key-0001"))
    assert reply.status == 200
    assert reply.json() == {"subject": key_subject("inline-key-0001"), "kind": "api_key", "claims": {}}
    reply = request(keyed_server.port, "GET", "/whoami", headers=[("authorization", "bearer file-key-plain-02")])
    assert reply.json()["subject"] == key_subject("file-key-plain-02")
    reply = request(
        keyed_server.port,
        "POST",
        "/echo/echo",
        headers=bearer("inline-key-0001"),
        body=b'{"prompt": "hi", "max_tokens": 2}',
    )
    assert reply.status == 200
    assert reply.json() == {"app": "echo", "text": "hi hi", "tokens": 2}
    assert request(keyed_server.port, "POST", "/echo/echo", body=b"{}").status == 401


def test_keys_file_lines_are_keys_and_comments_are_not(keyed_server):
    port = keyed_server.port
    assert request(port, "GET", "/whoami", headers=bearer("file-key-plain-02")).status == 200
    assert request(port, "GET", "/whoami", headers=bearer("file-key-indented-03")).status == 200
    # A commented-out key is not a key, and neither is the comment text.
    assert request(port, "GET", "/whoami", headers=bearer("file-key-revoked-05")).status == 401
    assert request(port, "GET", "/whoami", headers=bearer("#")).status == 401


def test_keys_file_trailing_comment_is_ignored(keyed_server):
    # conf/examples/api_keys.toml: "everything from a '#' to the end of its line" is
    # ignored, so a key can be annotated: "sk-3f9a...   # alice, laptop".
    reply = request(keyed_server.port, "GET", "/whoami", headers=bearer("file-key-annotated-04"))
    assert reply.status == 200
    assert reply.json()["subject"] == key_subject("file-key-annotated-04")


def test_health_stays_public_with_auth_on(keyed_server):
    reply = request(keyed_server.port, "GET", "/health")
    assert reply.status == 200
    assert reply.body == b'{"status":"ok"}'
    assert reply.header(b"www-authenticate") is None


def test_realm_is_configurable(start_server):
    server = start_server({"auth": {"kind": "api_key", "keys": ["realm-key-001"], "realm": "models"}},
                          plugins=[WhoAmI()], load_entrypoints=False)
    assert request(server.port, "GET", "/whoami").header(b"www-authenticate") == b'Bearer realm="models"'


def test_runnel_api_keys_env_turns_auth_on_and_replaces_inline_keys(start_server):
    base = runnel.config_from_dict({"server": {"port": 0}})
    config = apply_environment(base, {"RUNNEL_API_KEYS": " env-key-0001 , env-key-0002,"})
    assert config.auth.kind == "api_key"
    server = start_server(config, plugins=[WhoAmI()], load_entrypoints=False)
    assert request(server.port, "GET", "/whoami").status == 401
    for key in ("env-key-0001", "env-key-0002"):
        reply = request(server.port, "GET", "/whoami", headers=bearer(key))
        assert reply.json() == {"subject": key_subject(key), "kind": "api_key", "claims": {}}

    base = runnel.config_from_dict({"server": {"port": 0}, "auth": {"kind": "api_key", "keys": ["inline-key-0001"]}})
    server = start_server(apply_environment(base, {"RUNNEL_API_KEYS": "env-key-0003"}), plugins=[WhoAmI()],
                          load_entrypoints=False)
    assert request(server.port, "GET", "/whoami", headers=bearer("env-key-0003")).status == 200
    assert request(server.port, "GET", "/whoami", headers=bearer("inline-key-0001")).json() == INVALID


def test_unknown_auth_kind_is_config_error_naming_auth_kind(tmp_path):
    server = runnel.Server(runnel.config_from_dict({"auth": {"kind": "ldap"}}), load_entrypoints=False)
    with pytest.raises(runnel.ConfigError) as info:
        server.build()
    assert info.value.key == "auth.kind"
    message = str(info.value)
    prefix = "auth.kind: unknown auth kind 'ldap'; installed: "
    assert message.startswith(prefix)
    installed = message[len(prefix):].split(", ")
    assert installed == sorted(installed) and {"api_key", "none"} <= set(installed)

    path = tmp_path / "runnel.toml"
    path.write_text('[auth]\nkind = "oauth"\n')
    with pytest.raises(runnel.ConfigError) as info:
        runnel.Server(runnel.load_config(path)).build()
    assert str(info.value).startswith(f"{path}: auth.kind: unknown auth kind 'oauth'")


def test_api_key_config_mistakes_name_the_key(tmp_path):
    cases = [
        ({"kind": "api_key"}, "auth.keys: api_key auth needs at least one key"),
        ({"kind": "api_key", "keys": ["short"]}, "auth.keys: every API key must be at least 8 characters long"),
        ({"kind": "api_key", "keys": ["long-enough-1"], "kees": []}, "auth.kees: unknown key 'kees'"),
        ({"kind": "api_key", "keys_file": str(tmp_path / "absent.txt")},
         f"auth.keys_file: cannot read {tmp_path / 'absent.txt'}: No such file or directory"),
    ]
    for auth, message in cases:
        server = runnel.Server(runnel.config_from_dict({"auth": auth}), load_entrypoints=False)
        with pytest.raises(runnel.ConfigError) as info:
            server.build()
        assert str(info.value).startswith(message), (auth, str(info.value))


class HeaderGate:
    """Vouches for ``x-user``, refuses mallory with 403, abstains otherwise."""

    def __init__(self):
        self.calls = []

    @hookimpl
    def runnel_authenticate(self, request, route):
        self.calls.append((request.path, route.template))
        user = request.header(b"x-user")
        if user == b"mallory":
            raise HTTPError(403, "mallory is banned")
        if user is not None:
            return Principal(user.decode(), "header", {"route": route.template})
        return None


def test_custom_authenticate_plugin_refuses_or_vouches(start_server):
    gate = HeaderGate()
    server = start_server({}, plugins=[gate, WhoAmI()], load_entrypoints=False)
    with H11Client(server.port) as client:
        reply = client.request("GET", "/whoami", headers=[("x-user", "alice")])
        assert reply.status == 200
        assert reply.json() == {"subject": "alice", "kind": "header", "claims": {"route": "/whoami"}}

        reply = client.request("GET", "/whoami", headers=[("x-user", "mallory")])
        assert (reply.status, reply.reason) == (403, b"Forbidden")
        assert reply.json() == error_body("mallory is banned", "permission_error")

        # Abstaining leaves it to the configured kind ("none": anonymous).
        reply = client.request("GET", "/whoami")
        assert reply.json() == {"subject": "anonymous", "kind": "none", "claims": {}}

        # Public routes never ask.
        assert client.request("GET", "/health").status == 200
    assert gate.calls == [("/whoami", "/whoami")] * 3
