"""The multipart/form-data reader of uploads (runnel.surfaces.openai.files.receive_form): the
file streamed to disk however the body is cut into pieces, fields kept, and a hostile or
broken form refused with 400 (413 for a file past the limit)."""

from __future__ import annotations

import asyncio

import pytest

from runnel.errors import HTTPError
from runnel.surfaces.openai.files import receive_form

BOUNDARY = b"----runnelBoundary7MA4YWxk"
CONTENT = b'{"custom_id": "a"}\r\n--not-the-boundary\r\n' + bytes(range(256)) * 3


def form(content: bytes = CONTENT, boundary: bytes = BOUNDARY) -> bytes:
    return (b"--" + boundary + b"\r\n"
            b'Content-Disposition: form-data; name="purpose"\r\n\r\n'
            b"batch\r\n"
            b"--" + boundary + b"\r\n"
            b'Content-Disposition: form-data; name="file"; filename="in.jsonl"\r\n'
            b"Content-Type: application/octet-stream\r\n\r\n" + content + b"\r\n"
            b"--" + boundary + b"--\r\n")


async def pieces(body: bytes, size: int):
    for start in range(0, len(body), size):
        yield body[start:start + size]


def receive(body: bytes, tmp_path, size: int = 1 << 16, max_bytes: int = 1 << 20, boundary: bytes = BOUNDARY):
    target = tmp_path / "upload"
    result = asyncio.run(receive_form(pieces(body, size), boundary, str(target), max_bytes))
    return result, target


@pytest.mark.parametrize("size", [1, 2, 3, 7, 29, 64, 1000, 1 << 16])
def test_the_file_arrives_whole_however_the_body_is_cut(tmp_path, size):
    result, target = receive(form(), tmp_path, size)
    assert result.fields == {"purpose": "batch"} and result.filename == "in.jsonl"
    assert target.read_bytes() == CONTENT and result.size == len(CONTENT)


def test_a_file_past_the_limit_is_413(tmp_path):
    with pytest.raises(HTTPError) as caught:
        receive(form(b"x" * 5000), tmp_path, size=100, max_bytes=4999)
    assert caught.value.status == 413
    assert receive(form(b"x" * 5000), tmp_path, max_bytes=5000)[0].size == 5000


@pytest.mark.parametrize("body", [
    b"",  # nothing
    b"no boundary at all" * 2000,  # a preamble that never ends
    form()[:-20],  # cut before the closing boundary
    form().replace(b"Content-Disposition", b"Content-Whatever"),  # a part with no name
    (b"--" + BOUNDARY + b"\r\nContent-Disposition: form-data; name=\"x\"\r\n" + b"h" * 20000),  # endless head
    (b"--" + BOUNDARY + b"\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\n" + b"p" * 5000
     + b"\r\n--" + BOUNDARY + b"--\r\n"),  # a field too long to keep
    form().replace(b"--" + BOUNDARY + b"\r\nContent-Disposition: form-data; name=\"purpose\"",
                   b"--" + BOUNDARY + b"XXContent-Disposition: form-data; name=\"purpose\""),
])
def test_a_broken_form_is_400(tmp_path, body):
    with pytest.raises(HTTPError) as caught:
        receive(body, tmp_path, size=7)
    assert caught.value.status == 400


def test_a_file_field_without_a_filename_is_400(tmp_path):
    body = form().replace(b'; filename="in.jsonl"', b"")
    with pytest.raises(HTTPError) as caught:
        receive(body, tmp_path)
    assert (caught.value.status, caught.value.param) == (400, "file")
