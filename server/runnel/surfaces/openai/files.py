"""Files, as OpenAI's /v1/files: JSONL uploaded for the Batch API, and the output and error
files batches write (``runnel.surfaces.openai.batches``).

A file is two entries in ``<files dir>/files/``: ``<id>.jsonl``, its content, and ``<id>.json``,
its object (OpenAI's shape) with the principal that owns it: no one else sees it (404, as an
unknown id). Both are written whole under a temporary name and renamed into place, the
content before the object, so a file that is listed is whole. Every read and write of them is
off the event loop. The directory is ``[server] files_path``, by default next to the SQLite run
store (``files_dir``); servers sharing runs through Redis must share it too (a shared mount).

An upload (multipart/form-data, as the SDKs send it) is streamed to disk as it arrives, never
held whole in memory; past ``[server] files_max_bytes`` it is refused with 413.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import tempfile
import time
import uuid
from typing import Any

import orjson

from ...errors import HTTPError
from ...http.response import Response, json_response
from ...runs import default_runs_path
from ...serializers import NDJSON
from .params import invalid

__all__ = ["FileStore", "FilesAPI", "files_dir"]

PURPOSES = ("batch",)  # what may be uploaded; batches make "batch_output" files themselves
FIELD_LIMIT = 1024  # bytes of a form field other than the file (purpose)
HEAD_LIMIT = 16384  # bytes of a part's headers
MULTIPART_OVERHEAD = 65536  # a form's bytes besides the file: what the body limit allows on top of it
WRITE_CHUNK = 1 << 20  # an upload reaches the disk in pieces this big, each on a worker thread
READ_CHUNK = 1 << 18  # a download leaves the disk in pieces this big
_ID = re.compile(r"file-[0-9a-f]{32}")
_BOUNDARY = re.compile(rb'boundary=(?:"([^"]{1,70})"|([^\s;]{1,70}))', re.IGNORECASE)
_DISPOSITION_PARAM = re.compile(rb'(name|filename)="([^"]*)"', re.IGNORECASE)
NDJSON_FRAMING = NDJSON()


def files_dir(config) -> str | None:
    """Where files are kept: ``[server] files_path``, else ``<run store>-files`` next to the
    SQLite run store's file (the per-user default one when ``runs_path`` is unset); None
    when runs are kept in memory (``runs_path = ""``): files then live in a temporary
    directory and go with the process, as those runs do."""
    settings = config.server
    if settings.files_path:
        return os.path.abspath(os.path.expanduser(settings.files_path))
    if settings.runs_path == "" and settings.runs is None:
        return None
    base = default_runs_path(config) if not settings.runs_path else os.path.abspath(
        os.path.expanduser(settings.runs_path))
    return os.path.splitext(base)[0] + "-files"


class FileStore:
    """The files on disk, each owned by a principal. Every method does its I/O on a worker thread."""

    def __init__(self, directory: str | None) -> None:
        self._root = directory  # None: a temporary directory, made on first use
        self._temporary: str | None = None

    @property
    def made(self) -> bool:
        """Whether the directory may hold anything (a temporary one is made on first use)."""
        return self._root is not None

    @property
    def root(self) -> str:
        if self._root is None:
            self._root = self._temporary = tempfile.mkdtemp(prefix="runnel-files-")
        return self._root

    def close(self) -> None:
        if self._temporary is not None:
            shutil.rmtree(self._temporary, ignore_errors=True)

    def path(self, file_id: str) -> str:
        return os.path.join(self.root, "files", f"{file_id}.jsonl")

    def _object_path(self, file_id: str) -> str:
        return os.path.join(self.root, "files", f"{file_id}.json")

    def new_temp(self) -> str:
        """A fresh path to write a file's content to before ``adopt``."""
        return os.path.join(self.root, "tmp", uuid.uuid4().hex)

    @staticmethod
    def open_temp(path: str):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return open(path, "wb")  # noqa: SIM115 (the caller closes it, on a worker thread)

    async def adopt(self, temp: str, *, principal: str, filename: str, purpose: str,
                    file_id: str | None = None) -> dict[str, Any]:
        """Make the content written at ``temp`` a file of ``principal``'s (``file_id``: that
        one, replaced if it exists; else a new id); its object."""
        file_id = file_id or "file-" + uuid.uuid4().hex
        return await asyncio.to_thread(self._adopt, temp, file_id, principal, filename, purpose)

    def _adopt(self, temp: str, file_id: str, principal: str, filename: str, purpose: str) -> dict[str, Any]:
        os.makedirs(os.path.join(self.root, "files"), exist_ok=True)
        size = os.path.getsize(temp)
        os.replace(temp, self.path(file_id))
        record = {"id": file_id, "object": "file", "bytes": size, "created_at": int(time.time()),
                  "filename": filename, "purpose": purpose, "status": "processed", "status_details": None,
                  "expires_at": None, "principal": principal, "_created": time.time()}
        write_atomically(self._object_path(file_id), orjson.dumps(record))
        return record

    async def get(self, file_id: str, principal: str) -> dict[str, Any] | None:
        """The file's record (its object and ``principal``) if ``principal`` owns it, else None."""
        if not _ID.fullmatch(file_id):
            return None
        record = await asyncio.to_thread(read_json, self._object_path(file_id))
        return record if record is not None and record.get("principal") == principal else None

    async def owned_by(self, principal: str) -> list[dict[str, Any]]:
        """``principal``'s files, newest first."""
        return await asyncio.to_thread(self._owned_by, principal)

    def _owned_by(self, principal: str) -> list[dict[str, Any]]:
        directory = os.path.join(self.root, "files")
        try:
            names = os.listdir(directory)
        except FileNotFoundError:
            return []
        records = []
        for name in names:
            if name.endswith(".json"):
                record = read_json(os.path.join(directory, name))
                if record is not None and record.get("principal") == principal:
                    records.append(record)
        records.sort(key=lambda record: record["_created"], reverse=True)
        return records

    async def delete(self, file_id: str) -> None:
        def delete() -> None:
            for path in (self._object_path(file_id), self.path(file_id)):  # the object first: unlisted at once
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
        await asyncio.to_thread(delete)


def public(record: dict[str, Any]) -> dict[str, Any]:
    """A file's object as OpenAI shows it (without its owner, or its creation time to the microsecond)."""
    return {key: value for key, value in record.items() if key != "principal" and key[0] != "_"}


def read_json(path: str) -> Any:
    try:
        with open(path, "rb") as f:
            return orjson.loads(f.read())
    except (FileNotFoundError, orjson.JSONDecodeError):
        return None


def write_atomically(path: str, data: bytes) -> None:
    """``data`` at ``path``, whole or not at all (a reader never sees half of it)."""
    temp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
    with open(temp, "wb") as f:
        f.write(data)
    os.replace(temp, path)


class FilesAPI:
    def __init__(self, store: FileStore, max_bytes: int) -> None:
        self.store = store
        self.max_bytes = max_bytes

    async def create(self, request) -> Response:
        content_type = request.header(b"content-type", b"")
        match = _BOUNDARY.search(content_type) if content_type.lower().startswith(b"multipart/form-data") else None
        if match is None:
            raise invalid(None, "Upload a file as multipart/form-data, with the fields 'file' and 'purpose'.",
                          "invalid_content_type")
        temp = self.store.new_temp()
        try:
            form = await receive_form(request.stream_body(), match[1] or match[2], temp, self.max_bytes)
            purpose = form.fields.get("purpose")
            if purpose is None:
                raise invalid("purpose", "Missing required parameter: 'purpose'.", "missing_required_parameter")
            if purpose not in PURPOSES:
                raise invalid("purpose", f"'{purpose}' is not supported: this server takes files for "
                              f"{', '.join(repr(p) for p in PURPOSES)}.")
            if form.filename is None:
                raise invalid("file", "Missing required parameter: 'file'.", "missing_required_parameter")
            record = await self.store.adopt(temp, principal=request.principal.identity, filename=form.filename,
                                            purpose=purpose)
        finally:
            await asyncio.to_thread(unlink_quietly, temp)  # gone already when adopted
        return json_response(public(record))

    async def index(self, request) -> Response:
        purpose = request.query_param("purpose")
        order = request.query_param("order", "desc")
        if order not in ("asc", "desc"):
            raise invalid("order", f"'{order}' is not one of 'asc', 'desc'.")
        limit = page_limit(request, default=10000, most=10000)
        records = await self.store.owned_by(request.principal.identity)
        if purpose is not None:
            records = [record for record in records if record["purpose"] == purpose]
        if order == "asc":
            records.reverse()
        return json_response(page([public(record) for record in records], request.query_param("after"), limit))

    async def _find(self, request) -> dict[str, Any]:
        file_id = request.path_params["file_id"]
        record = await self.store.get(file_id, request.principal.identity)
        if record is None:
            raise HTTPError(404, f"No such File object: {file_id}", type="invalid_request_error", param="id")
        return record

    async def retrieve(self, request) -> Response:
        return json_response(public(await self._find(request)))

    async def delete(self, request) -> Response:
        record = await self._find(request)
        await self.store.delete(record["id"])
        return json_response({"id": record["id"], "object": "file", "deleted": True})

    async def content(self, request) -> Response | None:
        record = await self._find(request)
        path = self.store.path(record["id"])
        try:
            source = await asyncio.to_thread(open, path, "rb")
        except FileNotFoundError:  # deleted meanwhile
            raise HTTPError(404, f"No such File object: {record['id']}", type="invalid_request_error",
                            param="id") from None
        try:
            if record["bytes"] <= READ_CHUNK:
                return Response(200, await asyncio.to_thread(source.read), media_type=b"application/octet-stream")
            stream = request.stream(serializer=NDJSON_FRAMING, media_type=b"application/octet-stream")
            while data := await asyncio.to_thread(source.read, READ_CHUNK):
                if stream.closed:
                    break
                stream.write(data)
                await stream.drain()
            stream.end()
            return None
        finally:
            await asyncio.to_thread(source.close)


def page_limit(request, *, default: int, most: int) -> int:
    raw = request.query_param("limit")
    if raw is None:
        return default
    try:
        limit = int(raw)
    except ValueError:
        limit = 0
    if not 1 <= limit <= most:
        raise invalid("limit", f"'limit' must be an integer from 1 to {most}.")
    return limit


def page(items: list[dict[str, Any]], after: str | None, limit: int) -> dict[str, Any]:
    """OpenAI's list object: ``limit`` items following the one whose id is ``after``."""
    start = 0
    if after is not None:
        start = next((index + 1 for index, item in enumerate(items) if item["id"] == after), len(items))
    data = items[start:start + limit]
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": start + limit < len(items)}


def unlink_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


class Form:
    __slots__ = ("fields", "filename", "size")

    def __init__(self) -> None:
        self.fields: dict[str, str] = {}
        self.filename: str | None = None  # of the 'file' part, once it came
        self.size = 0


async def receive_form(body, boundary: bytes, temp: str, max_bytes: int) -> Form:
    """Read a multipart/form-data body as it arrives: its 'file' part streamed to ``temp``
    (written in pieces on a worker thread), its other fields kept (small). 400 for a body
    that is not such a form, 413 for a file over ``max_bytes``."""
    form = Form()
    delimiter = b"\r\n--" + boundary
    buffer = b"\r\n"  # the first boundary has no CRLF before it: lend it one
    state = "preamble"
    name: str | None = None
    value = bytearray()
    pending: list[bytes] = []  # the file's bytes not yet written
    pending_size = 0
    out = None
    try:
        async for chunk in body:
            buffer += chunk
            while True:
                if state == "preamble" or state == "between":
                    at = buffer.find(delimiter) if state == "preamble" else 0
                    if at < 0 or len(buffer) < at + len(delimiter) + 2:
                        if state == "preamble" and len(buffer) > HEAD_LIMIT:
                            raise _bad_form("no boundary")
                        break
                    after = buffer[at + len(delimiter):at + len(delimiter) + 2]
                    buffer = buffer[at + len(delimiter) + 2:]
                    if after == b"--":
                        state = "end"
                        break
                    if after != b"\r\n":
                        raise _bad_form("a boundary is not followed by CRLF")
                    state = "head"
                if state == "head":
                    end = buffer.find(b"\r\n\r\n")
                    if end < 0:
                        if len(buffer) > HEAD_LIMIT:
                            raise _bad_form("part headers too long")
                        break
                    name, filename = _disposition(buffer[:end])
                    buffer = buffer[end + 4:]
                    value.clear()
                    if name == "file":
                        if filename is None:
                            raise invalid("file", "The 'file' field must be a file (with a filename).")
                        form.filename = filename
                        if out is None:
                            out = await asyncio.to_thread(FileStore.open_temp, temp)
                    state = "part"
                if state == "part":
                    at = buffer.find(delimiter)
                    data = buffer if at < 0 else buffer[:at]
                    if at < 0:  # keep what may be the start of a delimiter
                        data = buffer[:max(0, len(buffer) - len(delimiter))]
                    if name == "file":
                        form.size += len(data)
                        if form.size > max_bytes:
                            raise HTTPError(413, f"The file is larger than the limit of {max_bytes} bytes.",
                                            type="invalid_request_error", param="file", code="file_too_large")
                        pending.append(data)
                        pending_size += len(data)
                        if pending_size >= WRITE_CHUNK:
                            await asyncio.to_thread(out.write, b"".join(pending))  # type: ignore[union-attr]
                            pending, pending_size = [], 0
                    else:
                        value += data
                        if len(value) > FIELD_LIMIT:
                            raise _bad_form(f"the field '{name}' is too long")
                    buffer = buffer[len(data):]
                    if at < 0:
                        break
                    if name != "file" and name is not None:
                        form.fields[name] = value.decode("utf-8", "replace")
                    state = "between"
            if state == "end":
                break
        if state != "end":
            raise _bad_form("the body ended before its closing boundary")
        if out is not None and pending:
            await asyncio.to_thread(out.write, b"".join(pending))
    finally:
        if out is not None:
            await asyncio.to_thread(out.close)
    return form


def _disposition(head: bytes) -> tuple[str | None, str | None]:
    for line in head.split(b"\r\n"):
        key, _, rest = line.partition(b":")
        if key.strip().lower() == b"content-disposition":
            params = {k.lower(): v for k, v in _DISPOSITION_PARAM.findall(rest)}
            name = params.get(b"name")
            filename = params.get(b"filename")
            return (None if name is None else name.decode("utf-8", "replace"),
                    None if filename is None else filename.decode("utf-8", "replace"))
    raise _bad_form("a part has no Content-Disposition")


def _bad_form(why: str) -> HTTPError:
    return invalid(None, f"The body is not a valid multipart/form-data form: {why}.", "invalid_multipart")
