"""The OpenAI Batch API end to end, with the official SDK: files uploaded, batches made,
polled and read back; bad input files failed with OpenAI's line-numbered errors; per-line
4xx answers in the error file; cancel; list pagination; owners; size limits; and a server
SIGKILLed mid-batch that, restarted, finishes it without running a recorded line again.
"""

from __future__ import annotations

import io
import textwrap

import openai
import orjson
import pytest
from openai import OpenAI

from runnel.testing import ServeProcess as Serve
from runnel.testing import request, wait_until

DONE = ("completed", "failed", "cancelled", "expired")


def client_for(server, key: str = "unused") -> OpenAI:
    return OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0)


def jsonl(lines: list[dict]) -> bytes:
    return b"".join(orjson.dumps(line) + b"\n" for line in lines)


def chat_line(custom_id: str, text: str = "hello there", model: str = "echo", **extra) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 4, **extra}}


def upload(client: OpenAI, data: bytes, name: str = "input.jsonl"):
    return client.files.create(file=(name, io.BytesIO(data)), purpose="batch")


def finished(client: OpenAI, batch_id: str, timeout: float = 30):
    return wait_until(lambda: (b := client.batches.retrieve(batch_id)).status in DONE and b, timeout=timeout,
                      interval=0.05)


def lines_of(client: OpenAI, file_id: str | None) -> list[dict]:
    if file_id is None:
        return []
    return [orjson.loads(line) for line in client.files.content(file_id).content.splitlines()]


@pytest.fixture
def server(start_server, tmp_path):
    return start_server({"server": {"runs_path": str(tmp_path / "runs.sqlite3"), "files_max_bytes": 200_000},
                         "apps": {"echo": {"backend": "echo"}}})


def test_chat_batch_with_the_sdk(server):
    client = client_for(server)
    lines = [chat_line(f"req-{n}", f"line number {n}") for n in range(40)]  # two shards
    uploaded = upload(client, jsonl(lines))
    assert (uploaded.object, uploaded.purpose, uploaded.bytes) == ("file", "batch", len(jsonl(lines)))
    assert client.files.retrieve(uploaded.id).filename == "input.jsonl"
    assert client.files.content(uploaded.id).content == jsonl(lines)

    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                  completion_window="24h", metadata={"job": "nightly"})
    assert batch.status == "validating" and batch.metadata == {"job": "nightly"}
    assert client.files.delete(uploaded.id).deleted  # as OpenAI allows: the batch keeps its lines
    batch = finished(client, batch.id)
    assert batch.status == "completed", batch
    assert batch.request_counts.model_dump() == {"total": 40, "completed": 40, "failed": 0}
    assert batch.error_file_id is None and batch.completed_at >= batch.in_progress_at >= batch.created_at
    assert batch.model == "echo"
    output = lines_of(client, batch.output_file_id)
    assert [line["custom_id"] for line in output] == [f"req-{n}" for n in range(40)]  # input order
    for line in output:
        assert line["error"] is None and line["id"].startswith("batch_req_")
        assert line["response"]["status_code"] == 200 and line["response"]["request_id"]
        body = line["response"]["body"]
        assert body["object"] == "chat.completion"
        assert body["choices"][0]["message"]["content"]  # echo's words
    assert client.files.retrieve(batch.output_file_id).purpose == "batch_output"


def test_completions_and_embeddings_lines(server):
    client = client_for(server)
    completions = [{"custom_id": f"c{n}", "method": "POST", "url": "/v1/completions",
                    "body": {"model": "echo", "prompt": "one two three", "max_tokens": 3}} for n in range(3)]
    embeddings = [{"custom_id": f"e{n}", "method": "POST", "url": "/v1/embeddings",
                   "body": {"model": "echo", "input": f"text {n}"}} for n in range(3)]
    for endpoint, lines, kind in (("/v1/completions", completions, "text_completion"),
                                  ("/v1/embeddings", embeddings, "list")):
        batch = client.batches.create(input_file_id=upload(client, jsonl(lines)).id, endpoint=endpoint,
                                      completion_window="24h")
        batch = finished(client, batch.id)
        assert batch.status == "completed" and batch.request_counts.completed == 3, batch
        output = lines_of(client, batch.output_file_id)
        assert [line["response"]["body"]["object"] for line in output] == [kind] * 3
    assert len(output[0]["response"]["body"]["data"][0]["embedding"]) > 0


def test_a_line_answered_4xx_goes_to_the_error_file(server):
    client = client_for(server)
    lines = [chat_line("good"), chat_line("bad", temperature=7), chat_line("unknown-field", bogus=1)]
    batch = client.batches.create(input_file_id=upload(client, jsonl(lines)).id, endpoint="/v1/chat/completions",
                                  completion_window="24h")
    batch = finished(client, batch.id)
    assert batch.status == "completed"
    assert batch.request_counts.model_dump() == {"total": 3, "completed": 1, "failed": 2}
    assert [line["custom_id"] for line in lines_of(client, batch.output_file_id)] == ["good"]
    errors = lines_of(client, batch.error_file_id)
    assert [line["custom_id"] for line in errors] == ["bad", "unknown-field"]
    for line in errors:
        assert line["response"]["status_code"] == 400 and line["error"] is None
        assert line["response"]["body"]["error"]["type"] == "invalid_request_error"
    assert errors[0]["response"]["body"]["error"]["param"] == "temperature"


@pytest.mark.parametrize("content,code,line,param", [
    (b'{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "echo"}}\n{not json\n',
     "invalid_json_line", 2, None),
    (jsonl([chat_line("a"), {**chat_line("b"), "url": "/v1/completions"}]), "invalid_url", 2, "url"),
    (jsonl([chat_line("a"), chat_line("b", model="other")]), "mismatched_model", 2, "body.model"),
    (jsonl([chat_line("a"), chat_line("b"), chat_line("a")]), "duplicate_custom_id", 3, "custom_id"),
    (jsonl([{**chat_line("a"), "method": "GET"}]), "invalid_method", 1, "method"),
    (b"\n\n", "empty_file", None, None),
])
def test_a_bad_input_file_fails_the_batch_with_line_numbers(server, content, code, line, param):
    client = client_for(server)
    batch = client.batches.create(input_file_id=upload(client, content).id, endpoint="/v1/chat/completions",
                                  completion_window="24h")
    batch = finished(client, batch.id)
    assert batch.status == "failed" and batch.failed_at is not None
    assert batch.output_file_id is None and batch.error_file_id is None
    [error] = batch.errors.data
    assert (error.code, error.line, error.param) == (code, line, param), error


def test_a_model_no_app_serves_fails_validation(server):
    client = client_for(server)
    batch = client.batches.create(input_file_id=upload(client, jsonl([chat_line("a", model="gpt-9")])).id,
                                  endpoint="/v1/chat/completions", completion_window="24h")
    batch = finished(client, batch.id)
    assert batch.status == "failed" and batch.errors.data[0].code == "model_not_found"


def test_create_refuses_bad_parameters(server):
    client = client_for(server)
    file_id = upload(client, jsonl([chat_line("a")])).id
    with pytest.raises(openai.BadRequestError) as caught:
        client.batches.create(input_file_id=file_id, endpoint="/v1/moderations", completion_window="24h")
    assert caught.value.body["param"] == "endpoint"
    with pytest.raises(openai.BadRequestError) as caught:
        client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="2d")
    assert caught.value.body["param"] == "completion_window"
    with pytest.raises(openai.NotFoundError):
        client.batches.create(input_file_id="file-" + "0" * 32, endpoint="/v1/chat/completions",
                              completion_window="24h")
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_" + "0" * 32)


def test_files_upload_limits_and_listing(server):
    client = client_for(server)
    with pytest.raises(openai.APIStatusError) as caught:
        upload(client, b"x" * 200_001)
    assert caught.value.status_code == 413
    with pytest.raises(openai.BadRequestError) as caught:
        client.files.create(file=("a.jsonl", io.BytesIO(b"{}\n")), purpose="fine-tune")
    assert caught.value.body["param"] == "purpose"
    reply = request(server.port, "POST", "/v1/files", headers=[("content-type", "application/json")], body=b"{}")
    assert reply.status == 400
    # A body far past the limit is refused from its Content-Length, before it is read.
    reply = request(server.port, "POST", "/v1/files", body=b"x" * 300_000,
                    headers=[("content-type", "multipart/form-data; boundary=x")])
    assert reply.status == 413
    ids = [upload(client, jsonl([chat_line(str(n))]), f"f{n}.jsonl").id for n in range(3)]
    listed = client.files.list(purpose="batch")
    assert [f.id for f in listed.data][:3] == ids[::-1]
    deleted = client.files.delete(ids[0])
    assert deleted.deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(ids[0])
    assert ids[0] not in [f.id for f in client.files.list().data]


def test_list_batches_paginates_as_openai(server):
    client = client_for(server)
    file_id = upload(client, jsonl([chat_line("a")])).id
    made = [client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions",
                                  completion_window="24h").id for _ in range(5)]
    first = client.batches.list(limit=2)
    assert [b.id for b in first.data] == made[::-1][:2] and first.has_more
    second = client.batches.list(limit=2, after=first.data[-1].id)
    assert [b.id for b in second.data] == made[::-1][2:4]
    assert [b.id for b in client.batches.list(limit=20)] == made[::-1]
    assert [b.id for b in client.batches.list(limit=2)] == made[::-1]  # the SDK follows has_more and after


def slow_batch(start_server, tmp_path, count: int, window: str):
    """A batch of ``count`` lines on a paced echo app, one line at a time: it takes seconds."""
    server = start_server({"server": {"runs_path": str(tmp_path / "runs.sqlite3"), "batch_concurrency": 1},
                           "apps": {"echo": {"backend": "echo", "pace_ms": 20}}})
    client = client_for(server)
    lines = [chat_line(f"r{n:03}", "a b c d e f g h", max_tokens=8) for n in range(count)]
    batch = client.batches.create(input_file_id=upload(client, jsonl(lines)).id, endpoint="/v1/chat/completions",
                                  completion_window=window)
    return client, batch


def test_cancel_keeps_what_finished(start_server, tmp_path):
    client, batch = slow_batch(start_server, tmp_path, 60, "24h")
    wait_until(lambda: client.batches.retrieve(batch.id).request_counts.completed > 0, timeout=30, interval=0.05)
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status == "cancelling" and cancelling.cancelling_at is not None
    batch = finished(client, batch.id)
    assert batch.status == "cancelled" and batch.cancelled_at is not None
    output = lines_of(client, batch.output_file_id)
    assert 0 < batch.request_counts.completed == len(output) < 60
    custom_ids = [line["custom_id"] for line in output]
    assert custom_ids == sorted(custom_ids)  # in input order
    with pytest.raises(openai.ConflictError):
        client.batches.cancel(batch.id)


def test_an_elapsed_completion_window_expires_the_batch(start_server, tmp_path):
    client, batch = slow_batch(start_server, tmp_path, 200, "2s")
    batch = finished(client, batch.id)
    assert batch.status == "expired" and batch.expired_at is not None
    assert 0 < batch.request_counts.completed < 200
    assert len(lines_of(client, batch.output_file_id)) == batch.request_counts.completed


def test_another_principal_gets_404(start_server, tmp_path):
    server = start_server({"server": {"runs_path": str(tmp_path / "runs.sqlite3")},
                           "auth": {"kind": "api_key", "keys": ["first-key-0001", "second-key-002"]},
                           "apps": {"echo": {"backend": "echo"}}})
    owner, other = client_for(server, "first-key-0001"), client_for(server, "second-key-002")
    uploaded = upload(owner, jsonl([chat_line("a")]))
    batch = owner.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    for call in (lambda: other.files.retrieve(uploaded.id), lambda: other.files.content(uploaded.id),
                 lambda: other.files.delete(uploaded.id), lambda: other.batches.retrieve(batch.id),
                 lambda: other.batches.cancel(batch.id),
                 lambda: other.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                              completion_window="24h")):
        with pytest.raises(openai.NotFoundError):
            call()
    assert other.files.list().data == [] and other.batches.list().data == []
    batch = finished(owner, batch.id)
    assert batch.status == "completed"
    with pytest.raises(openai.NotFoundError):
        other.files.content(batch.output_file_id)


def test_sigkill_mid_batch_resumes_without_redoing_recorded_lines(tmp_path):
    config = tmp_path / "runnel.toml"
    config.write_text(textwrap.dedent(f"""
        [server]
        runs_path = "{tmp_path / 'runs.sqlite3'}"
        batch_concurrency = 1

        [apps.echo]
        backend = "echo"
        pace_ms = 15
    """))
    lines = [chat_line(f"r{n:03}", "a b c d e f g h", max_tokens=6) for n in range(64)]
    servers = []
    try:
        first = Serve(tmp_path, config, "first")
        servers.append(first)
        wait_until(first.ready, timeout=30)
        client = OpenAI(base_url=f"http://127.0.0.1:{first.port}/v1", api_key="unused", max_retries=0)
        batch = client.batches.create(input_file_id=upload(client, jsonl(lines)).id,
                                      endpoint="/v1/chat/completions", completion_window="24h")
        results = tmp_path / "runs-files" / "batches" / batch.id
        recorded = lambda: sum(p.read_bytes().count(b"\n") for p in results.glob("[0-9]*.jsonl"))  # noqa: E731
        wait_until(lambda: recorded() >= 36, timeout=30, interval=0.02)  # into the second shard (of 32 lines)
        first.kill()
        before = {orjson.loads(line)["custom_id"]: orjson.loads(line)["id"]
                  for path in results.glob("[0-9]*.jsonl") for line in path.read_bytes().splitlines()
                  if line.endswith(b"}")}
        assert 36 <= len(before) < 64

        second = Serve(tmp_path, config, "second")
        servers.append(second)
        wait_until(second.ready, timeout=30)
        client = OpenAI(base_url=f"http://127.0.0.1:{second.port}/v1", api_key="unused", max_retries=0)
        batch = finished(client, batch.id, timeout=60)
        assert batch.status == "completed", batch
        assert batch.request_counts.model_dump() == {"total": 64, "completed": 64, "failed": 0}
        output = lines_of(client, batch.output_file_id)
        assert [line["custom_id"] for line in output] == [f"r{n:03}" for n in range(64)]
        # Each recorded line kept its result (its id), made once, before the kill.
        after = {line["custom_id"]: line["id"] for line in output}
        assert all(after[custom_id] == result_id for custom_id, result_id in before.items())
    finally:
        for serve in servers:
            serve.kill()


def shards_finished(server) -> float:
    """Shard runs this server executed to the end (its runs metric for the app)."""
    metrics = request(server.port, "GET", "/metrics").body.decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
               if line.startswith('runnel_runs_finished_total{app="echo",state="succeeded"}'))


def test_runs_on_redis_spread_a_batch_over_servers(start_server, tmp_path, redis_url):
    config = {"server": {"runs": redis_url, "files_path": str(tmp_path / "shared"), "metrics_public": True},
              "apps": {"echo": {"backend": "echo", "pace_ms": 5}}}
    first, second = start_server(config), start_server(config)
    client = client_for(first)
    lines = [chat_line(f"r{n:03}", "a b c d", max_tokens=4) for n in range(32 * 6)]  # six shards
    batch = client.batches.create(input_file_id=upload(client, jsonl(lines)).id, endpoint="/v1/chat/completions",
                                  completion_window="24h")
    batch = finished(client_for(second), batch.id, timeout=60)  # any server answers for it
    assert batch.status == "completed" and batch.request_counts.completed == 32 * 6, batch
    assert [line["custom_id"] for line in lines_of(client_for(second), batch.output_file_id)] == [
        f"r{n:03}" for n in range(32 * 6)]
    assert shards_finished(first) + shards_finished(second) == 6
    assert shards_finished(first) >= 1 and shards_finished(second) >= 1, "both servers took shards"


def test_at_most_batch_concurrency_lines_run_at_once(start_server, tmp_path):
    server = start_server({"server": {"runs_path": str(tmp_path / "runs.sqlite3"), "batch_concurrency": 2},
                           "apps": {"echo": {"backend": "echo", "pace_ms": 5}}})
    client = client_for(server)
    lines = [chat_line(f"r{n:03}", "a b c d e f", max_tokens=6) for n in range(64)]  # two shards
    batch = client.batches.create(input_file_id=upload(client, jsonl(lines)).id, endpoint="/v1/chat/completions",
                                  completion_window="24h")
    seen = set()
    while client.batches.retrieve(batch.id).status not in DONE:
        seen.add(request(server.port, "GET", "/stats").json()["apps"]["echo"]["generating"])
    assert max(seen) <= 2 and 2 in seen, seen
    assert finished(client, batch.id).request_counts.completed == 64


def test_a_large_file_is_streamed_back_whole(start_server, tmp_path):
    server = start_server({"server": {"runs_path": str(tmp_path / "runs.sqlite3"), "max_body_bytes": 65536},
                           "apps": {"echo": {"backend": "echo"}}})
    client = client_for(server)
    content = jsonl([chat_line(f"r{n:05}", "word " * 40) for n in range(3000)])  # ~1 MB, past max_body_bytes
    assert len(content) > 900_000
    uploaded = upload(client, content)
    assert uploaded.bytes == len(content)
    assert client.files.content(uploaded.id).content == content
