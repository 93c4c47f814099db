"""`PerceptionGPTMixin`: `<vis>` heads, region injection, losses and grounded generation over any VLM family.

A family model is `class PerceptionGPT<Family>ForConditionalGeneration(PerceptionGPTMixin, <Family>ForConditionalGeneration)`
plus a small vision adapter: the three family methods at the end of the mixin. `input_ids` always reach the base
model (its placeholders, M-RoPE positions and masks stay its own); region embeddings are written into the decoder's
`inputs_embeds` by a forward pre-hook that reads the call's regions from a context variable.

The i-th `<vis>` of a row owns slot i of `vis_boxes` (B, K, 4) / `vis_masks` (B, K, S, S) / `vis_mask_valid` (B, K),
prompt and answer alike. Its box and mask are decoded from the final hidden state just BEFORE it (the state that
predicts `<vis>`); its input embedding carries a region: a prompt mask through the mask encoder, otherwise a box.
Shapes: B batch, T tokens, K slots, N selected slots, D text hidden, g mask-grid side, C ViT width, S mask side.
"""

import torch
from transformers import initialization as init
from transformers.modeling_utils import slice_logits_to_keep
from transformers.utils import is_torchdynamo_compiling
from transformers.utils.generic import can_return_tuple

from .box_decoders_perceptiongpt import QueryBoxDecoder, build_box_decoder
from .generation_perceptiongpt import PerceptionGPTGenerationMixin
from .heads_perceptiongpt import (
    PERCEPTION_NO_SPLIT_MODULES,
    BoxEncoder,
    LayerFusion,
    MaskEncoder,
    RegionFeaturePooling,
)
from .injection_perceptiongpt import REGIONS_IN_FLIGHT, RegionInjection, inject_regions
from .losses_perceptiongpt import box_losses, mask_bce_loss_sum, mask_dice_loss_sum
from .mask_decoder_perceptiongpt import MaskDecoder, sine_position_encoding_2d
from .modeling_outputs_perceptiongpt import PerceptionGPTCausalLMOutput
from .region_inputs import (
    check_region_inputs,
    embed_boxes_branch_free,
    image_index_per_token,
    vis_slot_index,
    vis_targets,
)


class PerceptionGPTMixin(PerceptionGPTGenerationMixin):
    """Heads, region injection, losses and grounded generation; placed before the native class in the bases."""

    # the box/mask means need the global `<vis>` counts, for every family (Qwen2.5-VL's own class sets False)
    accepts_loss_kwargs = True
    # with `device_map`, every head stays whole on one device
    _no_split_modules = PERCEPTION_NO_SPLIT_MODULES
    # boxes are regressed to ~1e-3 of the image: bf16's 8-bit mantissa would cost pixels, so the box decoder loads
    # in fp32 whatever the dtype (`decode_regions` casts its inputs)
    _keep_in_fp32_modules_strict = ["box_decoder"]

    def _build_perception_heads(self, vision_hidden_size: int):
        """Adds the heads; called by each family's `__init__` before `post_init`."""
        config = self.config
        text_hidden, grid = config.text_config.hidden_size, config.patch_grid_size
        self.box_encoder = BoxEncoder(config.box_head_config, text_hidden)
        self.mask_encoder = MaskEncoder(config.mask_head_config, text_hidden)
        self.mask_feature_fusion = LayerFusion(config.vision_fusion_layers)
        self.box_decoder = build_box_decoder(config.box_head_config, text_hidden, vision_hidden_size, grid)
        attention = self._mask_attention_implementation()
        self.mask_decoder = MaskDecoder(config.mask_head_config, text_hidden, vision_hidden_size, grid, attention)
        if config.pool_region_features:
            layout = config.region_feature_layout
            self.region_feature_pooling = RegionFeaturePooling(vision_hidden_size, text_hidden, grid, layout)
        self.get_decoder().register_forward_pre_hook(inject_regions, with_kwargs=True)

    def _mask_attention_implementation(self):
        return self.config.mask_head_config._attn_implementation or self.config._attn_implementation

    def set_attn_implementation(self, attn_implementation, allow_all_kernels: bool = False):
        """`PreTrainedModel.set_attn_implementation`, reaching the mask decoder's SAM layers too."""
        super().set_attn_implementation(attn_implementation, allow_all_kernels=allow_all_kernels)
        self.mask_decoder.set_attn_implementation(self._mask_attention_implementation())

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
        elif isinstance(module, QueryBoxDecoder):  # its non-persistent buffers, as the mask decoder's
            centres, points, corners = module.constants(module.grid_size, module.refine_layout)
            init.copy_(module.patch_centres, centres)
            init.copy_(module.refine_points, points)
            init.copy_(module.corners, corners)
        else:
            super()._init_weights(module)

    def embed_regions(
        self, input_ids, inputs_embeds, vis_boxes, vis_masks, vis_mask_valid, vis_is_target, image_features=None
    ):
        """Writes each `<vis>` slot's region into its input embedding: a prompt mask through the mask encoder, else a
        finite box through the box encoder; NaN slots keep the plain `<vis>` embedding. With `pool_region_features`,
        prompt regions also get their image's patches under them (`image_features` (N_img, g*g, C) of this forward's
        images; `vis_is_target` (B, T) marks the answer `<vis>`, which are not pooled)."""
        if input_ids.shape[1] == 1 and vis_masks is None and vis_boxes is not None:
            # a decode step of generate(): its `<vis>` is an answer (a box only), embedded without a host sync
            mode, vis_id = self.config.region_embedding_mode, self.config.vis_token_id
            return embed_boxes_branch_free(self.box_encoder, input_ids, inputs_embeds, vis_boxes, vis_id, mode)
        vis = input_ids == self.config.vis_token_id  # (B, T)
        if not vis.any():
            return inputs_embeds
        rows, cols = vis.nonzero(as_tuple=True)  # (M,)
        slots = vis_slot_index(input_ids, self.config.vis_token_id)[rows, cols]  # (M,)
        region = inputs_embeds.new_zeros(len(rows), inputs_embeds.shape[-1])  # (M, D)
        use_mask = torch.zeros_like(rows, dtype=torch.bool)  # (M,)
        is_answer = torch.zeros_like(use_mask) if vis_is_target is None else vis_is_target[rows, cols]  # (M,)
        masks = None
        if vis_masks is not None:
            known = slots < vis_masks.shape[1]
            use_mask[known] = vis_mask_valid.to(rows.device)[rows[known], slots[known]]
            use_mask &= ~is_answer  # answer masks are never fed back
            if use_mask.any():
                masks = vis_masks.to(rows.device)[rows[use_mask], slots[use_mask]]  # (M_mask, S, S)
                region[use_mask] = self.mask_encoder(masks).to(region)
        use_box = torch.zeros_like(use_mask)
        boxes = inputs_embeds.new_full((len(rows), 4), float("nan"), dtype=torch.float32)  # (M, 4)
        if vis_boxes is not None:
            known = slots < vis_boxes.shape[1]
            boxes[known] = vis_boxes.to(boxes)[rows[known], slots[known]]
            use_box = torch.isfinite(boxes).all(-1) & ~use_mask
            if use_box.any():
                region[use_box] = self.box_encoder(boxes[use_box].to(inputs_embeds.dtype)).to(region)
        has = use_mask | use_box
        if image_features is not None and self.config.pool_region_features:
            starts = self.image_starts(input_ids)  # (B, T)
            image_idx = image_index_per_token(starts, num_images=len(image_features))[rows, cols]  # (M,)
            pool = has & ~is_answer & (image_idx >= 0)  # (M,)
            if pool.any():
                pooling = self.region_feature_pooling
                weights = pooling.region_weights(boxes, masks, use_mask)[pool]  # (M_pool, g*g)
                layout_boxes = pooling.region_boxes(boxes, masks, use_mask)[pool] if pooling.layout else None
                pooled = pooling(image_features[image_idx[pool]], weights, layout_boxes)  # (M_pool, D)
                region[pool] = region[pool] + pooled.to(region)
        if self.config.region_embedding_mode == "add":
            region = region + inputs_embeds[rows, cols]
        return inputs_embeds.index_put((rows[has], cols[has]), region[has])

    def decode_regions(self, hidden, image_features=None, has_image=None, want_masks=None, image_states=None):
        """Boxes and masks of `<vis>` slots from the states that predict them.

        hidden (N, D); image_features (N, g*g, C) fused patches of each slot's image (any value where `has_image`
        (N,) is False); want_masks (N,) bool. Returns a `BoxPrediction` (boxes (N, 4) normalized xyxy) and mask
        logits (N_m, S, S) for the rows `want_masks & has_image` in order, or None when there are none. A box
        decoder that reads masks (`decoder_type="mask"`) gets them for every row with an image; one that reads the
        LLM's image states gets `image_states` (N, g*g, D), or their `project_patches` pair.
        """
        has_image = (
            torch.zeros(len(hidden), dtype=torch.bool, device=hidden.device) if has_image is None else has_image
        )
        want_masks = has_image if want_masks is None else want_masks & has_image
        decode = has_image if self.box_decoder.needs_masks else want_masks  # (N,)
        masks = self.mask_decoder(hidden[decode], image_features[decode]) if decode.any() else None
        box = self.decode_boxes(hidden, image_features, has_image, image_states, masks)
        if masks is not None and self.box_decoder.needs_masks:
            masks = masks[want_masks[has_image]] if want_masks.any() else None
        return box, masks

    def decode_boxes(self, hidden, image_features, has_image, image_states=None, mask_logits=None):
        """The box part of `decode_regions` (same arguments; has_image (N,) bool, not None), for a box decoder that
        reads no masks unless `mask_logits` (N_img, S, S) are given: generate() feeds back boxes only."""
        patches = image_states if self.box_decoder.reads_llm_image_states else image_features
        weight = next(self.box_decoder.parameters(), None)  # the "mask" design has none
        dtype = hidden.dtype if weight is None else weight.dtype  # fp32 under a bf16 model (`_keep_in_fp32_modules`)
        if patches is not None and not isinstance(patches, tuple):  # a tuple: the query design's projected patches
            patches = patches.to(dtype)
        return self.box_decoder(
            hidden.to(dtype),
            patches,
            has_image,
            None if mask_logits is None else mask_logits.to(dtype),
            vision_patches=image_features,  # the fused ViT patches (read by the query design's second stage)
        )

    def encode_images(self, pixel_values, **image_kwargs):
        """Runs the vision tower once: the family's `get_image_features` output (its `pooler_output` feeds the LLM)
        plus `mask_features` (N_img, g*g, C), the fused ViT layers on the mask grid."""
        outputs = self.model.get_image_features(
            pixel_values, **image_kwargs, output_hidden_states=True, return_dict=True
        )
        outputs.mask_features = self.mask_feature_fusion(self.vision_layer_grids(outputs, image_kwargs))
        return outputs

    def _mask_features(self, image_outputs, kwargs):
        """`encode_images`' `mask_features`, fused again from the ViT hidden states when a device-map hook rebuilt
        the output without that attribute."""
        features = getattr(image_outputs, "mask_features", None)
        if features is None:
            image_kwargs = {name: kwargs[name] for name in self._image_encoder_kwargs if kwargs.get(name) is not None}
            features = self.mask_feature_fusion(self.vision_layer_grids(image_outputs, image_kwargs))
        return features

    def _encoded_images(self, pixel_values, mm_encoder_outputs, kwargs):
        """`mm_encoder_outputs` with the images of `pixel_values` encoded by `encode_images`, for the family forward."""
        if mm_encoder_outputs is not None and mm_encoder_outputs.get("image") is not None:
            raise ValueError("Pass either `pixel_values` or `mm_encoder_outputs['image']`, not both.")
        image_kwargs = {name: kwargs[name] for name in self._image_encoder_kwargs if kwargs.get(name) is not None}
        return {**(mm_encoder_outputs or {}), "image": self.encode_images(pixel_values, **image_kwargs)}

    def vis_targets(self, input_ids, labels, vis_boxes, vis_mask_valid=None):
        """`region_inputs.vis_targets` with this family's image placeholders (rows, cols, slots, has_box, has_mask)."""
        image_index = image_index_per_token(self.image_starts(input_ids))
        return vis_targets(self.config.vis_token_id, input_ids, labels, vis_boxes, vis_mask_valid, image_index)

    @can_return_tuple
    def forward(
        self,
        input_ids=None,
        *,
        pixel_values=None,
        inputs_embeds=None,
        labels=None,
        logits_to_keep=0,
        mm_encoder_outputs=None,
        vis_boxes=None,
        vis_masks=None,
        vis_mask_valid=None,
        num_vis_in_batch=None,
        num_masks_in_batch=None,
        vis_is_answer=None,
        **kwargs,
    ):
        """The family's forward with regions in and named losses out (every other argument is the family's own).

        vis_boxes (B, K, 4) normalized xyxy, NaN = absent; vis_masks (B, K, S, S) bool with vis_mask_valid (B, K).
        vis_is_answer (B, T) bool: answer `<vis>` besides those `labels` supervise (generate() marks the generated
        ones): they take their box only, never a mask or pooled image features, as in training.
        num_vis_in_batch / num_masks_in_batch: box / mask targets in the GLOBAL batch (GA window x processes); box and
        mask losses are sums over local targets divided by them, so batch splits give the same gradients. Default:
        the local counts.
        """
        if is_torchdynamo_compiling():  # a traced generate step: branch-free boxes, no image, no labels
            inputs_embeds = self.get_input_embeddings()(input_ids)
            if vis_boxes is not None:  # None: no row feeds a `<vis>` (one more traced variant, not a data branch)
                inputs_embeds = embed_boxes_branch_free(
                    self.box_encoder,
                    input_ids,
                    inputs_embeds,
                    vis_boxes,
                    self.config.vis_token_id,
                    self.config.region_embedding_mode,
                )
            return self._lm_forward(None, inputs_embeds, None, logits_to_keep, None, kwargs)[0]
        check_region_inputs(self.config, input_ids, vis_boxes, vis_masks, vis_mask_valid)
        if input_ids is None and (vis_boxes is not None or vis_masks is not None):
            raise ValueError("`vis_boxes`/`vis_masks` need `input_ids` to locate the `<vis>` tokens.")
        vis_is_target = self._answer_vis(input_ids, labels, vis_is_answer, vis_boxes, num_vis_in_batch, kwargs)
        if pixel_values is not None:
            mm_encoder_outputs = self._encoded_images(pixel_values, mm_encoder_outputs, kwargs)
        inject = None
        if input_ids is not None and (vis_boxes is not None or vis_masks is not None):
            image = (mm_encoder_outputs or {}).get("image") if self.config.pool_region_features else None
            features = None if image is None else self._mask_features(image, kwargs)
            inject = RegionInjection(self, input_ids, vis_boxes, vis_masks, vis_mask_valid, vis_is_target, features)
        token = REGIONS_IN_FLIGHT.set(inject)
        try:
            result, hidden = self._lm_forward(
                input_ids, inputs_embeds, labels, logits_to_keep, mm_encoder_outputs, kwargs
            )
        finally:
            REGIONS_IN_FLIGHT.reset(token)
        if result.image_outputs is not None and input_ids is not None and self.box_decoder.reads_llm_image_states:
            result.image_token_states = self.image_token_grids(input_ids, hidden, result.image_outputs)
        if labels is None:
            return result
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

    def _lm_forward(self, input_ids, inputs_embeds, labels, logits_to_keep, mm_encoder_outputs, kwargs):
        """The base model, the LM head and the LM loss, as the family's own forward computes them."""
        outputs = self.model(
            input_ids=input_ids, inputs_embeds=inputs_embeds, mm_encoder_outputs=mm_encoder_outputs, **kwargs
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
        )
        if labels is not None:
            vocab_size = self.config.text_config.vocab_size
            result.lm_loss = self.loss_function(logits=logits, labels=labels, vocab_size=vocab_size, **kwargs)
        return result, hidden

    def _answer_vis(self, input_ids, labels, vis_is_answer, vis_boxes, num_vis_in_batch, kwargs):
        """(B, T) bool of the answer `<vis>` (supervised by `labels`, or marked by `vis_is_answer`), or None."""
        if vis_is_answer is not None and (input_ids is None or vis_is_answer.shape != input_ids.shape):
            got = None if input_ids is None else tuple(input_ids.shape)
            raise ValueError(
                f"`vis_is_answer` must be (B, T) like `input_ids` {got}, got {tuple(vis_is_answer.shape)}."
            )
        supervised = self._check_labels(labels, vis_boxes, num_vis_in_batch, kwargs)
        if supervised is None or vis_is_answer is None:
            return vis_is_answer if supervised is None else supervised
        return supervised | vis_is_answer

    def _check_labels(self, labels, vis_boxes, num_vis_in_batch, kwargs):
        """(B, T) bool of the supervised answer `<vis>`, or None without labels; refuses silent zero losses."""
        if labels is None:
            return None
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
        return vis_is_target

    def _perception_losses(
        self, result, hidden, input_ids, labels, vis_boxes, vis_masks, vis_mask_valid, num_vis, num_masks
    ):
        """Fills the box and mask losses of `result` from the states that predict each target `<vis>`."""
        zero = hidden.sum() * 0.0  # keeps the graph connected when a batch has no targets
        result.box_l1_loss = result.box_giou_loss = result.box_aux_loss = zero
        result.mask_dice_loss = result.mask_bce_loss = zero
        if input_ids is None or vis_boxes is None:
            return
        image_index = image_index_per_token(self.image_starts(input_ids))  # (B, T)
        rows, cols, slots, has_box, has_mask = vis_targets(
            self.config.vis_token_id, input_ids, labels, vis_boxes, vis_mask_valid, image_index
        )
        states = hidden[rows, cols - 1]  # (N, D): the states that predict each target `<vis>`
        image_idx = torch.full_like(rows, -1)
        features = image_states = None
        if result.image_outputs is not None:
            # per token, not per row: a packed row holds several samples, each `<vis>` reads its own sample's image
            image_idx = image_index[rows, cols]  # (N,)
            features = result.image_outputs.mask_features[image_idx.clamp(min=0)]  # (N, g*g, C)
            if result.image_token_states is not None:
                image_states = result.image_token_states[image_idx.clamp(min=0)]  # (N, g*g, D)
        has_image = image_idx >= 0
        want_masks = (has_mask & has_image) if vis_masks is not None else torch.zeros_like(has_mask)
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

    # --- the family's vision adapter -------------------------------------------------------------------------------
    # keyword inputs of the family's `get_image_features` besides `pixel_values` (e.g. Qwen's `image_grid_thw`)
    _image_encoder_kwargs = ()

    def image_starts(self, input_ids):
        """(B, T) -> (B, T) bool: the first placeholder of each image."""
        raise NotImplementedError

    def vision_layer_grids(self, image_outputs, image_kwargs):
        """The ViT hidden states of `image_outputs` -> one (N_img, g*g, C) tensor per hidden state, on the mask grid."""
        raise NotImplementedError

    def image_token_grids(self, input_ids, hidden, image_outputs):
        """(B, T) ids, (B, T, D) final states -> (N_img, g*g, D) at each image's placeholders, on the mask grid."""
        raise NotImplementedError


__all__ = ["PerceptionGPTMixin"]
