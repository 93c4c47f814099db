"""Run by test_distributed.py under `accelerate launch`: 3 steps on the tiny model, losses written by rank 0."""

import json
import sys

import torch
from transformers import TrainingArguments

from perceptiongpt import PerceptionGPTConfig, PerceptionGPTForConditionalGeneration
from perceptiongpt.processing.collator import DataCollatorForPerceptionGPT
from perceptiongpt.processing.processing_perceptiongpt import build_processor
from perceptiongpt.processing.synthetic import SyntheticConfig, build_synthetic_dataset
from perceptiongpt.processing.tokenization_factory import build_tokenizer
from perceptiongpt.trainer import LOSS_PARTS, PerceptionGPTTrainer


def main(output, per_device_batch):
    torch.set_num_threads(1)
    data = SyntheticConfig(**{**SyntheticConfig.demo().__dict__, "tasks": ("rec", "res")})
    rows = build_synthetic_dataset(data, "train", 24, seed=0)
    processor = build_processor(16, 4, 16, build_tokenizer("char"))
    torch.manual_seed(0)
    model = PerceptionGPTForConditionalGeneration(PerceptionGPTConfig.from_preset("tiny"))
    args = TrainingArguments(
        output_dir=output + ".out",
        max_steps=3,
        per_device_train_batch_size=per_device_batch,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        remove_unused_columns=False,
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        lr_scheduler_type="constant",
        optim="sgd",
        dataloader_drop_last=True,
        ddp_find_unused_parameters=True,
    )
    trainer = PerceptionGPTTrainer(
        model=model,
        args=args,
        train_dataset=rows,
        processing_class=processor,
        data_collator=DataCollatorForPerceptionGPT(processor),
    )
    trainer.train()
    if trainer.is_world_process_zero():
        logs = [{k: e[k] for k in ("loss", *LOSS_PARTS)} for e in trainer.state.log_history if "loss" in e]
        with open(output, "w") as handle:
            json.dump({"world_size": trainer.args.world_size, "logs": logs}, handle)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
