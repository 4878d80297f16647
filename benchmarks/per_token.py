"""The loop thread's cost per token for a CTranslate2 row: the rules (runnel.choices) and the push.

    .venv/bin/python benchmarks/per_token.py [--repeat 40] [--rules-only] [--stream]

Greedy ids of builtin:tiny are made once; then each case runs them through a scheduler
``Row`` as ``Batch.deliver`` does (``consume`` per token, ``emit`` per burst of 1 or 8)
into a sink that does nothing, and prints the median and best microseconds per token
over the repeats. ``--rules-only`` swaps the detokenizer for a table of each id's text, to
see the rules themselves (since the detokenizer's own table fast path, it costs about the
same). ``--stream`` pushes into the completions stream sink and a ResponseStream over a
transport that drops the bytes instead: everything the loop thread does per token but the
wake-up and the write system call. The machine's other load shows: compare runs made side
by side, and prefer the best column.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import ctranslate2
from runnel_ctranslate2 import scheduler
from runnel_ctranslate2.builtin import ensure_builtin
from runnel_ctranslate2.tokenizer import load_tokenizer

from runnel.generation import SamplingParams

PROMPT = "The cat sees a red ball"
CASES = {
    "plain": SamplingParams(max_tokens=1000, ignore_eos=True),
    "stop strings": SamplingParams(max_tokens=1000, ignore_eos=True, stop=("zqx", "The end")),
    "logprobs": SamplingParams(max_tokens=1000, ignore_eos=True, logprobs=True, top_logprobs=1),
}


class NullSink:
    def on_tokens(self, index, text, token_ids, logprobs) -> None:
        pass

    def on_finish(self, index, reason, completion_tokens) -> None:
        pass

    def on_error(self, error) -> None:
        pass


class NullTransport:
    def write(self, data: bytes) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0


def stream_sink():
    """The completions stream sink over a ResponseStream that frames SSE chunks into NullTransport."""
    from runnel.http.flow_control import FlowControl
    from runnel.http.response import ResponseStream
    from runnel.serializers import ServerSentEvents
    from runnel.surfaces.openai.sinks import CompletionStream, Usage

    head = {"id": "cmpl-0123456789abcdef0123", "object": "text_completion", "created": 1700000000, "model": "tiny"}
    sink = CompletionStream(logprobs=False, echo=None, choices=1, usage=Usage(7), include_usage=True, head=head)
    transport = NullTransport()
    sink.open(ResponseStream(transport, FlowControl(transport, asyncio.get_running_loop()),  # type: ignore[arg-type]
                             serializer=ServerSentEvents(), chunked=True, discard=False, max_pending=1 << 20,
                             on_end=lambda: None, on_overflow=lambda pending: None))
    return sink


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=40)
    parser.add_argument("--rules-only", action="store_true")
    parser.add_argument("--stream", action="store_true", help="push into the completions stream sink")
    args = parser.parse_args()

    model = ensure_builtin("tiny")
    tokenizer = load_tokenizer(model)
    prompt = tokenizer.encode(PROMPT, add_bos=True)
    start = [tokenizer.id_to_token(i) for i in prompt]
    generator = ctranslate2.Generator(model, device="cpu", intra_threads=1)
    ids = list(generator.generate_batch([start], max_length=512, min_length=512, sampling_topk=1, end_token=[],
                                        include_prompt_in_result=False)[0].sequences_ids[0])
    del generator
    tokens = [tokenizer.id_to_token(i) for i in ids]
    if args.rules_only:
        pieces = {i: tokenizer.decode([i]) for i in set(ids)}

        class TableDetokenizer:
            def __init__(self, tokenizer, context_ids=()) -> None:
                pass

            def push(self, token_id: int) -> str:
                return pieces[token_id]

            def flush(self) -> str:
                return ""

        scheduler.IncrementalDetokenizer = TableDetokenizer

    def once(params: SamplingParams, burst: int) -> float:
        generation = scheduler.BatchedGeneration(stream_sink() if args.stream else NullSink())
        row = scheduler.Row(generation, 0, start, prompt, params, tokenizer)
        generation.rows = [row]
        began = time.perf_counter()
        for i, (token_id, token) in enumerate(zip(ids, tokens, strict=True)):
            row.consume(token_id, token, -0.5, False)
            if i % burst == burst - 1 and not row.done:
                row.emit()
        if not row.done:
            row.finish("length")
        return (time.perf_counter() - began) / len(ids) * 1e6

    async def report() -> None:  # in a running loop: the sink makes a future
        print(f"{'case':14s} burst   median us/token   best")
        for name, params in CASES.items():
            if args.stream and params.logprobs:
                continue  # a stream of plain text: the sink's general format is not what is timed here
            for burst in (1, 8):
                runs = sorted(once(params, burst) for _ in range(args.repeat))
                print(f"{name:14s} {burst:5d}   {statistics.median(runs):15.2f}   {runs[0]:4.2f}")

    asyncio.run(report())


if __name__ == "__main__":
    main()
