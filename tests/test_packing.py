"""Padding-free packing: one `[1, T]` row computes exactly what the padded batch computes."""

import pytest
import torch
from conftest import IMAGE, VIS, training_arguments

from perceptiongpt import PerceptionGPTConfig, PerceptionGPTForConditionalGeneration
from perceptiongpt.processing.collator import IGNORE_INDEX, DataCollatorForPerceptionGPT
from perceptiongpt.processing.packing import DataCollatorForPackedPerceptionGPT, pack_batch
from perceptiongpt.processing.processing_perceptiongpt import build_processor
from perceptiongpt.processing.synthetic import SyntheticConfig, build_synthetic_dataset
from perceptiongpt.processing.tokenization_factory import build_tokenizer
from perceptiongpt.trainer import PerceptionGPTTrainer


LOSSES = ("lm_loss", "box_l1_loss", "box_giou_loss", "mask_dice_loss", "mask_bce_loss", "loss")


@pytest.fixture(scope="module")
def processor():
    return build_processor(16, 4, 16, build_tokenizer("char"))


@pytest.fixture(scope="module")
def rows():
    data = SyntheticConfig(**{**SyntheticConfig.demo().__dict__, "tasks": ("rec", "res")})
    return build_synthetic_dataset(data, "train", 8, seed=0)


@pytest.fixture
def model():
    torch.manual_seed(0)
    model = PerceptionGPTForConditionalGeneration(PerceptionGPTConfig.from_preset("tiny"))
    with torch.no_grad():  # non-trivial boxes, and masks that depend on the image (a fresh decoder barely does)
        model.box_decoder.mlp[-1].weight.normal_(0, 0.5)
        for weight in model.mask_decoder.parameters():
            if weight.dim() > 1:
                weight.normal_(0, 0.3)
    return model


def _split(packed_tensor, lengths):
    """(1, T_total, ...) -> one (L_b, ...) piece per sample."""
    return torch.split(packed_tensor[0], lengths)


def test_pack_batch_layout():
    ids = torch.tensor([[1, IMAGE, 7, VIS, 8, 0, 0], [1, IMAGE, VIS, 9, VIS, 2, 0]])  # (2, 7), right-padded
    attention = (ids != 0).long()
    attention[1, 6] = 0
    labels = torch.where(ids > 5, ids, IGNORE_INDEX)
    labels[:, 0] = 1  # a first label that packing must hide: nothing predicts a sample's first token
    boxes = torch.tensor(
        [
            [[0.1, 0.1, 0.2, 0.2], [9.0, 9.0, 9.0, 9.0]],  # slot 1 is padding (no second `<vis>`)
            [[0.3, 0.3, 0.4, 0.4], [0.5, 0.5, 0.6, 0.6]],
        ]
    )
    masks = torch.zeros(2, 2, 4, 4, dtype=torch.bool)
    masks[1, 1, 0, 0] = True
    valid = torch.tensor([[False, False], [False, True]])
    batch = {
        "input_ids": ids,
        "attention_mask": attention,
        "labels": labels,
        "pixel_values": torch.randn(2, 3, 4, 4),
        "vis_boxes": boxes,
        "vis_masks": masks,
        "vis_mask_valid": valid,
    }
    packed = pack_batch(batch, VIS, return_seq_idx=True)
    assert "attention_mask" not in packed
    assert packed["input_ids"].tolist() == [[1, IMAGE, 7, VIS, 8, 1, IMAGE, VIS, 9, VIS, 2]]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5]]
    assert packed["seq_idx"].tolist() == [[0] * 5 + [1] * 6]
    assert packed["labels"].tolist() == [[-100, -100, 7, -100, 8, -100, -100, -100, 9, -100, -100]]
    assert torch.equal(packed["pixel_values"], batch["pixel_values"])
    assert torch.equal(packed["vis_boxes"], torch.cat([boxes[0, :1], boxes[1]])[None])  # (1, 3, 4), token order
    assert torch.equal(packed["vis_masks"], torch.cat([masks[0, :1], masks[1]])[None])  # (1, 3, 4, 4)
    assert packed["vis_mask_valid"].tolist() == [[False, False, True]]


def test_pack_batch_refuses_what_it_cannot_place():
    ids = torch.tensor([[1, 7, 8], [0, 1, 7]])
    with pytest.raises(ValueError, match="row 1 is not right-padded"):
        pack_batch({"input_ids": ids, "attention_mask": (ids != 0).long()}, VIS)
    with pytest.raises(ValueError, match=r"cannot place: \['image_sizes'\]"):
        pack_batch({"input_ids": ids, "image_sizes": torch.ones(2, 2)}, VIS)
    with pytest.raises(ValueError, match="without `vis_mask_valid`"):
        pack_batch({"input_ids": ids, "vis_masks": torch.zeros(2, 1, 4, 4, dtype=torch.bool)}, VIS)


def _compare(model, padded, packed, use_cache=False):
    """Per-sample max |logit difference|, and both outputs."""
    lengths = padded["attention_mask"].sum(-1).tolist()
    a = model(**padded, use_cache=use_cache)
    b = model(**packed, use_cache=use_cache)
    worst = [
        (a.logits[row, :length] - piece).abs().max().item()
        for row, (length, piece) in enumerate(zip(lengths, _split(b.logits, lengths)))
    ]
    return worst, a, b


def test_packed_logits_losses_boxes_and_grads_match_padded(model, processor, rows):
    batch_rows = [rows[i] for i in range(4)]
    padded = DataCollatorForPerceptionGPT(processor)(batch_rows)
    packed = DataCollatorForPackedPerceptionGPT(processor)(batch_rows)
    del padded["vis_masks"], padded["vis_mask_valid"], packed["vis_masks"], packed["vis_mask_valid"]
    assert packed["input_ids"].shape == (1, int(padded["attention_mask"].sum()))
    worst, a, b = _compare(model, padded, packed)
    assert max(worst) < 1e-5
    for name in LOSSES:
        assert abs(getattr(a, name).item() - getattr(b, name).item()) < 1e-6, name
    assert a.box_l1_loss > 0 and a.pred_boxes.shape == (4, 4)
    assert (a.pred_boxes - b.pred_boxes).abs().max() < 1e-6
    grads = []
    for out in (a, b):
        model.zero_grad()
        out.loss.backward(retain_graph=True)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    assert max((grads[0][n] - grads[1][n]).abs().max().item() for n in grads[0]) < 1e-5


def test_packed_training_forward_is_isolated_whatever_use_cache_says(model, processor, rows):
    """The trap: with a cache the LM skips the block-diagonal mask and later samples attend to earlier ones. With
    labels, `forward` forces use_cache=False, so a plain Trainer (or the text config's default) cannot fall in."""
    batch_rows = [rows[i] for i in range(2)]
    padded = DataCollatorForPerceptionGPT(processor)(batch_rows)
    packed = DataCollatorForPackedPerceptionGPT(processor)(batch_rows)
    assert model.config.text_config.use_cache and "labels" in packed
    with torch.no_grad():
        for use_cache in (None, True):
            worst, _, _ = _compare(model, padded, packed, use_cache=use_cache)
            assert max(worst) < 1e-5, use_cache


def test_packed_mask_losses_read_each_samples_image(model, processor, rows):
    batch_rows = [rows[i] for i in range(4)]
    padded = DataCollatorForPerceptionGPT(processor)(batch_rows)
    packed = DataCollatorForPackedPerceptionGPT(processor)(batch_rows)
    assert int(padded["vis_mask_valid"].sum()) == 3  # res rows 0, 1, 3: packed rows 1 and 3 need images 1 and 3
    with torch.no_grad():
        worst, a, b = _compare(model, padded, packed)
    assert max(worst) < 1e-5
    for name in ("mask_dice_loss", "mask_bce_loss", "loss"):
        assert abs(getattr(a, name).item() - getattr(b, name).item()) < 1e-5, name
    assert a.pred_masks.shape == (3, 16, 16) and (a.pred_masks - b.pred_masks).abs().max() < 1e-4
    # the check is sensitive: the masks of image 0 differ from those of the right images
    features = a.image_outputs.mask_features  # (4, 16, C)
    states = model.model(**{k: v for k, v in padded.items() if k != "labels"}).last_hidden_state
    state = states[1, (padded["labels"][1] == VIS).nonzero()[0, 0] - 1][None]  # (1, D) predicts row 1's `<vis>`
    wrong = model.mask_decoder(state, features[:1])  # (1, S, S)
    assert (wrong[0] - a.pred_masks[1]).abs().max() > 1e-2


def test_packed_training_matches_padded_training(processor, tmp_path):
    """Two SGD steps through PerceptionGPTTrainer (which passes use_cache=False) give the same weights."""
    data = SyntheticConfig(**{**SyntheticConfig.demo().__dict__, "tasks": ("rec",)})
    train_rows = build_synthetic_dataset(data, "train", 8, seed=1)
    finals = []
    for collator in (DataCollatorForPerceptionGPT(processor), DataCollatorForPackedPerceptionGPT(processor)):
        torch.manual_seed(0)
        model = PerceptionGPTForConditionalGeneration(PerceptionGPTConfig.from_preset("tiny"))
        initial = {n: p.detach().clone() for n, p in model.named_parameters()}
        args = training_arguments(tmp_path / "out", learning_rate=1e-1, optim="sgd")
        trainer = PerceptionGPTTrainer(
            model=model, args=args, train_dataset=train_rows, data_collator=collator, processing_class=processor
        )
        trainer.train()
        finals.append({n: p.detach().clone() for n, p in model.named_parameters()})
        logged = [entry for entry in trainer.state.log_history if "box_l1_loss" in entry]
        assert len(logged) == 2 and logged[0]["box_l1_loss"] > 0
    worst = max((finals[0][n] - finals[1][n]).abs().max().item() for n in finals[0])
    moved = max((finals[0][n] - initial[n]).abs().max().item() for n in initial)
    assert worst < 1e-6 and moved > 1e-3
