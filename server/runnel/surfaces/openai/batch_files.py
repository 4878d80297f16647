"""A batch's files, read and written on worker threads (never on the event loop): its input
checked line by line (OpenAI's ``errors``, with line numbers) and cut into shards, each
shard's results appended line by line as they come, and the output and error files made
from them in input order.

A shard's results file holds OpenAI's output lines (``{"id", "custom_id", "response":
{"status_code", "request_id", "body"}, "error"}``), each appended whole with one write
before its line counts as done: a process killed mid-shard leaves at most a torn last
line, dropped when the file is read again, so a line recorded is never executed again.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import orjson

__all__ = ["Shard", "Checked", "check_input", "read_lines", "recorded", "assemble", "is_success"]

SHARD_LINES = 32  # lines per shard (one run): small enough to spread, few enough not to flood the queue
MAX_ERRORS = 100  # errors listed for a bad input file; the first ones, by line


@dataclass(slots=True)
class Shard:
    start: int  # byte offsets of its lines in the input file
    end: int
    first_line: int  # 1-based number of its first line
    lines: int

    def as_list(self) -> list[int]:
        return [self.start, self.end, self.first_line, self.lines]


@dataclass(slots=True)
class Checked:
    model: str | None = None
    total: int = 0
    shards: list[Shard] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)


def _error(code: str, message: str, line: int | None, param: str | None = None) -> dict[str, Any]:
    return {"code": code, "message": message, "param": param, "line": line}


def check_input(path: str, endpoint: str, max_lines: int) -> Checked:
    """Every line of the input file checked as OpenAI does before a batch starts: valid JSON,
    a unique string ``custom_id``, ``method`` POST, ``url`` the batch's endpoint, a ``body``
    object naming the same ``model`` as every other line; at most ``max_lines`` of them."""
    checked = Checked()
    seen: set[str] = set()
    shard: Shard | None = None
    offset = 0
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            start, offset = offset, offset + len(raw)
            if not raw.strip():
                continue
            checked.total += 1
            if len(checked.errors) < MAX_ERRORS:
                problem = _check_line(raw, number, endpoint, seen, checked)
                if problem is not None:
                    checked.errors.append(problem)
            if shard is None or shard.lines == SHARD_LINES:
                shard = Shard(start, offset, number, 0)
                checked.shards.append(shard)
            shard.end = offset
            shard.lines += 1
    if checked.total == 0:
        checked.errors.append(_error("empty_file", "The input file has no requests.", None))
    elif checked.total > max_lines:
        checked.errors.insert(0, _error("too_many_requests", f"The input file has {checked.total} requests; a "
                                        f"batch takes at most {max_lines}.", None))
    return checked


def _check_line(raw: bytes, number: int, endpoint: str, seen: set[str], checked: Checked) -> dict | None:
    try:
        line = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return _error("invalid_json_line", "This line is not parseable as valid JSON.", number)
    if type(line) is not dict:
        return _error("invalid_json_line", "This line is not a JSON object.", number)
    custom_id = line.get("custom_id")
    if type(custom_id) is not str or not custom_id:
        return _error("missing_required_parameter", "Each line needs a 'custom_id' string.", number, "custom_id")
    if custom_id in seen:
        return _error("duplicate_custom_id", f"The custom_id '{custom_id}' is used by an earlier line; each "
                      "line's must be unique.", number, "custom_id")
    seen.add(custom_id)
    if line.get("method") != "POST":
        return _error("invalid_method", "'method' must be 'POST'.", number, "method")
    if line.get("url") != endpoint:
        return _error("invalid_url", f"The line's url {line.get('url')!r} is not the batch's endpoint "
                      f"'{endpoint}'.", number, "url")
    body = line.get("body")
    if type(body) is not dict:
        return _error("invalid_request", "'body' must be a JSON object.", number, "body")
    model = body.get("model")
    if type(model) is not str:
        return _error("missing_required_parameter", "The body needs a 'model' string.", number, "body.model")
    if checked.model is None:
        checked.model = model
    elif model != checked.model:
        return _error("mismatched_model", f"The model '{model}' differs from the batch's '{checked.model}': every "
                      "line of a batch must name the same model.", number, "body.model")
    return None


def read_lines(path: str, start: int, end: int) -> list[dict[str, Any]]:
    """A shard's lines (checked already), parsed."""
    with open(path, "rb") as f:
        f.seek(start)
        data = f.read(end - start)
    return [orjson.loads(raw) for raw in data.splitlines() if raw.strip()]


def recorded(path: str, *, repair: bool = False) -> dict[str, bytes]:
    """The results a shard recorded so far, by custom_id, without a last line not yet whole
    (being written, or torn: the process died writing it). ``repair``: cut a torn line off
    the file, so the next append starts a whole line; only for the shard's one writer,
    before it writes."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return {}
    results: dict[str, bytes] = {}
    whole = data.rfind(b"\n") + 1
    for raw in data[:whole].splitlines():
        results[orjson.loads(raw)["custom_id"]] = raw
    if repair and whole < len(data):
        os.truncate(path, whole)
    return results


def is_success(line: bytes) -> bool:
    result = orjson.loads(line)
    response = result.get("response")
    return result.get("error") is None and response is not None and 200 <= response["status_code"] < 300


def assemble(input_path: str, shards: list[list[int]], results_dir: str, output, errors) -> tuple[int, int]:
    """Write every recorded result, in input order, to ``output`` (successes) or ``errors``
    (the rest): open binary files. (completed, failed)."""
    completed = failed = 0
    for index, (start, end, _first, _count) in enumerate(shards):
        results = recorded(os.path.join(results_dir, f"{index}.jsonl"))
        if not results:
            continue
        for line in read_lines(input_path, start, end):
            raw = results.get(line["custom_id"])
            if raw is None:
                continue
            if is_success(raw):
                output.write(raw + b"\n")
                completed += 1
            else:
                errors.write(raw + b"\n")
                failed += 1
    return completed, failed
