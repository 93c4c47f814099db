"""The suite every registered VLM family passes (`perceptiongpt.conversion_perceptiongpt.FAMILIES`), on tiny random
native models built offline: a new family must add its tiny case here, or `test_every_family_has_a_tiny_case` fails.
"""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import BLOCK_PACKAGE, CROSS_PROCESS_TOLERANCE, subprocess_env
from test_generation import MODES  # every generate mode
from transformers import (
    AutoModelForImageTextToText,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    LlavaConfig,
    LlavaForConditionalGeneration,
    Qwen2_5_VLForConditionalGeneration,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
)

import perceptiongpt
from perceptiongpt.configuration_perceptiongpt import TINY_HEADS
from perceptiongpt.conversion_perceptiongpt import FAMILIES
from perceptiongpt.region_inputs import image_index_per_token


NAN = float("nan")
IMAGE = 4
LLAMA = {
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "vocab_size": 272,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
SIGLIP = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}


def _rows(image_block, length=22, vis_at=16, batch=2, seed=0):
    """Rows `[text, <image block>, text, <vis> (row 0), text]`; (B, T) ids."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, 200, (batch, length), generator=g)
    ids[:, 1 : 1 + len(image_block)] = torch.tensor(image_block)
    ids[0, vis_at + len(image_block) - 12] = 5
    return ids


def _llava_case():
    config = LlavaConfig(
        vision_config={**SIGLIP, "model_type": "clip_vision_model", "image_size": 16, "patch_size": 4},
        text_config=LLAMA,
        image_token_id=IMAGE,
        image_seq_length=16,
        vision_feature_layer=-2,
    )
    ids = _rows([IMAGE] * 16, length=30)
    inputs = {"input_ids": ids, "pixel_values": torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))}

    def expand(inputs, copies):  # the images of each sample for `copies` rows
        return {"pixel_values": inputs["pixel_values"].repeat_interleave(copies, 0)}

    return LlavaForConditionalGeneration(config), inputs, expand, {}


def _qwen_case():
    from test_qwen2_5_vl import native_config, qwen_rows

    inputs, _ = qwen_rows(vis_at=((20,), ()))

    def expand(inputs, copies):
        sizes = inputs["image_grid_thw"].prod(-1).tolist()
        patches = inputs["pixel_values"].split(sizes)
        return {
            "pixel_values": torch.cat([p for p in patches for _ in range(copies)]),
            "image_grid_thw": inputs["image_grid_thw"].repeat_interleave(copies, 0),
        }

    return Qwen2_5_VLForConditionalGeneration(native_config()), inputs, expand, {"mask_grid_size": 4}


def _idefics_case(config_class, model_class):
    """Two tiles and the global image (last), 4 tokens each after the 2x pixel shuffle of a 4x4 patch grid."""

    def case():
        config = config_class(
            vision_config={**SIGLIP, "image_size": 16, "patch_size": 4}, text_config=LLAMA, image_token_id=IMAGE
        )
        block = [7] + [IMAGE] * 4 + [8] + [IMAGE] * 4 + [9] + [IMAGE] * 4 + [7]
        ids = _rows(block, length=26)
        pixels = torch.randn(2, 3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
        inputs = {"input_ids": ids, "pixel_values": pixels}

        def expand(inputs, copies):
            return {"pixel_values": inputs["pixel_values"].repeat_interleave(copies, 0)}

        return model_class(config), inputs, expand, {"mask_grid_size": 4}

    return case


TINY = {
    "llava": _llava_case,
    "qwen2_5_vl": _qwen_case,
    "idefics3": _idefics_case(Idefics3Config, Idefics3ForConditionalGeneration),
    "smolvlm": _idefics_case(SmolVLMConfig, SmolVLMForConditionalGeneration),
}


def _image_inputs_of(expand, inputs, sample):
    """The image inputs of one sample (`expand` with one copy, then that sample's share)."""
    everything = expand(inputs, 1)
    if "image_grid_thw" in everything:  # Qwen: patches of every image back to back
        sizes = everything["image_grid_thw"].prod(-1).tolist()
        patches = everything["pixel_values"].split(sizes)
        return {"pixel_values": patches[sample], "image_grid_thw": everything["image_grid_thw"][sample : sample + 1]}
    return {key: value[sample : sample + 1] for key, value in everything.items()}


def test_every_family_has_a_tiny_case():
    assert set(TINY) == set(FAMILIES) == set(perceptiongpt.SUPPORTED_FAMILIES)


def _converted(family):
    torch.manual_seed(0)
    native, inputs, expand, overrides = TINY[family]()
    native.eval()
    model, _ = perceptiongpt.from_base(native, **TINY_HEADS, **overrides)
    model.eval()
    # the cases mark the prompt `<vis>` with id 5; without a tokenizer `<vis>` takes the next free id
    inputs = {
        **inputs,
        "input_ids": inputs["input_ids"].masked_fill(inputs["input_ids"] == 5, model.config.vis_token_id),
    }
    with torch.no_grad():  # a non-trivial box decoder, and `<vis>` likely enough to be generated
        model.box_decoder.mlp[-1].weight.normal_(0, 0.5)
        model.lm_head.weight[model.config.vis_token_id] = model.get_decoder().norm.weight * 3
    return native, model, inputs, expand


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_from_base_keeps_every_tensor_and_the_native_logits(family):
    native, model, inputs, _ = _converted(family)
    assert type(model) is FAMILIES[family][2]
    vocab = native.get_input_embeddings().weight.shape[0]
    converted, lm_head_row = model.state_dict(), model.config.vis_token_id
    for name, tensor in native.state_dict().items():
        if tensor.shape != converted[name].shape:  # the embedding matrices, grown by the `<vis>` row
            assert torch.equal(converted[name][:vocab], tensor), name
        elif name.startswith("lm_head"):
            assert torch.equal(converted[name][:lm_head_row], tensor[:lm_head_row]), name
        else:
            assert torch.equal(converted[name], tensor), name
    plain = {
        **inputs,
        "input_ids": inputs["input_ids"].masked_fill(inputs["input_ids"] == model.config.vis_token_id, 11),
    }
    with torch.no_grad():
        expected, found = native(**plain).logits, model(**plain).logits
    torch.testing.assert_close(found[..., :vocab], expected, rtol=1e-5, atol=1e-5)
    assert type(AutoModelForImageTextToText.from_config(native.config)) is type(native)  # native class untouched


def _boxes(inputs, slots):
    boxes = torch.full((inputs["input_ids"].shape[0], slots, 4), NAN)
    boxes[0, 0] = torch.tensor([0.1, 0.2, 0.5, 0.7])
    return boxes


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_generated_boxes_and_masks_match_teacher_forcing(family, mode):
    kwargs = MODES[mode]
    _, model, inputs, expand = _converted(family)
    vis = model.config.vis_token_id
    torch.manual_seed(0)
    generate_kwargs = {"do_sample": False, **kwargs}
    out = model.generate(
        **inputs, vis_boxes=_boxes(inputs, 1), max_new_tokens=5, return_dict_in_generate=True, **generate_kwargs
    )
    seqs = out.sequences
    rows, copies = seqs.shape[0], seqs.shape[0] // inputs["input_ids"].shape[0]
    slots = torch.full((rows, int((seqs == vis).sum(-1).max()), 4), NAN)
    for r in range(rows):
        prompt_boxes = _boxes(inputs, 1)[r // copies]
        first = int((seqs[r, : inputs["input_ids"].shape[1]] == vis).sum())
        slots[r, :first] = prompt_boxes[:first]
        slots[r, first : first + len(out.pred_boxes[r])] = out.pred_boxes[r]
    forced = {key: value for key, value in inputs.items() if key not in expand(inputs, copies)}
    forced.update(expand(inputs, copies), input_ids=seqs)
    if "attention_mask" in inputs:  # the prompt's padding, then the generated tokens
        new = torch.ones(rows, seqs.shape[1] - inputs["input_ids"].shape[1], dtype=torch.long)
        forced["attention_mask"] = torch.cat([inputs["attention_mask"].repeat_interleave(copies, 0), new], 1)
    if "mm_token_type_ids" in forced:
        forced["mm_token_type_ids"] = (seqs == model.config.image_token_id).long()
    with torch.no_grad():
        tf = model(**forced, vis_boxes=slots)
    image_index = image_index_per_token(model.image_starts(seqs))
    count = 0
    for r in range(rows):
        for j, p in enumerate(out.vis_positions[r].tolist()):
            index = image_index[r, p]
            features = tf.image_outputs.mask_features[index][None]
            box, masks = model.decode_regions(tf.last_hidden_state[r, p - 1][None], features, torch.tensor([True]))
            torch.testing.assert_close(box.boxes[0], out.pred_boxes[r][j], rtol=0, atol=1e-6)
            torch.testing.assert_close(masks[0], out.pred_masks[r][j], rtol=1e-5, atol=1e-5)
            count += 1
    assert count >= 1
    generated = seqs[:, inputs["input_ids"].shape[1] :]
    assert not torch.isin(generated, torch.tensor(model.config.suppressed_token_ids)).any()


_REMOTE = """
import sys
try:
    import perceptiongpt  # noqa: F401
    sys.exit("perceptiongpt must not be importable here")
except ImportError:
    pass
import torch
from transformers import AutoModelForImageTextToText

model = AutoModelForImageTextToText.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
inputs = torch.load(sys.argv[2])
out = model.generate(**inputs, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
torch.save({"sequences": out.sequences, "boxes": out.pred_boxes}, sys.argv[3])
"""


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_save_reload_and_remote_code(family, tmp_path):
    _, model, inputs, _ = _converted(family)
    inputs = {**inputs, "vis_boxes": _boxes(inputs, 1)}
    model.save_pretrained(tmp_path / "model")
    saved = json.loads((tmp_path / "model" / "config.json").read_text())
    assert saved["model_type"] == FAMILIES[family][1].model_type
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "model").eval()
    assert type(reloaded) is type(model)
    local = model.generate(**inputs, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    again = reloaded.generate(**inputs, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    assert torch.equal(local.sequences, again.sequences)
    torch.save(inputs, tmp_path / "inputs.pt")
    command = [sys.executable, "-c", BLOCK_PACKAGE + textwrap.dedent(_REMOTE), str(tmp_path / "model")]
    command += [str(tmp_path / "inputs.pt"), str(tmp_path / "out.pt")]
    env = subprocess_env(HF_MODULES_CACHE=str(tmp_path / "modules"))
    completed = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    remote = torch.load(tmp_path / "out.pt")
    assert torch.equal(remote["sequences"], local.sequences)
    for a, b in zip(remote["boxes"], local.pred_boxes):
        torch.testing.assert_close(a, b, **CROSS_PROCESS_TOLERANCE)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_lora_targets_the_decoder_only(family):
    from peft import get_peft_model

    from perceptiongpt.trainer import lora_config
    from perceptiongpt.trainer.peft_recipe import decoder_path

    _, model, inputs, _ = _converted(family)
    peft_model = get_peft_model(model, lora_config(model, preset="full"))
    lora = [n for n, p in peft_model.named_parameters() if p.requires_grad and "lora_" in n]
    assert lora and all(f"{decoder_path(model)}.layers." in n for n in lora)
    labels = inputs["input_ids"].clone()
    out = peft_model(**inputs, vis_boxes=_boxes(inputs, 1), labels=labels)
    out.loss.backward()
    assert out.box_l1_loss > 0
    trained = [n for n, p in peft_model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert any("box_decoder" in n and "modules_to_save" in n for n in trained)
    assert all(p.requires_grad for n, p in peft_model.named_parameters() if n in trained)


@pytest.mark.parametrize("kwargs", [{}, {"num_beams": 2}])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_left_padded_row_equals_the_row_alone(family, kwargs):
    _, model, inputs, expand = _converted(family)
    ids, pad = inputs["input_ids"], 3
    prefix = torch.randint(10, 200, (2, pad), generator=torch.Generator().manual_seed(5))
    prefix[1] = 0
    mask = inputs.get("attention_mask", torch.ones_like(ids))
    prefix_mask = torch.tensor([[1] * pad, [0] * pad])
    padded = {**inputs, "input_ids": torch.cat([prefix, ids], 1), "attention_mask": torch.cat([prefix_mask, mask], 1)}
    if "mm_token_type_ids" in inputs:
        padded["mm_token_type_ids"] = (padded["input_ids"] == model.config.image_token_id).long()
    keep = mask[1].bool()  # row 1 without any padding
    alone = {"input_ids": ids[1:, keep], "attention_mask": mask[1:, keep], **_image_inputs_of(expand, inputs, 1)}
    if "mm_token_type_ids" in inputs:
        alone["mm_token_type_ids"] = (alone["input_ids"] == model.config.image_token_id).long()
    with torch.no_grad():  # row 1 starts its answer with `<vis>`, so that it has a box to compare
        model.lm_head.weight[model.config.vis_token_id] = model(**alone).last_hidden_state[0, -1] * 10
    generate = dict(max_new_tokens=5, do_sample=False, return_dict_in_generate=True, **kwargs)
    batched = model.generate(**padded, vis_boxes=_boxes(padded, 1), **generate)
    single = model.generate(**alone, vis_boxes=torch.full((1, 1, 4), NAN), **generate)
    assert torch.equal(
        batched.sequences[1, padded["input_ids"].shape[1] :], single.sequences[0, alone["input_ids"].shape[1] :]
    )
    assert len(single.pred_boxes[0]) >= 1
    torch.testing.assert_close(batched.pred_boxes[1], single.pred_boxes[0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_model_loaded_without_weights_is_initialized_like_a_fresh_one(family, tmp_path):
    """Every missing tensor gets the init of its own (sub-)model, as in `Model(config)`: same buffers, and per
    weight the same mean and spread (the values are random). The CLIP tower's attention is initialized by CLIP at the
    parameter-less CLIPAttention level, which transformers' guard for custom code used to skip."""
    from safetensors.torch import save_file

    _, model, _, _ = _converted(family)
    model.config.save_pretrained(tmp_path)
    save_file({"unrelated": torch.zeros(1)}, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    torch.manual_seed(0)
    loaded = type(model).from_pretrained(tmp_path)
    torch.manual_seed(0)
    fresh = type(model)(model.config)
    fresh_state = fresh.state_dict()
    for name, tensor in loaded.state_dict().items():
        expected = fresh_state[name]
        if not tensor.is_floating_point() or tensor.numel() == 1 or expected.std() == 0:
            assert torch.equal(tensor, expected), name  # constants, ids and position buffers: exactly the same
        else:  # random: the spread must match (loosely for the few small vectors)
            ratio = (tensor.float().std() / expected.float().std()).item()
            low, high = (0.7, 1.4) if tensor.numel() >= 256 else (0.4, 2.5)
            assert low < ratio < high, (name, ratio)
