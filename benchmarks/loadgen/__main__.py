"""runnel-loadgen (or python -m benchmarks.loadgen): load an HTTP server, print a table.

The examples are in EXAMPLES below (``--help`` prints them).
"""

from __future__ import annotations

import argparse
import os
import sys

import orjson

from .client import LoadSpec, Workload, run_load
from .dataset import Lengths, Sample, fixed, load_sharegpt, synthetic
from .metrics import parse_slos
from .report import format_table

DEFAULT_MAX_TOKENS = 16
MAX_PROMPTS = 100_000
EXAMPLES = """examples:
  # an OpenAI-compatible server: 8 streams of 128-word prompts and 128 tokens out, goodput under SLOs
  runnel-loadgen --base-url http://127.0.0.1:8000 --model tiny --input-len 128 --output-len 128 \\
      --ignore-eos -c 8 -d 20 --goodput ttft:500 tpot:50 --json out.json
  # open loop: 4 requests/s, Poisson arrivals, prompts and lengths from a ShareGPT file
  runnel-loadgen --base-url http://127.0.0.1:8000/v1 --model tiny --endpoint chat \\
      --dataset sharegpt.jsonl --request-rate 4 -d 60
  # any URL: a health check from 8 clients; a function endpoint, streamed
  runnel-loadgen http://127.0.0.1:8000/health -c 8 -d 5
  runnel-loadgen http://127.0.0.1:8000/v4/p/hello/count --body '{"to": 16}' --stream -c 4
  # a server on another host (only loopback without --allow-remote)
  runnel-loadgen --base-url http://10.0.0.5:8000 --allow-remote --model m --api-key KEY -c 4
"""


def _header(text: str) -> tuple[str, str]:
    name, sep, value = text.partition(":")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"expected NAME:VALUE, got {text!r}")
    return name.strip(), value.strip()


def _body(text: str) -> bytes:
    if text.startswith("@"):
        try:
            with open(text[1:], "rb") as f:
                return f.read()
        except OSError as exc:
            raise argparse.ArgumentTypeError(f"cannot read {text[1:]!r}: {exc.strerror}") from None
    return text.encode()


def _lengths(text: str) -> Lengths:
    try:
        return Lengths.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="runnel-loadgen", description=__doc__.split("\n")[0],
                                epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("url", nargs="?", help="target URL (with --model or --openai-*: the base URL, as --base-url)")
    p.add_argument("--base-url", help="the server's OpenAI base URL, e.g. http://127.0.0.1:8000 or .../v1")
    p.add_argument("--allow-remote", action="store_true",
                   help="send to a host that is not loopback (by default only 127.0.0.1, ::1, localhost)")
    p.add_argument("--method", help="HTTP method (default GET, or POST with a body)")
    p.add_argument("--body", type=_body, help="request body: JSON text, or @FILE")
    p.add_argument("--header", type=_header, action="append", default=[], metavar="NAME:VALUE",
                   help="extra request header (repeatable)")
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                   help="parse answers as SSE and count tokens (default: on with --model, else off)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--concurrency", "-c", type=int, help="closed loop: N clients (default 1)")
    mode.add_argument("--request-rate", "--rate", "-r", dest="rate", type=float,
                      help="open loop: requests/s, Poisson arrivals (see --burstiness)")
    p.add_argument("--burstiness", type=float, default=1.0,
                   help="open loop: gamma shape of the inter-arrival times (1 = Poisson; <1 burstier)")
    p.add_argument("--duration", "-d", type=float, default=10.0, help="seconds measured (default 10)")
    p.add_argument("--max-requests", "-n", type=int, default=100_000,
                   help="at most this many requests, warmup included (default 100000)")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds of load before measuring (default 1)")
    p.add_argument("--timeout", type=float, default=30.0, help="per request, seconds (default 30)")
    p.add_argument("--goodput", nargs="+", metavar="KEY:MS",
                   help="SLOs for goodput, e.g. ttft:500 tpot:50 (keys ttft, tpot, e2el; ms)")
    p.add_argument("--json", metavar="FILE", help="also write the report as JSON ('-' for stdout)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress line on stderr (default: when stderr is a terminal)")
    oa = p.add_argument_group("OpenAI requests (the bodies are built; the URL is the base URL)")
    kind = oa.add_mutually_exclusive_group()
    kind.add_argument("--model", "-m", help="the model to ask (with --endpoint)")
    kind.add_argument("--openai-chat", metavar="MODEL", help="POST /v1/chat/completions for MODEL")
    kind.add_argument("--openai-completion", metavar="MODEL", help="POST /v1/completions for MODEL")
    oa.add_argument("--endpoint", choices=("completions", "chat"), default="completions",
                    help="with --model: /v1/completions (default) or /v1/chat/completions")
    oa.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"),
                    help="sent as Authorization: Bearer (default: $OPENAI_API_KEY)")
    oa.add_argument("--prompt", default="Hello", help="the prompt of every request (default 'Hello')")
    oa.add_argument("--input-len", type=_lengths, metavar="N|LOW-HIGH",
                    help="synthetic prompts of N words, or uniform in LOW-HIGH (in place of --prompt)")
    oa.add_argument("--max-tokens", "--output-len", dest="output_len", type=_lengths, metavar="N|LOW-HIGH",
                    help="max_tokens: N, or uniform in LOW-HIGH (default 16; a --dataset's own lengths)")
    oa.add_argument("--dataset", metavar="FILE", help="prompts (and output lengths) from a ShareGPT-style "
                    "JSONL or JSON file: {conversations: [...]} or {prompt, output_tokens} per record")
    oa.add_argument("--num-prompts", type=int, default=1000,
                    help="distinct requests prepared (cycled), from --input-len or --dataset (default 1000)")
    oa.add_argument("--seed", type=int, default=0, help="seed of the prompts and lengths (default 0)")
    oa.add_argument("--ignore-eos", action="store_true", help='add "ignore_eos": true (vLLM, runnel)')
    oa.add_argument("--temperature", type=float, help="temperature")
    return p.parse_args(argv)


def _samples(args: argparse.Namespace) -> list[Sample]:
    if not 1 <= args.num_prompts <= MAX_PROMPTS:
        raise ValueError(f"--num-prompts must be between 1 and {MAX_PROMPTS}")
    if args.dataset:
        if args.input_len:
            raise ValueError("--dataset and --input-len cannot be combined")
        return load_sharegpt(args.dataset, args.num_prompts, args.seed, args.output_len)
    output_len = args.output_len or Lengths(DEFAULT_MAX_TOKENS, DEFAULT_MAX_TOKENS)
    if args.input_len:
        return synthetic(args.num_prompts, args.input_len, output_len, args.seed)
    return fixed(args.prompt, output_len, args.num_prompts, args.seed)


def build(args: argparse.Namespace) -> tuple[Workload, LoadSpec]:
    model = args.model or args.openai_chat or args.openai_completion
    if args.base_url and args.url:
        raise ValueError("give the URL or --base-url, not both")
    url = args.base_url or args.url
    if not url:
        raise ValueError("no URL: give one, or --base-url")
    if model:
        if args.body is not None:
            raise ValueError("--body cannot be combined with --model/--openai-chat/--openai-completion")
        extra: dict = {}
        if args.ignore_eos:
            extra["ignore_eos"] = True
        if args.temperature is not None:
            extra["temperature"] = args.temperature
        chat = bool(args.openai_chat) or (bool(args.model) and args.endpoint == "chat")
        samples = _samples(args)
        if args.model:  # streams by default, and asks for usage
            stream = True if args.stream is None else args.stream
            workload = Workload.openai(url, model, samples, chat=chat, stream=stream, api_key=args.api_key,
                                       allow_remote=args.allow_remote, **extra)
        else:  # the original form: one body, as given
            if len(samples) > 1 or args.dataset:
                raise ValueError("--openai-chat/--openai-completion send one prompt: use --model for lengths")
            make = Workload.openai_chat if chat else Workload.openai_completion
            workload = make(url, model, samples[0].prompt, samples[0].output_tokens, bool(args.stream), **extra)
            workload.allow_remote = args.allow_remote
            if args.api_key:
                workload.headers.append(("authorization", f"Bearer {args.api_key}"))
        workload.headers += args.header
    else:
        method = args.method or ("POST" if args.body is not None else "GET")
        workload = Workload(url, method, args.body, list(args.header), bool(args.stream),
                            allow_remote=args.allow_remote)
    spec = LoadSpec(
        concurrency=(args.concurrency or 1) if args.rate is None else None,
        rate=args.rate,
        duration=args.duration,
        max_requests=args.max_requests,
        warmup=args.warmup,
        timeout=args.timeout,
        progress=sys.stderr.isatty() if args.progress is None else args.progress,
        burstiness=args.burstiness,
        goodput=parse_slos(args.goodput),
    )
    return workload, spec


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        workload, spec = build(args)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        report = run_load(workload, spec)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    print(format_table(report))
    if args.json == "-":
        sys.stdout.buffer.write(orjson.dumps(report, option=orjson.OPT_INDENT_2) + b"\n")
    elif args.json:
        with open(args.json, "wb") as f:
            f.write(orjson.dumps(report, option=orjson.OPT_INDENT_2) + b"\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
