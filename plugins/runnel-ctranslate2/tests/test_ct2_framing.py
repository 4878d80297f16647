"""Encoders see inputs framed by the tokenizer's post-processor, as sentence-transformers does."""

from tokenizers import Tokenizer, models, pre_tokenizers, processors

from runnel_ctranslate2.tokenizer import HuggingFaceTokenizer

VOCAB = {"[UNK]": 0, "[CLS]": 1, "[SEP]": 2, "the": 3, "cat": 4, "sat": 5}


def bert_like_tokenizer(path):
    tokenizer = Tokenizer(models.WordLevel(VOCAB, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 1), ("[SEP]", 2)]
    )
    tokenizer.save(str(path))
    return HuggingFaceTokenizer(path)


def test_framed_encoding_adds_cls_and_sep(tmp_path):
    tokenizer = bert_like_tokenizer(tmp_path / "tokenizer.json")
    assert tokenizer.encode_framed("the cat sat") == [1, 3, 4, 5, 2]
    # Generation prompts stay unframed: only add_bos decides what is added there.
    assert tokenizer.encode("the cat sat", add_bos=False) == [3, 4, 5]
