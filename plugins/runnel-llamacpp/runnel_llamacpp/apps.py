"""The llama.cpp app: a GGUF model serving the OpenAI-style surfaces (runnel.generation.ModelApp)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from runnel.chat_template import BUILTIN_TEMPLATES, ChatTemplate, chat_prompt
from runnel.supervisor import worker_slot
from runnel.workers import DaemonThreads

from .engine import ContextPool

logger = logging.getLogger("runnel.llamacpp")


def model_path(model: str) -> str:
    if model.startswith("builtin:"):
        from .builtin import ensure_builtin_gguf

        return ensure_builtin_gguf(model.removeprefix("builtin:"))
    return model


def _piece(vocab, token: int) -> bytes:
    """The bytes token ``token`` adds to text; b"" for special tokens (llama-cpp-python's own
    ``token_to_piece`` returns its whole buffer, NULs and all)."""
    import ctypes

    import llama_cpp

    size = 64
    while True:
        buffer = ctypes.create_string_buffer(size)
        length = llama_cpp.llama_token_to_piece(vocab, token, buffer, size, 0, False)
        if length >= 0:
            return buffer.raw[:length]
        size = -length  # too small: llama.cpp answers the size it needs, negated


class _GGUFApp:
    """What both apps share: the model file, its settings, and the text of its token ids."""

    owned_by = "runnel"

    def __init__(self, *, name: str, model: str, served_model_name: str | None, context_length: int | None,
                 threads: int, n_gpu_layers: int, close_wait: float = 5.0) -> None:
        self.name = name
        self.model = model
        self.model_id = served_model_name or (name if model.startswith("builtin:") else Path(model).stem)
        self._context_length = context_length
        self.context_length = context_length or 0
        self.threads = threads
        self.n_gpu_layers = n_gpu_layers
        self.close_wait = close_wait  # how long close() waits for running work
        self.vocab_size: int | None = None
        self._pieces: list[bytes] = []  # what each id adds to the text, made at load

    def decode(self, token_ids: list[int]) -> str:
        """The text of ``token_ids`` (runnel.generation.ModelApp's optional detokenizer); thread-safe."""
        return b"".join(self._pieces[i] for i in token_ids).decode("utf-8", "replace")


class LlamaApp(_GGUFApp):
    # Beyond CTranslate2: logits control (structured output, forced tool calls held to their
    # schemas, penalties, logit_bias, per-request seeds, real top-k alternatives). Not
    # min_tokens: llama.cpp's chain has no "not before n".
    supported = frozenset({"temperature", "top_p", "top_k", "seed", "stop", "stop_token_ids", "logprobs",
                           "top_logprobs", "presence_penalty", "frequency_penalty", "repetition_penalty",
                           "ignore_eos", "response_format", "logit_bias", "tool_call"})

    def __init__(self, *, parallel: int, max_queue: int, default_max_tokens: int, chat_template: str | None,
                 **common) -> None:
        super().__init__(**common)
        self.parallel = parallel
        self.max_queue = max_queue
        self.default_max_tokens = default_max_tokens
        self._template_name = chat_template
        self.contexts: list = []
        self.pool: ContextPool | None = None
        self.template = None
        self._eos_id: int | None = None
        self._bos_text = ""
        self._texts: list[str] = []

    # -- life cycle ------------------------------------------------------------------------
    async def start(self) -> None:
        threads = DaemonThreads(1, "runnel-llamacpp-load")
        try:
            await threads.run(self._load)
        finally:
            threads.close()
        self.pool = ContextPool(self.contexts, max_queue=self.max_queue, eos_id=self._eos_id, pieces=self._pieces,
                                texts=self._texts)

    def _threads_each(self) -> int:
        if self.threads:
            return self.threads
        slot = worker_slot()
        cores = slot.cores if slot is not None else os.cpu_count() or 1
        return max(1, cores // self.parallel)  # contexts x threads <= cores: more oversubscribes

    def _load(self) -> None:
        from llama_cpp import Llama

        path = model_path(self.model)
        threads = self._threads_each()
        for _ in range(self.parallel):
            self.contexts.append(Llama(model_path=path, n_ctx=self._context_length or 0, n_threads=threads,
                                       n_threads_batch=threads, n_gpu_layers=self.n_gpu_layers, verbose=False))
        llama = self.contexts[0]
        self.context_length = llama.n_ctx()
        self.vocab_size = llama.n_vocab()
        self._eos_id = llama.token_eos()
        model = llama._model
        # What each id adds to the text (special tokens: nothing), made once: the per-token path is an index.
        self._pieces = [_piece(model.vocab, i) for i in range(self.vocab_size)]
        self._texts = [piece.decode("utf-8", "replace") for piece in self._pieces]
        metadata = llama.metadata
        bos = llama.token_bos()
        self._bos_text = model.token_get_text(bos) if bos >= 0 else ""
        eos_text = model.token_get_text(self._eos_id) if self._eos_id >= 0 else ""
        source = metadata.get("tokenizer.chat_template")
        if self._template_name is not None:
            source = BUILTIN_TEMPLATES[self._template_name]
        if source:
            self.template = ChatTemplate(source, bos_token=self._bos_text, eos_token=eos_text)
        logger.info("app %r: %s, %d context(s) x %d thread(s), n_ctx %d, %d GPU layers", self.name, path,
                    self.parallel, threads, self.context_length, self.n_gpu_layers)

    async def close(self) -> None:
        finished = True
        if self.pool is not None:
            finished = await self.pool.close(self.close_wait)
            self.pool = None
        if finished:
            for llama in self.contexts:
                llama.close()
        else:  # a context is still decoding: freeing it under that thread would crash the process
            logger.warning("app %r: a row is stuck; its contexts are left to the process exit", self.name)
        self.contexts = []

    # -- runnel.generation.ModelApp ----------------------------------------------------------
    @property
    def max_choices(self) -> int:
        return self.max_queue

    def tokenize(self, text: str) -> list[int]:
        # Chat templates write their own bos token; raw prompts get one added. Special tokens
        # written as text are their ids, as the CTranslate2 app's tokenizers do. Thread-safe:
        # llama.cpp's tokenizer only reads the vocabulary.
        add_bos = not (self._bos_text and text.startswith(self._bos_text))
        return self.contexts[0].tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)

    def chat_prompt(self, messages: list[dict], *, tools: list[dict] | None = None, prefill: str = "") -> str:
        # The core's jinja2 rendering (transformers' environment), as the CTranslate2 app's.
        return chat_prompt(self.template, self.model_id, messages, tools=tools, prefill=prefill)

    @property
    def tool_parser(self) -> str | None:
        """builtin:tiny's format (its weights are the CTranslate2 plugin's); a GGUF's is its
        app's ``tool_parser`` setting."""
        from runnel_ctranslate2.builtin import tool_parser_of

        return tool_parser_of(self.model)

    def generate(self, prompt_tokens, params, n, sink):
        return self.pool.submit(list(prompt_tokens), params, n, sink)

    def stats(self) -> dict:
        pool = self.pool
        if pool is None:
            return {"state": "loading"}
        return {"contexts": pool.count, "busy": pool.count - len(pool.free),
                "waiting": sum(not row.done for row in pool.waiting),
                "rows": pool.rows_served, "tokens": pool.tokens_made}


POOLING = ("model", "mean", "cls", "last")


class LlamaEmbedApp(_GGUFApp):
    """A GGUF embedding model serving /v1/embeddings: one vector per input, pooled as the
    model says (``pooling = "model"``) or as configured, normalized unless told not to."""

    def __init__(self, *, pooling: str, normalize: bool, **common) -> None:
        super().__init__(**common)
        self.pooling = pooling
        self.normalize = normalize
        self.llama = None
        # One context, one call at a time; a daemon, so a stuck call never holds the process.
        self._threads = DaemonThreads(1, "runnel-llamacpp-embed")
        self._running: set = set()

    async def start(self) -> None:
        await self._threads.run(self._load)

    def _load(self) -> None:
        import llama_cpp

        pooling = {"model": llama_cpp.LLAMA_POOLING_TYPE_UNSPECIFIED, "mean": llama_cpp.LLAMA_POOLING_TYPE_MEAN,
                   "cls": llama_cpp.LLAMA_POOLING_TYPE_CLS, "last": llama_cpp.LLAMA_POOLING_TYPE_LAST}[self.pooling]
        slot = worker_slot()
        threads = self.threads or (slot.cores if slot is not None else os.cpu_count() or 1)
        llama = llama_cpp.Llama(model_path=model_path(self.model), embedding=True, pooling_type=pooling,
                                n_ctx=self._context_length or 0, n_threads=threads, n_threads_batch=threads,
                                n_gpu_layers=self.n_gpu_layers, verbose=False)
        if llama.pooling_type() == llama_cpp.LLAMA_POOLING_TYPE_NONE:
            llama.close()
            raise ValueError(f"app {self.name!r}: the model names no pooling (not an embedding model?); "
                             "set pooling = \"mean\", \"cls\" or \"last\"")
        # One input is one batch: no input may be longer than a batch.
        self.context_length = min(llama.n_ctx(), llama.n_batch)
        self.vocab_size = llama.n_vocab()
        self._pieces = [_piece(llama._model.vocab, i) for i in range(self.vocab_size)]
        self.llama = llama

    async def close(self) -> None:
        finished = True
        if self._running:  # never blocks the loop: waits with a deadline, then abandons
            import asyncio

            _, stuck = await asyncio.wait(set(self._running), timeout=self.close_wait)
            finished = not stuck
        self._threads.close()
        if self.llama is not None and finished:
            self.llama.close()
        self.llama = None

    async def embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        running = self._threads.run(lambda: self._embed(texts))
        self._running.add(running)
        running.add_done_callback(self._running.discard)
        return await running

    def _embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        from runnel import HTTPError

        llama = self.llama
        for index, text in enumerate(texts):
            size = len(llama.tokenize(text.encode("utf-8")))
            if size > self.context_length:  # llama-cpp-python would cut it silently
                raise HTTPError(400, f"Input {index} is {size} tokens; this model takes at most "
                                f"{self.context_length}.", param=f"input[{index}]", code="context_length_exceeded")
        vectors, tokens = llama.embed(texts, normalize=self.normalize, truncate=False, return_count=True)
        return vectors, tokens
