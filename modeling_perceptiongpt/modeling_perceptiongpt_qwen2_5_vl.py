"""PerceptionGPT on Qwen2.5-VL: `PerceptionGPTMixin` over `Qwen2_5_VLForConditionalGeneration`, plus its adapter.

Qwen2.5-VL sees each image at its own resolution: (t, h, w) patches of 14 px, flattened in 2x2 merge blocks and,
inside the ViT, permuted into attention-window order; the LLM gets one token per merge block, delimited by vision
start/end tokens, with M-RoPE positions derived from `input_ids`. The adapter undoes the window permutation,
rebuilds each image's patch grid and resamples it (and the LLM's image states) to the fixed `mask_grid_size`.
Shapes: N_img images, C ViT width, D text hidden, g mask-grid side.
"""

import torch
from torch.nn import functional as F
from transformers import GenerationMixin
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLForConditionalGeneration
from transformers.utils.versions import require_version
from transformers.vision_utils import get_vision_window_index

from .configuration_perceptiongpt_qwen2_5_vl import PerceptionGPTQwen2_5_VLConfig
from .injection_perceptiongpt import forward_with_native_signature
from .loading_perceptiongpt import PerceptionGPTLoadingMixin
from .mixin_perceptiongpt import PerceptionGPTMixin
from .region_inputs import image_starts_by_run


require_version("transformers>=5.24,<6", "PerceptionGPT's modeling code: pip install 'transformers>=5.24,<6'")


def resample_grid(states: torch.Tensor, side: int) -> torch.Tensor:
    """(h, w, X) -> (side*side, X), bilinear (the identity when h == w == side)."""
    grid = states.permute(2, 0, 1)[None].float()  # (1, X, h, w)
    grid = F.interpolate(grid, size=(side, side), mode="bilinear", align_corners=False)
    return grid[0].flatten(1).transpose(0, 1).to(states.dtype)  # (side*side, X)


class PerceptionGPTQwen2_5_VLForConditionalGeneration(
    PerceptionGPTMixin, PerceptionGPTLoadingMixin, Qwen2_5_VLForConditionalGeneration, GenerationMixin
):
    config: PerceptionGPTQwen2_5_VLConfig
    config_class = PerceptionGPTQwen2_5_VLConfig
    _image_encoder_kwargs = ("image_grid_thw",)

    def __init__(self, config: PerceptionGPTQwen2_5_VLConfig):
        super().__init__(config)
        self._build_perception_heads(config.vision_config.hidden_size)
        self.post_init()  # initializes the heads added after Qwen's own post_init

    def encode_images(self, pixel_values, image_grid_thw=None, **image_kwargs):
        if image_grid_thw is None:
            raise ValueError("`image_grid_thw` (N_img, 3) is required with `pixel_values` for Qwen2.5-VL.")
        outputs = super().encode_images(pixel_values, image_grid_thw=image_grid_thw, **image_kwargs)
        outputs.image_grid_thw = image_grid_thw  # for `image_token_grids`
        return outputs

    forward = forward_with_native_signature(Qwen2_5_VLForConditionalGeneration, PerceptionGPTMixin.forward)

    def image_starts(self, input_ids):
        return image_starts_by_run(input_ids, self.config.image_token_id)

    def vision_layer_grids(self, image_outputs, image_kwargs):
        grid_thw = image_kwargs["image_grid_thw"]  # (N_img, 3)
        vision = self.config.vision_config
        merge = vision.spatial_merge_size
        window_index, _ = get_vision_window_index(grid_thw, merge, vision.window_size, vision.patch_size)
        order = torch.argsort(window_index.to(grid_thw.device))  # window order -> merge-block order
        sizes = (grid_thw.prod(-1)).tolist()
        grids = []
        for states in image_outputs.hidden_states:  # (sum of t*h*w, C), in window order
            blocks = states.unflatten(0, (-1, merge * merge))[order].flatten(0, 1)  # (sum t*h*w, C) block order
            per_image = []
            for image, (t, h, w) in zip(blocks.split(sizes), grid_thw.tolist()):
                image = image.view(t, h // merge, w // merge, merge, merge, -1)[0]  # first frame: (h/m, w/m, m, m, C)
                image = image.permute(0, 2, 1, 3, 4).reshape(h, w, -1)  # (h, w, C)
                per_image.append(resample_grid(image, self.config.patch_grid_size))
            grids.append(torch.stack(per_image))  # (N_img, g*g, C)
        return grids

    def image_token_grids(self, input_ids, hidden, image_outputs):
        merge = self.config.vision_config.spatial_merge_size
        grid_thw = self._grids_of_rows(input_ids, image_outputs.image_grid_thw)  # (N_img, 3)
        states = hidden[input_ids == self.config.image_token_id]  # (sum of tokens, D), in image order
        sizes = (grid_thw.prod(-1) // merge**2).tolist()
        grids = [
            resample_grid(image.view(t, h // merge, w // merge, -1)[0], self.config.patch_grid_size)
            for image, (t, h, w) in zip(states.split(sizes), grid_thw.tolist())
        ]
        return torch.stack(grids)  # (N_img, g*g, D)

    def _grids_of_rows(self, input_ids, grid_thw):
        """The (t, h, w) of every image placeholder run in `input_ids`, in order. generate() repeats each sample's
        images for its beams / returned sequences (consecutive rows) in the LLM features only, not in `grid_thw`."""
        per_row = image_starts_by_run(input_ids, self.config.image_token_id).sum(-1).tolist()  # images per row
        total = sum(per_row)
        if total == len(grid_thw):
            return grid_thw
        if not grid_thw.numel() or total % len(grid_thw):
            raise ValueError(f"`input_ids` hold {total} images but `image_grid_thw` describes {len(grid_thw)}.")
        copies = total // len(grid_thw)
        grids, first = [], 0
        for sample in range(len(per_row) // copies):
            count = per_row[sample * copies]
            grids += [grid_thw[first : first + count]] * copies
            first += count
        return torch.cat(grids)


# Checkpoint renames are looked up by class name and skipped for custom classes: without this, a Hub-layout Qwen2.5-VL
# checkpoint (`model.layers.*`, `visual.*`) would silently leave the language model and ViT randomly initialized.
register_checkpoint_conversion_mapping(
    PerceptionGPTQwen2_5_VLForConditionalGeneration.__name__,
    get_checkpoint_conversion_mapping("Qwen2_5_VLForConditionalGeneration"),
    overwrite=True,
)


__all__ = ["PerceptionGPTQwen2_5_VLForConditionalGeneration", "resample_grid"]
