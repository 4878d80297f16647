"""The ceiling: CTranslate2 called in-process, no HTTP. Prints one JSON object.

    python benchmarks/peers/ct2_in_process.py --model-dir DIR --clients N [--tokens 128] [--seconds 5]

The same model and settings as the servers (greedy, every request exactly --tokens tokens,
inter_threads=2, intra_threads=1). N clients are one generate_batch of N prompts, again and
again: the best a batching server can do. Tokens arrive through a step callback, as they do
in a server; it records when each row's tokens arrive, for time to first token (from the
call) and inter-token latency.
"""

import argparse
import json
import os
import time

import ctranslate2
import numpy as np
import sentencepiece as spm


def percentiles(values: list[float]) -> dict:
    if not values:
        return {}
    a = np.asarray(values) * 1000
    return {"p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99)), "mean": float(a.mean()), "max": float(a.max())}


def measure(generator, prompt: list[str], clients: int, tokens: int, seconds: float, warmup: float) -> dict:
    """``clients`` prompts in one generate_batch, again and again for ``seconds`` after
    ``warmup``: tokens/s, and TTFT / inter-token latency from the step callback's times."""
    last = [0.0] * clients
    first = [True] * clients
    ttft, itl = [], []

    def callback(step):
        now = time.perf_counter()
        row = step.batch_id
        (ttft if first[row] else itl).append(now - last[row])
        first[row], last[row] = False, now
        return False

    options = dict(max_length=tokens, min_length=tokens, sampling_topk=1, end_token=[],
                   include_prompt_in_result=False, callback=callback)

    def batch() -> int:
        last[:] = [time.perf_counter()] * clients
        first[:] = [True] * clients
        results = generator.generate_batch([prompt] * clients, **options)
        return sum(len(result.sequences_ids[0]) for result in results)

    deadline = time.perf_counter() + warmup
    while time.perf_counter() < deadline:
        batch()
    ttft.clear(), itl.clear()
    made, requests = 0, 0
    start = time.perf_counter()
    deadline = start + seconds
    while time.perf_counter() < deadline:
        made += batch()
        requests += clients
    elapsed = time.perf_counter() - start
    return {"requests": requests, "errors": {}, "duration_s": elapsed, "requests_per_s": requests / elapsed,
            "tokens": made, "tokens_per_s": made / elapsed, "ttft_ms": percentiles(ttft), "itl_ms": percentiles(itl)}


def prompt_tokens(model_dir: str, text: str) -> list[str]:
    """``text`` as the model's start tokens, bos first (its sentencepiece tokenizer.model)."""
    sp = spm.SentencePieceProcessor(model_file=os.path.join(model_dir, "tokenizer.model"))
    return [sp.id_to_piece(sp.bos_id())] + sp.encode(text, out_type=str)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--prompt", default="The cat sees a red ball")
    parser.add_argument("--clients", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--inter-threads", type=int, default=2)
    parser.add_argument("--intra-threads", type=int, default=1)
    parser.add_argument("--compute-type", default="default")
    args = parser.parse_args()
    generator = ctranslate2.Generator(args.model_dir, device="cpu", inter_threads=args.inter_threads,
                                      intra_threads=args.intra_threads, compute_type=args.compute_type)
    result = measure(generator, prompt_tokens(args.model_dir, args.prompt), args.clients, args.tokens, args.seconds,
                     args.warmup)
    del generator  # before exit: a generator that ran Python callbacks can abort at exit
    print(json.dumps(result))


if __name__ == "__main__":
    main()
