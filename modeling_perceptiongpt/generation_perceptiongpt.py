"""Grounded decoding inside the standard `generate()`, through its public hooks only.

Each forward's last hidden state is kept, keyed by (sample, the tokens generated so far). When the next
`prepare_inputs_for_generation` sees a row whose last token is `<vis>`, it looks up the state that predicted it,
decodes a box, and feeds the box into that `<vis>`'s input embedding. Keying by generated suffix rather than by row
makes beam reordering, returned-sequence re-ranking and padding irrelevant (no cache hook is needed), and keeps the
keys independent of the prompt length. Masks are decoded once, at the end, for the returned rows only.
Shapes: R = generation rows (batch x beams or x returned sequences), K slots, D hidden, S mask side.
"""

from dataclasses import dataclass

import torch
from transformers import GenerationMixin, LogitsProcessorList, SuppressTokensLogitsProcessor
from transformers.generation.utils import GenerateBeamDecoderOnlyOutput, GenerateDecoderOnlyOutput

from .generation_state_perceptiongpt import PerceptionGenerationState
from .region_inputs import DECODED_BY_GENERATE, heads_inference_mode, last_image_index_per_row
from .streaming_perceptiongpt import GroundedObject, _EndDeferred


@dataclass
class PerceptionGPTGenerateOutput(GenerateDecoderOnlyOutput):
    """Per output row, for the GENERATED `<vis>` tokens: pred_boxes (n, 4) normalized xyxy; pred_masks (n, S, S)
    logits, or None without an image; vis_scores (n,) probability of `<vis>` when it was produced; vis_positions
    (n,) indices into `sequences`. prompt_length: the prompt's tokens at the start of every row of `sequences`.
    image_states: (B, g*g, D) per input sample, the LLM's states at its last image, for box heads that read them
    (`query_source="llm"`); pass them back as `generate(..., cache=out.cache, image_states=out.image_states)`."""

    pred_boxes: list[torch.Tensor] | None = None
    pred_masks: list[torch.Tensor | None] | None = None
    vis_scores: list[torch.Tensor] | None = None
    vis_positions: list[torch.Tensor] | None = None
    prompt_length: int | None = None
    image_states: torch.Tensor | None = None


@dataclass
class PerceptionGPTBeamGenerateOutput(GenerateBeamDecoderOnlyOutput):
    """Beam-search counterpart of `PerceptionGPTGenerateOutput`, with the same extra fields."""

    pred_boxes: list[torch.Tensor] | None = None
    pred_masks: list[torch.Tensor | None] | None = None
    vis_scores: list[torch.Tensor] | None = None
    vis_positions: list[torch.Tensor] | None = None
    prompt_length: int | None = None
    image_states: torch.Tensor | None = None


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


def _slots_from(regions: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """(R, K, ...) per-slot regions, (R,) first slot of each row -> (R, K, ...) with row r's slots from first[r] on
    (the `<vis>` of an uncached tail are counted from its start); slots past the end are NaN / False / 0."""
    slots = first[:, None] + torch.arange(regions.shape[1], device=regions.device)  # (R, K)
    inside = slots < regions.shape[1]
    index = slots.clamp(max=regions.shape[1] - 1).view(*slots.shape, *[1] * (regions.dim() - 2))
    taken = regions.gather(1, index.expand_as(regions))
    empty = torch.full_like(taken, float("nan")) if taken.is_floating_point() else torch.zeros_like(taken)
    return torch.where(inside.view_as(index), taken, empty)


class SuppressModalityTokens(SuppressTokensLogitsProcessor):
    """Its own type: generate() drops a custom processor's default twin, so a plain `SuppressTokensLogitsProcessor`
    would silently replace the caller's `suppress_tokens`. Its (V,) mask over the `vocab_size` logits is built once
    per generate(), not at every step (one op per step instead of three)."""

    def __init__(self, suppress_tokens, vocab_size: int, device="cpu"):
        super().__init__(suppress_tokens, device=device)
        self.mask = torch.isin(torch.arange(vocab_size, device=device), self.suppress_tokens)  # (V,)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        return scores.masked_fill(self.mask.to(scores.device), -float("inf"))  # (R, V)


def _given_image_states(image_states, batch_size):
    """The caller's `image_states` (B, g*g, D) for a continued generate(), checked; None when not given."""
    if image_states is None:
        return None
    if not isinstance(image_states, torch.Tensor):
        raise TypeError(f"`image_states` must be a torch.Tensor (B, g*g, D), got {type(image_states).__name__}.")
    if image_states.dim() != 3 or image_states.shape[0] != batch_size:
        raise ValueError(
            f"`image_states` must be (B, g*g, D) with one row per input sample ({batch_size}), got "
            f"{tuple(image_states.shape)}: pass the `image_states` of the generate() output you continue."
        )
    return image_states


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
        state = PerceptionGenerationState(batch_size, prompt_length)
        state.image_states = _given_image_states(kwargs.pop("image_states", None), batch_size)
        if callable(getattr(kwargs.get("streamer"), "on_object", None)):
            state.streamer, kwargs["streamer"] = kwargs["streamer"], _EndDeferred(kwargs["streamer"])
        if kwargs.get("pixel_values") is not None:  # encoded once, with the mask decoder's features
            image_kwargs = {name: kwargs[name] for name in self._image_encoder_kwargs if kwargs.get(name) is not None}
            images = self.encode_images(kwargs.pop("pixel_values"), **image_kwargs)
            kwargs["mm_encoder_outputs"] = {**(kwargs.get("mm_encoder_outputs") or {}), "image": images}
        processors = LogitsProcessorList(logits_processor or [])
        # never sample a modality placeholder: its features would be missing, or found by embedding (LLaVA)
        vocab_size = self.get_output_embeddings().weight.shape[0]  # the logits' width
        processors.append(SuppressModalityTokens(self.config.suppressed_token_ids, vocab_size, device=self.device))
        out = super().generate(
            inputs=inputs,
            generation_config=generation_config,
            logits_processor=processors,
            perception_state=state,
            **kwargs,
        )
        is_dict = isinstance(out, (GenerateDecoderOnlyOutput, GenerateBeamDecoderOnlyOutput))
        if is_dict or state.streamer is not None:
            self._decode_new_vis(state, out.sequences if is_dict else out)  # a `<vis>` of the very last step
        if state.streamer is not None:
            state.streamer.end()
        if not is_dict:
            return out
        fields = self._collect_generated_regions(out.sequences, state)
        cls = (
            PerceptionGPTBeamGenerateOutput
            if isinstance(out, GenerateBeamDecoderOnlyOutput)
            else PerceptionGPTGenerateOutput
        )
        return cls(**out, **fields, prompt_length=state.prompt_length, image_states=state.image_states)

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
            newest_vis = None
        else:
            newest_vis = self._decode_new_vis(state, input_ids)
        state.last_inputs = input_ids
        if model_inputs.get("input_ids") is None:  # a prompt given as `inputs_embeds` alone: no `<vis>` to find
            return model_inputs
        if is_first_iteration or not use_cache:
            # the whole sequence is fed: prompt regions plus every generated box so far
            regions = {"vis_boxes": self._boxes_for_sequences(state, input_ids, vis_boxes)}
            if vis_masks is not None:
                regions.update(vis_masks=vis_masks, vis_mask_valid=vis_mask_valid)
            fed = model_inputs["input_ids"].shape[1]
            generated = state.generated_vis(input_ids, self.config.vis_token_id)  # (R, T)
            if generated.any():  # answers: as in training, a box only
                model_inputs["vis_is_answer"] = generated[:, -fed:]
            if fed < input_ids.shape[1]:  # continuing from a given cache: only the uncached tail is fed
                first = (input_ids[:, :-fed] == self.config.vis_token_id).sum(-1)  # (R,) slots already cached
                regions = {name: _slots_from(value, first) for name, value in regions.items()}
                for name in ("pixel_values", "image_sizes", "mm_encoder_outputs"):  # images: cached, masks: captured
                    model_inputs.pop(name, None)
            model_inputs.update(regions)
        else:  # only the newest token is fed: one slot per row, NaN unless that token is a `<vis>`
            model_inputs["vis_boxes"] = self._boxes_for_newest_token(state, input_ids, newest_vis)
        return model_inputs

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, **kwargs):
        model_kwargs = super()._update_model_kwargs_for_generation(outputs, model_kwargs, **kwargs)
        state = model_kwargs.get("perception_state")
        if state is not None and state.image_states is None and outputs.image_token_states is not None:
            self._capture_image_states(state, outputs.image_token_states)
        if state is not None:
            # (R, D) states and (R, V) logits that predict the next token; P(<vis>) only for the rows that decode one
            state.pending_outputs = outputs.last_hidden_state[:, -1], outputs.logits[:, -1]
            state.pending = {key: r for r, key in enumerate(state.row_keys(state.last_inputs)[0])}
        return model_kwargs

    def _capture_images(self, state, input_ids, mm_encoder_outputs):
        image = (mm_encoder_outputs or {}).get("image")
        if image is None:
            return
        state.mask_features = image.mask_features
        per_sample = input_ids[:: max(input_ids.shape[0] // state.batch_size, 1)]  # one row per sample
        state.sample_image = last_image_index_per_row(self.image_starts(per_sample))

    def _capture_image_states(self, state, image_token_states):
        """From the first forward (the whole prompt): each sample's last image's states, from its first row."""
        step = max(state.last_inputs.shape[0] // state.batch_size, 1)
        last = last_image_index_per_row(self.image_starts(state.last_inputs))[::step]  # (B,) forward's images, or -1
        has = last >= 0  # (B,)
        state.image_states = image_token_states[last.clamp(min=0)] * has[:, None, None].to(image_token_states)

    def _decode_new_vis(self, state, input_ids):
        """Decodes every row whose newest token is `<vis>`, from the state that predicted it (also after the last
        step, whose `<vis>` is never fed back), and streams it. Returns those rows' (row, record key)."""
        newest = state.newest_tokens(input_ids)  # (R,): one device-to-host copy per step, not one per row
        rows = (newest == self.config.vis_token_id).nonzero()[0].tolist()
        if not rows:
            return []
        keys, before = state.row_keys(input_ids)
        keyed = [(r, keys[r]) for r in rows]
        todo = {}  # rows with the same sample and generated suffix share one record
        for r, key in keyed:
            if key not in state.records:  # predicted by the prefix without the newest token
                todo[key] = (key, key[0], state.predicting(before[r]))
        if todo:
            self._decode_into_records(state, list(todo.values()))
        self._stream_objects(state, input_ids, rows)
        return keyed

    def _stream_objects(self, state, sequences, rows):
        """Hands the newest `<vis>` of each of `rows` (decoded) to the streamer, with its mask where it has an image."""
        if state.streamer is None or not rows:
            return
        samples = [state.sample_of(r, sequences.shape[0]) for r in rows]
        keys = state.row_keys(sequences)[0]
        records = [state.record(keys[r]) for r in rows]
        masks = [None] * len(rows)
        has_image, features = self._image_inputs(state, samples)
        if has_image is not None and has_image.any() and getattr(state.streamer, "stream_masks", True):
            decoded = self.mask_decoder(torch.stack([h for _, h, _ in records]), features)  # (N, S, S)
            masks = [decoded[i] if has_image[i] else None for i in range(len(rows))]
        for r, (box, _, score), mask in zip(rows, records, masks):
            index = int((sequences[r, state.prompt_length :] == self.config.vis_token_id).sum()) - 1
            obj = GroundedObject(row=r, index=index, position=sequences.shape[1] - 1, box=box, score=score, mask=mask)
            state.streamer.on_object(obj)

    def _decode_into_records(self, state, todo):
        hidden, scores = state.predicted([row for _, _, row in todo], self.config.vis_token_id)  # (N, D), (N,)
        samples = [sample for _, sample, _ in todo]
        has_image, features = self._image_inputs(state, samples)
        if self.box_decoder.reads_llm_image_states and state.image_states is None and has_image is not None:
            raise ValueError(
                "This box head reads the LLM's states at the image tokens, which a generate() continued from a cache "
                "does not recompute: pass `image_states=out.image_states` from the call that saw the image (with "
                "`return_dict_in_generate=True`), or generate again from the whole conversation without `cache`."
            )
        image_states = None  # as the query design reads them: keys and values, projected once per generate()
        if state.image_states is not None and self.box_decoder.reads_llm_image_states:
            if state.projected_states is None:
                state.projected_states = self.box_decoder.project_patches(state.image_states)  # (B, g*g, d) x 2
            image_states = tuple(state.per_sample(part, samples) for part in state.projected_states)  # (N, g*g, d)
        with heads_inference_mode():
            if self.box_decoder.needs_masks or has_image is None:
                no_masks = torch.zeros(len(todo), dtype=torch.bool, device=hidden.device)  # boxes are fed back
                boxes = self.decode_regions(hidden, features, has_image, no_masks, image_states)[0].boxes  # (N, 4)
            else:  # no mask work at all
                boxes = self.decode_boxes(hidden, features, has_image, image_states).boxes  # (N, 4)
        boxes = boxes.clone()  # a normal tensor: the records leave generate() (outputs, streamer)
        # views of these (N, ...) tensors, never of a forward's outputs; one unbind each, not one index op per row
        for (key, _, _), record in zip(todo, zip(boxes.unbind(), hidden.unbind(), scores.unbind())):
            state.records[key] = record

    def _image_inputs(self, state, samples):
        """(has_image (N,) bool, fused patches (N, g*g, C)) of each sample's image, or (None, None) without images."""
        if state.mask_features is None:
            return None, None
        if state.sample_inputs is None:  # each sample's, gathered once per generate()
            state.sample_inputs = (state.sample_image >= 0, state.mask_features[state.sample_image.clamp(min=0)])
        return tuple(state.per_sample(value, samples) for value in state.sample_inputs)

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
        ends = [[] for _ in range(rows)]  # each row's generated `<vis>` positions
        for r, t in state.generated_vis(input_ids, self.config.vis_token_id).nonzero().tolist():
            ends[r].append(t)
        for r in (r for r in range(rows) if ends[r]):  # keyed with one host copy per row, not one per `<vis>`
            for t, key in zip(ends[r], state.prefix_keys(state.sample_of(r, rows), input_ids[r], ends[r])):
                boxes[r, slot[r, t]] = state.record(key)[0]
        return boxes

    def _boxes_for_newest_token(self, state, input_ids, newest_vis):
        """(R, T) sequences, `_decode_new_vis`' (row, key) -> (R, 1, 4): the decoded box where the newest token is a
        `<vis>`, NaN elsewhere; None when no newest token is one (the plain family forward, no region injection)."""
        if not newest_vis:
            return None
        decoded = torch.stack([state.record(key)[0] for _, key in newest_vis])  # (N, 4) float32
        rows = [r for r, _ in newest_vis]
        if len(rows) == input_ids.shape[0]:  # every row feeds a `<vis>` (rows in order): no NaN row
            boxes = decoded[:, None]
        else:
            boxes = torch.full((input_ids.shape[0], 1, 4), float("nan"), device=input_ids.device)
            boxes[rows, 0] = decoded  # one write for all rows
        setattr(boxes, DECODED_BY_GENERATE, True)  # our own boxes: the forward need not validate them
        return boxes

    def _collect_generated_regions(self, sequences, state):
        rows = sequences.shape[0]
        fields = {"pred_boxes": [], "pred_masks": [], "vis_scores": [], "vis_positions": []}
        per_row = []
        for r in range(rows):
            sample = state.sample_of(r, rows)
            positions = (sequences[r] == self.config.vis_token_id).nonzero(as_tuple=True)[0]
            positions = positions[positions >= state.prompt_length]
            per_row.append([state.record(key) for key in state.prefix_keys(sample, sequences[r], positions.tolist())])
            fields["vis_positions"].append(positions)
            empty = sequences.new_zeros((0, 4), dtype=torch.float32)
            fields["pred_boxes"].append(torch.stack([b for b, _, _ in per_row[-1]]) if per_row[-1] else empty)
            scores = [s for _, _, s in per_row[-1]]
            fields["vis_scores"].append(torch.stack(scores) if scores else sequences.new_zeros(0, dtype=torch.float32))
        fields["pred_masks"] = self._decode_returned_masks(state, per_row)
        return fields

    def _decode_returned_masks(self, state, per_row):
        """Mask logits (n, S, S) per returned row, in one mask-decoder pass; None for rows without an image."""
        if state.mask_features is None:
            return [None] * len(per_row)
        image_idx = state.sample_image[[state.sample_of(r, len(per_row)) for r in range(len(per_row))]].tolist()
        rows = [r for r in range(len(per_row)) if image_idx[r] >= 0 and per_row[r]]
        hidden = [h for r in rows for _, h, _ in per_row[r]]
        masks = None
        if hidden:  # (N, D) states, each with the index of its image: the decoder adapts each image once
            index = torch.tensor([image_idx[r] for r in rows for _ in per_row[r]], device=state.mask_features.device)
            masks = self.mask_decoder.decode_in_chunks(torch.stack(hidden), state.mask_features, index)  # (N, S, S)
        side = self.config.mask_head_config.mask_size
        out, start = [], 0
        for r, records in enumerate(per_row):
            if image_idx[r] < 0:
                out.append(None)
            elif not records:
                out.append(state.mask_features.new_zeros((0, side, side), dtype=torch.float32))
            else:
                out.append(masks[start : start + len(records)])
                start += len(records)
        return out


__all__ = ["PerceptionGPTBeamGenerateOutput", "PerceptionGPTGenerateOutput", "PerceptionGPTGenerationMixin"]
