"""The `visual-grounding` pipeline: an image and a question in, the answer and its objects (pixel boxes, scores,
masks) out. Saved with every model folder the package writes (`save_grounding_pipeline`), so that
`pipeline("visual-grounding", model=DIR, trust_remote_code=True)` works without the package. Imports transformers
only (it is copied as remote code).
"""

from pathlib import Path

import numpy as np
from PIL import Image
from transformers import Pipeline
from transformers.dynamic_module_utils import custom_object_save


TASK = "visual-grounding"


class VisualGroundingPipeline(Pipeline):
    """`pipe(image, prompt="Where is the red circle?", boxes=None, masks=None)` ->
    `{"generated_text": str, "objects": [{"box": {"xmin", "ymin", "xmax", "ymax"}, "score", "mask"}]}`.

    Boxes are int pixels on the original image (rounded, as transformers' zero-shot-object-detection), in the order of
    their `<vis>` tokens; `mask` is a PIL image of mode "L" at the original size, or None. `boxes` / `masks` give the
    regions of `<vis>` tokens written in the prompt (pixels). A list of images runs them one by one (or batched with
    `batch_size`). Generation kwargs (`max_new_tokens`, `do_sample`, ...) pass through to `generate()`.
    """

    _load_processor = True
    _load_image_processor = False
    _load_tokenizer = False
    _load_feature_extractor = False
    _pipeline_calls_generate = True

    def _sanitize_parameters(self, prompt=None, boxes=None, masks=None, mask_threshold=None, **generate_kwargs):
        preprocess = {key: value for key, value in (("prompt", prompt), ("boxes", boxes), ("masks", masks)) if value}
        postprocess = {} if mask_threshold is None else {"mask_threshold": mask_threshold}
        return preprocess, {"generate_kwargs": generate_kwargs}, postprocess

    def preprocess(self, image, prompt=None, boxes=None, masks=None):
        if not isinstance(image, Image.Image):
            raise TypeError(f"`image` must be a PIL image, got {type(image).__name__}.")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"`prompt` must be a non-empty question, got {prompt!r}.")
        messages = [{"role": "user", "content": self.processor.user_content(prompt, image)}]
        inputs = self.processor.apply_chat_template(
            [messages],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
            processor_kwargs={
                "boxes": None if boxes is None else [boxes],
                "masks": None if masks is None else [masks],
            },
        )
        return {"inputs": inputs, "image_size": (image.height, image.width)}

    def _forward(self, model_inputs, generate_kwargs=None):
        inputs = dict(model_inputs["inputs"])  # the pipeline has moved them to the model's device
        generate_kwargs = {"max_new_tokens": 32, **(generate_kwargs or {})}
        out = self.model.generate(**inputs, return_dict_in_generate=True, **generate_kwargs)
        return {"out": out, "image_size": model_inputs["image_size"]}

    def postprocess(self, model_outputs, mask_threshold=0.0):
        result = self.processor.post_process_generation(
            model_outputs["out"], [model_outputs["image_size"]], mask_threshold=mask_threshold
        )[0]
        objects = []
        for index, (box, score) in enumerate(zip(result["boxes"].tolist(), result["scores"].tolist())):
            mask = None
            if result["masks"] is not None:
                mask = Image.fromarray((result["masks"][index].numpy() * 255).astype(np.uint8), mode="L")
            xmin, ymin, xmax, ymax = (int(round(value)) for value in box)
            objects.append(
                {"box": {"xmin": xmin, "ymin": ymin, "xmax": xmax, "ymax": ymax}, "score": score, "mask": mask}
            )
        return {"generated_text": result["text"], "objects": objects}


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
