"""Grounded decoding inside the standard `generate()`, through its public hooks only.

Each forward's last hidden state is kept, keyed by (sample, the exact token prefix it was computed on). When the
next `prepare_inputs_for_generation` sees a row whose last token is `<vis>`, it looks up the state that predicted
it, decodes a box (and a mask), and feeds the box into that `<vis>`'s input embedding. Keying by prefix rather than
by row makes beam reordering, returned-sequence re-ranking and padding irrelevant; no cache hook is needed.
Shapes: R = generation rows (batch x beams or x returned sequences), K slots, D hidden, S mask side.
"""

from dataclasses import dataclass

import torch
from transformers import GenerationMixin, LogitsProcessorList, SuppressTokensLogitsProcessor
from transformers.generation.utils import GenerateBeamDecoderOnlyOutput, GenerateDecoderOnlyOutput

from .region_inputs import last_image_index_per_row


@dataclass
class PerceptionGPTGenerateOutput(GenerateDecoderOnlyOutput):
    """Per output row, for the GENERATED `<vis>` tokens: pred_boxes (n, 4) normalized xyxy; pred_masks (n, S, S)
    logits, or None without an image; vis_scores (n,) probability of `<vis>` when it was produced; vis_positions
    (n,) indices into `sequences`. prompt_length: the prompt's tokens at the start of every row of `sequences`."""

    pred_boxes: list[torch.Tensor] | None = None
    pred_masks: list[torch.Tensor | None] | None = None
    vis_scores: list[torch.Tensor] | None = None
    vis_positions: list[torch.Tensor] | None = None
    prompt_length: int | None = None


@dataclass
class PerceptionGPTBeamGenerateOutput(GenerateBeamDecoderOnlyOutput):
    """Beam-search counterpart of `PerceptionGPTGenerateOutput`, with the same extra fields."""

    pred_boxes: list[torch.Tensor] | None = None
    pred_masks: list[torch.Tensor | None] | None = None
    vis_scores: list[torch.Tensor] | None = None
    vis_positions: list[torch.Tensor] | None = None
    prompt_length: int | None = None


class PerceptionGenerationState:
    """Side channel carried through generate() as a model kwarg (a non-tensor, so generate never expands it)."""

    def __init__(self, batch_size: int, prompt_length: int, prompt_boxes: torch.Tensor | None):
        self.batch_size = batch_size
        self.prompt_length = prompt_length
        self.prompt_boxes = prompt_boxes  # (B, K, 4) unexpanded prompt regions, or None
        self.last_inputs = None  # (R, T) the sequences of the latest forward
        self.pending = {}  # (sample, prefix bytes) -> (hidden (D,), P(<vis>)) from the latest forward
        self.records = {}  # (sample, prefix incl. <vis> bytes) -> (box (4,), mask (S, S) or None, score)
        self.mask_features = None  # (N_img, g*g, C) fused patches, unexpanded
        self.sample_image = None  # (B,) index of each sample's last image (that of its generated `<vis>`), or -1
        self.image_states = None  # (B, g*g, D) LLM states at each sample's last image, for boxes that read them

    def sample_of(self, row: int, num_rows: int) -> int:
        return row // max(num_rows // self.batch_size, 1)

    @staticmethod
    def key(sample: int, prefix: torch.Tensor):
        return sample, prefix.cpu().numpy().tobytes()


def _prompt_shape(input_ids, kwargs) -> tuple[int, int]:
    """(batch size, prompt tokens at the start of the returned sequences), as `generate` will build its inputs:
    `input_ids` are kept; a prompt given as `inputs_embeds` alone is not returned (0); without either, generation
    starts from one BOS token per sample, batched like the other tensor inputs."""
    if input_ids is not None:
        return input_ids.shape[0], input_ids.shape[1]
    if kwargs.get("inputs_embeds") is not None:
        return kwargs["inputs_embeds"].shape[0], 0
    tensors = [value for value in kwargs.values() if isinstance(value, torch.Tensor)]
    return (tensors[0].shape[0] if tensors else 1), 1


_UNSUPPORTED = {
    "assistant_model": "assisted decoding",
    "prompt_lookup_num_tokens": "prompt-lookup (speculative) decoding",
    "assistant_early_exit": "self-speculative (early-exit) decoding",
    "prefill_chunk_size": "chunked prefill",
    "custom_generate": "a custom generation loop (`custom_generate`)",
}


class PerceptionGPTGenerationMixin(GenerationMixin):
    @torch.no_grad()
    def generate(self, inputs=None, generation_config=None, logits_processor=None, **kwargs):
        """`GenerationMixin.generate` with `<vis>` decoding and feedback. Returns a tensor by default; with
        `return_dict_in_generate=True`, `PerceptionGPT(Beam)GenerateOutput` with the boxes of generated `<vis>`."""
        config = generation_config if generation_config is not None else self.generation_config
        for name, mode in _UNSUPPORTED.items():
            if kwargs.get(name) is not None or getattr(config, name, None) is not None:
                raise ValueError(
                    f"PerceptionGPT generate() does not support {mode} (`{name}` was set): every "
                    "`<vis>` must be decoded and fed back one step at a time."
                )
        cache_impl = kwargs.get("cache_implementation", config.cache_implementation)
        if cache_impl is not None and "paged" in str(cache_impl):
            raise ValueError(
                f"PerceptionGPT generate() does not support `cache_implementation={cache_impl!r}`: "
                "continuous batching cannot feed decoded boxes back."
            )
        input_ids = inputs if inputs is not None else kwargs.get("input_ids")
        if input_ids is None and any(kwargs.get(name) is not None for name in ("vis_boxes", "vis_masks")):
            raise ValueError(
                "`vis_boxes`/`vis_masks` need the prompt's `input_ids` to find their `<vis>` tokens; got only "
                "`inputs_embeds`. Pass `input_ids` (with or without `inputs_embeds`)."
            )
        batch_size, prompt_length = _prompt_shape(input_ids, kwargs)
        state = PerceptionGenerationState(batch_size, prompt_length, kwargs.get("vis_boxes"))
        processors = LogitsProcessorList(logits_processor or [])
        # never sample `<image>`: LLaVA finds image placeholders by embedding, so a sampled one corrupts later passes
        processors.append(SuppressTokensLogitsProcessor([self.config.image_token_id], device=self.device))
        out = super().generate(
            inputs=inputs,
            generation_config=generation_config,
            logits_processor=processors,
            perception_state=state,
            **kwargs,
        )
        if not isinstance(out, (GenerateDecoderOnlyOutput, GenerateBeamDecoderOnlyOutput)):
            return out
        fields = self._collect_generated_regions(out.sequences, state)
        cls = (
            PerceptionGPTBeamGenerateOutput
            if isinstance(out, GenerateBeamDecoderOnlyOutput)
            else PerceptionGPTGenerateOutput
        )
        return cls(**out, **fields, prompt_length=state.prompt_length)

    def prepare_inputs_for_generation(
        self,
        input_ids,
        inputs_embeds=None,
        is_first_iteration=False,
        perception_state=None,
        vis_boxes=None,
        vis_masks=None,
        vis_mask_valid=None,
        **kwargs,
    ):
        model_inputs = super().prepare_inputs_for_generation(
            input_ids, inputs_embeds=inputs_embeds, is_first_iteration=is_first_iteration, **kwargs
        )
        state = perception_state
        use_cache = kwargs.get("use_cache", True)
        if state is None:  # a plain forward-style call outside generate()
            model_inputs.update(vis_boxes=vis_boxes, vis_masks=vis_masks, vis_mask_valid=vis_mask_valid)
            return model_inputs
        if is_first_iteration:
            self._capture_images(state, input_ids, kwargs.get("mm_encoder_outputs"))
        else:
            self._decode_new_vis(state, input_ids)
        state.last_inputs = input_ids
        if model_inputs.get("input_ids") is None:  # a prompt given as `inputs_embeds` alone: no `<vis>` to find
            return model_inputs
        if is_first_iteration or not use_cache:
            # the whole sequence is fed: prompt regions plus every generated box so far
            model_inputs.update(vis_masks=vis_masks, vis_mask_valid=vis_mask_valid)
            model_inputs["vis_boxes"] = self._boxes_for_sequences(state, input_ids, vis_boxes)
        else:  # only the newest token is fed: one slot per row, NaN unless that token is a `<vis>`
            model_inputs["vis_boxes"] = self._boxes_for_newest_token(state, input_ids)
        return model_inputs

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, **kwargs):
        model_kwargs = super()._update_model_kwargs_for_generation(outputs, model_kwargs, **kwargs)
        state = model_kwargs.get("perception_state")
        if state is not None and state.image_states is None and outputs.image_token_states is not None:
            self._capture_image_states(state, outputs.image_token_states)
        if state is not None:
            hidden = outputs.last_hidden_state[:, -1]  # (R, D): states that predict the next token
            vis_prob = outputs.logits[:, -1].float().softmax(-1)[:, self.config.vis_token_id]  # (R,)
            rows = state.last_inputs.shape[0]
            sequences = state.last_inputs.cpu()  # one device-to-host copy per step, not one per row
            state.pending = {
                state.key(state.sample_of(r, rows), sequences[r]): (hidden[r], vis_prob[r]) for r in range(rows)
            }
        return model_kwargs

    def _capture_images(self, state, input_ids, mm_encoder_outputs):
        image = (mm_encoder_outputs or {}).get("image")
        if image is None:
            return
        state.mask_features = image.mask_features
        per_sample = input_ids[:: max(input_ids.shape[0] // state.batch_size, 1)]  # one row per sample
        state.sample_image = last_image_index_per_row(
            per_sample, self.config.image_token_id, self.config.num_image_tokens
        )

    def _capture_image_states(self, state, image_token_states):
        """From the first forward (the whole prompt): each sample's last image's states, from its first row."""
        step = max(state.last_inputs.shape[0] // state.batch_size, 1)
        ids, tokens = self.config.image_token_id, self.config.num_image_tokens
        last = last_image_index_per_row(state.last_inputs, ids, tokens)[::step]  # (B,) forward's images, or -1
        has = last >= 0  # (B,)
        state.image_states = image_token_states[last.clamp(min=0)] * has[:, None, None].to(image_token_states)

    def _decode_new_vis(self, state, input_ids):
        """Decodes every row whose newest token is `<vis>`, from the state that predicted it."""
        rows = (input_ids[:, -1] == self.config.vis_token_id).nonzero(as_tuple=True)[0].tolist()
        todo = []
        for r in rows:
            sample = state.sample_of(r, input_ids.shape[0])
            key = state.key(sample, input_ids[r])
            if key not in state.records:
                todo.append((key, sample, state.pending[state.key(sample, input_ids[r, :-1])]))
        if todo:
            self._decode_into_records(state, todo)

    def _decode_into_records(self, state, todo):
        hidden = torch.stack([h for _, _, (h, _) in todo])  # (N, D)
        has_image, features = None, None
        if state.mask_features is not None:
            image_idx = state.sample_image[[sample for _, sample, _ in todo]]  # (N,)
            has_image = image_idx >= 0
            features = state.mask_features[image_idx.clamp(min=0)]  # (N, g*g, C)
        samples = [sample for _, sample, _ in todo]
        image_states = None if state.image_states is None else state.image_states[samples]  # (N, g*g, D)
        box, decoded = self.decode_regions(hidden, features, has_image, has_image, image_states)
        boxes = box.boxes
        masks = [None] * len(todo)
        if decoded is not None:
            for j, i in enumerate(has_image.nonzero(as_tuple=True)[0].tolist()):
                masks[i] = decoded[j]
        for i, (key, _, (_, score)) in enumerate(todo):
            state.records[key] = (boxes[i], masks[i], score)

    def _boxes_for_sequences(self, state, input_ids, prompt_boxes):
        """(R, T) sequences -> (R, K, 4) boxes of their `<vis>` slots: prompt slots from `prompt_boxes` (expanded),
        generated slots from the records, NaN elsewhere."""
        rows = input_ids.shape[0]
        is_vis = input_ids == self.config.vis_token_id  # (R, T)
        num_slots = max(int(is_vis.sum(-1).max()), 0 if prompt_boxes is None else prompt_boxes.shape[1], 1)
        boxes = torch.full((rows, num_slots, 4), float("nan"), device=input_ids.device)
        if prompt_boxes is not None:
            boxes[:, : prompt_boxes.shape[1]] = prompt_boxes.to(boxes)
        slot = is_vis.long().cumsum(-1) - 1  # (R, T)
        generated = is_vis.clone()
        generated[:, : state.prompt_length] = False
        for r, t in generated.nonzero().tolist():
            boxes[r, slot[r, t]] = state.records[state.key(state.sample_of(r, rows), input_ids[r, : t + 1])][0]
        return boxes

    def _boxes_for_newest_token(self, state, input_ids):
        """(R, T) sequences -> (R, 1, 4): the decoded box where the newest token is a `<vis>`, NaN elsewhere."""
        rows = input_ids.shape[0]
        boxes = torch.full((rows, 1, 4), float("nan"), device=input_ids.device)
        for r in (input_ids[:, -1] == self.config.vis_token_id).nonzero(as_tuple=True)[0].tolist():
            boxes[r, 0] = state.records[state.key(state.sample_of(r, rows), input_ids[r])][0]
        return boxes

    def _collect_generated_regions(self, sequences, state):
        rows = sequences.shape[0]
        # a `<vis>` produced by the very last step was never fed back: decode it from the last forward's states
        last = [(r, state.sample_of(r, rows)) for r in range(rows) if sequences[r, -1] == self.config.vis_token_id]
        todo = [
            (state.key(s, sequences[r]), s, state.pending[state.key(s, sequences[r, :-1])])
            for r, s in last
            if state.key(s, sequences[r]) not in state.records
        ]
        if todo:
            self._decode_into_records(state, todo)
        fields = {"pred_boxes": [], "pred_masks": [], "vis_scores": [], "vis_positions": []}
        for r in range(rows):
            sample = state.sample_of(r, rows)
            positions = (sequences[r] == self.config.vis_token_id).nonzero(as_tuple=True)[0]
            positions = positions[positions >= state.prompt_length]
            records = [state.records[state.key(sample, sequences[r, : p + 1])] for p in positions.tolist()]
            fields["vis_positions"].append(positions)
            fields["pred_boxes"].append(
                torch.stack([b for b, _, _ in records])
                if records
                else sequences.new_zeros((0, 4), dtype=torch.float32)
            )
            fields["vis_scores"].append(
                torch.stack([s for _, _, s in records]) if records else sequences.new_zeros(0, dtype=torch.float32)
            )
            has_image = state.mask_features is not None and int(state.sample_image[sample]) >= 0
            if not has_image:
                fields["pred_masks"].append(None)
            elif records:
                fields["pred_masks"].append(torch.stack([m for _, m, _ in records]))
            else:
                side = self.config.mask_head_config.mask_size
                fields["pred_masks"].append(sequences.new_zeros((0, side, side), dtype=torch.float32))
        return fields


__all__ = ["PerceptionGPTBeamGenerateOutput", "PerceptionGPTGenerateOutput", "PerceptionGPTGenerationMixin"]
