"""The one exception type that carries an HTTP error to the client."""

from __future__ import annotations

from http import HTTPStatus

_DEFAULT_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    431: "invalid_request_error",
}


class HTTPError(Exception):
    """Raise anywhere below dispatch to answer with this status and an error body.

    The fields follow OpenAI's error envelope, the shape most clients already parse:
    ``{"error": {"message", "type", "param", "code"}}``. A surface may render them
    in its own shape (see ``Router.add(..., errors=...)``).
    """

    def __init__(
        self,
        status: int,
        message: str | None = None,
        *,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        headers: tuple[tuple[bytes, bytes], ...] = (),
    ) -> None:
        self.status = status
        self.message = message or HTTPStatus(status).phrase
        self.type = type or _DEFAULT_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
        self.param = param
        self.code = code
        self.headers = headers
        super().__init__(self.message)

    def to_dict(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
