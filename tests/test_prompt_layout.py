"""The prompt layout is part of the model: stored on the processor, saved with it, and every consumer's default."""

import json

import pytest
import torch
from PIL import Image
from transformers import TrainingArguments

from perceptiongpt import PerceptionGPTConfig, PerceptionGPTForConditionalGeneration
from perceptiongpt.processing.collator import DataCollatorForPerceptionGPT
from perceptiongpt.processing.processing_perceptiongpt import PerceptionGPTProcessor, build_processor
from perceptiongpt.processing.synthetic import SyntheticConfig, build_synthetic_dataset
from perceptiongpt.processing.templates import IMAGE_POSITIONS
from perceptiongpt.processing.tokenization_factory import build_tokenizer
from perceptiongpt.trainer import PerceptionGPTTrainer, evaluate_grounding


TOKENIZER = build_tokenizer("char")
ORDER = {"first": ["image", "text"], "after_text": ["text", "image"]}
OTHER = {"first": "after_text", "after_text": "first"}


def _processor(layout):
    return build_processor(16, 4, 16, TOKENIZER, image_position=layout)


@pytest.fixture(scope="module")
def rows():
    data = SyntheticConfig(**{**SyntheticConfig.demo().__dict__, "tasks": ("rec",)})
    return build_synthetic_dataset(data, "test", 2, seed=0)


def test_layout_is_saved_with_the_processor_and_old_folders_load_as_first(tmp_path):
    _processor("after_text").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "processor_config.json").read_text())
    assert config["image_position"] == "after_text"
    assert PerceptionGPTProcessor.from_pretrained(tmp_path).image_position == "after_text"
    del config["image_position"]  # a folder saved before the layout was stored
    (tmp_path / "processor_config.json").write_text(json.dumps(config))
    assert PerceptionGPTProcessor.from_pretrained(tmp_path).image_position == "first"


def test_an_unknown_layout_is_refused_with_the_choices():
    with pytest.raises(ValueError, match=r"`image_position` must be one of \('first', 'after_text'\), got 'last'"):
        _processor("last")


@pytest.mark.parametrize("layout", IMAGE_POSITIONS)
def test_user_content_and_the_collator_follow_the_processor(layout, rows):
    processor = _processor(layout)
    image = Image.new("RGB", (8, 8))
    assert [part["type"] for part in processor.user_content("Where?", image)] == ORDER[layout]
    conversation = DataCollatorForPerceptionGPT(processor).conversation(rows[0], 0)
    assert [part["type"] for part in conversation[0]["content"]] == ORDER[layout]
    override = DataCollatorForPerceptionGPT(processor, image_position=OTHER[layout]).conversation(rows[0], 0)
    assert [part["type"] for part in override[0]["content"]] == ORDER[OTHER[layout]]


def _prompt_ids(model, monkeypatch, run):
    """The input_ids every `model.generate` call of `run()` received."""
    seen, generate = [], model.generate

    def recording(*args, **kwargs):
        seen.append(kwargs["input_ids"].clone())
        return generate(*args, **kwargs)

    monkeypatch.setattr(model, "generate", recording)
    run()
    monkeypatch.undo()
    return seen


@pytest.mark.parametrize("layout", IMAGE_POSITIONS)
def test_evaluation_and_the_trainer_prompt_in_the_processor_layout(layout, rows, monkeypatch, tmp_path):
    torch.manual_seed(0)
    model = PerceptionGPTForConditionalGeneration(PerceptionGPTConfig.from_preset("tiny")).eval()
    processor = _processor(layout)

    def evaluate(**kwargs):
        return _prompt_ids(model, monkeypatch, lambda: evaluate_grounding(model, processor, rows, 2, 2, **kwargs))

    default, explicit, other = evaluate(), evaluate(image_position=layout), evaluate(image_position=OTHER[layout])
    assert torch.equal(default[0], explicit[0]) and not torch.equal(default[0], other[0])
    args = TrainingArguments(str(tmp_path), per_device_eval_batch_size=2, report_to=[], use_cpu=True)
    trainer = PerceptionGPTTrainer(
        model=model, args=args, eval_dataset=rows, processing_class=processor, eval_max_new_tokens=2
    )
    assert torch.equal(_prompt_ids(model, monkeypatch, trainer.evaluate)[0], default[0])
