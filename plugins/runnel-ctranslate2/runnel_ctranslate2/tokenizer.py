"""Tokenizers for CTranslate2 model directories, and streaming detokenization.

CTranslate2 takes and returns token *strings* (its vocabulary is the tokenizer's pieces in id
order), so a tokenizer here maps text <-> ids <-> piece strings. Two kinds are supported:
a sentencepiece ``tokenizer.model`` (Llama-2 style, the built-in model) and a Hugging Face
``tokenizer.json`` (read with the ``tokenizers`` library, no transformers needed).
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

REPLACEMENT_CHAR = "\ufffd"


@runtime_checkable
class Tokenizer(Protocol):
    bos_id: int | None
    eos_id: int | None
    bos_token: str | None
    eos_token: str | None
    vocab_size: int
    special_ids: frozenset[int]  # ids that decode() drops (bos, eos, ...)
    # Optional: ``plain_texts``, a dict id -> the text the id adds in mid-text whatever comes
    # before it (once earlier text is whole): IncrementalDetokenizer's fast path (see there).

    def encode(self, text: str, *, add_bos: bool) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def id_to_token(self, id: int) -> str: ...

    def ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        """``[id_to_token(id) for id in ids]``, in one call where the library has one: a
        prompt's tokens are converted on the event loop (3,200 ids: ~2.7 ms one by one)."""
        ...

    def token_to_id(self, token: str) -> int | None: ...


def _special_token(config: dict, key: str) -> str | None:
    # tokenizer_config.json writes a special token as a string or as an AddedToken dict.
    value = config.get(key)
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    return data if isinstance(data, dict) else {}


class SentencePieceTokenizer:
    """A sentencepiece ``tokenizer.model``; special tokens written as text become their ids."""

    def __init__(self, path: str | os.PathLike):
        import sentencepiece as spm

        self._sp = spm.SentencePieceProcessor(model_file=str(path))
        self.vocab_size = self._sp.get_piece_size()
        self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
        self.eos_id = self._sp.eos_id() if self._sp.eos_id() >= 0 else None
        self.bos_token = self._sp.id_to_piece(self.bos_id) if self.bos_id is not None else None
        self.eos_token = self._sp.id_to_piece(self.eos_id) if self.eos_id is not None else None
        self.special_ids = frozenset(
            i for i in range(self.vocab_size) if self._sp.is_control(i)
        )
        # sentencepiece itself encodes "<s>" in text as the characters < s >; Hugging Face's
        # Llama tokenizer (and so every chat template with {{ bos_token }}) expects the token.
        specials = sorted(
            (self._sp.id_to_piece(i) for i in self.special_ids), key=len, reverse=True
        )
        self._special_re = (
            re.compile("(" + "|".join(map(re.escape, specials)) + ")") if specials else None
        )
        # Built here, where the model loads (off the event loop): ~1 us per vocabulary entry.
        self.plain_texts = _plain_texts(self, self._plain_candidates())

    def _plain_candidates(self) -> list[int]:
        """Ids of ordinary pieces: not control, unknown, unused or byte-fallback (<0xNN>) ones."""
        sp = self._sp
        return [
            id for id in range(self.vocab_size)
            if not (sp.is_control(id) or sp.is_unknown(id) or sp.is_unused(id) or sp.is_byte(id))
        ]

    def encode(self, text: str, *, add_bos: bool) -> list[int]:
        ids = [self.bos_id] if add_bos and self.bos_id is not None else []
        parts = self._special_re.split(text) if self._special_re else [text]
        for i, part in enumerate(parts):
            if i % 2:  # the separators re.split keeps: special tokens
                ids.append(self._sp.piece_to_id(part))
            elif part:
                ids.extend(self._sp.encode(part))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode(list(ids))

    def id_to_token(self, id: int) -> str:
        if not 0 <= id < self.vocab_size:
            raise ValueError(f"token id {id} out of range (vocabulary of {self.vocab_size})")
        return self._sp.id_to_piece(id)

    def ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        ids = list(ids)
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
            bad = next(id for id in ids if not 0 <= id < self.vocab_size)
            raise ValueError(f"token id {bad} out of range (vocabulary of {self.vocab_size})")
        return self._sp.id_to_piece(ids)  # sentencepiece's own loop: ~5x the Python one

    def token_to_id(self, token: str) -> int | None:
        id = self._sp.piece_to_id(token)
        # piece_to_id answers unk_id for unknown pieces.
        return None if id == self._sp.unk_id() and token != self._sp.id_to_piece(id) else id


class HuggingFaceTokenizer:
    """A Hugging Face ``tokenizer.json``; bos/eos come from ``tokenizer_config.json`` or
    CTranslate2's ``config.json``."""

    def __init__(self, path: str | os.PathLike):
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(path)
        self._tok = HFTokenizer.from_file(str(path))
        # A saved tokenizer may pad or truncate every encoding; prompts must be neither.
        self._tok.no_padding()
        self._tok.no_truncation()
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.special_ids = frozenset(
            id for id, added in self._tok.get_added_tokens_decoder().items() if added.special
        )
        tokenizer_config = _read_json(path.parent / "tokenizer_config.json")
        ct2_config = _read_json(path.parent / "config.json")

        def special(key: str) -> tuple[str | None, int | None]:
            token = _special_token(tokenizer_config, key) or _special_token(ct2_config, key)
            id = self._tok.token_to_id(token) if token else None
            return (token, id) if id is not None else (None, None)

        self.bos_token, self.bos_id = special("bos_token")
        self.eos_token, self.eos_id = special("eos_token")

    def encode(self, text: str, *, add_bos: bool) -> list[int]:
        # The post-processor's own special tokens are left out so that add_bos alone
        # decides: the same rule for every tokenizer.
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if add_bos and self.bos_id is not None else ids

    def encode_framed(self, text: str) -> list[int]:
        """One sequence framed as the tokenizer's post-processor frames it (BERT's
        [CLS] ... [SEP]): what sentence-transformers pools over."""
        return self._tok.encode(text, add_special_tokens=True).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def id_to_token(self, id: int) -> str:
        # The library answers None past the vocabulary and raises OverflowError below 0.
        token = self._tok.id_to_token(id) if id >= 0 else None
        if token is None:
            raise ValueError(f"token id {id} out of range (vocabulary of {self.vocab_size})")
        return token

    def ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        return [self.id_to_token(id) for id in ids]  # the tokenizers library converts one at a time

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)


def load_tokenizer(model_dir: str | os.PathLike) -> Tokenizer:
    """The tokenizer of a model directory: ``tokenizer.model`` first, then ``tokenizer.json``."""
    model_dir = Path(model_dir)
    if (model_dir / "tokenizer.model").is_file():
        return SentencePieceTokenizer(model_dir / "tokenizer.model")
    if (model_dir / "tokenizer.json").is_file():
        return HuggingFaceTokenizer(model_dir / "tokenizer.json")
    raise FileNotFoundError(
        f"no tokenizer in {str(model_dir)!r}: expected tokenizer.model (sentencepiece) "
        "or tokenizer.json (Hugging Face tokenizers)"
    )


@functools.lru_cache(maxsize=16)  # once per tokenizer, not once per request row
def _find_anchor(tokenizer: Tokenizer) -> tuple[list[int], str]:
    """A token whose text is plain letters and survives being followed by other tokens.

    Decoding a window of recent ids on its own would strip the leading space of its first
    word (sentencepiece drops every leading "▁" at the start of a text); putting this token
    first keeps the window in mid-text, and its own text is cut off again.
    """
    for id in range(tokenizer.vocab_size):
        if id in tokenizer.special_ids:
            continue
        text = tokenizer.decode([id])
        if text.isascii() and text.isalnum() and tokenizer.decode([id, id]) == text * 2:
            return [id], text
    raise ValueError("the tokenizer has no plain alphanumeric token to anchor decoding on")


def _plain_texts(tokenizer: Tokenizer, candidates: Sequence[int]) -> dict[int, str]:
    """The ``candidates`` whose text is context-free in mid-text, each with that text.

    An id qualifies when decoding it after the anchor (mid-text) gives a non-empty text with
    no U+FFFD, and decoding it twice after the anchor gives that text twice: then appending
    it to whole text adds exactly this text. For sentencepiece that is every ordinary piece,
    its "\u2581"s as spaces; the first-word rule (no leading space at the start of a text)
    is the detokenizer's: it uses the table only in mid-text.
    """
    anchor_ids, anchor_text = _find_anchor(tokenizer)
    cut = len(anchor_text)
    texts = {}
    for id in candidates:
        text = tokenizer.decode(anchor_ids + [id])[cut:]
        if text and REPLACEMENT_CHAR not in text and tokenizer.decode(anchor_ids + [id, id])[cut:] == text + text:
            texts[id] = text
    return texts


class IncrementalDetokenizer:
    """Turns ids into text one id at a time, as ``tokenizer.decode`` would for all of them.

    ``"".join(push(i) for i in ids) + flush() == tokenizer.decode(ids)``. Text is held back
    while it ends in an incomplete UTF-8 character, so no output ever carries half of one.
    Each push decodes only a short window: the ids of the text emitted last time (context
    for spacing and merges) plus the ids not emitted yet (the scheme of Hugging Face's
    TextStreamer and vLLM's detokenize_incrementally).

    ``context_ids`` (e.g. the prompt) makes the text continue it, so a first word gets its
    leading space: the output is then what ``decode(context + ids)`` adds after
    ``decode(context)``, provided the context ends on a whole character.

    Fast path: in mid-text, with nothing held back, an id in the tokenizer's ``plain_texts``
    (an ordinary piece) adds exactly its table text, so push returns that without decoding
    (the two decodes cost ~5 us a token; the lookup ~0.3 us). Everything else (the first
    text, byte pieces, special ids, a window with a partial character) decodes as before.
    """

    __slots__ = ("_tokenizer", "_anchor_ids", "_anchor_text", "_ids", "_prefix_offset", "_read_offset", "_mid_text",
                 "_plain")

    _CONTEXT_WINDOW = 6

    def __init__(self, tokenizer: Tokenizer, *, context_ids: Sequence[int] = ()):
        self._tokenizer = tokenizer
        self._anchor_ids, self._anchor_text = _find_anchor(tokenizer)
        tail = list(context_ids[-self._CONTEXT_WINDOW :])
        self._ids: list[int] = tail
        self._prefix_offset = 0  # window start: the ids of the last emitted text
        self._read_offset = len(tail)  # ids before this have been turned into text
        # Until some text exists the window must be decoded as a start of text (leading
        # spaces dropped); after that, anchored as mid-text.
        self._plain: dict[int, str] = getattr(tokenizer, "plain_texts", None) or {}
        self._mid_text = self._continues_text(context_ids)

    def _continues_text(self, context_ids: Sequence[int]) -> bool:
        """Whether ``context_ids`` decode to some text (then the output continues it).

        A plain piece with a visible character among the last few ids answers at once: its
        character is in the decoded text (a start of text strips only leading spaces), and
        it is normally the very last id. Only otherwise is the context decoded, which for a
        long prompt costs ~0.15 us an id on the event loop, once per row."""
        plain = self._plain
        for id in context_ids[-self._CONTEXT_WINDOW:]:
            text = plain.get(id)
            if text is not None and not text.isspace():
                return True
        return bool(context_ids) and bool(self._tokenizer.decode(list(context_ids)))

    def _text(self, start: int, end: int | None = None) -> str:
        ids = self._ids[start:end]
        if not self._mid_text:
            return self._tokenizer.decode(ids)
        return self._tokenizer.decode(self._anchor_ids + ids)[len(self._anchor_text) :]

    def push(self, token_id: int) -> str:
        """Add one id; return the text it completes (often "", never half a character)."""
        ids = self._ids
        # Mid-text and nothing held back (every id is text already): a plain piece adds its text.
        if self._mid_text and self._read_offset == len(ids):
            text = self._plain.get(token_id)
            if text is not None:
                ids.append(token_id)
                return self._advance(text)
        ids.append(token_id)
        if token_id in self._tokenizer.special_ids:
            return ""
        prefix_text = self._text(self._prefix_offset, self._read_offset)
        new_text = self._text(self._prefix_offset)
        if len(new_text) <= len(prefix_text) or new_text.endswith(REPLACEMENT_CHAR):
            # Nothing new, or the last bytes may still become a character: wait.
            return ""
        return self._advance(new_text[len(prefix_text) :])

    def flush(self) -> str:
        """Return whatever is held back (e.g. a truncated character, as U+FFFD)."""
        if self._read_offset == len(self._ids):
            return ""  # nothing is: every id is text already (two decodes saved per row)
        prefix_text = self._text(self._prefix_offset, self._read_offset)
        new_text = self._text(self._prefix_offset)
        if len(new_text) <= len(prefix_text):
            return ""
        return self._advance(new_text[len(prefix_text) :])

    def _advance(self, text: str) -> str:
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        self._mid_text = True
        # Drop ids before the window so memory stays flat on long generations.
        if self._prefix_offset > 64:
            del self._ids[: self._prefix_offset]
            self._read_offset -= self._prefix_offset
            self._prefix_offset = 0
        return text
