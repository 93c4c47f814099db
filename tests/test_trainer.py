"""PerceptionGPTTrainer: loss parts, global-count averaging under GA, LoRA recipe, round trips, resume."""

import math

import pytest
import torch
from conftest import training_arguments

from perceptiongpt import PerceptionGPTConfig, PerceptionGPTForConditionalGeneration
from perceptiongpt.processing.collator import DataCollatorForPerceptionGPT
from perceptiongpt.processing.processing_perceptiongpt import build_processor
from perceptiongpt.processing.synthetic import SyntheticConfig, build_synthetic_dataset
from perceptiongpt.processing.tokenization_factory import build_tokenizer
from perceptiongpt.trainer import LOSS_PARTS, PerceptionGPTTrainer, count_parameters, evaluate_grounding, lora_config


DATA = SyntheticConfig(**{**SyntheticConfig.demo().__dict__, "tasks": ("rec", "res")})


@pytest.fixture(scope="module")
def rows():
    return build_synthetic_dataset(DATA, "train", 16, seed=0)


@pytest.fixture
def setup():
    torch.manual_seed(0)
    config = PerceptionGPTConfig.from_preset("tiny")
    model = PerceptionGPTForConditionalGeneration(config)
    processor = build_processor(16, 4, 16, build_tokenizer("char"))
    return model, processor


def _args(tmp_path, **kwargs):
    return training_arguments(tmp_path / "out", **kwargs)


def _trainer(model, processor, rows, tmp_path, **kwargs):
    return PerceptionGPTTrainer(
        model=model,
        args=_args(tmp_path, **kwargs),
        train_dataset=rows,
        data_collator=DataCollatorForPerceptionGPT(processor),
        processing_class=processor,
    )


def test_logs_every_loss_part(setup, rows, tmp_path):
    model, processor = setup
    trainer = _trainer(model, processor, rows, tmp_path)
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 2
    for entry in logged:
        assert all(name in entry and math.isfinite(entry[name]) for name in LOSS_PARTS)
        parts = entry["lm_loss"] + 1.0 * (entry["box_l1_loss"] + entry["box_giou_loss"]) + entry["mask_dice_loss"]
        assert abs(entry["loss"] - (parts + entry["mask_bce_loss"])) < 1e-3 * entry["loss"]


def test_gradient_accumulation_matches_one_big_batch(rows, tmp_path):
    """SGD (no Adam normalization hiding scale errors): batch 4 == 2 x batch 2 under GA, for every weight."""
    finals = []
    processor = build_processor(16, 4, 16, build_tokenizer("char"))
    for batch, accumulation in ((4, 1), (2, 2)):
        torch.manual_seed(0)
        model = PerceptionGPTForConditionalGeneration(PerceptionGPTConfig.from_preset("tiny"))
        trainer = _trainer(
            model,
            processor,
            rows,
            tmp_path,
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=accumulation,
            optim="sgd",
            max_steps=2,
            dataloader_drop_last=True,
        )
        trainer.train()
        finals.append({n: p.detach().clone() for n, p in model.named_parameters()})
    worst = max((finals[0][n] - finals[1][n]).abs().max().item() for n in finals[0])
    assert worst < 1e-6


def test_lora_recipe_trains_only_lora_heads_and_vis_rows(setup, rows, tmp_path):
    from peft import get_peft_model

    model, processor = setup
    peft_model = get_peft_model(model, lora_config(model, preset="paper"))
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters()}
    _trainer(peft_model, processor, rows, tmp_path).train()
    changed = {n for n, p in peft_model.named_parameters() if not torch.equal(before[n], p)}
    assert any("lora_A" in n for n in changed) and any("lora_B" in n for n in changed)
    for head in ("box_decoder", "mask_decoder", "box_encoder", "mask_feature_fusion"):
        assert any(head in n and "modules_to_save" in n for n in changed), head
    assert any("trainable_tokens_delta" in n for n in changed)
    frozen = {n for n, p in peft_model.named_parameters() if not p.requires_grad}
    assert frozen and not (frozen & changed)
    config = lora_config(model, preset="paper")
    assert (config.r, config.lora_alpha, config.lora_dropout) == (16, 64, 0.1)
    counts = count_parameters(peft_model)
    assert 0 < counts["trainable"] < counts["total"] == sum(p.numel() for p in peft_model.parameters())
    assert counts["trainable"] == sum(p.numel() for p in peft_model.parameters() if p.requires_grad)


def test_lora_save_reload_and_merge_give_same_boxes(setup, rows, tmp_path):
    from peft import PeftModel, get_peft_model

    model, processor = setup
    peft_model = get_peft_model(model, lora_config(model, preset="full", lora_dropout=0.0))
    trainer = _trainer(peft_model, processor, rows, tmp_path)
    trainer.train()
    peft_model.eval()
    inputs = DataCollatorForPerceptionGPT(processor)([rows[0], rows[1]])
    prompt = {"input_ids": inputs["input_ids"][:, :30], "pixel_values": inputs["pixel_values"]}

    def boxes(m):
        m.eval()
        with torch.no_grad():
            hidden = m(**prompt).last_hidden_state[:, -1]  # the state that decodes a `<vis>` at the next step
            # biased towards `<vis>` so that boxes come out after only 2 training steps, whatever the heads learned
            vis_bias = {(m.config.vis_token_id,): 20.0}
            out = m.generate(
                **prompt, max_new_tokens=4, do_sample=False, return_dict_in_generate=True, sequence_bias=vis_bias
            )
        return hidden, out.sequences, torch.cat(out.pred_boxes)

    expected_hidden, expected_seq, expected_boxes = boxes(peft_model)
    assert expected_boxes.shape[0] >= 2
    trainer.save_model(str(tmp_path / "adapter"))
    torch.manual_seed(0)
    base = PerceptionGPTForConditionalGeneration(PerceptionGPTConfig.from_preset("tiny"))
    reloaded = PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    merged_dir = tmp_path / "merged"
    for candidate in ("reloaded", "merged"):
        if candidate == "merged":
            reloaded.merge_and_unload().save_pretrained(merged_dir)
            model_to_check = PerceptionGPTForConditionalGeneration.from_pretrained(merged_dir)
        else:
            model_to_check = reloaded
        hidden, seq, found = boxes(model_to_check)
        assert (hidden - expected_hidden).abs().max() < 1e-5 and torch.equal(seq, expected_seq), candidate
        assert found.shape == expected_boxes.shape and (found - expected_boxes).abs().max() < 1e-5


def test_evaluate_by_generation_reports_metrics(setup, rows, tmp_path):
    model, processor = setup
    trainer = PerceptionGPTTrainer(
        model=model,
        args=_args(tmp_path),
        eval_dataset=rows,
        processing_class=processor,
        data_collator=DataCollatorForPerceptionGPT(processor),
        eval_max_new_tokens=4,
    )
    metrics = trainer.evaluate()
    result = evaluate_grounding(model.eval(), processor, rows, batch_size=8, max_new_tokens=4)
    assert metrics["eval_n_eval_rec"] + metrics["eval_n_eval_res"] == len(rows)
    for key in ("rec_acc@0.5", "rec_miou", "res_ciou", "res_giou"):
        if key in result.metrics:
            assert metrics[f"eval_{key}"] == pytest.approx(result.metrics[key])
    assert len(result.predictions) == len(rows)


class _Kill(RuntimeError):
    pass


def _kill_after(step):
    from transformers import TrainerCallback

    class KillCallback(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == step:
                raise _Kill(f"killed at step {step}")

    return KillCallback()


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_resume_after_kill_matches_uninterrupted_run(rows, tmp_path):
    processor = build_processor(16, 4, 16, build_tokenizer("char"))
    kwargs = dict(max_steps=4, save_strategy="steps", save_steps=2, per_device_train_batch_size=2, optim="adamw_torch")
    torch.manual_seed(0)
    model = PerceptionGPTForConditionalGeneration(PerceptionGPTConfig.from_preset("tiny"))
    _trainer(model, processor, rows, tmp_path / "full", **kwargs).train()
    expected = _params(model)

    torch.manual_seed(0)
    model = PerceptionGPTForConditionalGeneration(PerceptionGPTConfig.from_preset("tiny"))
    trainer = _trainer(model, processor, rows, tmp_path / "killed", **kwargs)
    trainer.add_callback(_kill_after(3))
    with pytest.raises(_Kill):
        trainer.train()
    torch.manual_seed(123)  # a different fresh init: everything must come from the checkpoint
    model = PerceptionGPTForConditionalGeneration(PerceptionGPTConfig.from_preset("tiny"))
    trainer = _trainer(model, processor, rows, tmp_path / "killed", **kwargs)
    trainer.train(resume_from_checkpoint=True)
    worst = max((expected[n] - p).abs().max().item() for n, p in _params(model).items())
    assert trainer.state.global_step == 4 and worst < 1e-6


@pytest.mark.parametrize("damage", ["truncate_weights", "drop_optimizer", "not_a_folder"])
def test_corrupt_or_partial_checkpoint_raises(setup, rows, tmp_path, damage):
    model, processor = setup
    trainer = _trainer(model, processor, rows, tmp_path, max_steps=2, save_strategy="steps", save_steps=2)
    trainer.train()
    checkpoint = tmp_path / "out" / "checkpoint-2"
    if damage == "truncate_weights":
        data = (checkpoint / "model.safetensors").read_bytes()
        (checkpoint / "model.safetensors").write_bytes(data[: len(data) // 2])
        match = "corrupt"
    elif damage == "drop_optimizer":
        (checkpoint / "optimizer.pt").unlink()
        match = r"partial: missing \['optimizer.pt'\]"
    else:
        checkpoint = tmp_path / "nowhere"
        match = "checkpoint folder"
    with pytest.raises(ValueError, match=match):
        trainer.train(resume_from_checkpoint=str(checkpoint))


def test_activation_checkpointing_gives_the_same_step(rows, tmp_path):
    processor = build_processor(16, 4, 16, build_tokenizer("char"))
    finals = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = PerceptionGPTForConditionalGeneration(PerceptionGPTConfig.from_preset("tiny"))
        _trainer(
            model,
            processor,
            rows,
            tmp_path / str(checkpointing),
            max_steps=1,
            optim="sgd",
            activation_checkpointing=checkpointing,
        ).train()
        finals.append(_params(model))
    assert max((finals[0][n] - finals[1][n]).abs().max().item() for n in finals[0]) < 1e-6


def test_paper_preset_trainable_share_on_meta_device():
    """The paper's recipe at 7B, counted without allocating: `<vis>` rows only vs the whole embedding."""
    from peft import get_peft_model

    shares = {}
    for whole in (False, True):
        with torch.device("meta"):
            model = PerceptionGPTForConditionalGeneration(PerceptionGPTConfig.from_preset("paper"))
        base = count_parameters(model)["total"]
        peft_model = get_peft_model(model, lora_config(model, preset="paper", whole_embedding=whole))
        shares[whole] = 100.0 * count_parameters(peft_model)["trainable"] / base
        lora = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
        assert lora == 2 * 32 * 2 * 4096 * 16  # q and v: A (16 x 4096) + B (4096 x 16) in 32 layers
    assert 0.75 < shares[False] < 0.85  # LoRA 8.4M + heads ~48M + 2 token rows, of 7.16B
    # the whole 32064-row embedding replaces the single `<vis>` row delta
    assert abs((shares[True] - shares[False]) / 100 * base - (32064 - 1) * 4096) < 1


def test_plain_trainer_is_refused_rather_than_mis_normalized(rows, tmp_path):
    from transformers import Trainer

    processor = build_processor(16, 4, 16, build_tokenizer("char"))
    model = PerceptionGPTForConditionalGeneration(PerceptionGPTConfig.from_preset("tiny"))
    trainer = Trainer(
        model=model,
        args=_args(tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=2),
        train_dataset=rows,
        data_collator=DataCollatorForPerceptionGPT(processor),
    )
    with pytest.raises(ValueError, match="`num_items_in_batch` was given without `num_vis_in_batch`.*Trainer"):
        trainer.train()


def test_heads_learning_rate_moves_the_heads_at_their_own_rate(setup, rows, tmp_path):
    """Adam's first step moves every parameter with a gradient by about its group's lr: 1e-2 for the heads,
    1e-4 for the rest, with weight decay kept per group."""
    model, processor = setup
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = PerceptionGPTTrainer(
        model=model,
        args=_args(tmp_path, max_steps=1, learning_rate=1e-4, weight_decay=0.0),
        train_dataset=rows,
        data_collator=DataCollatorForPerceptionGPT(processor),
        processing_class=processor,
        heads_learning_rate=1e-2,
    )
    trainer.train()
    moved = {n: float((p.detach() - before[n]).abs().max()) for n, p in model.named_parameters()}
    heads = ("box_encoder", "box_decoder", "mask_encoder", "mask_decoder", "mask_feature_fusion")
    head_moves = [m for n, m in moved.items() if n.split(".")[0] in heads]
    other_moves = [m for n, m in moved.items() if n.split(".")[0] not in heads]
    assert max(head_moves) == pytest.approx(1e-2, rel=0.02) and max(other_moves) == pytest.approx(1e-4, rel=0.02)
    lrs = sorted({group["lr"] for group in trainer.optimizer.param_groups})
    assert lrs == [pytest.approx(1e-4), pytest.approx(1e-2)]
    assert sum(len(g["params"]) for g in trainer.optimizer.param_groups) == len(list(model.parameters()))


@pytest.mark.parametrize("value", [0, -1e-3, "1e-3"])
def test_heads_learning_rate_must_be_positive(setup, rows, tmp_path, value):
    model, processor = setup
    with pytest.raises(ValueError, match=r"`heads_learning_rate` must be a positive number or None, got"):
        PerceptionGPTTrainer(model=model, args=_args(tmp_path), train_dataset=rows, heads_learning_rate=value)
