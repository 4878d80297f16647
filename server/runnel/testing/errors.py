"""The OpenAI error envelope as tests expect it: ``{"error": {message, type, param, code}}``."""

from __future__ import annotations


def error_body(message: str, type_: str, code: str | None = None, param: str | None = None) -> dict:
    """The whole body of an error response, in the server's key order."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def assert_error(reply, status: int, param, code: str | None = None, type_: str = "invalid_request_error") -> dict:
    """``reply`` (any response with status, header() and json()) is this error; returns its "error"."""
    assert reply.status == status, reply.body
    assert reply.header(b"content-type") == b"application/json", reply.header(b"content-type")
    body = reply.json()
    assert list(body) == ["error"], body
    error = body["error"]
    assert sorted(error) == ["code", "message", "param", "type"], error
    assert type(error["message"]) is str and error["message"], error
    assert error["type"] == type_, error
    assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return error
