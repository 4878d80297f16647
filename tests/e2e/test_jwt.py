"""JWT authentication end to end: HS256 secrets, RS256 public keys, ES256 JWKS with rotation,
every way a token can be wrong, project checks, and config errors."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import time
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

import runnel
from runnel import hookimpl, json_response
from runnel.testing import H11Client, error_body, request, wait_until

EXAMPLES = Path(__file__).resolve().parents[2] / "conf" / "examples"
SECRET = "test-secret-0123456789-abcdefghijklmnop"  # 39 bytes: HS256 wants at least 32
AUDIENCE = "runnel-tests"
ISSUER = "https://issuer.test/"

CHALLENGE = b'Bearer realm="runnel"'
INVALID = b'Bearer realm="runnel", error="invalid_token"'
FORBIDDEN = b'Bearer realm="runnel", error="insufficient_scope"'


def unauthorized(message: str) -> dict:
    return error_body(message, "authentication_error", "invalid_token")


def forbidden(message: str) -> dict:
    return error_body(message, "permission_error", "wrong_project")


class Routes:
    """GET /v4/{project_id}/whoami (a project route) and GET /me (not one): the principal."""

    @hookimpl
    def runnel_register_routes(self, register, server):
        async def whoami(request):
            principal = request.principal
            return json_response({"subject": principal.subject, "kind": principal.kind,
                                  "claims": dict(principal.claims), "project": request.path_params.get("project_id")})

        register("GET", "/v4/{project_id}/whoami", whoami)
        register("GET", "/me", whoami)


# -- tokens and keys --------------------------------------------------------------------


def claims(**overrides) -> dict:
    now = int(time.time())
    base = {"sub": "alice", "project": "p1", "aud": AUDIENCE, "iss": ISSUER, "iat": now, "exp": now + 300}
    base.update(overrides)
    return {name: value for name, value in base.items() if value is not None}  # None: leave the claim out


def hs256(payload=None, secret=SECRET) -> str:
    return jwt.encode(claims() if payload is None else payload, secret, algorithm="HS256")


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned(header: dict, payload: dict, sign=lambda signing_input: b"") -> str:
    """A token built by hand, for the ones pyjwt refuses to make."""
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(payload).encode())}"
    return f"{signing_input}.{b64url(sign(signing_input.encode()))}"


def pem(private_key) -> bytes:
    return private_key.public_key().public_bytes(serialization.Encoding.PEM,
                                                 serialization.PublicFormat.SubjectPublicKeyInfo)


def jwk(private_key, kid: str) -> dict:
    return {**jwt.algorithms.ECAlgorithm.to_jwk(private_key.public_key(), as_dict=True), "kid": kid, "alg": "ES256"}


def write_jwks(path: Path, *keys: dict) -> None:
    path.write_text(json.dumps({"keys": list(keys)}))


@pytest.fixture(scope="module")
def rsa_key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_keys():
    return [ec.generate_private_key(ec.SECP256R1()) for _ in range(3)]


# -- servers and requests -----------------------------------------------------------------


def jwt_config(**auth) -> dict:
    return {"auth": {"kind": "jwt", **auth}}


@pytest.fixture
def hs_server(start_server):
    config = jwt_config(algorithms=["HS256"], secret=SECRET, audience=AUDIENCE, issuer=ISSUER)
    return start_server(config, plugins=[Routes()], load_entrypoints=False)


def get(server, path: str, token: str | None):
    headers = [] if token is None else [("authorization", f"Bearer {token}")]
    return request(server.port, "GET", path, headers=headers)


def assert_refused(reply, status: int, challenge: bytes, body: dict, token: str | None = None) -> None:
    assert (reply.status, reply.header(b"www-authenticate"), reply.json()) == (status, challenge, body)
    if token:
        assert token.encode() not in reply.body
        assert token.split(".")[-1].encode() not in reply.body


# -- HS256 ----------------------------------------------------------------------------------


def test_valid_hs256_token_reaches_handler_with_its_claims(hs_server):
    payload = claims()
    reply = get(hs_server, "/v4/p1/whoami", hs256(payload))
    assert (reply.status, reply.header(b"www-authenticate")) == (200, None)
    assert reply.json() == {"subject": "alice", "kind": "jwt", "claims": payload, "project": "p1"}
    # A route without {project_id} only needs a valid token, whatever its project.
    reply = get(hs_server, "/me", hs256(claims(project="elsewhere")))
    assert (reply.status, reply.json()["project"]) == (200, None)
    # No sub: the subject is "?".
    assert get(hs_server, "/me", hs256(claims(sub=None))).json()["subject"] == "?"


def test_missing_token_gets_a_plain_challenge(hs_server):
    missing = unauthorized("Missing bearer token: send 'Authorization: Bearer <JWT>'")
    assert_refused(get(hs_server, "/me", None), 401, CHALLENGE, missing)
    with H11Client(hs_server.port) as client:
        for value in ("Basic YWxpY2U6cHc=", "Bearer", "Token abc"):
            reply = client.request("GET", "/me", headers=[("authorization", value)])
            assert_refused(reply, 401, CHALLENGE, missing)
        # The connection survives the refusals.
        assert client.request("GET", "/me", headers=[("authorization", f"Bearer {hs256()}")]).status == 200


def test_expired_token(hs_server):
    now = int(time.time())
    token = hs256(claims(iat=now - 600, exp=now - 120))
    assert_refused(get(hs_server, "/me", token), 401, INVALID, unauthorized("Token has expired"), token)
    # Expired by less than the 30 s leeway: still accepted.
    assert get(hs_server, "/me", hs256(claims(iat=now - 600, exp=now - 5))).status == 200


def test_token_without_exp_is_refused(hs_server):
    token = hs256(claims(exp=None))
    assert_refused(get(hs_server, "/me", token), 401, INVALID, unauthorized("Token lacks the required 'exp' claim"))


def test_not_yet_valid_token(hs_server):
    now = int(time.time())
    token = hs256(claims(nbf=now + 120))
    assert_refused(get(hs_server, "/me", token), 401, INVALID, unauthorized("Token is not yet valid (nbf)"), token)
    # nbf in the future, but within the 30 s leeway (clock skew): accepted.
    assert get(hs_server, "/me", hs256(claims(nbf=now + 5))).status == 200


def test_token_issued_in_the_future(hs_server):
    now = int(time.time())
    token = hs256(claims(iat=now + 120))
    body = unauthorized("Token was issued in the future (iat)")
    assert_refused(get(hs_server, "/me", token), 401, INVALID, body, token)
    assert get(hs_server, "/me", hs256(claims(iat=now + 5))).status == 200


def signed_hs256(payload: dict) -> str:
    """Signed by hand: json.dumps writes NaN and Infinity, which pyjwt's encoder may not."""
    return unsigned({"alg": "HS256", "typ": "JWT"}, payload,
                    lambda signing_input: hmac.new(SECRET.encode(), signing_input, hashlib.sha256).digest())


@pytest.mark.parametrize(("claim", "value", "message"), [
    # pyjwt alone takes these (int() of them works): a string date, or one that never comes.
    ("exp", "9999999999", "Token exp claim must be a number of seconds since 1970 (a NumericDate)"),
    ("exp", 1e308, "Token exp claim must be a number of seconds since 1970 (a NumericDate)"),
    ("exp", 10**20, "Token exp claim must be a number of seconds since 1970 (a NumericDate)"),
    ("nbf", "0", "Token nbf claim must be a number of seconds since 1970 (a NumericDate)"),
    ("nbf", -1e308, "Token nbf claim must be a number of seconds since 1970 (a NumericDate)"),
    ("iat", "0", "Token iat claim must be a number of seconds since 1970 (a NumericDate)"),
    ("iat", -5, "Token iat claim must be a number of seconds since 1970 (a NumericDate)"),
    # pyjwt refuses these itself, in its own words.
    ("exp", True, "Token has expired"),  # int(True) is 1
    ("exp", float("nan"), "Token is malformed"),
    ("exp", float("inf"), "Token is malformed"),
    ("nbf", float("nan"), "Token is malformed"),
    ("iat", float("nan"), "Token iat claim is not a number"),
])
def test_date_claims_must_be_numeric_dates(hs_server, claim, value, message):
    token = signed_hs256(claims(**{claim: value}))
    assert_refused(get(hs_server, "/me", token), 401, INVALID, unauthorized(message), token)


def test_fractional_date_claims_are_numeric_dates(hs_server):
    now = time.time()
    assert get(hs_server, "/me", signed_hs256(claims(iat=now - 1.5, nbf=now - 0.5, exp=now + 300.25))).status == 200


def test_wrong_signature(hs_server):
    token = hs256(secret="another-secret-of-32-bytes-or-more-000")
    assert_refused(get(hs_server, "/me", token), 401, INVALID, unauthorized("Token signature is invalid"), token)
    # A valid token with its signature swapped for another token's.
    good, other = hs256(), hs256(claims(sub="mallory"))
    forged = good.rsplit(".", 1)[0] + "." + other.rsplit(".", 1)[1]
    assert_refused(get(hs_server, "/me", forged), 401, INVALID, unauthorized("Token signature is invalid"))


def test_alg_none_token_is_refused(hs_server):
    token = unsigned({"alg": "none", "typ": "JWT"}, claims())
    assert token.endswith(".")
    body = unauthorized("Token is signed with an algorithm this server does not accept")
    assert_refused(get(hs_server, "/me", token), 401, INVALID, body)
    assert_refused(get(hs_server, "/me", unsigned({"alg": "None", "typ": "JWT"}, claims())), 401, INVALID, body)


def test_wrong_audience_and_issuer(hs_server):
    token = hs256(claims(aud="someone-else"))
    body = unauthorized("Token audience is not accepted here")
    assert_refused(get(hs_server, "/me", token), 401, INVALID, body, token)
    token = hs256(claims(iss="https://evil.test/"))
    body = unauthorized("Token issuer is not accepted here")
    assert_refused(get(hs_server, "/me", token), 401, INVALID, body, token)
    # Once configured, aud and iss are required.
    body = unauthorized("Token lacks the required 'aud' claim")
    assert_refused(get(hs_server, "/me", hs256(claims(aud=None))), 401, INVALID, body)
    body = unauthorized("Token lacks the required 'iss' claim")
    assert_refused(get(hs_server, "/me", hs256(claims(iss=None))), 401, INVALID, body)
    # A token for several audiences, ours among them, is accepted.
    assert get(hs_server, "/me", hs256(claims(aud=["other", AUDIENCE]))).status == 200


def test_wrong_project_is_403(hs_server):
    reply = get(hs_server, "/v4/p2/whoami", hs256(claims(project="p1")))
    assert_refused(reply, 403, FORBIDDEN, forbidden("Token is not valid for this project"))
    assert get(hs_server, "/v4/p1/whoami", hs256(claims(project="p1"))).status == 200


def test_missing_project_claim_on_project_route_is_403(hs_server):
    token = hs256(claims(project=None))
    reply = get(hs_server, "/v4/p1/whoami", token)
    assert_refused(reply, 403, FORBIDDEN, forbidden("Token has no 'project' claim, which this route requires"))
    assert get(hs_server, "/me", token).status == 200


def test_project_claim_is_configurable(start_server):
    config = jwt_config(algorithms=["HS256"], secret=SECRET, project_claim="tenant")
    server = start_server(config, plugins=[Routes()], load_entrypoints=False)
    payload = claims(tenant="t9", project="p1", aud=None, iss=None)
    assert get(server, "/v4/t9/whoami", hs256(payload)).status == 200
    reply = get(server, "/v4/p1/whoami", hs256(payload))
    assert_refused(reply, 403, FORBIDDEN, forbidden("Token is not valid for this project"))


def test_token_with_aud_is_refused_where_no_audience_is_configured(start_server):
    """RFC 7519 4.1.3 (and pyjwt): a token meant for some audience is not for a server that has none."""
    config = jwt_config(algorithms=["HS256"], secret=SECRET)
    server = start_server(config, plugins=[Routes()], load_entrypoints=False)
    assert get(server, "/me", hs256(claims(aud=None))).status == 200  # iss is not checked: no issuer set
    body = unauthorized("Token audience is not accepted here")
    assert_refused(get(server, "/me", hs256(claims())), 401, INVALID, body)


@pytest.mark.parametrize("token", ["not-a-jwt", "a.b.c", "a.b", "....", "eyJhbGciOiJIUzI1NiJ9.e30"])
def test_malformed_token(hs_server, token):
    assert_refused(get(hs_server, "/me", token), 401, INVALID, unauthorized("Token is malformed"))


def test_health_stays_public(hs_server):
    reply = get(hs_server, "/health", None)
    assert (reply.status, reply.header(b"www-authenticate")) == (200, None)


# -- RS256 with a public key file -------------------------------------------------------------


@pytest.fixture
def rs_server(start_server, tmp_path, rsa_key):
    (tmp_path / "public.pem").write_bytes(pem(rsa_key))
    config = jwt_config(algorithms=["RS256"], public_key_file=str(tmp_path / "public.pem"),
                        audience=[AUDIENCE, "other"], issuer=ISSUER)
    return start_server(config, plugins=[Routes()], load_entrypoints=False)


def test_rs256_with_public_key_file(rs_server, rsa_key):
    reply = get(rs_server, "/v4/p1/whoami", jwt.encode(claims(), rsa_key, algorithm="RS256"))
    assert (reply.status, reply.json()["subject"]) == (200, "alice")
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    token = jwt.encode(claims(), other, algorithm="RS256")
    assert_refused(get(rs_server, "/me", token), 401, INVALID, unauthorized("Token signature is invalid"), token)
    # HS256 with our SECRET is not accepted by an RS256 server either.
    body = unauthorized("Token is signed with an algorithm this server does not accept")
    assert_refused(get(rs_server, "/me", hs256()), 401, INVALID, body)


def test_hs256_signed_with_the_public_key_is_refused(rs_server, rsa_key):
    """Algorithm confusion: the attacker knows the public key and uses it as an HMAC secret."""
    public_pem = pem(rsa_key)
    token = unsigned({"alg": "HS256", "typ": "JWT"}, claims(sub="mallory"),
                     sign=lambda data: hmac.new(public_pem, data, hashlib.sha256).digest())
    body = unauthorized("Token is signed with an algorithm this server does not accept")
    assert_refused(get(rs_server, "/me", token), 401, INVALID, body, token)


# -- ES256 with a JWKS file ---------------------------------------------------------------------


def es256(private_key, kid: str | None) -> str:
    headers = {"kid": kid} if kid is not None else None
    return jwt.encode(claims(aud=None, iss=None), private_key, algorithm="ES256", headers=headers)


def test_es256_jwks_picks_the_key_by_kid(start_server, tmp_path, ec_keys):
    first, second, stranger = ec_keys
    write_jwks(tmp_path / "jwks.json", jwk(first, "first"), jwk(second, "second"))
    config = jwt_config(algorithms=["RS256", "ES256"], jwks_file=str(tmp_path / "jwks.json"))
    server = start_server(config, plugins=[Routes()], load_entrypoints=False)
    assert get(server, "/me", es256(first, "first")).json()["subject"] == "alice"
    assert get(server, "/v4/p1/whoami", es256(second, "second")).status == 200
    # Signed by one key but naming the other.
    token = es256(first, "second")
    assert_refused(get(server, "/me", token), 401, INVALID, unauthorized("Token signature is invalid"), token)
    unknown = unauthorized("Token kid does not name a known key")
    assert_refused(get(server, "/me", es256(stranger, "stranger")), 401, INVALID, unknown)
    assert_refused(get(server, "/me", es256(first, None)), 401, INVALID, unknown)


def test_jwks_rotation(start_server, tmp_path, ec_keys, caplog):
    old, new, _ = ec_keys
    path = tmp_path / "jwks.json"
    write_jwks(path, jwk(old, "old"))
    config = jwt_config(algorithms=["ES256"], jwks_file=str(path))
    server = start_server(config, plugins=[Routes()], load_entrypoints=False)
    old_token, new_token = es256(old, "old"), es256(new, "new")
    assert get(server, "/me", old_token).status == 200
    assert get(server, "/me", new_token).status == 401

    write_jwks(path, jwk(new, "new"))
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    wait_until(lambda: get(server, "/me", new_token).status == 200, interval=0.05)
    reply = get(server, "/me", old_token)
    assert_refused(reply, 401, INVALID, unauthorized("Token kid does not name a known key"))

    # A broken rewrite (say, half written) keeps the keys in use.
    path.write_text('{"keys": [')
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10_000_000_000))
    time.sleep(1.1)  # past the once-a-second check, so the next request looks at the file
    assert get(server, "/me", new_token).status == 200
    assert f"jwt: keeping the previous keys; cannot use {path}: {path} is not valid JSON" in caplog.text


# -- config ----------------------------------------------------------------------------------------


def build(auth: dict) -> None:
    runnel.Server(runnel.config_from_dict(jwt_config(**auth)), load_entrypoints=False).build()


@pytest.mark.parametrize(
    ("auth", "error"),
    [
        ({"secret": SECRET}, "auth.algorithms: is required"),
        ({"algorithms": ["none"], "secret": SECRET},
         'auth.algorithms: "none" would accept unsigned tokens; it is never allowed'),
        ({"algorithms": ["HS256", "none"], "secret": SECRET},
         'auth.algorithms: "none" would accept unsigned tokens; it is never allowed'),
        ({"algorithms": ["HS256", "RS256"], "secret": SECRET},
         "auth.algorithms: must not mix HS* with public-key algorithms: a public key would then be accepted "
         "as an HMAC secret (algorithm confusion)"),
        ({"algorithms": []}, 'auth.algorithms: must name at least one algorithm, e.g. ["RS256"]'),
        ({"algorithms": ["HS257"], "secret": SECRET}, "auth.algorithms: unknown algorithm 'HS257'; known: "),
        ({"algorithms": ["HS256"]},
         "auth: jwt auth needs exactly one key source: secret, public_key_file or jwks_file; it is missing"),
        ({"algorithms": ["RS256"], "secret": SECRET, "public_key_file": "k.pem"},
         "auth: jwt auth needs exactly one key source: secret, public_key_file or jwks_file; it is given 2 "
         "times (secret, public_key_file)"),
        ({"algorithms": ["HS256"], "secret": "short-secret-of-31-bytes-000000"},
         "auth.secret: must be at least 32 bytes long, got 31"),
        ({"algorithms": ["HS512"], "secret": SECRET}, "auth.secret: The HMAC key is 39 bytes long"),
        ({"algorithms": ["RS256"], "secret": SECRET},
         "auth.secret: is only for HS* algorithms; use public_key_file or jwks_file"),
        ({"algorithms": ["HS256"], "jwks_file": "jwks.json"}, "auth.algorithms: HS* algorithms need 'secret'"),
        ({"algorithms": ["HS256"], "secret": SECRET, "leeway": -1}, "auth.leeway: must be a number of seconds"),
        ({"algorithms": ["HS256"], "secret": SECRET, "audience": []}, "auth.audience: must not be empty"),
        ({"algorithms": ["HS256"], "secret": SECRET, "audience": ["a", 1]},
         "auth.audience[1]: expected a string, got integer 1"),
        ({"algorithms": ["HS256"], "secret": SECRET, "issuers": "x"}, "auth.issuers: unknown key 'issuers' (did you"),
        ({"algorithms": ["RS256"], "public_key_file": "/nonexistent/k.pem"},
         "auth.public_key_file: cannot read /nonexistent/k.pem: No such file or directory"),
        ({"algorithms": ["ES256"], "jwks_file": "/nonexistent/jwks.json"},
         "auth.jwks_file: cannot read /nonexistent/jwks.json: No such file or directory"),
    ],
)
def test_config_errors_name_the_key(auth, error):
    with pytest.raises(runnel.ConfigError) as info:
        build(auth)
    assert str(info.value).startswith(error)


def test_key_file_errors(tmp_path, rsa_key, ec_keys):
    (tmp_path / "rsa.pem").write_bytes(pem(rsa_key))
    with pytest.raises(runnel.ConfigError) as info:
        build({"algorithms": ["RS256", "ES256"], "public_key_file": str(tmp_path / "rsa.pem")})
    assert str(info.value).startswith("auth.public_key_file: ES256 cannot use this key")
    (tmp_path / "private.pem").write_bytes(rsa_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    with pytest.raises(runnel.ConfigError) as info:
        build({"algorithms": ["RS256"], "public_key_file": str(tmp_path / "private.pem")})
    assert str(info.value) == f"auth.public_key_file: {tmp_path / 'private.pem'} is not a PEM public key"

    jwks = tmp_path / "jwks.json"
    write_jwks(jwks, jwk(ec_keys[0], "only"))  # an ES256 key, but only RS256 is allowed
    with pytest.raises(runnel.ConfigError) as info:
        build({"algorithms": ["RS256"], "jwks_file": str(jwks)})
    assert str(info.value) == f"auth.jwks_file: {jwks} has no usable key for RS256"
    jwks.write_text("[]")
    with pytest.raises(runnel.ConfigError) as info:
        build({"algorithms": ["ES256"], "jwks_file": str(jwks)})
    assert str(info.value) == f'auth.jwks_file: {jwks} is not a JWKS: expected {{"keys": [...]}}'


def test_example_config_builds():
    config = runnel.load_config(EXAMPLES / "jwt.toml")
    assert config.auth.kind == "jwt"
    runnel.Server(config, load_entrypoints=False).build()
