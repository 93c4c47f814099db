"""Every task of the paper: REG from a box or a mask prompt (and its region-blind control), several objects per answer,
and mixed-task batches whose box/mask normalisation stays exact."""

import numpy as np
import pytest
import torch

from perceptiongpt import PerceptionGPTConfig, PerceptionGPTForConditionalGeneration
from perceptiongpt.processing.collator import DataCollatorForPerceptionGPT, decode_rle
from perceptiongpt.processing.metrics import multi_object_f1, region_description_accuracy
from perceptiongpt.processing.processing_perceptiongpt import build_processor
from perceptiongpt.processing.synthetic import SyntheticConfig, build_synthetic_dataset
from perceptiongpt.processing.tokenization_factory import build_tokenizer
from perceptiongpt.trainer.evaluation import grounding_metrics, swap_regions


VOCABULARY = {"size": ("small", "large"), "colour": ("red", "blue"), "shape": ("circle", "square")}


def test_region_description_accuracy_hand_computed():
    predictions = [
        "the small red circle",  # 3/3 right
        "It is the large red circle.",  # size wrong: 2/3
        "a red square and a blue square",  # two colours named: colour wrong, shape right, size missing: 1/3
        "",  # nothing: 0/3
    ]
    references = ["the small red circle"] * 3 + ["the large blue square"]
    result = region_description_accuracy(predictions, references, VOCABULARY)
    assert result["acc"] == pytest.approx(1 / 4)
    assert result["attr_acc"] == pytest.approx((3 + 2 + 0 + 0) / 12)  # "square" vs reference "circle": wrong too
    partial = region_description_accuracy(["a blue shape"], ["the blue square"], VOCABULARY)
    assert partial == {"acc": 0.0, "attr_acc": 0.5, "n": 1}  # the reference names colour and shape only
    with pytest.raises(TypeError, match=r"`predictions\[0\]` must be a string, got NoneType"):
        region_description_accuracy([None], ["the red circle"], VOCABULARY)


def test_multi_object_counts_and_iou_exactly_half():
    half = [[0, 0, 10, 10]], [[0, 0, 10, 5]]  # IoU = 50 / 100
    assert multi_object_f1([half[0]], [half[1]])["f1"] == 1.0
    assert multi_object_f1([half[0]], [half[1]], iou=0.51)["f1"] == 0.0
    scored = [
        {"task": "multi", "pred": [[0, 0, 10, 10], [0, 0, 10, 10]], "ref": [[0, 0, 10, 10], [20, 20, 30, 30]]},
        {"task": "multi", "pred": None, "ref": [[0, 0, 5, 5]]},  # nothing generated
        {"task": "reg", "pred": "the small red circle", "ref": "the small red circle"},
        {"task": "reg_mask", "pred": "the large red circle", "ref": "the small red circle"},
    ]
    metrics = grounding_metrics(scored, VOCABULARY)
    assert metrics["multi_precision"] == pytest.approx(1 / 2) and metrics["multi_recall"] == pytest.approx(1 / 3)
    assert metrics["multi_pred_count"] == 1.0 and metrics["multi_true_count"] == 1.5
    assert metrics["reg_acc"] == 1.0 and metrics["reg_mask_acc"] == 0.0
    assert metrics["reg_mask_attr_acc"] == pytest.approx(2 / 3)
    assert (metrics["n_eval_reg"], metrics["n_eval_reg_mask"], metrics["n_eval_multi"]) == (1, 1, 2)


@pytest.fixture(scope="module")
def rows():
    config = SyntheticConfig(**{**SyntheticConfig.demo().__dict__, "tasks": ("reg", "multi", "rec", "res")})
    return list(build_synthetic_dataset(config, "test", 120, seed=3)), config


def test_reg_rows_describe_their_target_fully_from_a_box_or_a_mask(rows):
    rows, config = rows
    reg = [row for row in rows if row["task"] == "reg"]
    vocabulary = config.attribute_vocabulary()
    with_mask = [row for row in reg if row["masks"][0] is not None]
    assert 10 <= len(with_mask) <= len(reg) - 10  # both kinds of prompt region
    for row in reg:
        answer = row["messages"][1]["content"].split()
        assert [sum(word in words for word in answer) for words in vocabulary.values()] == [1, 1, 1]
        assert "<vis>" in row["messages"][0]["content"] and len(row["boxes"]) == 1
        others = [region["box"] for region in row["other_regions"]]
        assert others and row["boxes"][0] not in others  # every other object of the scene, not the target
    for row in with_mask:  # the prompt mask is the target's: its bounding box is the prompt box
        mask = decode_rle(row["masks"][0], "masks")
        ys, xs = np.nonzero(mask)
        assert [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] == row["boxes"][0]
    multi = [row for row in rows if row["task"] == "multi"]
    assert multi and all(len(row["boxes"]) >= 2 for row in multi)
    assert all(row["messages"][1]["content"].count("<vis>") == len(row["boxes"]) for row in multi)
    assert all(row["other_regions"] == [] for row in rows if row["task"] != "reg")


def test_the_region_blind_control_never_keeps_a_rows_own_region(rows):
    rows, _ = rows
    swapped = swap_regions(rows, seed=0)
    for row, blind in zip(rows, swapped):
        if row["task"] != "reg":
            assert blind == row
            continue
        assert blind["boxes"][0] != row["boxes"][0] and blind["messages"] == row["messages"]
        match = [region for region in row["other_regions"] if region["box"] == blind["boxes"][0]]
        assert len(match) >= 1
        if row["masks"][0] is not None:
            assert blind["masks"][0] in [region["mask"] for region in match]
    assert swap_regions(rows, seed=0) == swapped
    no_others = {**next(row for row in rows if row["task"] == "reg"), "other_regions": []}
    with pytest.raises(ValueError, match=r"`rows\[0\]` is a REG row without `other_regions`"):
        swap_regions([no_others])


def _tiny():
    torch.manual_seed(0)
    model = PerceptionGPTForConditionalGeneration(PerceptionGPTConfig.from_preset("tiny")).eval()
    return model, build_processor(16, 4, 16, build_tokenizer("char"))


def test_a_prompt_mask_at_two_places_gives_different_answer_logits():
    model, processor = _tiny()
    image = np.full((32, 32, 3), 120, dtype=np.uint8)
    logits = []
    for corner in (slice(0, 12), slice(20, 32)):
        mask = np.zeros((32, 32), dtype=bool)
        mask[corner, corner] = True
        messages = [{"role": "user", "content": processor.user_content("What is in <vis>?", image)}]
        inputs = processor.apply_chat_template(
            [messages], add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt",
            processor_kwargs={"boxes": [[[0, 0, 32, 32]]], "masks": [[mask]]},  # the same box: only the mask moves
        )  # fmt: skip
        with torch.no_grad():
            logits.append(model(**inputs).logits[0, -1])
    assert (logits[0] - logits[1]).abs().max() > 1e-3


def test_mixed_task_batches_keep_the_global_normalisation_exact(rows):
    """REC (no mask), RES (mask), REG (a prompt `<vis>`: no target) and multi (3 targets): the batch's losses equal
    the sum of each row's with the global counts."""
    rows, _ = rows
    pick = {task: next(r for r in rows if r["task"] == task and (task != "multi" or len(r["boxes"]) == 3))
            for task in ("rec", "res", "reg", "multi")}  # fmt: skip
    model, processor = _tiny()
    collator = DataCollatorForPerceptionGPT(processor)
    batch = collator(list(pick.values()))
    _, _, _, has_box, has_mask = model.vis_targets(
        batch["input_ids"], batch["labels"], batch["vis_boxes"], batch["vis_mask_valid"]
    )
    assert int(has_box.sum()) == 1 + 1 + 0 + 3 and int(has_mask.sum()) == 1
    counts = dict(
        num_items_in_batch=int((batch["labels"][:, 1:] != -100).sum()),
        num_vis_in_batch=int(has_box.sum()),
        num_masks_in_batch=int(has_mask.sum()),
    )
    full = model(**batch, **counts)
    parts = [model(**collator([row]), **counts) for row in pick.values()]
    for name in ("loss", "box_l1_loss", "box_giou_loss", "mask_dice_loss", "mask_bce_loss"):
        total = sum((getattr(part, name) for part in parts if getattr(part, name) is not None), torch.tensor(0.0))
        torch.testing.assert_close(getattr(full, name), total, atol=2e-5, rtol=1e-5)


def test_the_strict_rec_protocol_counts_iou_above_half_on_unclipped_boxes():
    from types import SimpleNamespace

    half = [{"task": "rec", "pred": [0, 0, 10, 10], "ref": [0, 0, 10, 5]}]  # IoU exactly 0.5
    assert grounding_metrics(half)["rec_acc@0.5"] == 1.0
    assert grounding_metrics(half, rec_protocol="strict")["rec_acc@0.5"] == 0.0
    with pytest.raises(ValueError, match=r"`rec_protocol` must be one of \('standard', 'strict'\), got 'loose'"):
        grounding_metrics(half, rec_protocol="loose")
    _, processor = _tiny()  # pad mode: a 40x20 image is padded to a 40x40 frame
    outputs = SimpleNamespace(
        sequences=torch.tensor([[processor.vis_token_id]]), pred_boxes=[torch.tensor([[0.0, 0.0, 1.0, 1.0]])],
        pred_masks=None, vis_scores=[torch.tensor([0.9])], prompt_length=0,
    )  # fmt: skip
    clipped = processor.post_process_generation(outputs, [(20, 40)])[0]["boxes"][0]
    as_predicted = processor.post_process_generation(outputs, [(20, 40)], clip_boxes=False)[0]["boxes"][0]
    assert clipped.tolist() == [0, 0, 40, 20] and as_predicted.tolist() == [0, -10, 40, 30]


def test_the_transfer_domain_has_new_words_and_well_formed_rec_rows():
    from perceptiongpt.processing.grounding_datasets import check_grounding_rows
    from perceptiongpt.processing.synthetic_transfer import build_transfer_dataset, generate_transfer_samples

    rows = build_transfer_dataset("train", 12, seed=1)
    check_grounding_rows(rows)
    assert list(generate_transfer_samples("train", 12, seed=1))[5]["boxes"] == rows[5]["boxes"]  # deterministic
    for row in rows:
        mask = decode_rle(row["masks"][0], "masks")
        ys, xs = np.nonzero(mask)
        assert [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] == row["boxes"][0]
        words = set(row["messages"][0]["content"].lower().strip("?.").split())
        demo_words = {w for words in SyntheticConfig.demo().attribute_vocabulary().values() for w in words}
        assert words & {"ring", "bar", "frame", "plus"} and not words & demo_words  # none of the demo's words
    with pytest.raises(ValueError, match="`split` must be one of"):
        list(generate_transfer_samples("dev", 1))
