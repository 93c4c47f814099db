"""Run by test_distributed.py under `accelerate launch`: an evaluation by generation (9 rows, split unevenly over 2
processes), then 3 steps on the tiny model; metrics and losses written by rank 0."""

import json
import sys

import torch
from accelerate.utils import gather_object
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
        eval_max_new_tokens=4,
    )
    generated, generate = [], model.generate
    model.generate = lambda **kwargs: generated.append(kwargs["input_ids"].shape[0]) or generate(**kwargs)
    # before training, so that both runs evaluate identical weights; 9 rows split 5 + 4 over 2 processes
    evaluation = trainer.evaluate(eval_dataset=rows.select(range(9)))
    rows_per_process = gather_object([sum(generated)])
    model.generate = generate
    trainer.train()
    if trainer.is_world_process_zero():
        logs = [{k: e[k] for k in ("loss", *LOSS_PARTS)} for e in trainer.state.log_history if "loss" in e]
        with open(output, "w") as handle:
            result = {"world_size": trainer.args.world_size, "logs": logs, "eval": evaluation}
            json.dump({**result, "eval_rows_per_process": rows_per_process}, handle)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
