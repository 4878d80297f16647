"""Built-in plugin: the ``jwt`` authentication kind.

A request must carry ``Authorization: Bearer <JWT>``, verified with pyjwt against
keys from the config. The ``[auth]`` keys:

``algorithms``       required list, e.g. ``["HS256"]`` or ``["RS256", "ES256"]``: the only
                     algorithms a token may use. ``"none"`` is refused, and so is mixing HS*
                     with public-key algorithms (a public key would then double as an HMAC
                     secret: the algorithm-confusion attack).
``secret``           the HMAC secret (HS* only), at least 32 bytes (48 for HS384, 64 for HS512).
``public_key_file``  a PEM public key (RS*, PS*, ES*, EdDSA); relative to the config file.
``jwks_file``        a JWKS JSON file (``{"keys": [...]}``); the token's ``kid`` header picks
                     the key. The file is re-read when it changes (checked at most once a
                     second), so keys rotate without a restart; a broken rewrite keeps the
                     previous keys. Keys without a ``kid``, or whose algorithm (``alg``, else
                     the default for its type and curve) is not in ``algorithms``, are skipped.
                     Exactly one of ``secret``, ``public_key_file`` and ``jwks_file`` is given.
``audience``         optional string or list: the token's ``aud`` must name one of them. Unset,
                     a token that has an ``aud`` is refused (RFC 7519 4.1.3: not meant for us).
``issuer``           optional string: the token's ``iss`` must equal it.
``leeway``           seconds of clock skew allowed for ``exp``, ``nbf`` and ``iat`` (default 30).
``project_claim``    the claim naming the token's project (default ``"project"``). On a route
                     with a ``{project_id}`` parameter it must be present and equal to it.
``required_claims``  claims every token must have (default ``["exp"]``; ``exp`` always is).
``realm``            the realm in ``WWW-Authenticate`` challenges (default ``"runnel"``).

An absent or invalid token is a 401 with an RFC 6750 challenge; a valid token for another
project is a 403. Messages say what was wrong, never what the token was. ``exp``, ``nbf``
and ``iat``, where present, must be NumericDates (RFC 7519 2): a JSON number of seconds,
finite, between 0 and the end of year 9999; pyjwt alone would take ``"exp": "9999999999"``
or ``1e308`` (a token that never expires).

The principal's identity, which owns the runs a token creates, is the token's project
claim and subject together: another subject, or the same subject in another project, is
another owner.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import time

from ..errors import HTTPError
from ..hookspecs import hookimpl
from . import Principal, bearer_token

logger = logging.getLogger("runnel.auth.jwt")

HMAC_ALGORITHMS = ("HS256", "HS384", "HS512")
JWKS_CHECK_INTERVAL = 1.0  # seconds between looks at the jwks_file's mtime
DATE_CLAIMS = ("exp", "nbf", "iat")
LATEST_DATE = 253402300799  # 9999-12-31T23:59:59Z: later is no date a real issuer writes

# Why a token was refused, by pyjwt exception class name (the first match along the MRO).
# Names rather than classes so that importing this plugin does not import pyjwt.
_REASONS = {
    "ExpiredSignatureError": "Token has expired",
    "InvalidSignatureError": "Token signature is invalid",
    "InvalidAlgorithmError": "Token is signed with an algorithm this server does not accept",
    "InvalidAudienceError": "Token audience is not accepted here",
    "InvalidIssuerError": "Token issuer is not accepted here",
    "InvalidIssuedAtError": "Token iat claim is not a number",
    "UnknownKeyId": "Token kid does not name a known key",
    "DecodeError": "Token is malformed",
}


def _explain(exc: Exception) -> str:
    name = type(exc).__name__
    if name == "ImmatureSignatureError":  # pyjwt says which: "... not yet valid (iat)" or "(nbf)"
        return "Token was issued in the future (iat)" if "(iat)" in str(exc) else "Token is not yet valid (nbf)"
    if name == "MissingRequiredClaimError":
        # pyjwt's MissingRequiredClaimError, matched by name so that jwt is imported lazily.
        return f"Token lacks the required {exc.claim!r} claim"  # type: ignore[attr-defined]
    for cls in type(exc).__mro__:
        if cls.__name__ in _REASONS:
            return _REASONS[cls.__name__]
    return "Token is invalid"


def bad_date_claim(claims: dict) -> str | None:
    """Why a date claim of ``claims`` is not a NumericDate, or None when they all are."""
    for name in DATE_CLAIMS:
        if name not in claims:
            continue
        value = claims[name]
        if type(value) not in (int, float) or not (math.isfinite(value) and 0 <= value <= LATEST_DATE):
            return f"Token {name} claim must be a number of seconds since 1970 (a NumericDate)"
    return None


class JwtAuth:
    """``kind = "jwt"``: a valid JWT, and for ``{project_id}`` routes, the right project."""

    def __init__(self, decode, key_for, errors, project_claim: str, realm: str) -> None:
        self._decode = decode  # decode(token, key) -> claims, with everything else pinned
        self._key_for = key_for  # key_for(token) -> the key to verify it with
        self._errors = errors  # jwt.PyJWTError, what both raise for a bad token
        self._project_claim = project_claim
        self._missing = ((b"www-authenticate", f'Bearer realm="{realm}"'.encode()),)
        self._invalid = ((b"www-authenticate", f'Bearer realm="{realm}", error="invalid_token"'.encode()),)
        self._forbidden = ((b"www-authenticate", f'Bearer realm="{realm}", error="insufficient_scope"'.encode()),)

    @hookimpl
    def runnel_authenticate(self, request, route):
        token = bearer_token(request)
        if token is None:
            raise HTTPError(401, "Missing bearer token: send 'Authorization: Bearer <JWT>'",
                            code="invalid_token", headers=self._missing)
        try:
            claims = self._decode(token, self._key_for(token))
        except self._errors as exc:
            raise HTTPError(401, _explain(exc), code="invalid_token", headers=self._invalid) from None
        problem = bad_date_claim(claims)
        if problem is not None:
            raise HTTPError(401, problem, code="invalid_token", headers=self._invalid)
        project = request.path_params.get("project_id")
        if project is not None:
            claimed = claims.get(self._project_claim)
            if claimed is None:
                raise HTTPError(403, f"Token has no {self._project_claim!r} claim, which this route requires",
                                code="wrong_project", headers=self._forbidden)
            if claimed != project:
                raise HTTPError(403, "Token is not valid for this project", code="wrong_project",
                                headers=self._forbidden)
        identity = json.dumps([claims.get(self._project_claim), claims.get("sub")], sort_keys=True,
                              separators=(",", ":"))
        return Principal(subject=claims.get("sub", "?"), kind="jwt", claims=claims, identity=f"jwt:{identity}")


class JwksKeys:
    """``key_for`` over a JWKS file, re-read when its mtime (or size, or inode) changes."""

    def __init__(self, path: str, algorithms: list[str]) -> None:
        import jwt

        self._path = path
        self._algorithms = algorithms
        self._header = jwt.get_unverified_header
        self._unknown = type("UnknownKeyId", (jwt.InvalidTokenError,), {})
        self._stamp = self._stat()
        self._keys = read_jwks(path, algorithms)  # ValueError if unusable: a config error
        self._next_check = time.monotonic() + JWKS_CHECK_INTERVAL

    def _stat(self):
        st = os.stat(self._path)
        return st.st_mtime_ns, st.st_size, st.st_ino

    def _refresh(self) -> None:
        now = time.monotonic()
        if now < self._next_check:
            return
        self._next_check = now + JWKS_CHECK_INTERVAL
        try:
            stamp = self._stat()
            if stamp == self._stamp:
                return
            self._stamp = stamp  # even if it fails below: warn once per change, not per second
            self._keys = read_jwks(self._path, self._algorithms)
            logger.info("jwt: reloaded %d key(s) from %s", len(self._keys), self._path)
        except (OSError, ValueError) as exc:
            logger.warning("jwt: keeping the previous keys; cannot use %s: %s", self._path, exc)

    def __call__(self, token: bytes):
        kid = self._header(token).get("kid")  # DecodeError for a malformed token
        self._refresh()
        key = self._keys.get(kid) if isinstance(kid, str) else None
        if key is None:
            raise self._unknown()
        return key


def read_jwks(path: str, algorithms: list[str]) -> dict:
    """{kid: PyJWK} of the usable keys in a JWKS file; ValueError if there are none."""
    import jwt

    try:
        with open(path, "rb") as file:
            data = json.load(file)
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise ValueError(f'{path} is not a JWKS: expected {{"keys": [...]}}')
    keys, skipped = {}, []
    for index, jwk in enumerate(data["keys"]):
        kid = jwk.get("kid") if isinstance(jwk, dict) else None
        if not isinstance(kid, str):
            skipped.append(f"keys[{index}]: no kid")
            continue
        try:
            key = jwt.PyJWK(jwk)
        except (jwt.PyJWTError, TypeError, ValueError) as exc:
            skipped.append(f"{kid!r}: {exc}")
            continue
        problem = (
            f"algorithm {key.algorithm_name} is not in algorithms" if key.algorithm_name not in algorithms
            else key.Algorithm.check_key_length(key.key)
        )
        if problem:
            skipped.append(f"{kid!r}: {problem}")
        else:
            keys[kid] = key
    if skipped:
        logger.warning("jwt: %s: skipped keys: %s", path, "; ".join(skipped))
    if not keys:
        raise ValueError(f"{path} has no usable key for {', '.join(algorithms)}")
    return keys


def _static_key(table, name: str, key, algorithms: list[str]):
    """``key`` (a secret or a public key) if every configured algorithm can use it."""
    from jwt.algorithms import get_default_algorithms

    for alg in algorithms:
        algorithm = get_default_algorithms()[alg]
        try:
            problem = algorithm.check_key_length(algorithm.prepare_key(key))
        except Exception as exc:  # InvalidKeyError, TypeError: the wrong kind of key
            problem = f"{alg} cannot use this key ({exc})"
        if problem:
            raise table.error(name, problem)
    return lambda token: key


def make_jwt_auth(table, config) -> JwtAuth:
    import jwt  # with cryptography ~90 ms: paid only by servers that use jwt auth
    from cryptography.hazmat.primitives.serialization import load_pem_public_key
    from jwt.algorithms import get_default_algorithms

    algorithms = table.get_list("algorithms", str)
    secret = table.get("secret", str, default=None)
    public_key_file = table.path("public_key_file", config.base_dir, default=None)
    jwks_file = table.path("jwks_file", config.base_dir, default=None)
    audience = table.get("audience", (str, list), default=None)
    if isinstance(audience, list):
        audience = table.get_list("audience", str)
    issuer = table.get("issuer", str, default=None)
    leeway = table.get("leeway", float, default=30.0)
    project_claim = table.get("project_claim", str, default="project")
    required = table.get_list("required_claims", str, default=["exp"])
    realm = table.get("realm", str, default="runnel")
    table.finish()

    if audience == []:
        raise table.error("audience", "must not be empty")
    if not (math.isfinite(leeway) and leeway >= 0):
        raise table.error("leeway", f"must be a number of seconds >= 0, got {leeway}")
    if not project_claim:
        raise table.error("project_claim", "must not be empty")
    if not algorithms:
        raise table.error("algorithms", "must name at least one algorithm, e.g. [\"RS256\"]")
    known = [alg for alg in get_default_algorithms() if alg != "none"]
    for alg in algorithms:
        if alg.lower() == "none":
            raise table.error("algorithms", '"none" would accept unsigned tokens; it is never allowed')
        if alg not in known:
            raise table.error("algorithms", f"unknown algorithm {alg!r}; known: {', '.join(known)}")
    hmac = [alg for alg in algorithms if alg in HMAC_ALGORITHMS]
    if hmac and len(hmac) != len(algorithms):
        raise table.error("algorithms", "must not mix HS* with public-key algorithms: a public key would "
                                        "then be accepted as an HMAC secret (algorithm confusion)")
    sources = [name for name, value in (("secret", secret), ("public_key_file", public_key_file),
                                        ("jwks_file", jwks_file)) if value is not None]
    if len(sources) != 1:
        problem = "is missing" if not sources else f"is given {len(sources)} times ({', '.join(sources)})"
        raise table.error("", f"jwt auth needs exactly one key source: secret, public_key_file or jwks_file; "
                              f"it {problem}")
    if hmac and not secret:
        raise table.error("algorithms", f"HS* algorithms need 'secret', not {sources[0]!r}")
    if secret is not None:
        if not hmac:
            raise table.error("secret", "is only for HS* algorithms; use public_key_file or jwks_file")
        if len(secret.encode()) < 32:
            raise table.error("secret", f"must be at least 32 bytes long, got {len(secret.encode())}")
        key_for = _static_key(table, "secret", secret.encode(), algorithms)
    elif public_key_file is not None:
        try:
            with open(public_key_file, "rb") as file:
                public_key = load_pem_public_key(file.read())
        except OSError as exc:
            raise table.error("public_key_file", f"cannot read {public_key_file}: {exc.strerror}") from None
        except ValueError:
            raise table.error("public_key_file", f"{public_key_file} is not a PEM public key") from None
        key_for = _static_key(table, "public_key_file", public_key, algorithms)
    else:
        try:
            key_for = JwksKeys(jwks_file, algorithms)
        except OSError as exc:
            raise table.error("jwks_file", f"cannot read {jwks_file}: {exc.strerror}") from None
        except ValueError as exc:
            raise table.error("jwks_file", str(exc)) from None

    decode = functools.partial(
        jwt.decode,
        algorithms=list(algorithms),  # pinned: never taken from the token
        audience=audience,
        issuer=issuer,
        leeway=leeway,
        options={"require": list(dict.fromkeys(["exp", *required])), "enforce_minimum_key_length": True},
    )
    return JwtAuth(decode, key_for, jwt.PyJWTError, project_claim, realm)


@hookimpl
def runnel_register_auth_kinds(register):
    register("jwt", make_jwt_auth)
