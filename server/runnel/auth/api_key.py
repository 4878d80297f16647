"""Built-in plugin: the ``api_key`` authentication kind."""

from __future__ import annotations

import hashlib
import hmac

from ..errors import HTTPError
from ..hookspecs import hookimpl
from . import Principal, bearer_token


class ApiKeyAuth:
    """``kind = "api_key"``: ``Authorization: Bearer <key>`` (or ``x-api-key: <key>``, as
    Anthropic's clients send it) must be one of the keys.

    Keys are kept only as SHA-256 digests and every digest is compared in
    constant time, so neither a key nor which one matched leaks through timing.
    """

    def __init__(self, keys: list[str], realm: str) -> None:
        self._digests = [hashlib.sha256(key.encode()).digest() for key in keys]
        self._challenge = ((b"www-authenticate", f'Bearer realm="{realm}"'.encode()),)

    @hookimpl
    def runnel_authenticate(self, request, route):
        token = bearer_token(request) or request.header(b"x-api-key")
        if token is None:
            raise HTTPError(401, "Missing API key: send 'Authorization: Bearer <key>'",
                            code="invalid_api_key", headers=self._challenge)
        digest = hashlib.sha256(token).digest()
        matched = None
        for index, known in enumerate(self._digests):
            if hmac.compare_digest(digest, known):
                matched = index
        if matched is None:
            raise HTTPError(401, "Invalid API key", code="invalid_api_key", headers=self._challenge)
        digest = self._digests[matched]
        # The identity is longer than the subject (shown in logs): two keys must never share one.
        return Principal(f"key:{digest[:4].hex()}", "api_key", identity=f"key:{digest[:8].hex()}")


def _read_keys_file(path: str, table) -> list[str]:
    try:
        with open(path, encoding="utf-8") as file:
            lines = file.read().splitlines()
    except OSError as exc:
        raise table.error("keys_file", f"cannot read {path}: {exc.strerror}") from None
    keys = (line.split("#", 1)[0].strip() for line in lines)  # '#' starts a comment anywhere
    return [key for key in keys if key]


def make_api_key_auth(table, config) -> ApiKeyAuth:
    keys = table.get_list("keys", str, default=[])
    keys_file = table.path("keys_file", config.base_dir, default=None)
    realm = table.get("realm", str, default="runnel")
    table.finish()
    if keys_file is not None:
        keys = keys + _read_keys_file(keys_file, table)
    if not keys:
        raise table.error("keys", "api_key auth needs at least one key (in 'keys' or 'keys_file')")
    if any(len(key) < 8 for key in keys):
        raise table.error("keys", "every API key must be at least 8 characters long")
    return ApiKeyAuth(keys, realm)


@hookimpl
def runnel_register_auth_kinds(register):
    register("api_key", make_api_key_auth)
