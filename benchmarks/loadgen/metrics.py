"""Per-request serving metrics, defined as ``vllm bench serve`` defines them, and goodput.

For one request that ended (times in ns from ``perf_counter_ns``; ``due`` is when it
was due, ``first`` when its first token was read, ``end`` when its last byte was):

- TTFT = first - due;
- E2EL = end - due (the report's ``latency_ms``);
- TPOT = (E2EL - TTFT) / (output_tokens - 1): the time per output token after the
  first; no value when the request made fewer than 2 tokens. GenAI-Perf (AIPerf)
  calls this "inter token latency" and GuideLLM its per-request ITL;
- ITL: every gap between consecutive token-bearing reads (``sse.StreamTokens``), over
  all requests, as vLLM's ITL.

Goodput (DistServe's, as vLLM computes it): the requests per second that met every
service-level objective given, each a bound in ms on ``ttft``, ``tpot`` or ``e2el``.
A request with fewer than 2 tokens has TPOT 0 for this; a request not streamed has
no first token apart from its end, so its TTFT is its E2EL.
"""

from __future__ import annotations

SLO_KEYS = ("ttft", "tpot", "e2el")


def request_metrics(due: int, first: int, end: int, output_tokens: int) -> tuple[float | None, float | None, float]:
    """(TTFT, TPOT, E2EL) in ms of one request; ``first`` 0 means no token was streamed
    (TTFT and TPOT are then None)."""
    e2el = (end - due) * 1e-6
    if not first:
        return None, None, e2el
    ttft = (first - due) * 1e-6
    tpot = (end - first) * 1e-6 / (output_tokens - 1) if output_tokens > 1 else None
    return ttft, tpot, e2el


def parse_slos(items: list[str] | None) -> dict[str, float] | None:
    """``["ttft:500", "tpot:50"]`` -> ``{"ttft": 500.0, "tpot": 50.0}`` (ms); ValueError
    for an unknown key, a repeated one or a bound that is not a positive number."""
    if not items:
        return None
    slos: dict[str, float] = {}
    for item in items:
        key, sep, value = item.partition(":")
        key = key.strip().lower()
        if not sep or key not in SLO_KEYS:
            raise ValueError(f"a goodput SLO is KEY:MS with KEY one of {', '.join(SLO_KEYS)}: got {item!r}")
        if key in slos:
            raise ValueError(f"goodput SLO {key!r} given twice")
        try:
            bound = float(value)
        except ValueError:
            raise ValueError(f"goodput SLO {item!r}: {value!r} is not a number of ms") from None
        if not bound > 0 or bound == float("inf"):
            raise ValueError(f"goodput SLO {item!r}: the bound must be a positive number of ms")
        slos[key] = bound
    return slos


def meets(slos: dict[str, float], ttft: float | None, tpot: float | None, e2el: float) -> bool:
    """Whether one request met every SLO (see the module's docstring for the missing values)."""
    values = {"ttft": e2el if ttft is None else ttft, "tpot": tpot or 0.0, "e2el": e2el}
    return all(values[key] <= bound for key, bound in slos.items())
