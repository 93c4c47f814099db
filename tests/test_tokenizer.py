"""The offline tokenizer factory: fixed special ids, lossless byte-level round trips, save/load."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from perceptiongpt.processing.templates import template_corpus
from perceptiongpt.processing.tokenization_factory import CHAR_VOCAB_SIZE, SPECIAL_TOKEN_IDS, build_tokenizer


CHAR = build_tokenizer("char")
BPE = build_tokenizer("bpe", corpus=template_corpus() * 20, vocab_size=400)


@pytest.mark.parametrize("tokenizer", [CHAR, BPE], ids=["char", "bpe"])
def test_special_token_ids_are_fixed(tokenizer):
    assert SPECIAL_TOKEN_IDS == {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "<image>": 4, "<vis>": 5}
    ids = (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id)
    assert ids == (0, 1, 2, 3)
    assert (tokenizer.image_token_id, tokenizer.vis_token_id) == (4, 5)
    assert (tokenizer.image_token, tokenizer.vis_token) == ("<image>", "<vis>")


def test_char_vocabulary_is_bytes_plus_specials():
    assert len(CHAR) == CHAR_VOCAB_SIZE == 262
    # one token per byte, after the prepended bos: "é" is two UTF-8 bytes
    assert CHAR("aé1")["input_ids"][0] == 1
    assert len(CHAR("aé1")["input_ids"]) == 1 + 4


def test_bpe_learns_template_words_and_respects_vocab_size():
    assert len(BPE) <= 400
    assert BPE.tokenize("Where is") == ["Where", "Ġis"]
    assert len(BPE("Locate the object")["input_ids"]) < len(CHAR("Locate the object")["input_ids"])


@pytest.mark.parametrize("tokenizer", [CHAR, BPE], ids=["char", "bpe"])
@settings(max_examples=60, deadline=None)
@given(text=st.text(max_size=40))
def test_any_text_round_trips_without_unk(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == text


@pytest.mark.parametrize("tokenizer", [CHAR, BPE], ids=["char", "bpe"])
def test_numbers_punctuation_and_specials_round_trip(tokenizer):
    text = "USER: <image>\nbox [12.5, 0.003, 640, 480] <vis> ünï 中文 🐱!</s>"
    ids = tokenizer(text)["input_ids"]
    assert ids.count(4) == 1 and ids.count(5) == 1 and ids.count(2) == 1
    assert tokenizer.decode(ids) == "<s>" + text
    assert tokenizer.decode(ids, skip_special_tokens=True) == "USER: \nbox [12.5, 0.003, 640, 480]  ünï 中文 🐱!"


@pytest.mark.parametrize("tokenizer", [CHAR, BPE], ids=["char", "bpe"])
def test_save_load_keeps_named_tokens_and_ids(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "find <vis> near 3.14 <image>"
    assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert (loaded.vis_token_id, loaded.image_token_id, loaded.pad_token_id) == (5, 4, 0)
    assert loaded.padding_side == "left"


def test_invalid_arguments_raise():
    with pytest.raises(ValueError, match="`kind` must be 'char' or 'bpe', got 'word'"):
        build_tokenizer("word")
    with pytest.raises(ValueError, match="`corpus` is required"):
        build_tokenizer("bpe")
    with pytest.raises(ValueError, match="`vocab_size` must be at least 262"):
        build_tokenizer("bpe", corpus=["a"], vocab_size=100)
