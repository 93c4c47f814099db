"""Training checks shared by the family processor tests: a short REC run and gradient accumulation."""

import numpy as np
import torch
from PIL import Image


def square_image(height, width, box):
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    x1, y1, x2, y2 = box
    pixels[y1:y2, x1:x2] = 255
    return Image.fromarray(pixels)


def box_losses_of_a_short_run(model, processor, prompt, steps=300, size=(32, 48), nest_images=False):
    """Box L1 of each AdamW step on synthetic REC (one white square per image, 4 per batch; the prompt ends with the
    answer `<vis>`, whose box is decoded from the state before it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: one thread is the fastest, and safe on a busy machine
    try:
        return _run(model, processor, prompt, steps, size, nest_images)
    finally:
        torch.set_num_threads(threads)


def _run(model, processor, prompt, steps, size, nest_images):
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    g = np.random.default_rng(0)
    height, width = size
    losses = []
    for _ in range(steps):
        images, boxes = [], []
        for _ in range(4):
            w, h = int(g.integers(width // 6, width * 5 // 12)), int(g.integers(height // 5, height // 2))
            x1, y1 = int(g.integers(0, width - w)), int(g.integers(0, height - h))
            image = square_image(height, width, (x1, y1, x1 + w, y1 + h))
            images.append([image] if nest_images else image)
            boxes.append([[x1, y1, x1 + w, y1 + h]])
        batch = processor(images=images, text=[prompt] * 4, boxes=boxes, return_tensors="pt")
        labels = torch.full_like(batch["input_ids"], -100)
        labels[batch["input_ids"] == processor.vis_token_id] = processor.vis_token_id
        out = model(**batch, labels=labels)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.box_l1_loss.item())
    return losses


def weights_after_accumulation(make_model_and_processor, rows, tmp_path, batch_size, accumulation):
    """Every weight after 2 SGD steps of PerceptionGPTTrainer at this batch size and accumulation."""
    from conftest import training_arguments

    from perceptiongpt.processing.collator import DataCollatorForPerceptionGPT
    from perceptiongpt.trainer import PerceptionGPTTrainer

    torch.manual_seed(0)
    model, processor = make_model_and_processor()
    args = training_arguments(
        tmp_path / f"out{accumulation}",
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation,
        optim="sgd",
        dataloader_drop_last=True,
    )
    collator = DataCollatorForPerceptionGPT(processor)
    trainer = PerceptionGPTTrainer(
        model=model, args=args, train_dataset=rows, data_collator=collator, processing_class=processor
    )
    trainer.train()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def accumulation_error(make_model_and_processor, rows, tmp_path):
    """Max |difference| of any weight between batch 4 and 2 x batch 2 under gradient accumulation."""
    one = weights_after_accumulation(make_model_and_processor, rows, tmp_path, 4, 1)
    two = weights_after_accumulation(make_model_and_processor, rows, tmp_path, 2, 2)
    return max((one[n] - two[n]).abs().max().item() for n in one)
