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
    # `<vis>` absorbs the space before it (one token per object), so that space is the only byte not decoded back
    assert tokenizer.decode(ids) == "<s>" + text.replace(" <vis>", "<vis>")
    assert tokenizer.decode(ids, skip_special_tokens=True) == "USER: \nbox [12.5, 0.003, 640, 480] ünï 中文 🐱!"


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


def _generated_tokens(processor, answer):
    """Tokens the model generates for an assistant `answer`, EOS not counted: full turn minus the prompt."""
    messages = [{"role": "user", "content": "Where is the small red circle?"}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    turn = processor.apply_chat_template(messages + [{"role": "assistant", "content": answer}])
    prompt, turn = (processor.tokenizer(text, add_special_tokens=False)["input_ids"] for text in (prompt, turn))
    assert turn[: len(prompt)] == prompt and turn[-1] == processor.tokenizer.eos_token_id
    return turn[len(prompt) : -1]


@pytest.mark.parametrize("tokenizer", [CHAR, BPE], ids=["char", "bpe"])
def test_one_generated_token_per_object(tokenizer):
    from perceptiongpt.processing.processing_perceptiongpt import build_processor
    from perceptiongpt.processing.templates import build_task_messages

    processor = build_processor(16, 4, 16, tokenizer)
    for task, n_objects in (("rec", 1), ("multi", 1), ("multi", 3)):
        answer = build_task_messages(task, "red shapes", n_objects=n_objects, seed=0)[1]["content"]
        assert _generated_tokens(processor, answer) == [tokenizer.vis_token_id] * n_objects, (task, n_objects)


def _metaspace_tokenizer():
    """A Llama-style (Metaspace, "▁" for spaces) BPE tokenizer trained in-process, as LLaVA-1.5's behaves."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tokenizer.train_from_iterator(template_corpus() * 10, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def test_vis_is_one_token_after_a_space_in_a_metaspace_tokenizer():
    from perceptiongpt import add_vis_token

    plain = _metaspace_tokenizer()
    plain.add_special_tokens({"additional_special_tokens": ["<vis>"]})
    tokens = plain.tokenize("ASSISTANT: <vis> <vis>")
    assert tokens[-4:] == ["▁", "<vis>", "▁", "<vis>"]  # the control: a lone space token before every object

    tokenizer = _metaspace_tokenizer()
    vis_id = add_vis_token(tokenizer)
    ids = tokenizer("ASSISTANT: <vis> <vis>", add_special_tokens=False)["input_ids"]
    assert ids[-3:] == [tokenizer.convert_tokens_to_ids(tokens[-5]), vis_id, vis_id]
    assert tokenizer.convert_tokens_to_ids("<vis>") == vis_id and tokenizer.vis_token == "<vis>"
