"""`PerceptionProcessorMixin`: `<vis>` regions in (pixel boxes / masks -> the model's tensors), pixel results out.

Shared by every family's PerceptionGPT processor, placed before the family's own processor in the bases.
Coordinates (DESIGN.md, "Coordinates"): callers give and get absolute pixel xyxy and (H, W) bool masks on the
ORIGINAL image; the model sees normalized xyxy of the vision frame and (mask_size, mask_size) masks.

Dimensions: B = input samples, K = `<vis>` slots per sample (the batch maximum), n = boxes of one row.
"""

import re
import warnings

import numpy as np
import torch

from .input_validation import (
    flatten_images,
    is_no_region,
    per_sample,
    slot_list,
    to_rgb_image,
    validated_box,
    validated_mask,
)
from .region_geometry import (
    boxes_xyxy_from_masks,
    boxes_xyxy_normalized_to_pixel,
    boxes_xyxy_pixel_to_normalized,
    geometry_from_image_processor,
    mask_logits_frame_to_pixel,
    mask_pixel_to_frame,
)
from .templates import IMAGE_POSITIONS, user_content


def _renested(flat, images):
    """`flat` (the RGB images in order) in the caller's nesting: per sample lists stay per sample (Idefics3 / SmolVLM
    count images per sample), a flat list stays flat."""
    if flat is None or not isinstance(images, (list, tuple)) or not any(isinstance(i, (list, tuple)) for i in images):
        return flat
    nested, start = [], 0
    for item in images:
        count = len(item) if isinstance(item, (list, tuple)) else 1
        nested.append(flat[start : start + count])
        start += count
    return nested


class PerceptionProcessorMixin:
    """Adds `<vis>` regions to a family processor: `vis_token`, `mask_size` and `image_position` (the prompt layout,
    part of the model: "first" puts the image before the question, "after_text" after it) are saved with it."""

    text_kwargs = {"padding": True}  # batched prompts of different lengths just work (pad side: the tokenizer's)

    def _set_perception_fields(self, tokenizer, vis_token, mask_size, image_position):
        self.vis_token = getattr(tokenizer, "vis_token", None) or vis_token
        self.vis_token_id = tokenizer.convert_tokens_to_ids(self.vis_token)
        if self.vis_token_id is None or self.vis_token_id == tokenizer.unk_token_id:
            raise ValueError(f"`tokenizer` has no {self.vis_token!r} token; add it as a special token first.")
        if mask_size is not None and (not isinstance(mask_size, int) or mask_size < 1):
            raise ValueError(f"`mask_size` must be a positive int or None, got {mask_size!r}.")
        if image_position not in IMAGE_POSITIONS:
            raise ValueError(f"`image_position` must be one of {IMAGE_POSITIONS}, got {image_position!r}.")
        self.mask_size, self.image_position = mask_size, image_position

    @property
    def model_input_names(self) -> list[str]:
        return super().model_input_names + ["vis_boxes", "vis_masks", "vis_mask_valid"]

    def user_content(self, text: str, image) -> list[dict]:
        """A user turn's content with `image` placed where this model expects it (its `image_position`)."""
        return user_content(text, image, self.image_position)

    def image_geometry(self, image_size: tuple[int, int]):
        """The `ImageGeometry` mapping an original (H, W) image onto the vision frame."""
        return geometry_from_image_processor(self.image_processor, image_size)

    def __call__(self, images=None, text=None, boxes=None, masks=None, **kwargs):
        r"""Tokenize `text`, preprocess `images` and convert the regions of every `<vis>`.

        Args:
            images: one image per `<image>` in `text`, flat or nested per sample (PIL or numpy; any mode, made RGB).
            text (`str` or `list[str]`): prompts; the k-th `<vis>` of a sample is its k-th slot.
            boxes: per sample, None or one entry per `<vis>`: pixel xyxy on the original image, None (its mask
                gives the region), or [nan, nan, nan, nan] for a `<vis>` with no region (the bare `<vis>` embedding).
            masks: per sample, None or one entry per `<vis>`: an (H, W) bool array on the original image, or None.
                A slot with a mask but no box takes the mask's bounding box. Every `<vis>` needs a box or a mask
                (or the NaN box): a missing one raises.

        Returns:
            `BatchFeature` with `input_ids`, `attention_mask`, `pixel_values` (when images are given) and, when text is
            given: `vis_boxes` (B, K, 4) float32 normalized xyxy of the vision frame, NaN = no box; with `masks`, also
            `vis_masks` (B, K, mask_size, mask_size) bool and `vis_mask_valid` (B, K) bool.
        """
        texts = [text] if isinstance(text, str) else text
        if texts is not None:
            if not isinstance(texts, (list, tuple)) or not all(isinstance(sample, str) for sample in texts):
                raise TypeError(f"`text` must be a string or a list of strings, got {type(text).__name__}.")
            for index, sample in enumerate(texts):
                if not sample.strip():
                    raise ValueError(f"`text[{index}]` must be non-empty, got {sample!r}.")
        elif boxes is not None or masks is not None:
            raise ValueError("`boxes` and `masks` need the `text` whose `<vis>` tokens they belong to; got text=None.")
        flat = None
        if images is not None:
            flat = [to_rgb_image(image, f"images[{i}]") for i, image in enumerate(flatten_images(images))]
        outputs = super().__call__(images=_renested(flat, images), text=texts, **kwargs)
        if texts is None:
            return outputs
        input_ids = outputs["input_ids"].tolist() if hasattr(outputs["input_ids"], "tolist") else outputs["input_ids"]
        vis_counts = [list(ids).count(self.vis_token_id) for ids in input_ids]
        text_counts = [sample.count(self.vis_token) for sample in texts]
        if vis_counts != text_counts:
            raise ValueError(
                f"`<vis>` count per sample: text={text_counts}, input_ids={vis_counts}; truncation must not cut a "
                "`<vis>`: disable truncation or raise `max_length`."
            )
        as_tensor = isinstance(outputs["input_ids"], torch.Tensor)
        regions = self._regions(list(texts), flat or [], boxes, masks)
        for key, value in regions.items():
            outputs[key] = torch.from_numpy(value) if as_tensor else value
        return outputs

    def _regions(self, texts: list[str], images: list, boxes, masks) -> dict[str, np.ndarray]:
        batch_size = len(texts)
        vis_counts = [sample.count(self.vis_token) for sample in texts]
        image_counts = [sample.count(self.image_token) for sample in texts]
        starts = np.cumsum([0, *image_counts])
        slots = max(vis_counts, default=0)
        vis_boxes = np.full((batch_size, slots, 4), np.nan, dtype=np.float32)
        box_lists, mask_lists = per_sample(boxes, batch_size, "boxes"), per_sample(masks, batch_size, "masks")
        with_masks = masks is not None
        if with_masks and self.mask_size is None:
            raise ValueError("`masks` need the processor's `mask_size` (the mask head's resolution), got None.")
        vis_masks = np.zeros((batch_size, slots, self.mask_size or 0, self.mask_size or 0), dtype=bool)
        vis_mask_valid = np.zeros((batch_size, slots), dtype=bool)
        for sample in range(batch_size):
            if vis_counts[sample] == 0 and box_lists[sample] is None and mask_lists[sample] is None:
                continue
            sample_boxes = slot_list(box_lists[sample], vis_counts[sample], f"boxes[{sample}]")
            sample_masks = slot_list(mask_lists[sample], vis_counts[sample], f"masks[{sample}]")
            missing = [
                slot
                for slot, (box, mask) in enumerate(zip(sample_boxes, sample_masks))
                if box is None and mask is None
            ]
            if missing:  # a bare `<vis>` embedding would silently stand for a region the model never sees
                raise ValueError(
                    f"`text[{sample}]` has {vis_counts[sample]} `<vis>` tokens but "
                    f"{vis_counts[sample] - len(missing)} regions (none for slots {missing}): give every `<vis>` its "
                    "box or mask in `boxes`/`masks`, or the box [nan, nan, nan, nan] to say it has no region."
                )
            if all(is_no_region(box) and mask is None for box, mask in zip(sample_boxes, sample_masks)):
                continue
            if image_counts[sample] != 1:
                raise ValueError(
                    f"`boxes[{sample}]`/`masks[{sample}]` need exactly one image in `text[{sample}]`, "
                    f"got {image_counts[sample]} `{self.image_token}` tokens."
                )
            image = images[starts[sample]]
            image_size = (image.height, image.width)
            geometry = self.image_geometry(image_size)
            for slot, (box, mask) in enumerate(zip(sample_boxes, sample_masks)):
                name = f"[{sample}][{slot}]"
                if mask is not None:
                    mask = validated_mask(mask, image_size, f"masks{name}")
                    vis_masks[sample, slot] = mask_pixel_to_frame(mask, geometry, self.mask_size)
                    vis_mask_valid[sample, slot] = True
                    if box is None:
                        box = boxes_xyxy_from_masks(mask[None])[0]
                        if np.isnan(box).any():
                            raise ValueError(f"`masks{name}` is empty and `boxes{name}` is None: no region given.")
                if is_no_region(box):
                    continue
                box = validated_box(box, image_size, f"boxes{name}")
                normalized = boxes_xyxy_pixel_to_normalized(torch.from_numpy(box)[None], geometry)[0].numpy()
                visible = np.clip(normalized, 0, 1).astype(np.float32)  # checked in the dtype the model gets
                if visible[2] <= visible[0] or visible[3] <= visible[1]:
                    raise ValueError(
                        f"`boxes{name}` = {box.tolist()} lies outside the part of the image the vision tower sees "
                        f"({self.resize_mode} mode)."
                    )
                if not np.array_equal(np.clip(normalized, 0, 1), normalized):
                    warnings.warn(
                        f"`boxes{name}` = {box.tolist()} is partly cropped away; clipped to the visible part"
                    )
                vis_boxes[sample, slot] = visible
        regions = {"vis_boxes": vis_boxes}
        if with_masks:
            regions.update(vis_masks=vis_masks, vis_mask_valid=vis_mask_valid)
        return regions

    def _decode_with_markers(self, token_ids: list[int], vis_marker: str | None) -> str:
        # Drop special tokens except `<vis>` (skip_special_tokens would strip it), then name each `<vis>`.
        special_ids = set(self.tokenizer.all_special_ids) - {self.vis_token_id}
        text = self.tokenizer.decode([i for i in token_ids if i not in special_ids], skip_special_tokens=False)
        # `<vis>` absorbs the space before it when tokenized (one token per object): give it back for reading
        text = re.sub(rf"(?<=[^\s(\[]){re.escape(self.vis_token)}", " " + self.vis_token, text)
        if vis_marker is None:
            return text
        pieces = text.split(self.vis_token)
        marked = [pieces[0]]
        for index, piece in enumerate(pieces[1:], start=1):
            marked.extend((vis_marker.replace("{index}", str(index)), piece))
        return "".join(marked)

    def post_process_generation(
        self,
        outputs,
        image_sizes,
        prompt_length=None,
        mask_threshold: float = 0.0,
        vis_marker: str | None = None,
        clip_boxes: bool = True,
    ) -> list[dict]:
        """Turn `generate(..., return_dict_in_generate=True)` output into pixel-space results, one dict per row.

        Args:
            outputs: the generate output, with `sequences` (rows, T) and per row `pred_boxes` (n, 4) normalized xyxy,
                `pred_masks` (n, h, w) logits or None, `vis_scores` (n,) and `vis_positions` (n,).
            image_sizes: one original (H, W) per INPUT sample; rows = samples x num_return_sequences, and row r
                belongs to sample r // (rows // samples).
            prompt_length: tokens to cut from each row; None takes `outputs.prompt_length` (set by PerceptionGPT's
                generate), else derives it from `outputs.scores`/`outputs.logits`, else keeps the whole sequence.
            mask_threshold: logit threshold for masks (0.0 = probability 0.5).
            vis_marker: replaces each generated `<vis>` in the text, with "{index}" the 1-based object number
                (e.g. "[obj{index}]"); None keeps `<vis>`.
            clip_boxes: clip boxes to the original image (False: as predicted, e.g. into the padding).

        Returns:
            `[{"text": str, "boxes": FloatTensor (n, 4) pixel xyxy on the original image, clipped,
            "scores": FloatTensor (n,), "masks": BoolTensor (n, H, W) or None}, ...]`
        """
        sequences = getattr(outputs, "sequences", None)
        if not isinstance(sequences, torch.Tensor) or getattr(outputs, "pred_boxes", None) is None:
            raise TypeError(
                "`outputs` must be the PerceptionGPT generate output with `sequences` and `pred_boxes` (call generate "
                f"with return_dict_in_generate=True), got {type(outputs).__name__}."
            )
        if not all(
            isinstance(size, (list, tuple, torch.Tensor, np.ndarray)) and len(size) == 2 for size in image_sizes
        ):
            raise TypeError(
                f"`image_sizes` must be a list of (H, W) pairs, one per input sample, got {image_sizes!r}."
            )
        rows, samples = sequences.shape[0], len(image_sizes)
        if samples == 0 or rows % samples:
            raise ValueError(f"`image_sizes` must have one (H, W) per sample, dividing {rows} rows, got {samples}.")
        if prompt_length is None:
            prompt_length = getattr(outputs, "prompt_length", None)
        if prompt_length is None:  # an output built elsewhere: derive it from the per-step scores when present
            steps = getattr(outputs, "scores", None) or getattr(outputs, "logits", None)
            prompt_length = sequences.shape[1] - len(steps) if steps else 0
        pred_masks = getattr(outputs, "pred_masks", None)
        results = []
        for row in range(rows):
            geometry = self.image_geometry(tuple(int(v) for v in image_sizes[row // (rows // samples)]))
            boxes = torch.as_tensor(outputs.pred_boxes[row]).detach().float().cpu().reshape(-1, 4)
            row_masks = pred_masks[row] if pred_masks is not None else None
            masks = None if row_masks is None else mask_logits_frame_to_pixel(row_masks, geometry, mask_threshold)
            results.append(
                {
                    "text": self._decode_with_markers(sequences[row, prompt_length:].tolist(), vis_marker),
                    "boxes": boxes_xyxy_normalized_to_pixel(boxes, geometry, clip=clip_boxes),
                    "scores": torch.as_tensor(outputs.vis_scores[row]).detach().float().cpu().reshape(-1),
                    "masks": masks,
                }
            )
        return results

    def post_process_object(self, obj, image_size, mask_threshold: float = 0.0) -> dict:
        """One object streamed by `generate(..., streamer=...)` (a `GroundedObject`: normalized `box` (4,), `score`,
        `mask` (S, S) logits or None) -> `{"box": FloatTensor (4,) pixel xyxy, "score": float, "mask": BoolTensor
        (H, W) or None}` on the original (H, W) `image_size`, exactly as `post_process_generation` converts it."""
        if not all(hasattr(obj, name) for name in ("box", "score", "mask")):
            raise TypeError(
                f"`obj` must be a streamed object with `box`, `score` and `mask`, got {type(obj).__name__}."
            )
        if not isinstance(image_size, (list, tuple)) or len(image_size) != 2:
            raise TypeError(f"`image_size` must be the original (H, W), got {image_size!r}.")
        geometry = self.image_geometry(tuple(int(v) for v in image_size))
        box = torch.as_tensor(obj.box).detach().float().cpu().reshape(1, 4)
        mask = None if obj.mask is None else mask_logits_frame_to_pixel(obj.mask[None], geometry, mask_threshold)[0]
        return {
            "box": boxes_xyxy_normalized_to_pixel(box, geometry)[0],
            "score": float(obj.score),
            "mask": mask,
        }


__all__ = ["PerceptionProcessorMixin"]
