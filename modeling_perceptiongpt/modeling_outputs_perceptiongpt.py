"""The forward output of every PerceptionGPT family: the family's own fields plus the named losses and decoded targets."""

from dataclasses import dataclass

import torch
from transformers.modeling_outputs import MultimodalCausalLMOutputWithPast


@dataclass
class PerceptionGPTCausalLMOutput(MultimodalCausalLMOutputWithPast):
    """The family's output plus the named loss parts and the decoded targets.

    last_hidden_state: final-norm hidden states, sliced like the logits (only the last position in generate()).
    pred_boxes: (N, 4) normalized xyxy decoded for the supervised `<vis>` targets with a box, in row-major order.
    pred_masks: (N_mask, S, S) mask logits for the supervised `<vis>` targets with a mask.
    image_token_states: (N_img, g*g, D) final states at each image's placeholders on the mask grid, in image order,
        when the box decoder reads them (`query_source="llm"`) and the input holds images.
    """

    last_hidden_state: torch.FloatTensor | None = None
    lm_loss: torch.FloatTensor | None = None
    box_l1_loss: torch.FloatTensor | None = None
    box_giou_loss: torch.FloatTensor | None = None
    mask_dice_loss: torch.FloatTensor | None = None
    mask_bce_loss: torch.FloatTensor | None = None
    box_aux_loss: torch.FloatTensor | None = None
    pred_boxes: torch.FloatTensor | None = None
    pred_masks: torch.FloatTensor | None = None
    image_token_states: torch.FloatTensor | None = None


__all__ = ["PerceptionGPTCausalLMOutput"]
