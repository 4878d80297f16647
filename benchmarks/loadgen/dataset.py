"""What the requests ask for: prompt and output lengths from a distribution, or a dataset.

The client has no tokenizer (it serves any model), so lengths are counted as the
servers' usage counts them where it can and estimated where it cannot:

- a synthetic prompt of N tokens is N words drawn from a list of common short English
  words, nearly all one token in the BPE vocabularies of GPT-2, Llama and their kin (so
  "N words" is about N tokens there; a small vocabulary such as builtin:tiny's splits
  them further, and the server's usage says by how much);
- an output length is ``max_tokens``; with ``ignore_eos`` (vLLM, runnel) the server
  makes exactly that many;
- a ShareGPT reply's length, when a record does not give one, is its characters / 4
  (OpenAI's rule of thumb for English), at least 1.

Every draw comes from ``random.Random(seed)``: the same seed gives the same requests.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import orjson

MAX_DATASET_BYTES = 1 << 30  # a dataset file larger than this is refused (it is read whole)
CHARS_PER_TOKEN = 4
WORDS = (
    "the of and to in is you that it he was for on are as with his they at be this have from or one had by "
    "word but not what all were we when your can said there use an each which she do how their if will up "
    "other about out many then them these so some her would make like him into time has look two more write "
    "go see number no way could people my than first water been call who oil its now find long down day did "
    "get come made may part over new sound take only little work know place year live me back give most very "
    "after thing our just name good sentence man think say great where help through much before line right "
    "too mean old any same tell boy follow came want show also around form three small set put end does "
    "another well large must big even such because turn here why ask went men read need land different home "
    "us move try kind hand picture again change off play spell air away animal house point page letter"
).split()


@dataclass(frozen=True)
class Sample:
    """One request's content: the prompt (user message) and ``max_tokens``."""

    prompt: str
    output_tokens: int


@dataclass(frozen=True)
class Lengths:
    """A length distribution: ``low`` == ``high`` is fixed, else uniform on [low, high]."""

    low: int
    high: int

    def __post_init__(self) -> None:
        if not 1 <= self.low <= self.high:
            raise ValueError(f"lengths must satisfy 1 <= low <= high, got {self.low}-{self.high}")

    @classmethod
    def parse(cls, text: str) -> Lengths:
        """``"128"`` (fixed) or ``"64-256"`` / ``"64:256"`` (uniform, both ends included)."""
        low, sep, high = text.replace(":", "-").partition("-")
        try:
            lengths = cls(int(low), int(high) if sep else int(low))
        except ValueError as exc:
            raise ValueError(f"expected N or LOW-HIGH (positive integers), got {text!r}: {exc}") from None
        return lengths

    def draw(self, rng: random.Random) -> int:
        return self.low if self.low == self.high else rng.randint(self.low, self.high)

    def __str__(self) -> str:
        return str(self.low) if self.low == self.high else f"{self.low}-{self.high}"


def synthetic(count: int, input_lengths: Lengths, output_lengths: Lengths, seed: int = 0) -> list[Sample]:
    """``count`` prompts of random words, lengths drawn from the two distributions."""
    rng = random.Random(seed)
    samples = []
    for _ in range(count):
        words = rng.choices(WORDS, k=input_lengths.draw(rng))
        samples.append(Sample(" ".join(words), output_lengths.draw(rng)))
    return samples


def fixed(prompt: str, output_lengths: Lengths, count: int = 1, seed: int = 0) -> list[Sample]:
    """One prompt for every request; output lengths drawn (one sample when fixed)."""
    if output_lengths.low == output_lengths.high:
        return [Sample(prompt, output_lengths.low)]
    rng = random.Random(seed)
    return [Sample(prompt, output_lengths.draw(rng)) for _ in range(count)]


def _turns(record: dict) -> tuple[str | None, str | None]:
    """(the first user turn, the reply after it) of a ShareGPT conversation."""
    turns = record.get("conversations", record.get("conversation"))
    if type(turns) is not list:
        return None, None
    prompt = reply = None
    for turn in turns:
        if type(turn) is not dict:
            continue
        role = turn.get("from", turn.get("role"))
        text = turn.get("value", turn.get("content"))
        if type(text) is not str:
            continue
        if prompt is None:
            if role in ("human", "user"):
                prompt = text
        elif role in ("gpt", "assistant", "chatgpt", "bard", "bing"):
            reply = text
            break
    return prompt, reply


def load_sharegpt(path: str | os.PathLike[str], count: int, seed: int = 0,
                  output_lengths: Lengths | None = None) -> list[Sample]:
    """``count`` samples (cycled when the file has fewer, in a seeded shuffle) of a file
    the user supplies: JSON lines, or one JSON array (ShareGPT's own form), of either

    - ``{"conversations": [{"from": "human", "value": ...}, {"from": "gpt", "value": ...}, ...]}``
      (``role``/``content`` and ``user``/``assistant`` also read): the first user turn
      is the prompt, the reply after it gives the output length (characters / 4);
    - ``{"prompt": "...", "output_tokens": N}`` (``max_tokens`` also read; without it,
      ``output_lengths`` must be given).

    ``output_lengths``, when given, replaces every record's output length. Records with
    no prompt are skipped; a line that is not JSON is a ValueError naming it."""
    if os.path.getsize(path) > MAX_DATASET_BYTES:
        raise ValueError(f"{os.fspath(path)!r} is larger than {MAX_DATASET_BYTES >> 20} MiB")
    with open(path, "rb") as f:
        data = f.read()
    if data.lstrip()[:1] == b"[":
        try:
            records = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise ValueError(f"{os.fspath(path)!r} is not a JSON array: {exc}") from None
    else:
        records = []
        for number, line in enumerate(data.splitlines(), 1):
            if line.strip():
                try:
                    records.append(orjson.loads(line))
                except orjson.JSONDecodeError as exc:
                    raise ValueError(f"{os.fspath(path)!r} line {number} is not JSON: {exc}") from None
    rng = random.Random(seed)
    pool = []
    for record in records:
        if type(record) is not dict:
            continue
        if type(record.get("prompt")) is str:
            prompt, reply = record["prompt"], None
            given = record.get("output_tokens", record.get("max_tokens"))
        else:
            prompt, reply = _turns(record)
            given = None
        if not prompt:
            continue
        if output_lengths is not None:
            out = output_lengths.draw(rng)
        elif type(given) is int and given >= 1:
            out = given
        elif reply is not None:
            out = max(1, round(len(reply) / CHARS_PER_TOKEN))
        else:
            raise ValueError(f"a record of {os.fspath(path)!r} gives no output length: "
                             "add output_tokens, or pass the output lengths")
        pool.append(Sample(prompt, out))
    if not pool:
        raise ValueError(f"{os.fspath(path)!r} holds no record with a prompt")
    rng.shuffle(pool)
    return [pool[i % len(pool)] for i in range(count)]
