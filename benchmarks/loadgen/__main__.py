"""python -m benchmarks.loadgen URL [options]: load a loopback HTTP server, print a table.

Examples (from the repository root):
    .venv/bin/python -m benchmarks.loadgen http://127.0.0.1:8000/health --concurrency 8 --duration 5
    .venv/bin/python -m benchmarks.loadgen http://127.0.0.1:8000 --openai-chat echo \\
        --prompt "one two three" --max-tokens 64 --ignore-eos --stream --rate 50 --json out.json
    .venv/bin/python -m benchmarks.loadgen http://127.0.0.1:8000/v4/p/hello/count \\
        --body '{"to": 16}' --stream --concurrency 4
"""

from __future__ import annotations

import argparse
import sys

import orjson

from .client import LoadSpec, Workload, run_load
from .report import format_table


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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.loadgen", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("url", help="target URL on loopback (with --openai-*: the base URL, e.g. http://127.0.0.1:8000)")
    p.add_argument("--method", help="HTTP method (default GET, or POST with a body)")
    p.add_argument("--body", type=_body, help="request body: JSON text, or @FILE")
    p.add_argument("--header", type=_header, action="append", default=[], metavar="NAME:VALUE",
                   help="extra request header (repeatable)")
    p.add_argument("--stream", action="store_true", help="parse answers as SSE and count tokens")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--concurrency", "-c", type=int, help="closed loop: N clients (default 1)")
    mode.add_argument("--rate", "-r", type=float, help="open loop: requests/s, Poisson arrivals")
    p.add_argument("--duration", "-d", type=float, default=10.0, help="seconds measured (default 10)")
    p.add_argument("--max-requests", "-n", type=int, default=100_000,
                   help="at most this many requests, warmup included (default 100000)")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds of load before measuring (default 1)")
    p.add_argument("--timeout", type=float, default=30.0, help="per request, seconds (default 30)")
    p.add_argument("--json", metavar="FILE", help="also write the report as JSON ('-' for stdout)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress line on stderr (default: when stderr is a terminal)")
    oa = p.add_argument_group("OpenAI requests (the body is built; URL is the base URL)")
    kind = oa.add_mutually_exclusive_group()
    kind.add_argument("--openai-chat", metavar="MODEL", help="POST /v1/chat/completions for MODEL")
    kind.add_argument("--openai-completion", metavar="MODEL", help="POST /v1/completions for MODEL")
    oa.add_argument("--prompt", default="Hello", help="the user message / prompt (default 'Hello')")
    oa.add_argument("--max-tokens", type=int, default=16, help="max_tokens (default 16)")
    oa.add_argument("--ignore-eos", action="store_true", help='add "ignore_eos": true (vLLM-style)')
    oa.add_argument("--temperature", type=float, help="temperature")
    return p.parse_args(argv)


def build(args: argparse.Namespace) -> tuple[Workload, LoadSpec]:
    model = args.openai_chat or args.openai_completion
    if model:
        if args.body is not None:
            raise ValueError("--body cannot be combined with --openai-chat/--openai-completion")
        extra = {}
        if args.ignore_eos:
            extra["ignore_eos"] = True
        if args.temperature is not None:
            extra["temperature"] = args.temperature
        make = Workload.openai_chat if args.openai_chat else Workload.openai_completion
        workload = make(args.url, model, args.prompt, args.max_tokens, args.stream, **extra)
        workload.headers += args.header
    else:
        method = args.method or ("POST" if args.body is not None else "GET")
        workload = Workload(args.url, method, args.body, list(args.header), args.stream)
    concurrency = args.concurrency if args.rate is None else None
    spec = LoadSpec(
        concurrency=concurrency if concurrency is not None or args.rate is not None else 1,
        rate=args.rate,
        duration=args.duration,
        max_requests=args.max_requests,
        warmup=args.warmup,
        timeout=args.timeout,
        progress=sys.stderr.isatty() if args.progress is None else args.progress,
    )
    return workload, spec


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        workload, spec = build(args)
    except ValueError as exc:
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
