"""Offline tokenizers for the `tiny` and `demo` presets, built with the `tokenizers` library (no Hub access).

Both kinds are byte-level: every string (digits, punctuation, any unicode) encodes without `<unk>` and decodes back
exactly, which the text-coordinate baseline needs because it writes numbers. The special-token ids are fixed because
the model presets hard-code them (`SPECIAL_TOKEN_IDS`).
"""

from collections.abc import Iterable

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast


PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN, IMAGE_TOKEN, VIS_TOKEN = (
    "<pad>",
    "<s>",
    "</s>",
    "<unk>",
    "<image>",
    "<vis>",
)
# Order = id: the presets' `pad_token_id`, `bos_token_id`, `eos_token_id`, `image_token_id`, `vis_token_id`.
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN, IMAGE_TOKEN, VIS_TOKEN)
SPECIAL_TOKEN_IDS = {token: index for index, token in enumerate(SPECIAL_TOKENS)}
# 6 special tokens + the 256 byte symbols of the byte-level alphabet.
CHAR_VOCAB_SIZE = len(SPECIAL_TOKENS) + 256


def _byte_level_tokenizer(model: models.Model, use_regex: bool) -> Tokenizer:
    tokenizer = Tokenizer(model)
    # use_regex splits words (GPT-2 style) so BPE merges stay inside words; the char kind needs no split.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=use_regex)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _finish(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    # `<vis>` absorbs the space before it, so that an object is ONE generated token (not a space token + `<vis>`)
    tokenizer.add_special_tokens(
        [AddedToken(t, special=True, normalized=False, lstrip=t == VIS_TOKEN) for t in SPECIAL_TOKENS]
    )
    # A plain template (not ByteLevel's post-processor): its offset trimming would give a lone space token an empty
    # span, and the collator's assistant mask relies on offsets.
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B", special_tokens=[(BOS_TOKEN, 1)]
    )
    for token, expected_id in SPECIAL_TOKEN_IDS.items():
        if tokenizer.token_to_id(token) != expected_id:
            raise ValueError(
                f"Special token {token!r} must have id {expected_id}, got {tokenizer.token_to_id(token)}."
            )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=PAD_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        extra_special_tokens={"image_token": IMAGE_TOKEN, "vis_token": VIS_TOKEN},
        # Left padding is what batched generation needs; the training collator pads on the right itself.
        padding_side="left",
    )


def build_tokenizer(
    kind: str = "char", corpus: Iterable[str] | None = None, vocab_size: int = 1024
) -> PreTrainedTokenizerFast:
    """Build a byte-level tokenizer offline.

    Args:
        kind: `"char"`: one token per byte ({CHAR_VOCAB_SIZE} ids), for the tiny preset. `"bpe"`: byte-level BPE
            trained in-process on `corpus`, so frequent words (e.g. the task templates) become single tokens.
        corpus: iterable of strings, required for `"bpe"`.
        vocab_size: the BPE vocabulary size, special tokens and the 256 byte symbols included.

    Returns:
        A `PreTrainedTokenizerFast` with `<pad>`=0, `<s>`=1 (bos, prepended), `</s>`=2 (eos), `<unk>`=3, `<image>`=4
        and `<vis>`=5, the last two also reachable as `tok.image_token_id` / `tok.vis_token_id`.
    """
    if kind == "char":
        alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
        vocab = {token: index for index, token in enumerate((*SPECIAL_TOKENS, *alphabet))}
        model = models.BPE(vocab=vocab, merges=[], unk_token=UNK_TOKEN)
        return _finish(_byte_level_tokenizer(model, use_regex=False))
    if kind == "bpe":
        if corpus is None:
            raise ValueError("`corpus` is required when `kind='bpe'`, got None.")
        if vocab_size < CHAR_VOCAB_SIZE:
            raise ValueError(f"`vocab_size` must be at least {CHAR_VOCAB_SIZE} for `kind='bpe'`, got {vocab_size}.")
        tokenizer = _byte_level_tokenizer(models.BPE(unk_token=UNK_TOKEN), use_regex=True)
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tokenizer.train_from_iterator(corpus, trainer=trainer)
        return _finish(tokenizer)
    raise ValueError(f"`kind` must be 'char' or 'bpe', got {kind!r}.")


__all__ = ["build_tokenizer", "SPECIAL_TOKEN_IDS", "CHAR_VOCAB_SIZE"]
