"""PerceptionGPT modeling: LLaVA plus `<vis>` region encoders and box/mask decoders.

The i-th `<vis>` of a row owns slot i of `vis_boxes` (B, K, 4) / `vis_masks` (B, K, S, S) / `vis_mask_valid` (B, K),
prompt and answer alike. Its box and mask are decoded from the final hidden state just BEFORE it (the state that
predicts `<vis>`); its input embedding carries a region: a prompt mask through the mask encoder, otherwise a box.
Shapes: B batch, T tokens, K slots, N selected slots, D text hidden, P patches, C ViT width, S mask side.
"""

from dataclasses import dataclass

import torch
from torch import nn
from transformers import initialization as init
from transformers.modeling_utils import slice_logits_to_keep
from transformers.models.llava.modeling_llava import (
    LlavaCausalLMOutputWithPast,
    LlavaForConditionalGeneration,
    LlavaModel,
    LlavaPreTrainedModel,
)
from transformers.utils import is_flash_attn_2_available, is_flash_attn_4_available, is_torchdynamo_compiling
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import can_return_tuple
from transformers.utils.versions import require_version

from .box_decoders_perceptiongpt import BOX_DECODERS, build_box_decoder
from .configuration_perceptiongpt import PerceptionGPTConfig
from .generation_perceptiongpt import PerceptionGPTGenerationMixin
from .heads_perceptiongpt import BoxEncoder, LayerFusion, MaskEncoder
from .losses_perceptiongpt import box_losses, mask_bce_loss_sum, mask_dice_loss_sum
from .mask_decoder_perceptiongpt import MaskDecoder, sine_position_encoding_2d
from .region_inputs import (
    check_region_inputs,
    embed_boxes_branch_free,
    image_index_per_token,
    vis_slot_index,
    vis_targets,
)


BOX_DECODER_CLASS_NAMES = sorted({decoder.__name__ for decoder in BOX_DECODERS.values()})

# This file also runs as remote code (`trust_remote_code=True`), where setup.py's pin does not apply: the generate
# hooks and the LLaVA internals it subclasses are those of transformers 5.24 and later 5.x.
require_version("transformers>=5.24,<6", "PerceptionGPT's modeling code: pip install 'transformers>=5.24,<6'")


@dataclass
class PerceptionGPTCausalLMOutput(LlavaCausalLMOutputWithPast):
    """LLaVA's output plus the named loss parts and the decoded targets.

    last_hidden_state: final-norm hidden states, sliced like the logits (only the last position in generate()).
    pred_boxes: (N, 4) normalized xyxy decoded for the supervised `<vis>` targets with a box, in row-major order.
    pred_masks: (N_mask, S, S) mask logits for the supervised `<vis>` targets with a mask.
    image_token_states: (N_img, g*g, D) final states at each image's patch tokens, in image order, when the box
        decoder reads them (`query_source="llm"`) and the input holds images.
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


# FlashAttention-4's CuTe-DSL kernels need Hopper (sm90) or datacenter Blackwell (sm100/sm103) instructions.
FLASH_ATTN_4_MAJOR_CAPABILITIES = (9, 10)


def preferred_attn_implementation(dtype=None) -> str:
    """The implementation both towers get. On CUDA in half precision: FlashAttention-2 when flash-attn imports, else
    FlashAttention-4 (the `flash-attn-4` wheel) on Hopper/Blackwell. Otherwise sdpa, which has its own
    FlashAttention backend on CUDA."""
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    if dtype not in (torch.float16, torch.bfloat16) or not torch.cuda.is_available():
        return "sdpa"
    if is_flash_attn_2_available():
        return "flash_attention_2"
    if is_flash_attn_4_available() and torch.cuda.get_device_capability()[0] in FLASH_ATTN_4_MAJOR_CAPABILITIES:
        return "flash_attention_4"
    return "sdpa"


class PerceptionGPTPreTrainedModel(LlavaPreTrainedModel):
    config: PerceptionGPTConfig
    config_class = PerceptionGPTConfig
    # with `device_map`, every head stays whole on one device (the decoder and ViT layers come from the sub-models)
    _no_split_modules = ["BoxEncoder", "MaskEncoder", "MaskDecoder", "LayerFusion", *BOX_DECODER_CLASS_NAMES]
    # boxes are regressed to ~1e-3 of the image: bf16's 8-bit mantissa would cost pixels, so the box decoder loads
    # in fp32 whatever the dtype (`decode_regions` casts its inputs)
    _keep_in_fp32_modules_strict = ["box_decoder"]

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """`PreTrainedModel.from_pretrained` with two defaults:
        - `attn_implementation`: `preferred_attn_implementation(dtype)`;
        - `use_safetensors=True`: pickled weights (`pytorch_model.bin`) are refused, because unpickling can run code;
          pass `use_safetensors=False` explicitly to load them (transformers then uses torch.load(weights_only=True)).
        """
        if kwargs.get("attn_implementation") is None:
            kwargs["attn_implementation"] = preferred_attn_implementation(kwargs.get("dtype"))
        safetensors_by_default = kwargs.get("use_safetensors") is None
        if safetensors_by_default:
            kwargs["use_safetensors"] = True
        try:
            return super().from_pretrained(*args, **kwargs)
        except OSError as error:
            if not (safetensors_by_default and ".safetensors" in str(error)):
                raise
            source = args[0] if args else kwargs.get("pretrained_model_name_or_path")
            raise OSError(
                f"{str(source)!r} has no safetensors weights (`model.safetensors` or its index). PerceptionGPT refuses "
                "pickled weights such as `pytorch_model.bin` by default, because unpickling can run code; pass "
                "`use_safetensors=False` to load them from a source you trust."
            ) from error

    def _init_weights(self, module):
        if getattr(module, "zero_init", False):  # e.g. the box decoder's output layer, as in the paper
            init.zeros_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, LayerFusion):
            init.zeros_(module.logits)
        elif isinstance(module, MaskDecoder):
            # a non-persistent buffer: from_pretrained materializes it uninitialized (torch.empty), so recompute it
            encoding = module.position_encoding  # (d, g, g)
            init.copy_(encoding, sine_position_encoding_2d(encoding.shape[0], module.grid_size, module.grid_size))
        else:
            super()._init_weights(module)


class PerceptionGPTModel(PerceptionGPTPreTrainedModel, LlavaModel):
    """LlavaModel with fused ViT features and region embeddings at `<vis>` inputs."""

    def __init__(self, config: PerceptionGPTConfig):
        super().__init__(config)
        text_hidden = config.text_config.hidden_size
        self.box_encoder = BoxEncoder(config.box_head_config, text_hidden)
        self.mask_encoder = MaskEncoder(config.mask_head_config, text_hidden)
        self.mask_feature_fusion = LayerFusion(config.vision_fusion_layers)
        self.llm_feature_fusion = LayerFusion(config.vision_fusion_layers) if config.fuse_llm_features else None
        self.post_init()  # initializes the modules added after LlavaModel's own post_init

    @can_return_tuple
    def get_image_features(
        self, pixel_values, vision_feature_layer=None, vision_feature_select_strategy=None, image_sizes=None, **kwargs
    ):
        """Runs the ViT once. `pooler_output` holds the projected LLM features (one (P, D) per image, as LLaVA) and
        `mask_features` the fused patch features (N_img, g*g, C) for the mask decoder."""
        if image_sizes is not None:
            raise ValueError("`image_sizes` is not supported: PerceptionGPT uses fixed-size square vision inputs.")
        layer = self.config.vision_feature_layer if vision_feature_layer is None else vision_feature_layer
        strategy = vision_feature_select_strategy or self.config.vision_feature_select_strategy
        for key in ("output_hidden_states", "return_dict"):
            kwargs.pop(key, None)
        image_outputs = self.vision_tower(pixel_values, output_hidden_states=True, return_dict=True, **kwargs)
        hidden_states = image_outputs.hidden_states  # num_layers + 1 tensors (N_img, 1 + g*g, C)

        def select(states):  # "default" drops CLIP's CLS token, as LLaVA does
            return states[:, 1:] if strategy == "default" else states

        grid_tokens = self.config.patch_grid_size**2
        image_outputs.mask_features = self.mask_feature_fusion([h[:, -grid_tokens:] for h in hidden_states])
        if self.llm_feature_fusion is not None:
            selected = self.llm_feature_fusion([select(h) for h in hidden_states])
        elif isinstance(layer, int):
            selected = select(hidden_states[layer])
        else:
            selected = torch.cat([select(hidden_states[i]) for i in layer], dim=-1)
        image_outputs.pooler_output = list(self.multi_modal_projector(selected))  # N_img x (P, D)
        return image_outputs

    def embed_regions(self, input_ids, inputs_embeds, vis_boxes, vis_masks, vis_mask_valid, vis_is_target):
        """Writes each `<vis>` slot's region into its input embedding: a prompt mask through the mask encoder, else a
        finite box through the box encoder; NaN slots keep the plain `<vis>` embedding."""
        if is_torchdynamo_compiling():  # the traced generate step: boxes only, no data-dependent shapes
            if vis_masks is not None:
                raise ValueError("`vis_masks` are not supported under torch.compile; give prompt masks eagerly.")
            mode = self.config.region_embedding_mode
            return embed_boxes_branch_free(
                self.box_encoder, input_ids, inputs_embeds, vis_boxes, self.config.vis_token_id, mode
            )
        vis = input_ids == self.config.vis_token_id  # (B, T)
        if not vis.any():
            return inputs_embeds
        rows, cols = vis.nonzero(as_tuple=True)  # (M,)
        slots = vis_slot_index(input_ids, self.config.vis_token_id)[rows, cols]  # (M,)
        region = inputs_embeds.new_zeros(len(rows), inputs_embeds.shape[-1])  # (M, D)
        use_mask = torch.zeros_like(rows, dtype=torch.bool)  # (M,)
        if vis_masks is not None:
            known = slots < vis_masks.shape[1]
            use_mask[known] = vis_mask_valid.to(rows.device)[rows[known], slots[known]]
            if vis_is_target is not None:  # answer masks are never fed back
                use_mask &= ~vis_is_target[rows, cols]
            if use_mask.any():
                masks = vis_masks.to(rows.device)[rows[use_mask], slots[use_mask]]  # (M_mask, S, S)
                region[use_mask] = self.mask_encoder(masks).to(region)
        use_box = torch.zeros_like(use_mask)
        if vis_boxes is not None:
            known = slots < vis_boxes.shape[1]
            boxes = inputs_embeds.new_full((len(rows), 4), float("nan"), dtype=torch.float32)  # (M, 4)
            boxes[known] = vis_boxes.to(boxes)[rows[known], slots[known]]
            use_box = torch.isfinite(boxes).all(-1) & ~use_mask
            if use_box.any():
                region[use_box] = self.box_encoder(boxes[use_box].to(inputs_embeds.dtype)).to(region)
        has = use_mask | use_box
        if self.config.region_embedding_mode == "add":
            region = region + inputs_embeds[rows, cols]
        return inputs_embeds.index_put((rows[has], cols[has]), region[has])

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids=None,
        inputs_embeds=None,
        vis_boxes=None,
        vis_masks=None,
        vis_mask_valid=None,
        vis_is_target=None,
        **kwargs,
    ):
        """LlavaModel.forward plus region embeddings. `vis_is_target` (B, T) bool marks supervised answer `<vis>`."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You must specify exactly one of `input_ids` or `inputs_embeds`.")
        if input_ids is not None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
            if vis_boxes is not None or vis_masks is not None:
                inputs_embeds = self.embed_regions(
                    input_ids, inputs_embeds, vis_boxes, vis_masks, vis_mask_valid, vis_is_target
                )
        elif vis_boxes is not None or vis_masks is not None:
            raise ValueError("`vis_boxes`/`vis_masks` need `input_ids` to locate the `<vis>` tokens.")
        # `<image>` placeholders are then found by embedding equality, as LLaVA does for `inputs_embeds`.
        return super().forward(input_ids=None, inputs_embeds=inputs_embeds, **kwargs)


class PerceptionGPTForConditionalGeneration(
    PerceptionGPTGenerationMixin, PerceptionGPTPreTrainedModel, LlavaForConditionalGeneration
):
    def __init__(self, config: PerceptionGPTConfig):
        # Skip LlavaForConditionalGeneration.__init__, which would build a plain LlavaModel.
        super(LlavaForConditionalGeneration, self).__init__(config)
        self.model = PerceptionGPTModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        vision = config.vision_config
        self.box_decoder = build_box_decoder(
            config.box_head_config, config.text_config.hidden_size, vision.hidden_size, config.patch_grid_size
        )
        self.mask_decoder = MaskDecoder(
            config.mask_head_config, config.text_config.hidden_size, vision.hidden_size, config.patch_grid_size
        )
        self.post_init()

    def decode_regions(self, hidden, image_features=None, has_image=None, want_masks=None, image_states=None):
        """Boxes and masks of `<vis>` slots from the states that predict them.

        hidden (N, D); image_features (N, g*g, C) fused patches of each slot's image (any value where `has_image`
        (N,) is False); want_masks (N,) bool. Returns a `BoxPrediction` (boxes (N, 4) normalized xyxy) and mask
        logits (N_m, S, S) for the rows `want_masks & has_image` in order, or None when there are none. A box
        decoder that reads masks (`decoder_type="mask"`) gets them for every row with an image; one that reads the
        LLM's image states gets `image_states` (N, g*g, D).
        """
        has_image = (
            torch.zeros(len(hidden), dtype=torch.bool, device=hidden.device) if has_image is None else has_image
        )
        want_masks = has_image if want_masks is None else want_masks & has_image
        decode = has_image if self.box_decoder.needs_masks else want_masks  # (N,)
        masks = self.mask_decoder(hidden[decode], image_features[decode]) if decode.any() else None
        patches = image_states if self.box_decoder.reads_llm_image_states else image_features
        weight = next(self.box_decoder.parameters(), None)  # the "mask" design has none
        dtype = hidden.dtype if weight is None else weight.dtype  # fp32 under a bf16 model (`_keep_in_fp32_modules`)
        box = self.box_decoder(
            hidden.to(dtype),
            None if patches is None else patches.to(dtype),
            has_image,
            None if masks is None else masks.to(dtype),
        )
        if masks is not None and self.box_decoder.needs_masks:
            masks = masks[want_masks[has_image]] if want_masks.any() else None
        return box, masks

    def image_token_states(self, input_ids, hidden):
        """(B, T) ids, (B, T, D) final states -> (N_img, g*g, D) at each image's patch tokens, in image order (as
        LLaVA scatters images), or None when the box decoder does not read them or there is no image."""
        if not self.box_decoder.reads_llm_image_states or input_ids is None or is_torchdynamo_compiling():
            return None  # compiled: only decode steps, whose states generate() reads from the eager prefill
        if input_ids.shape[1] < self.config.num_image_tokens:  # a decode step: no host sync on every new token
            return None
        is_image = input_ids == self.config.image_token_id  # (B, T)
        if not is_image.any():
            return None
        tokens = self.config.num_image_tokens
        states = hidden[is_image].unflatten(0, (-1, tokens))  # (N_img, tokens, D)
        return states[:, -(self.config.patch_grid_size**2) :]  # without CLS under "full"

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids=None,
        pixel_values=None,
        attention_mask=None,
        position_ids=None,
        cache=None,
        inputs_embeds=None,
        labels=None,
        logits_to_keep=0,
        mm_encoder_outputs=None,
        vis_boxes=None,
        vis_masks=None,
        vis_mask_valid=None,
        num_vis_in_batch=None,
        num_masks_in_batch=None,
        **kwargs,
    ):
        """LLaVA forward with regions in and named losses out.

        vis_boxes (B, K, 4) normalized xyxy, NaN = absent; vis_masks (B, K, S, S) bool with vis_mask_valid (B, K).
        num_vis_in_batch / num_masks_in_batch: box / mask targets in the GLOBAL batch (GA window x processes); box and
        mask losses are sums over local targets divided by them, so batch splits give the same gradients. Default:
        the local counts.
        """
        if not is_torchdynamo_compiling():  # its checks branch on data; a traced step gets generate()'s own boxes
            check_region_inputs(self.config, input_ids, vis_boxes, vis_masks, vis_mask_valid)
        vis_is_target = None
        if labels is not None:
            vis_is_target = labels == self.config.vis_token_id  # (B, T)
            vis_is_target[:, 0] = False  # nothing predicts position 0
            if vis_boxes is None and vis_is_target.any():
                raise ValueError(
                    f"`labels` supervise {int(vis_is_target.sum())} `<vis>` tokens but `vis_boxes` is None: their "
                    "box loss would silently be 0. Pass `vis_boxes` (B, K, 4), NaN for slots without a box."
                )
            # a cache built from a packed or padded training batch is never valid to continue from
            kwargs["use_cache"] = False
            if kwargs.get("num_items_in_batch") is not None and num_vis_in_batch is None and vis_is_target.any():
                # a plain Trainer stops dividing by gradient accumulation once the model takes `num_items_in_batch`,
                # while the box/mask means here would stay local: over-weighted x GA x processes, silently
                raise ValueError(
                    "`num_items_in_batch` was given without `num_vis_in_batch`: a plain `transformers.Trainer` would "
                    "over-weight the box and mask losses by the gradient-accumulation steps and processes. Train "
                    "with `perceptiongpt.trainer.PerceptionGPTTrainer`, which passes the global `<vis>` counts."
                )
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            mm_encoder_outputs=mm_encoder_outputs,
            vis_boxes=vis_boxes,
            vis_masks=vis_masks,
            vis_mask_valid=vis_mask_valid,
            vis_is_target=vis_is_target,
            **kwargs,
        )
        hidden = outputs.last_hidden_state  # (B, T, D)
        kept_hidden = slice_logits_to_keep(hidden, logits_to_keep)
        logits = self.lm_head(kept_hidden)
        result = PerceptionGPTCausalLMOutput(
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_outputs=outputs.image_outputs,
            last_hidden_state=kept_hidden,
            image_token_states=self.image_token_states(input_ids, hidden),
        )
        if labels is None:
            return result
        result.lm_loss = self.loss_function(
            logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **kwargs
        )
        self._perception_losses(
            result,
            hidden,
            input_ids,
            labels,
            vis_boxes,
            vis_masks,
            vis_mask_valid,
            num_vis_in_batch,
            num_masks_in_batch,
        )
        config = self.config
        loss = (
            config.lm_loss_weight * result.lm_loss
            + config.box_l1_weight * result.box_l1_loss
            + config.box_giou_weight * result.box_giou_loss
            + config.mask_dice_weight * result.mask_dice_loss
            + config.mask_bce_weight * result.mask_bce_loss
            + config.box_aux_weight * result.box_aux_loss
        )
        return PerceptionGPTCausalLMOutput(loss=loss, **result)  # rebuilt so that `loss` leads its tuple form

    def _perception_losses(
        self, result, hidden, input_ids, labels, vis_boxes, vis_masks, vis_mask_valid, num_vis, num_masks
    ):
        """Fills the box and mask losses of `result` from the states that predict each target `<vis>`."""
        zero = hidden.sum() * 0.0  # keeps the graph connected when a batch has no targets
        result.box_l1_loss = result.box_giou_loss = result.box_aux_loss = zero
        result.mask_dice_loss = result.mask_bce_loss = zero
        if input_ids is None or vis_boxes is None:
            return
        rows, cols, slots, has_box, has_mask = vis_targets(self.config, input_ids, labels, vis_boxes, vis_mask_valid)
        states = hidden[rows, cols - 1]  # (N, D): the states that predict each target `<vis>`
        image_idx = torch.full_like(rows, -1)
        features = None
        if result.image_outputs is not None:
            # per token, not per row: a packed row holds several samples, each `<vis>` reads its own sample's image
            config = self.config
            per_token = image_index_per_token(input_ids, config.image_token_id, config.num_image_tokens)  # (B, T)
            image_idx = per_token[rows, cols]  # (N,)
            features = result.image_outputs.mask_features[image_idx.clamp(min=0)]  # (N, g*g, C)
        has_image = image_idx >= 0
        want_masks = (has_mask & has_image) if vis_masks is not None else torch.zeros_like(has_mask)
        image_states = None
        if result.image_token_states is not None:
            image_states = result.image_token_states[image_idx.clamp(min=0)]  # (N, g*g, D)
        box, pred_masks = self.decode_regions(states, features, has_image, want_masks, image_states)
        gt_boxes = vis_boxes.to(hidden.device)[rows[has_box], slots[has_box]].float()  # (N_box, 4)
        denom = torch.as_tensor(has_box.sum() if num_vis is None else num_vis, device=hidden.device).clamp(min=1)
        for name, value in box_losses(box, has_box, has_image, gt_boxes, denom).items():
            setattr(result, name, value)
        result.pred_boxes = box.boxes[has_box]  # (N_box, 4)
        if pred_masks is None:
            return
        gt_masks = vis_masks.to(hidden.device)[rows[want_masks], slots[want_masks]]  # (N_mask, S, S)
        count = want_masks.sum() if num_masks is None else num_masks
        denom = torch.as_tensor(count, device=hidden.device).clamp(min=1)
        result.mask_dice_loss = mask_dice_loss_sum(pred_masks, gt_masks) / denom
        result.mask_bce_loss = mask_bce_loss_sum(pred_masks, gt_masks) / denom
        result.pred_masks = pred_masks


__all__ = [
    "preferred_attn_implementation",
    "PerceptionGPTCausalLMOutput",
    "PerceptionGPTForConditionalGeneration",
    "PerceptionGPTModel",
    "PerceptionGPTPreTrainedModel",
]
