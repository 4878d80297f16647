"""CTranslate2 apps: a generator that serves completions, an encoder that serves embeddings."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from runnel.supervisor import WorkerSlot, worker_slot
from runnel.workers import DaemonThreads

from runnel.chat_template import ChatTemplate, chat_prompt, resolve_chat_template
from . import cuda
from .scheduler import BatchScheduler
from .tokenizer import load_tokenizer

logger = logging.getLogger("runnel.ctranslate2")


@dataclass(frozen=True)
class DeviceSettings:
    device: str  # "auto", "cpu" or "cuda"
    device_index: int | None  # None: not set (0, or a worker's own GPU)
    compute_type: str
    inter_threads: int
    intra_threads: int

    def resolve(self, worker: WorkerSlot | None = None, *, model_dir: str | Path | None = None) -> DeviceSettings:
        """Pick CUDA for "auto" when a GPU and its libraries are there; fit threads to the device.

        "auto" runs on CUDA when CTranslate2 sees a GPU and the CUDA 12 cuBLAS loads
        (runnel_ctranslate2.cuda), else on the CPU, logging why; "cuda" that cannot load
        its libraries raises CudaUnavailable. On a GPU, ``compute_type = "default"`` becomes
        cuda.gpu_compute_type(model_dir) and inter_threads 1.

        ``worker`` (``runnel serve --workers N``): on CPU the threads fit this worker's
        share of the cores; on GPUs a worker with no ``device_index`` set takes GPU
        ``worker.index`` modulo their count (one worker per GPU, round robin)."""
        import ctranslate2

        device = self.device
        gpus = ctranslate2.get_cuda_device_count() if device != "cpu" else 0
        if device == "auto":
            why_not = "no CUDA GPU is visible" if gpus == 0 else cuda.cublas_status().problem
            if why_not is not None:
                logger.log(logging.INFO if gpus == 0 else logging.WARNING,
                           "device auto: running on the CPU: %s", why_not)
            device = "cpu" if why_not else "cuda"
        elif device == "cuda" and (problem := cuda.cublas_status().problem) is not None:
            raise cuda.CudaUnavailable(f'device = "cuda": {problem}')
        index = self.device_index
        if index is None:
            index = worker.index % gpus if worker is not None and device == "cuda" and gpus > 0 else 0
        inter, intra = self.inter_threads, self.intra_threads
        compute_type = self.compute_type
        if device == "cpu":
            cores = worker.cores if worker is not None else os.cpu_count() or 1
            inter = inter or min(2, cores)
            # inter x intra <= cores: more oversubscribes, and on 2 cores intra_threads=2
            # collapses under any other busy thread (DESIGN: 3-11x slower).
            intra = intra or max(1, cores // inter)
        else:
            # One batch at a time per GPU: parallel batches share the weights but each keeps
            # its own activations and KV cache (CTranslate2's caching allocator holds what its
            # largest batch needed), and they contend for the same SMs; one wider batch does
            # the same work. More only for measured gains (docs/parallel.md: "may not improve").
            inter = inter or 1
            intra = intra or 1
            if compute_type == "default" and model_dir is not None:
                compute_type = cuda.gpu_compute_type(model_dir)
        return DeviceSettings(device, index, compute_type, inter, intra)


def model_directory(model: str) -> str:
    if model.startswith("builtin:"):
        from .builtin import ensure_builtin

        return ensure_builtin(model.removeprefix("builtin:"))
    return model


def _context_length(model_dir: Path, configured: int | None) -> int:
    if configured:
        return configured
    for name, key in (("tokenizer_config.json", "model_max_length"), ("config.json", "max_position_embeddings")):
        path = model_dir / name
        if path.is_file():
            value = json.loads(path.read_text(encoding="utf-8")).get(key)
            if isinstance(value, int) and 0 < value < 10_000_000:
                return value
    return 2048


class GeneratorApp:
    """A ``ctranslate2.Generator`` serving the OpenAI-style surfaces (runnel.generation.ModelApp)."""

    owned_by = "runnel"
    # seed is accepted as best effort: CTranslate2 seeds its threads when a generator is
    # created, not per call (OpenAI documents seed as best effort too).
    supported = frozenset({"temperature", "top_p", "top_k", "seed", "stop", "stop_token_ids", "logprobs",
                           "top_logprobs", "repetition_penalty", "no_repeat_ngram_size", "ignore_eos", "min_tokens"})

    def __init__(self, *, name: str, model: str, served_model_name: str | None, device: DeviceSettings,
                 context_length: int | None, default_max_tokens: int, chat_template: str | None,
                 max_batch_size: int | None, batch_window: float | None, max_queue: int, seed: int | None,
                 close_wait: float = 5.0, fold: bool = True) -> None:
        self.name = name
        self.model = model
        self.model_id = served_model_name or (name if model.startswith("builtin:") else Path(model).name)
        self.device = device
        self._context_length = context_length
        self.context_length = context_length or 0
        self.default_max_tokens = default_max_tokens
        self._template_name = chat_template
        # None: the device's default (cuda.BATCH_DEFAULTS), resolved at load with the device.
        self._max_batch_size, self._batch_window = max_batch_size, batch_window
        self.max_batch_size = max_batch_size or 0
        self.batch_window = batch_window or 0.0
        self.max_queue = max_queue
        self.seed = seed
        self.close_wait = close_wait  # how long close() waits for running batches to stop
        self.fold = fold  # waiting rows may join a running batch at its next step (runnel_ctranslate2.scheduler)
        self.generator = None
        self.tokenizer = None
        self.template: ChatTemplate | None = None
        self.scheduler: BatchScheduler | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        with ThreadPoolExecutor(max_workers=1) as pool:
            await loop.run_in_executor(pool, self._load)
            self.scheduler = BatchScheduler(
                self.generator, self.tokenizer, max_batch_size=self.max_batch_size, window=self.batch_window,
                max_queue=self.max_queue, slots=self.device.inter_threads, fold=self.fold,
            )
            # Warm-up: the first call pays for allocations; do it before we say "ready".
            await loop.run_in_executor(pool, lambda: self.generator.generate_batch(
                [[self.tokenizer.id_to_token(self.tokenizer.bos_id or 0)]], max_length=1))

    def _load(self) -> None:
        import ctranslate2

        if self.seed is not None:
            ctranslate2.set_random_seed(self.seed)  # only seeds generators created after it
        model_dir = Path(model_directory(self.model))
        self.device = self.device.resolve(worker_slot(), model_dir=model_dir)
        max_batch_size, batch_window = cuda.BATCH_DEFAULTS[self.device.device]
        self.max_batch_size = self._max_batch_size or max_batch_size
        self.batch_window = batch_window if self._batch_window is None else self._batch_window
        self.tokenizer = load_tokenizer(model_dir)
        self.context_length = _context_length(model_dir, self._context_length)
        source = resolve_chat_template(model_dir, self._template_name)
        if source is not None:
            self.template = ChatTemplate(source, bos_token=self.tokenizer.bos_token, eos_token=self.tokenizer.eos_token)
        self.generator = ctranslate2.Generator(
            str(model_dir), device=self.device.device, device_index=self.device.device_index,
            compute_type=self.device.compute_type, inter_threads=self.device.inter_threads,
            intra_threads=self.device.intra_threads,
        )
        logger.info("app %r: %s on %s (%s), %d x %d threads, batches of up to %d rows, %g ms window", self.name,
                    model_dir, self.device.device, self.generator.compute_type, self.device.inter_threads,
                    self.device.intra_threads, self.max_batch_size, self.batch_window * 1000)

    async def close(self) -> None:
        finished = True
        if self.scheduler is not None:
            # Never blocks the loop: waits (awaits) for the batches still running, with a deadline.
            finished = await self.scheduler.close(self.close_wait)
            self.scheduler = None
        if self.generator is not None:
            # Release explicitly, and drop every reference (the scheduler held one): a
            # generator that ran Python callbacks and is still alive when the process
            # exits aborts it ("terminate called without an active exception").
            if finished:
                self.generator.unload_model()
            else:
                # A batch is stuck inside it: unloading would wait for that batch. The
                # stuck batch's daemon thread holds the last reference: the generator is
                # deleted when the batch returns, or never, if the process exits first
                # (a frozen daemon thread never releases it, so no destructor runs at exit).
                logger.warning("app %r: a batch is stuck; its generator is left to the process exit", self.name)
            self.generator = None

    # -- runnel.generation.ModelApp ---------------------------------------------------
    @property
    def max_choices(self) -> int:
        """Choices one request may ask for: no more than the scheduler's queue holds."""
        return self.max_queue

    @property
    def vocab_size(self) -> int | None:
        """What top_k and stop_token_ids are checked against (CTranslate2 fails on more)."""
        return self.tokenizer.vocab_size if self.tokenizer is not None else None

    def tokenize(self, text: str) -> list[int]:
        # Thread-safe (the surfaces tokenize large prompts on a worker thread): both
        # sentencepiece's and Hugging Face's encoders are, and they release the GIL.
        tokenizer = self.tokenizer
        # Chat templates write their own bos token; raw prompts get one added.
        add_bos = not (tokenizer.bos_token and text.startswith(tokenizer.bos_token))
        return tokenizer.encode(text, add_bos=add_bos)

    def decode(self, token_ids: list[int]) -> str:
        """The text of ``token_ids`` (runnel.generation.ModelApp's optional detokenizer); thread-safe."""
        return self.tokenizer.decode(token_ids)

    def chat_prompt(self, messages: list[dict], *, tools: list[dict] | None = None, prefill: str = "") -> str:
        return chat_prompt(self.template, self.model_id, messages, tools=tools, prefill=prefill)

    @property
    def tool_parser(self) -> str | None:
        """The built-in model writes tool calls in the Hermes format (its training script);
        a converted model's format is its app's ``tool_parser`` setting."""
        from .builtin import tool_parser_of

        return tool_parser_of(self.model)

    def generate(self, prompt_tokens, params, n, sink):
        return self.scheduler.submit(list(prompt_tokens), params, n, sink)

    def stats(self) -> dict:
        scheduler = self.scheduler
        if scheduler is None:
            return {"state": "loading"}
        return {**scheduler.stats.to_dict(), "waiting": len(scheduler.waiting), "running_batches": scheduler.running,
                "device": self.device.device}

    def batching_stats(self) -> dict | None:
        """What runnel's /metrics reads at scrape time (runnel.metrics.LiveState): the
        scheduler's own counters, so /stats and /metrics never disagree."""
        scheduler = self.scheduler
        return None if scheduler is None else scheduler.batching_stats()


class EncoderApp:
    """A ``ctranslate2.Encoder`` serving /v1/embeddings: mean pooling, optional normalization."""

    owned_by = "runnel"

    def __init__(self, *, name: str, model: str, served_model_name: str | None, device: DeviceSettings,
                 normalize: bool, max_batch_size: int, close_wait: float = 5.0) -> None:
        self.name = name
        self.model = model
        self.model_id = served_model_name or Path(model).name
        self.device = device
        self.normalize = normalize
        self.max_batch_size = max_batch_size
        self.close_wait = close_wait
        self.context_length = 0  # tokens per input: the model's position embeddings
        self.encoder = None
        self.tokenizer = None
        # Daemons, as the generator's batches (runnel.workers): a stuck call never holds the process.
        self._threads = DaemonThreads(1, "runnel-ct2-encode")
        self._running: set[asyncio.Future] = set()

    async def start(self) -> None:
        await self._threads.run(self._load)

    def _load(self) -> None:
        import ctranslate2

        self.device = self.device.resolve(worker_slot(), model_dir=self.model)
        self.tokenizer = load_tokenizer(self.model)
        self.context_length = _context_length(Path(self.model), None)
        self.encoder = ctranslate2.Encoder(
            self.model, device=self.device.device, device_index=self.device.device_index,
            compute_type=self.device.compute_type, inter_threads=1, intra_threads=self.device.intra_threads,
        )

    async def close(self) -> None:
        finished = True
        if self._running:  # never blocks the loop: waits with a deadline, then abandons
            _, stuck = await asyncio.wait(set(self._running), timeout=self.close_wait)
            finished = not stuck
        self._threads.close()
        if self.encoder is not None:
            if finished:  # unloading under a running call would wait for it
                self.encoder.unload_model()
            self.encoder = None

    @property
    def vocab_size(self) -> int | None:
        """What token-id inputs are checked against (runnel.surfaces.openai.params.check_token_ids)."""
        return self.tokenizer.vocab_size if self.tokenizer is not None else None

    async def embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        return await self._run(lambda: self._embed(texts))

    async def embed_tokens(self, rows: list[list[int]]) -> tuple[list[list[float]], int]:
        """Token ids embedded as they are, unframed (a client that wants [CLS] ... [SEP] sends them)."""
        return await self._run(lambda: self._embed_ids(rows))

    async def _run(self, work):
        running = self._threads.run(work)
        self._running.add(running)
        running.add_done_callback(self._running.discard)
        return await running

    def _embed(self, texts: list[str]):
        frame = getattr(self.tokenizer, "encode_framed", None)  # [CLS] ... [SEP] for BERT-style models
        return self._embed_ids([frame(text) if frame else self.tokenizer.encode(text, add_bos=False)
                                for text in texts])

    def _embed_ids(self, ids: list[list[int]]):
        import numpy as np

        from runnel import HTTPError

        for index, row in enumerate(ids):
            if len(row) > self.context_length:  # CTranslate2 would fail on it: the client's mistake
                raise HTTPError(400, f"Input {index} is {len(row)} tokens; this model takes at most "
                                f"{self.context_length}.", param=f"input[{index}]", code="context_length_exceeded")
        vectors = []
        for start in range(0, len(ids), self.max_batch_size):
            chunk = ids[start : start + self.max_batch_size]
            output = self.encoder.forward_batch([self.tokenizer.ids_to_tokens(row) for row in chunk])
            hidden = np.asarray(output.last_hidden_state)  # (batch, time, dim), padded
            lengths = np.array([len(row) for row in chunk])
            mask = (np.arange(hidden.shape[1])[None, :] < lengths[:, None])[..., None]
            pooled = (hidden * mask).sum(axis=1) / np.maximum(lengths[:, None], 1)
            if self.normalize:
                pooled = pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
            vectors.extend(pooled.astype(np.float32).tolist())
        return vectors, sum(len(row) for row in ids)
