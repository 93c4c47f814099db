"""The `visual-grounding` pipeline: an image and a question in, the answer and its objects (pixel boxes, scores,
masks) out. Saved with every model folder the package writes (`save_grounding_pipeline`), so that
`pipeline("visual-grounding", model=DIR, trust_remote_code=True)` works without the package. Imports transformers
only (it is copied as remote code).
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from transformers import Pipeline
from transformers.dynamic_module_utils import custom_object_save


TASK = "visual-grounding"


@dataclass
class _Request:
    """One question, prepared but not tokenized: not a tensor, so that batching lists requests instead of padding
    them (the processor pads a batch itself, `<vis>` regions and image grids included)."""

    messages: list
    boxes: list | None
    masks: list | None
    image_size: tuple[int, int]


def _object(box, score: float, mask) -> dict:
    """Pixel box (4,), score, (H, W) bool mask or None -> the pipeline's object: int box dict, float, "L" image."""
    xmin, ymin, xmax, ymax = (int(round(value)) for value in box.tolist())
    if mask is not None:
        mask = Image.fromarray((mask.numpy() * 255).astype(np.uint8), mode="L")
    return {"box": {"xmin": xmin, "ymin": ymin, "xmax": xmax, "ymax": ymax}, "score": float(score), "mask": mask}


class _PixelObjectStreamer:
    """Hands each object to the caller's `on_object` as it is generated, in the pipeline's format; tokens go on to
    the caller's own `streamer` when one is given."""

    def __init__(self, processor, image_sizes, rows_per_sample, on_object, mask_threshold, streamer=None):
        self.processor, self.image_sizes, self.rows_per_sample = processor, image_sizes, rows_per_sample
        self.callback, self.mask_threshold, self.streamer = on_object, mask_threshold, streamer

    def put(self, value):
        if self.streamer is not None:
            self.streamer.put(value)

    def end(self):
        if self.streamer is not None:
            self.streamer.end()

    def on_object(self, obj):
        size = self.image_sizes[obj.row // self.rows_per_sample]
        pixel = self.processor.post_process_object(obj, size, self.mask_threshold)
        self.callback(_object(pixel["box"], pixel["score"], pixel["mask"]))


class VisualGroundingPipeline(Pipeline):
    """`pipe(image, prompt="Where is the red circle?", boxes=None, masks=None)` ->
    `{"generated_text": str, "objects": [{"box": {"xmin", "ymin", "xmax", "ymax"}, "score", "mask"}]}`.

    Boxes are int pixels on the original image (rounded, as transformers' zero-shot-object-detection), in the order of
    their `<vis>` tokens; `mask` is a PIL image of mode "L" at the original size, or None. `boxes` / `masks` give the
    regions of `<vis>` tokens written in the prompt (pixels). A list of images (with one prompt, or a list of as many
    prompts), or a list of `{"image", "prompt", "boxes", "masks"}` dicts, gives one result each, batched by
    `batch_size`. `on_object=callable` receives each object, in the same format, as soon as its `<vis>` is decoded.
    Generation kwargs (`max_new_tokens`, `do_sample`, `streamer`, ...) pass through to `generate()`; with
    `num_return_sequences > 1` each input gets a list of results.
    """

    _load_processor = True
    _load_image_processor = False
    _load_tokenizer = False
    _load_feature_extractor = False
    _pipeline_calls_generate = True

    def __call__(self, image, prompt=None, **kwargs):
        if isinstance(image, (list, tuple)) and isinstance(prompt, (list, tuple)):
            if len(image) != len(prompt):
                raise ValueError(
                    f"`image` and `prompt` must have the same length when both are lists, got {len(image)} images "
                    f"and {len(prompt)} prompts."
                )
            return super().__call__([{"image": im, "prompt": text} for im, text in zip(image, prompt)], **kwargs)
        if isinstance(prompt, (list, tuple)):
            raise TypeError(f"A list of {len(prompt)} prompts needs a list of as many images, got one image.")
        return super().__call__(image, prompt=prompt, **kwargs)

    def _sanitize_parameters(
        self, prompt=None, boxes=None, masks=None, mask_threshold=None, on_object=None, **generate_kwargs
    ):
        preprocess = {key: value for key, value in (("prompt", prompt), ("boxes", boxes), ("masks", masks)) if value}
        if on_object is not None and not callable(on_object):
            raise TypeError(f"`on_object` must be callable, got {type(on_object).__name__}.")
        forward = {"generate_kwargs": generate_kwargs, "on_object": on_object}
        if mask_threshold is not None:
            forward["mask_threshold"] = mask_threshold
        return preprocess, forward, {}

    def preprocess(self, image, prompt=None, boxes=None, masks=None):
        if isinstance(image, dict):  # one item of a list of requests
            unknown = set(image) - {"image", "prompt", "boxes", "masks"}
            if unknown:
                raise ValueError(f"A request dict takes `image`, `prompt`, `boxes`, `masks`; got {sorted(unknown)}.")
            request = image
            image, prompt = request.get("image"), request.get("prompt", prompt)
            boxes, masks = request.get("boxes", boxes), request.get("masks", masks)
        if not isinstance(image, Image.Image):
            raise TypeError(f"`image` must be a PIL image, got {type(image).__name__}.")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"`prompt` must be a non-empty question, got {prompt!r}.")
        messages = [{"role": "user", "content": self.processor.user_content(prompt, image)}]
        return {"request": _Request(messages, boxes, masks, (image.height, image.width))}

    def _forward(self, model_inputs, generate_kwargs=None, on_object=None, mask_threshold=0.0):
        requests = model_inputs["request"]  # one request, or a list of them when batched
        requests = requests if isinstance(requests, list) else [requests]
        regions = {
            name: [getattr(request, name) for request in requests]
            for name in ("boxes", "masks")
            if any(getattr(request, name) is not None for request in requests)
        }
        inputs = self.processor.apply_chat_template(
            [request.messages for request in requests],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
            # left padding: generation continues every row from its last token
            processor_kwargs={"padding": True, "padding_side": "left", **regions},
        )
        inputs = inputs.to(self.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        generate_kwargs = {"max_new_tokens": 32, **(generate_kwargs or {})}
        sizes = [request.image_size for request in requests]
        if on_object is not None:
            rows = generate_kwargs.get("num_return_sequences") or self.model.generation_config.num_return_sequences
            generate_kwargs["streamer"] = _PixelObjectStreamer(
                self.processor, sizes, rows or 1, on_object, mask_threshold, generate_kwargs.get("streamer")
            )
        out = self.model.generate(**inputs, return_dict_in_generate=True, **generate_kwargs)
        results = self.processor.post_process_generation(out, sizes, mask_threshold=mask_threshold)
        per_sample = len(results) // len(requests)
        return {"results": [{"rows": results[b * per_sample : (b + 1) * per_sample]} for b in range(len(requests))]}

    def postprocess(self, model_outputs):
        result = model_outputs["results"]  # a list of one when not batched, else this sample's (unbatched) entry
        rows = [
            {
                "generated_text": row["text"],
                "objects": [
                    _object(box, score, None if row["masks"] is None else row["masks"][index])
                    for index, (box, score) in enumerate(zip(row["boxes"], row["scores"].tolist()))
                ],
            }
            for row in (result[0] if isinstance(result, list) else result)["rows"]
        ]
        return rows[0] if len(rows) == 1 else rows


def save_grounding_pipeline(model, folder) -> None:
    """Writes the pipeline's code into `folder` and its entry into `model.config.custom_pipelines` (saved by the
    model's `save_pretrained`, which must come after)."""
    info = VisualGroundingPipeline._registered_impl[TASK]
    model.config.custom_pipelines = {
        TASK: {
            "impl": f"{VisualGroundingPipeline.__module__.split('.')[-1]}.{VisualGroundingPipeline.__name__}",
            "pt": tuple(cls.__name__ for cls in info["pt"]),
        }
    }
    Path(folder).mkdir(parents=True, exist_ok=True)
    custom_object_save(VisualGroundingPipeline, folder)


__all__ = ["TASK", "VisualGroundingPipeline", "save_grounding_pipeline"]
