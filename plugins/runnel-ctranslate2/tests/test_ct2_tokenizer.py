import json
import random

import pytest
from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from runnel_ctranslate2.tokenizer import (
    HuggingFaceTokenizer,
    IncrementalDetokenizer,
    SentencePieceTokenizer,
    load_tokenizer,
)

TEXTS = [
    "Hello world, the cat sees a red ball.",
    "  two  spaces\tand\nnew lines\n\n",
    "café crème brûlée, résumé, naïve, Ærøskøbing",
    "日本語のテキスト 中文 한국어 🎉👍🏽 emoji",
    "mixed: a日b🎉c é",
]

# Characters to build random valid text from: ASCII, accented (2-byte), CJK (3), emoji (4).
ALPHABET = list("abcdefghij ABC.,!?\n") + list("éèñüçß") + list("日本語中文") + ["🎉", "👍", "🚀"]


@pytest.fixture(scope="module")
def llama_json_dir(tmp_path_factory, tiny_dir):
    """A Llama-style tokenizer.json (Metaspace-like, byte fallback) over the tiny vocabulary."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tiny_dir / "tokenizer.model"))
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    tok = HFTokenizer(models.Unigram(vocab, unk_id=0, byte_fallback=True))
    tok.normalizer = normalizers.Sequence(
        [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
    )
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")])
    directory = tmp_path_factory.mktemp("llama-json")
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": {"content": "<s>"}, "eos_token": "</s>"})
    )
    return directory


@pytest.fixture(scope="module")
def bytelevel_dir(tmp_path_factory):
    """A GPT-2 style byte-level BPE tokenizer.json with no bos token."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [t * 3 for t in TEXTS] * 20
    tok.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=400,
            special_tokens=["<|endoftext|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    directory = tmp_path_factory.mktemp("bytelevel-json")
    tok.save(str(directory / "tokenizer.json"))
    # CTranslate2's config.json is the fallback for special tokens.
    (directory / "config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    return directory


@pytest.fixture(params=["sentencepiece", "llama-json", "bytelevel-json"])
def tokenizer(request, sp_tokenizer):
    if request.param == "sentencepiece":
        return sp_tokenizer
    fixture = {"llama-json": "llama_json_dir", "bytelevel-json": "bytelevel_dir"}[request.param]
    return load_tokenizer(request.getfixturevalue(fixture))


def stream(tokenizer, ids, **kwargs):
    detok = IncrementalDetokenizer(tokenizer, **kwargs)
    pieces = [detok.push(i) for i in ids]
    return pieces, detok.flush()


def random_valid_ids(tokenizer, rng):
    """Ids of random valid text, cut at token boundaries, with specials in between."""
    ids = []
    for _ in range(rng.randint(1, 6)):
        text = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 12)))
        ids += tokenizer.encode(text, add_bos=False)
        if rng.random() < 0.3 and tokenizer.special_ids:
            ids.append(rng.choice(sorted(tokenizer.special_ids)))
    return ids


def test_load_tokenizer_picks_the_kind(tiny_dir, llama_json_dir, bytelevel_dir, tmp_path):
    assert isinstance(load_tokenizer(tiny_dir), SentencePieceTokenizer)
    assert isinstance(load_tokenizer(llama_json_dir), HuggingFaceTokenizer)
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        load_tokenizer(tmp_path)


def test_special_tokens(sp_tokenizer, llama_json_dir, bytelevel_dir):
    for tok in (sp_tokenizer, load_tokenizer(llama_json_dir)):
        assert (tok.bos_token, tok.eos_token) == ("<s>", "</s>")
        assert (tok.bos_id, tok.eos_id) == (1, 2)
        assert tok.encode("hi", add_bos=True)[0] == 1
        assert tok.encode("hi", add_bos=False)[0] != 1
        assert tok.token_to_id("</s>") == 2 and tok.id_to_token(2) == "</s>"
        # Special tokens written in text (as chat templates do) become the tokens.
        assert tok.encode("<s>User: hi</s>", add_bos=False)[0] == 1
        assert tok.encode("<s>User: hi</s>", add_bos=False)[-1] == 2
        assert tok.decode(tok.encode("<s>hi</s>", add_bos=True)) == "hi"
    tok = load_tokenizer(bytelevel_dir)
    assert tok.bos_id is None and tok.bos_token is None
    assert tok.eos_token == "<|endoftext|>" and tok.eos_id == tok.token_to_id("<|endoftext|>")
    assert tok.encode("hi", add_bos=True) == tok.encode("hi", add_bos=False)
    assert sp_tokenizer.token_to_id("no-such-piece") is None
    with pytest.raises(ValueError):
        sp_tokenizer.id_to_token(sp_tokenizer.vocab_size)


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tokenizer, text):
    ids = tokenizer.encode(text, add_bos=True)
    assert tokenizer.decode(ids) == text
    assert all(0 <= i < tokenizer.vocab_size for i in ids)
    assert [tokenizer.token_to_id(tokenizer.id_to_token(i)) for i in ids] == ids


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_matches_decode_on_text(tokenizer, text):
    ids = tokenizer.encode(text, add_bos=True)
    pieces, rest = stream(tokenizer, ids)
    assert "".join(pieces) == text and rest == ""
    assert not any("\ufffd" in p for p in pieces)


def test_incremental_on_random_valid_sequences(tokenizer):
    rng = random.Random(7)
    for _ in range(300):
        ids = random_valid_ids(tokenizer, rng)
        pieces, rest = stream(tokenizer, ids)
        assert "".join(pieces) + rest == tokenizer.decode(ids), ids
        assert not any("\ufffd" in p for p in pieces), ids
        assert rest == ""


@pytest.mark.parametrize("kind", ["sentencepiece", "bytelevel-json"])
def test_incremental_on_random_ids(kind, sp_tokenizer, bytelevel_dir):
    # Any ids at all, stray bytes and lone "▁" pieces included. (Hugging Face's ByteFallback
    # decoder is left out: it turns a whole run of byte tokens into U+FFFDs when a later one
    # is invalid, which no streaming decoder can match without holding every byte run.)
    tokenizer = sp_tokenizer if kind == "sentencepiece" else load_tokenizer(bytelevel_dir)
    rng = random.Random(11)
    for _ in range(1500):
        ids = [rng.randrange(tokenizer.vocab_size) for _ in range(rng.randint(0, 30))]
        pieces, rest = stream(tokenizer, ids)
        assert "".join(pieces) + rest == tokenizer.decode(ids), ids


def test_byte_pieces_are_held_until_the_character_is_complete(sp_tokenizer):
    ids = [sp_tokenizer.token_to_id(p) for p in ("▁a", "<0xE2>", "<0x82>", "<0xAC>", "!")]
    assert None not in ids
    assert stream(sp_tokenizer, ids) == (["a", "", "", "€", "!"], "")
    # A character cut short comes out of flush as decode gives it: U+FFFDs.
    pieces, rest = stream(sp_tokenizer, ids[:3])
    assert pieces == ["a", "", ""]
    assert rest == sp_tokenizer.decode(ids[:3])[1:] and set(rest) == {"\ufffd"}


def test_leading_spaces(sp_tokenizer):
    piece = sp_tokenizer.token_to_id
    ids = [piece("▁The"), piece("▁"), piece("▁"), piece("▁cat"), sp_tokenizer.eos_id]
    # No space before the first word; every later "▁" is a space, even lone ones.
    assert stream(sp_tokenizer, ids) == (["The", " ", " ", " cat", ""], "")
    assert sp_tokenizer.decode(ids) == "The   cat"


def test_context_gives_the_first_word_its_space(tokenizer):
    ids = tokenizer.encode("The cat sees the dog", add_bos=True)
    for cut in range(2, len(ids)):
        context, generated = ids[:cut], ids[cut:]
        pieces, rest = stream(tokenizer, generated, context_ids=context)
        full, before = tokenizer.decode(ids), tokenizer.decode(context)
        assert "".join(pieces) + rest == full[len(before) :]


class TableOff:
    """The same tokenizer without its ``plain_texts``: every push takes the decoding path.
    ``decodes`` counts the decodes, to see which path a push took."""

    def __init__(self, tokenizer, *, table: bool = False):
        self._tokenizer = tokenizer
        for name in ("bos_id", "eos_id", "bos_token", "eos_token", "vocab_size", "special_ids"):
            setattr(self, name, getattr(tokenizer, name))
        if table:
            self.plain_texts = tokenizer.plain_texts
        self.decodes = 0

    def decode(self, ids):
        self.decodes += 1
        return self._tokenizer.decode(ids)


@pytest.fixture(params=["random", "builtin:tiny"])
def any_sp_tokenizer(request, sp_tokenizer):
    """The test model's sentencepiece tokenizer, and the shipped builtin:tiny's (its 1000 pieces)."""
    if request.param == "random":
        return sp_tokenizer
    from runnel_ctranslate2.builtin import ensure_builtin

    return load_tokenizer(ensure_builtin("tiny"))


def test_plain_texts_are_the_ordinary_pieces(any_sp_tokenizer):
    sp_tokenizer = any_sp_tokenizer
    sp = sp_tokenizer._sp
    table = sp_tokenizer.plain_texts
    for id in range(sp_tokenizer.vocab_size):
        ordinary = not (sp.is_control(id) or sp.is_unknown(id) or sp.is_byte(id) or sp.is_unused(id))
        assert (id in table) == ordinary, (id, sp.id_to_piece(id))
        if ordinary:
            # The sentencepiece rule: each "\u2581" is a space, wherever it is in mid-text.
            assert table[id] == sp.id_to_piece(id).replace("\u2581", " ")
    assert len(table) >= sp_tokenizer.vocab_size - 259  # all but 256 bytes, <unk>, <s>, </s>


def test_table_path_equals_decoding_path_for_every_id(any_sp_tokenizer):
    sp_tokenizer = any_sp_tokenizer
    piece = sp_tokenizer.token_to_id
    euro = [piece(p) for p in ("<0xE2>", "<0x82>", "<0xAC>")]
    word, other = sp_tokenizer.encode("The cat", add_bos=False)[-2:]  # two words, each its own text
    space = piece("\u2581")
    prompt = sp_tokenizer.encode("The cat sees", add_bos=True)
    befores = [
        ([], []),  # the first text: no leading space
        ([], [word]),  # mid-text after a word
        ([], [space]),  # after a lone space piece
        ([], euro),  # after a character made of byte pieces
        ([], euro[:2]),  # while a character is held back (the table must not be used)
        ([], [sp_tokenizer.eos_id]),  # after a special id
        ([], [word, sp_tokenizer.bos_id]),  # a special id in mid-text
        (prompt, []),  # continuing a prompt: the first word gets its space
    ]
    assert None not in [*euro, space]
    for id in range(sp_tokenizer.vocab_size):
        for context, before in befores:
            ids = [*before, id, id, other]
            slow = TableOff(sp_tokenizer)
            fast = TableOff(sp_tokenizer, table=True)
            pieces_slow, rest_slow = stream(slow, ids, context_ids=context)
            pieces_fast, rest_fast = stream(fast, ids, context_ids=context)
            assert (pieces_fast, rest_fast) == (pieces_slow, rest_slow), (id, context, before)
            full, start = sp_tokenizer.decode(context + ids), sp_tokenizer.decode(context)
            assert "".join(pieces_fast) + rest_fast == full[len(start) :]
    # The table is used: an ordinary piece after whole text costs no decode at all.
    fast = TableOff(sp_tokenizer, table=True)
    detok = IncrementalDetokenizer(fast, context_ids=prompt)
    before = fast.decodes
    plain = [id for id in prompt if id in sp_tokenizer.plain_texts]
    assert [detok.push(id) for id in plain] == [sp_tokenizer.plain_texts[id] for id in plain]
    assert len(plain) >= 3 and fast.decodes == before


def test_table_path_on_random_sequences(sp_tokenizer):
    rng = random.Random(5)
    for _ in range(1500):
        ids = [rng.randrange(sp_tokenizer.vocab_size) for _ in range(rng.randint(0, 30))]
        context = [rng.randrange(sp_tokenizer.vocab_size) for _ in range(rng.randint(0, 3))]
        assert stream(TableOff(sp_tokenizer, table=True), ids, context_ids=context) == stream(
            TableOff(sp_tokenizer), ids, context_ids=context), (context, ids)


# -- per-request costs: a long prompt's conversions, once per request --------------------------


def test_ids_to_tokens_is_id_to_token_for_every_id_and_refuses_the_same_ids(tokenizer):
    ids = list(range(min(tokenizer.vocab_size, 4000)))
    assert tokenizer.ids_to_tokens(ids) == [tokenizer.id_to_token(id) for id in ids]
    assert tokenizer.ids_to_tokens([]) == []
    for bad in (-1, tokenizer.vocab_size):
        with pytest.raises(ValueError, match="out of range"):
            tokenizer.id_to_token(bad)
        with pytest.raises(ValueError, match="out of range"):
            tokenizer.ids_to_tokens([ids[1], bad, ids[2]])


def test_a_prompt_ending_in_a_word_is_not_decoded_and_a_spaces_only_one_is(sp_tokenizer):
    # Whether the output continues text (so its first word gets a space) needs decode(prompt)
    # only when none of the prompt's last ids is a plain piece with a visible character.
    counting = TableOff(sp_tokenizer, table=True)
    IncrementalDetokenizer(counting)  # the anchor is looked up once per tokenizer (cached)
    long_prompt = sp_tokenizer.encode("The cat sees the dog. " * 300, add_bos=True)
    spaces_only = [sp_tokenizer.bos_id, sp_tokenizer.token_to_id("▁")]
    for context, decodes in ((long_prompt, 0), (spaces_only, 1)):
        counting.decodes = 0
        detok = IncrementalDetokenizer(counting, context_ids=context)
        assert counting.decodes == decodes
        generated = sp_tokenizer.encode("cat sees", add_bos=False)
        pieces = [detok.push(id) for id in generated]
        counting.decodes = 0
        rest = detok.flush()
        assert counting.decodes == 0  # nothing held back: nothing to decode at the end
        full, before = sp_tokenizer.decode(context + generated), sp_tokenizer.decode(context)
        assert "".join(pieces) + rest == full[len(before):]
