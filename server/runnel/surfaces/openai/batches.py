"""The OpenAI Batch API: /v1/batches, over files (``files.py``) and runs (``runnel.runs``).

A batch is a record on disk (``<files dir>/batches/<id>.json``, OpenAI's object plus what
drives it), and its lines run as **shards**: runs of ``SHARD_LINES`` lines each, of this
surface's ``ShardRuns`` view. Shards as runs, rather than the batch as one run, because a
run is what the runner makes durable, recovers after a crash and, with runs on Redis, hands
to whichever server has a free worker: a batch's shards spread over servers by themselves.
At most ``OUTSTANDING`` shards of a batch are queued or running at once, so a batch of
50,000 lines never fills ``runs_max_queued``.

A shard appends each line's result to its own file as it comes (``batch_files``); a shard
run that dies with its server fails ``interrupted`` and is submitted again, and skips the
lines already recorded. So a line recorded is executed once, and a line in flight when the
process died is executed again (the Batch API promises no more).

One driver per batch moves it through OpenAI's statuses (validating -> in_progress ->
finalizing -> completed; failed for a bad input file; cancelling -> cancelled;
expired once ``completion_window`` has passed, with what finished kept): it holds an
exclusive lock on ``<id>.lock`` while it drives, so of several processes (restarts,
servers sharing the directory) one drives; the others find the lock taken and leave it.
Each server looks for batches nobody drives at start and every ``RESCAN`` seconds. A
cancel is a marker file (``<id>.cancel``), seen by the driver wherever it runs.

Batch lines are lower priority than live requests: at most ``[server] batch_concurrency``
lines execute at once per server, and a line starts only when its model has no row waiting
in its batcher (``batching_stats()["waiting_rows"]``, where the app has one).
"""

from __future__ import annotations

import asyncio
import fcntl
import functools
import hashlib
import logging
import os
import re
import shutil
import time
import uuid
from typing import Any

import orjson

from ...auth import Principal
from ...errors import HTTPError
from ...http.response import Response, json_response
from ...runs import CANCELLED, FAILED, SUCCEEDED, Run, RunView
from ...runs.idempotency import Idempotency
from . import batch_files
from .api import OpenAIAPI, can_embed, is_model_app
from .files import FileStore, page, page_limit, read_json, unlink_quietly, write_atomically
from .offline import ROUTES, call
from .params import invalid

logger = logging.getLogger("runnel.batches")

__all__ = ["BatchesAPI", "ShardRuns", "below_live_traffic"]

SURFACE = "batch"
OUTSTANDING = 2  # shards of one batch queued or running at once
RESCAN = 5.0  # seconds between looks for batches no process drives
POLL = 1.0  # seconds a driver waits on a shard before looking at its batch again
GATE_POLL = 0.01  # seconds a line waits while its model has interactive rows waiting
RETRY_STATUSES = (429, 503)  # a line refused for load is tried again, not recorded
RETRY_DELAY = 0.5
FINAL = ("completed", "failed", "cancelled", "expired")  # a batch's statuses nothing moves it out of
_ID = re.compile(r"batch_[0-9a-f]{32}")
_WINDOW = re.compile(r"([1-9][0-9]*)([smh])")
_UNITS = {"s": 1, "m": 60, "h": 3600}


def window_seconds(window: Any) -> int:
    """``completion_window``: OpenAI takes "24h" only; shorter ones ("90s", "30m", "2h") are
    taken here too, for tests and impatient clients."""
    match = _WINDOW.fullmatch(window) if type(window) is str else None
    seconds = int(match[1]) * _UNITS[match[2]] if match else 0
    if not 0 < seconds <= 86400:
        raise invalid("completion_window", "'completion_window' must be '24h' (or a shorter duration such as "
                      "'30m').")
    return seconds


class BatchRecords:
    """The batches on disk; every method does its I/O on a worker thread."""

    def __init__(self, files: FileStore) -> None:
        self.files = files

    @property
    def root(self) -> str:
        return os.path.join(self.files.root, "batches")

    def path(self, batch_id: str, suffix: str = ".json") -> str:
        return os.path.join(self.root, batch_id + suffix)

    def results_dir(self, batch_id: str) -> str:
        return os.path.join(self.root, batch_id)

    def input_path(self, batch_id: str) -> str:
        """The batch's own link to its input file's content: deleting the file (as OpenAI
        allows) leaves the batch its lines."""
        return os.path.join(self.results_dir(batch_id), "input.jsonl")

    async def keep_input(self, batch_id: str, source: str) -> None:
        def link() -> None:
            os.makedirs(self.results_dir(batch_id), exist_ok=True)
            try:
                os.link(source, self.input_path(batch_id))
            except FileExistsError:
                pass
            except OSError:  # a filesystem without hard links: a copy, then
                shutil.copyfile(source, self.input_path(batch_id))
        await asyncio.to_thread(link)

    async def load(self, batch_id: str) -> dict[str, Any] | None:
        def load():
            record = read_json(self.path(batch_id))
            if record is not None:
                record["_cancel_at"] = _mtime(self.path(batch_id, ".cancel"))
            return record
        return await asyncio.to_thread(load)

    async def save(self, record: dict[str, Any]) -> None:
        data = orjson.dumps({k: v for k, v in record.items() if k != "_cancel_at"})

        def save() -> None:
            os.makedirs(self.root, exist_ok=True)
            write_atomically(self.path(record["id"]), data)
        await asyncio.to_thread(save)

    async def owned_by(self, principal: str) -> list[dict[str, Any]]:
        """``principal``'s batches, newest first."""
        def owned_by() -> list[dict[str, Any]]:
            records = []
            for batch_id in self._ids():
                record = read_json(self.path(batch_id))
                if record is not None and record["_principal"] == principal:
                    record["_cancel_at"] = _mtime(self.path(batch_id, ".cancel"))
                    records.append(record)
            return sorted(records, key=lambda record: record["_created"], reverse=True)
        return await asyncio.to_thread(owned_by) if self.files.made else []

    def _ids(self) -> list[str]:
        try:
            return [name[:-5] for name in os.listdir(self.root) if name.endswith(".json")]
        except FileNotFoundError:
            return []

    async def ids(self) -> list[str]:
        if not self.files.made:
            return []  # no directory yet (a temporary one is made on first use): no batches
        return await asyncio.to_thread(self._ids)


def _mtime(path: str) -> int | None:
    try:
        return int(os.stat(path).st_mtime)
    except FileNotFoundError:
        return None


def render(record: dict[str, Any]) -> dict[str, Any]:
    """A batch as OpenAI shows it: a cancel asked and not yet acted on reads ``cancelling``."""
    shown = {key: value for key, value in record.items() if not key.startswith("_")}
    if record.get("_cancel_at") is not None and record["status"] in ("validating", "in_progress"):
        shown["status"] = "cancelling"
        shown["cancelling_at"] = record["_cancel_at"]
    return shown


class ShardRuns(RunView):
    """A shard of a batch, as a run: its lines executed through the live handlers
    (``offline.call``), each result appended to the shard's file before the next counts."""

    name = SURFACE
    opens_lazily = True  # no store is opened until a batch is made or resumed

    def __init__(self, batches: BatchesAPI) -> None:
        self.batches = batches

    def takes(self, app) -> bool:
        return is_model_app(app) or can_embed(app)

    async def call(self, app, run: Run) -> list[int]:
        return await self.batches.execute_shard(app, run)

    def render(self, run: Run) -> dict:
        return {"id": run.id, "state": run.state, "output": run.output, "error": run.error}


class BatchesAPI:
    def __init__(self, server, files: FileStore) -> None:
        self.openai = OpenAIAPI.of(server)
        self.runs = server.runs
        self.records = BatchRecords(files)
        self.files = files
        settings = server.config.server
        self.max_lines = settings.batch_max_lines
        self.lines = asyncio.Semaphore(settings.batch_concurrency)  # lines in flight here, every batch
        self.view = ShardRuns(self)
        self.runs.add_view(self.view)
        # Shard runs queued or running that this server's drivers submitted, by batch: at most
        # half the runs_workers in all, so batches never take every worker from other runs.
        self._outstanding: dict[str, int] = {}
        self.max_outstanding = max(1, settings.runs_workers // 2)
        self._drivers: dict[str, asyncio.Task] = {}
        self._ended: set[str] = set()  # batches seen final, which the scan skips
        self._wakers: dict[str, asyncio.Event] = {}
        self._scanner: asyncio.Task | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        if self.runs.in_use:
            self._scanner = asyncio.get_running_loop().create_task(self._scan_forever())

    async def stop(self) -> None:
        tasks = [task for task in (self._scanner, *self._drivers.values()) if task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.files.close()

    async def _scan_forever(self) -> None:
        """Drive every unfinished batch no process drives: at start (a restart resumes them),
        then every RESCAN seconds (a batch whose server died, on a shared directory)."""
        while True:
            try:
                for batch_id in await self.records.ids():
                    if batch_id not in self._drivers and batch_id not in self._ended:
                        record = await self.records.load(batch_id)
                        if record is not None and record["status"] in FINAL:
                            self._ended.add(batch_id)  # final: not read again
                        elif record is not None:
                            self._drive(batch_id)
            except Exception:
                logger.exception("looking for batches to resume failed")
            await asyncio.sleep(RESCAN)

    def _drive(self, batch_id: str) -> None:
        task = asyncio.get_running_loop().create_task(self._driver(batch_id))
        self._drivers[batch_id] = task
        task.add_done_callback(lambda _: self._drivers.pop(batch_id, None))

    # -- HTTP ------------------------------------------------------------------------------
    async def create(self, request) -> Response:
        body = await self.openai.body(request, frozenset(
            ("input_file_id", "endpoint", "completion_window", "metadata", "output_expires_after")), frozenset())
        endpoint = body.get("endpoint")
        if endpoint not in ROUTES:
            raise invalid("endpoint", f"'endpoint' must be one of {', '.join(ROUTES)}.")
        window = window_seconds(body.get("completion_window"))
        metadata = body.get("metadata")
        if metadata is not None and (type(metadata) is not dict or len(metadata) > 16 or any(
                type(v) is not str or len(k) > 64 or len(v) > 512 for k, v in metadata.items())):
            raise invalid("metadata", "'metadata' must be an object of at most 16 string values.")
        file_id = body.get("input_file_id")
        principal = request.principal.identity
        source = await self.files.get(file_id, principal) if type(file_id) is str else None
        if source is None:
            raise HTTPError(404, f"No such File object: {file_id}", type="invalid_request_error",
                            param="input_file_id")
        if source["purpose"] != "batch":
            raise invalid("input_file_id", f"The file {file_id} was not uploaded with purpose 'batch'.")
        now = int(time.time())
        batch_id = "batch_" + uuid.uuid4().hex
        try:
            await self.records.keep_input(batch_id, self.files.path(file_id))
        except FileNotFoundError:  # deleted meanwhile
            raise HTTPError(404, f"No such File object: {file_id}", type="invalid_request_error",
                            param="input_file_id") from None
        record = {
            "id": batch_id, "object": "batch", "endpoint": endpoint, "errors": None,
            "input_file_id": file_id, "completion_window": body["completion_window"], "status": "validating",
            "output_file_id": None, "error_file_id": None, "created_at": now, "in_progress_at": None,
            "expires_at": now + window, "finalizing_at": None, "completed_at": None, "failed_at": None,
            "expired_at": None, "cancelling_at": None, "cancelled_at": None,
            "request_counts": {"total": 0, "completed": 0, "failed": 0}, "metadata": metadata, "model": None,
            # Private (never shown): the owner, the app, the shards' byte ranges and their runs,
            # attempts and (completed, failed) counts, by shard index.
            "_principal": principal, "_created": time.time(), "_app": None, "_shards": [], "_runs": {},
            "_attempts": {}, "_counts": {},
        }
        await self.records.save(record)
        self._drive(record["id"])
        return json_response(render(record))

    async def _find(self, request) -> dict[str, Any]:
        batch_id = request.path_params["batch_id"]
        record = await self.records.load(batch_id) if _ID.fullmatch(batch_id) else None
        if record is None or record["_principal"] != request.principal.identity:
            raise HTTPError(404, f"No batch found with id '{batch_id}'.", type="invalid_request_error",
                            param="batch_id")
        return record

    async def retrieve(self, request) -> Response:
        return json_response(render(await self._find(request)))

    async def cancel(self, request) -> Response:
        record = await self._find(request)
        if record["status"] in FINAL or record["status"] == "finalizing":
            raise HTTPError(409, f"Cannot cancel a batch with status '{record['status']}'.",
                            type="invalid_request_error")
        marker = self.records.path(record["id"], ".cancel")
        await asyncio.to_thread(_touch, marker)
        waker = self._wakers.get(record["id"])
        if waker is not None:
            waker.set()
        record["_cancel_at"] = int(time.time())
        return json_response(render(record))

    async def index(self, request) -> Response:
        limit = page_limit(request, default=20, most=100)
        principal = request.principal.identity
        records = await self.records.owned_by(principal)
        return json_response(page([render(record) for record in records], request.query_param("after"), limit))

    # -- driving a batch -------------------------------------------------------------------
    async def _driver(self, batch_id: str) -> None:
        lock = await asyncio.to_thread(_try_lock, self.records.path(batch_id, ".lock"))
        if lock is None:
            return  # another process drives it
        self._wakers[batch_id] = asyncio.Event()
        try:
            while True:
                record = await self.records.load(batch_id)
                if record is None or record["status"] in FINAL:
                    return
                if record["status"] == "validating":
                    await self._validate(record)
                elif record["status"] in ("in_progress", "cancelling"):
                    await self._progress(record)
                else:  # finalizing
                    await self._finalize(record)
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("batch %s: driving it failed; it is taken up again at the next look", batch_id)
        finally:
            self._wakers.pop(batch_id, None)
            self._outstanding.pop(batch_id, None)
            await asyncio.to_thread(os.close, lock)

    async def _validate(self, record: dict[str, Any]) -> None:
        checked = await asyncio.to_thread(batch_files.check_input, self.records.input_path(record["id"]),
                                          record["endpoint"], self.max_lines)
        now = int(time.time())
        errors = checked.errors
        if not errors:
            try:
                need = can_embed if record["endpoint"] == "/v1/embeddings" else is_model_app
                record["_app"] = self.openai.by_model[self.openai.app_by_model(checked.model, need=need).model_id]
            except HTTPError as error:
                if error.status == 503:  # the model is still loading: validate again shortly
                    await asyncio.sleep(POLL)
                    return
                errors = [{"code": error.code or "model_not_found", "message": error.message,
                           "param": "body.model", "line": None}]
        if errors:
            record.update(status="failed", failed_at=now, errors={"object": "list", "data": errors})
            await asyncio.to_thread(_remove_tree, self.records.results_dir(record["id"]))
        else:
            record.update(status="in_progress", in_progress_at=now, model=checked.model,
                          _shards=[shard.as_list() for shard in checked.shards])
            record["request_counts"]["total"] = checked.total
        await self.records.save(record)

    async def _progress(self, record: dict[str, Any]) -> None:
        """Keep OUTSTANDING shards submitted until every one has finished, or the batch is
        cancelled or expires; then finalizing (which makes the files of what finished)."""
        batch_id = record["id"]
        waker = self._wakers[batch_id]
        shards, runs, counts = record["_shards"], record["_runs"], record["_counts"]
        while True:
            stop = None
            if record["_cancel_at"] is not None:
                stop = "cancelled"
            elif time.time() >= record["expires_at"]:
                stop = "expired"
            if stop is not None:
                if stop == "cancelled" and record["status"] != "cancelling":
                    record.update(status="cancelling", cancelling_at=record["_cancel_at"])
                    await self.records.save(record)
                for run_id in list(runs.values()):
                    await self.runs.cancel(run_id)
                record.update(status="finalizing", finalizing_at=int(time.time()), _end=stop)
                await self.records.save(record)
                return
            for index, run_id in list(runs.items()):
                run = await self.runs.get(run_id)
                if run is None or run.done:
                    await self._shard_done(record, int(index), run)
            for index in range(len(shards)):  # the first not done nor running (an interrupted one again)
                others = sum(self._outstanding.values()) - self._outstanding.get(batch_id, 0)
                if len(runs) >= OUTSTANDING or (runs and others + len(runs) >= self.max_outstanding):
                    break
                if str(index) not in counts and str(index) not in runs:
                    runs[str(index)] = await self._submit(record, index)
            self._outstanding[batch_id] = len(runs)
            # Finished shards' counts, and what the running ones have recorded so far.
            running = await asyncio.to_thread(self._recorded_counts, batch_id, [int(index) for index in runs])
            every = [*counts.values(), *running]
            record["request_counts"].update(completed=sum(value[0] for value in every),
                                            failed=sum(value[1] for value in every))
            await self.records.save(record)
            if not runs:
                record.update(status="finalizing", finalizing_at=int(time.time()), _end="completed")
                await self.records.save(record)
                return
            waker.clear()
            first = next(iter(runs.values()))
            waiting = asyncio.ensure_future(self.runs.wait(first, POLL))
            woken = asyncio.ensure_future(waker.wait())
            await asyncio.wait((waiting, woken), return_when=asyncio.FIRST_COMPLETED)
            for future in (waiting, woken):
                future.cancel()
            await asyncio.gather(waiting, woken, return_exceptions=True)
            fresh = await self.records.load(batch_id)
            record["_cancel_at"] = None if fresh is None else fresh["_cancel_at"]

    async def _shard_done(self, record: dict[str, Any], index: int, run: Run | None) -> None:
        key = str(index)
        del record["_runs"][key]
        if run is not None and run.state == SUCCEEDED:
            record["_counts"][key] = run.output
            return
        if run is not None and (run.state == CANCELLED or (run.state == FAILED and (run.error or {}).get(
                "code") != "interrupted")):
            # Not lost with a server: the app is gone, or someone cancelled the run. Its lines
            # not yet recorded fail, each with this error, so the batch can end.
            error = run.error or {"code": "cancelled", "message": "The shard was cancelled."}
            record["_counts"][key] = await self._fail_rest(record, index, error)
            return
        record["_attempts"][key] = record["_attempts"].get(key, 0) + 1  # interrupted, or purged: again

    async def _submit(self, record: dict[str, Any], index: int) -> str:
        """Submit shard ``index`` as a run: an idempotency key per (batch, shard, attempt), so a
        driver that died between submitting and saving finds the same run again."""
        attempt = record["_attempts"].get(str(index), 0)
        key = hashlib.sha256(f"{SURFACE}:{record['id']}:{index}:{attempt}".encode()).hexdigest()
        idempotency = Idempotency(key, key)
        start, end, _, _ = record["_shards"][index]
        data = {"batch": record["id"], "shard": index, "start": start, "end": end}
        while True:
            try:
                run = await self.runs.submit(SURFACE, record["_app"], "shard", data, principal=record["_principal"],
                                             idempotency=idempotency)
                return run.id
            except HTTPError as error:
                if error.status not in RETRY_STATUSES:
                    raise
                await asyncio.sleep(RETRY_DELAY * 4)  # the queue is full, or the store away: wait

    async def _fail_rest(self, record: dict[str, Any], index: int, error: dict) -> list[int]:
        start, end, _, _ = record["_shards"][index]
        path = self._results_path(record["id"], index)

        def fail_rest() -> list[int]:
            done = batch_files.recorded(path, repair=True)  # the shard's run is over: no one writes
            lines = batch_files.read_lines(self.records.input_path(record["id"]), start, end)
            with open(path, "ab") as f:
                for line in lines:
                    if line["custom_id"] not in done:
                        f.write(orjson.dumps(_result(line["custom_id"], None, {
                            "code": error.get("code"), "message": error.get("message")})) + b"\n")
            return self._recorded_counts(record["id"], [index])[0]
        return await asyncio.to_thread(fail_rest)

    async def _finalize(self, record: dict[str, Any]) -> None:
        """The output and error files from every recorded result, in input order. Their ids
        follow from the batch's, so finalizing again after a crash rewrites the same files."""
        principal = record["_principal"]
        output_temp, errors_temp = self.files.new_temp(), self.files.new_temp()

        def assemble() -> tuple[int, int]:
            with FileStore.open_temp(output_temp) as output, FileStore.open_temp(errors_temp) as errors:
                return batch_files.assemble(self.records.input_path(record["id"]), record["_shards"],
                                            self.records.results_dir(record["id"]), output, errors)
        completed, failed = await asyncio.to_thread(assemble)
        output_id = error_id = None
        if completed:
            output_id = (await self.files.adopt(output_temp, principal=principal, filename=f"{record['id']}_output"
                                                ".jsonl", purpose="batch_output",
                                                file_id=_file_id(record["id"], "output")))["id"]
        if failed:
            error_id = (await self.files.adopt(errors_temp, principal=principal, filename=f"{record['id']}_error"
                                               ".jsonl", purpose="batch_output",
                                               file_id=_file_id(record["id"], "error")))["id"]
        for temp in (output_temp, errors_temp):  # gone already when adopted
            await asyncio.to_thread(unlink_quietly, temp)
        now = int(time.time())
        end = record.pop("_end", "completed")
        record.update(status=end, output_file_id=output_id, error_file_id=error_id, **{f"{end}_at": now})
        record["request_counts"].update(completed=completed, failed=failed)
        await self.records.save(record)
        await asyncio.to_thread(_remove_tree, self.records.results_dir(record["id"]))

    # -- executing a shard (the runner calls it, through ShardRuns) ------------------------------
    def _results_path(self, batch_id: str, index: int) -> str:
        return os.path.join(self.records.results_dir(batch_id), f"{index}.jsonl")

    def _recorded_counts(self, batch_id: str, shards: list[int]) -> list[list[int]]:
        """(successes, failures) each of ``shards`` has recorded so far. On a worker thread."""
        counts = []
        for index in shards:
            results = batch_files.recorded(self._results_path(batch_id, index))
            successes = sum(batch_files.is_success(raw) for raw in results.values())
            counts.append([successes, len(results) - successes])
        return counts

    async def execute_shard(self, app, run: Run) -> list[int]:
        data = run.input
        record = await self.records.load(data["batch"])
        if record is None:
            raise HTTPError(404, f"Batch {data['batch']} is gone", code="batch_gone")
        path = self._results_path(record["id"], data["shard"])
        lines = await asyncio.to_thread(batch_files.read_lines, self.records.input_path(record["id"]),
                                        data["start"], data["end"])
        done = await asyncio.to_thread(functools.partial(batch_files.recorded, path, repair=True))
        todo = [line for line in lines if line["custom_id"] not in done]
        principal = Principal(run.principal, "batch", identity=run.principal)
        fd = await asyncio.to_thread(os.open, path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            await asyncio.gather(*(self._execute_line(app, record["endpoint"], line, principal, fd)
                                   for line in todo))
        finally:
            await asyncio.to_thread(os.close, fd)
        [counts] = await asyncio.to_thread(self._recorded_counts, record["id"], [data["shard"]])
        return counts

    async def _execute_line(self, app, endpoint: str, line: dict, principal: Principal, fd: int) -> None:
        async with self.lines:
            while True:
                await below_live_traffic(app)
                status, body = await call(self.openai, endpoint, line["body"], app=app, principal=principal)
                if status not in RETRY_STATUSES:
                    break
                await asyncio.sleep(RETRY_DELAY)
        result = _result(line["custom_id"], {"status_code": status, "request_id": uuid.uuid4().hex, "body": body},
                         None)
        await asyncio.to_thread(os.write, fd, orjson.dumps(result) + b"\n")  # one write: whole, or torn at the end


def _result(custom_id: str, response: dict | None, error: dict | None) -> dict[str, Any]:
    return {"id": "batch_req_" + uuid.uuid4().hex, "custom_id": custom_id, "response": response, "error": error}


def _file_id(batch_id: str, kind: str) -> str:
    """The id of a batch's output or error file: the same each time it is made."""
    return "file-" + uuid.uuid5(uuid.NAMESPACE_URL, f"runnel:{batch_id}:{kind}").hex


async def below_live_traffic(app) -> None:
    """Return once ``app`` has no interactive row waiting: a batch line never queues in front
    of a live request. Apps without a batcher (``batching_stats``) are not waited for."""
    stats = getattr(app, "batching_stats", None)
    while stats is not None:
        current = stats()
        if not current or not current.get("waiting_rows"):
            return
        await asyncio.sleep(GATE_POLL)


def _touch(path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "ab"):
        pass


def _try_lock(path: str) -> int | None:
    """An exclusive lock on ``path`` (its descriptor), or None when another process holds it.
    The lock goes with the process however it ends."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def _remove_tree(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)
