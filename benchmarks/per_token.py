"""The loop thread's cost per token for a CTranslate2 row: the rules (runnel.choices) and the push.

    .venv/bin/python benchmarks/per_token.py [--repeat 40] [--rules-only]

Greedy ids of builtin:tiny are made once; then each case runs them through a scheduler
``Row`` as ``Batch.deliver`` does (``consume`` per token, ``emit`` per burst of 1 or 8)
into a sink that does nothing, and prints the median and best microseconds per token
over the repeats. ``--rules-only`` swaps the detokenizer (most of the cost) for a table
lookup, to see the rules themselves. The machine's other load shows: compare runs made
side by side, and prefer the best column.
"""

from __future__ import annotations

import argparse
import statistics
import time

import ctranslate2

from runnel.generation import SamplingParams
from runnel_ctranslate2 import scheduler
from runnel_ctranslate2.builtin import ensure_builtin
from runnel_ctranslate2.tokenizer import load_tokenizer

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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=40)
    parser.add_argument("--rules-only", action="store_true")
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
        generation = scheduler.BatchedGeneration(NullSink())
        row = scheduler.Row(generation, 0, start, prompt, params, tokenizer)
        generation.rows = [row]
        began = time.perf_counter()
        for i, (token_id, token) in enumerate(zip(ids, tokens)):
            row.consume(token_id, token, -0.5, False)
            if i % burst == burst - 1 and not row.done:
                row.emit()
        if not row.done:
            row.finish("length")
        return (time.perf_counter() - began) / len(ids) * 1e6

    print(f"{'case':14s} burst   median us/token   best")
    for name, params in CASES.items():
        for burst in (1, 8):
            runs = sorted(once(params, burst) for _ in range(args.repeat))
            print(f"{name:14s} {burst:5d}   {statistics.median(runs):15.2f}   {runs[0]:4.2f}")


if __name__ == "__main__":
    main()
