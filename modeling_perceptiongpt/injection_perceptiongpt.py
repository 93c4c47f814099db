"""Region injection at the decoder's input, and the family forward's advertised signature.

`PerceptionGPTMixin.forward` sets the call's regions in a context variable; a forward pre-hook on the family's
decoder (`get_decoder()`) writes them into its `inputs_embeds`, after the family has scattered its image features.
So `input_ids` reach the base model unchanged (placeholders, M-RoPE positions), and no hook closes over the model
(deepcopy and PEFT wrapping keep working).
"""

import contextvars
import functools
import inspect

from transformers.utils import is_torchdynamo_compiling


# The regions of the forward in progress: set and reset by `PerceptionGPTMixin.forward`.
REGIONS_IN_FLIGHT = contextvars.ContextVar("perceptiongpt_regions", default=None)


def inject_regions(decoder, args, kwargs):
    """Forward pre-hook of the decoder: writes the call's region embeddings into `inputs_embeds` (B, T, D)."""
    if is_torchdynamo_compiling():  # a traced step embeds its boxes before the base model (`forward`)
        return None
    inject = REGIONS_IN_FLIGHT.get()
    if inject is None:
        return None
    embeds = kwargs.get("inputs_embeds")
    if embeds is None or tuple(embeds.shape[:2]) != tuple(inject.input_ids.shape):
        got = None if embeds is None else tuple(embeds.shape[:2])
        raise ValueError(
            f"The decoder got `inputs_embeds` of (B, T) {got}, not the (B, T) {tuple(inject.input_ids.shape)} of "
            "`input_ids`: this family calls its decoder in a way the `<vis>` region injection does not support."
        )
    kwargs["inputs_embeds"] = inject(embeds)
    return args, kwargs


class RegionInjection:
    """The regions of one forward, applied by the model's `embed_regions` to the decoder's `inputs_embeds`."""

    def __init__(self, model, input_ids, vis_boxes, vis_masks, vis_mask_valid, vis_is_target, image_features=None):
        self.model, self.input_ids = model, input_ids
        self.regions = (vis_boxes, vis_masks, vis_mask_valid, vis_is_target, image_features)

    def __call__(self, inputs_embeds):
        return self.model.embed_regions(self.input_ids, inputs_embeds, *self.regions)


def forward_with_native_signature(native_cls, perception_forward):
    """`perception_forward` (`PerceptionGPTMixin.forward`) advertising the native forward's parameters as well as its
    own: generate() and the Trainer inspect the signature (which inputs to build, validate and keep). Only
    `input_ids` is positional."""
    ours = inspect.signature(perception_forward).parameters
    native = inspect.signature(native_cls.forward).parameters
    keyword = inspect.Parameter.KEYWORD_ONLY
    names = [name for name in native if name not in ("self", "input_ids", "kwargs")]
    names += [name for name in ours if name not in names and name not in ("self", "input_ids", "kwargs")]
    parameters = [ours["self"], ours["input_ids"]]
    parameters += [(native.get(name) or ours[name]).replace(kind=keyword) for name in names]
    parameters.append(native.get("kwargs", ours["kwargs"]))  # its annotation (`Unpack[TransformersKwargs]`) too

    @functools.wraps(perception_forward)
    def forward(self, input_ids=None, **kwargs):
        return perception_forward(self, input_ids, **kwargs)

    forward.__signature__ = inspect.Signature(parameters)
    return forward


__all__ = ["REGIONS_IN_FLIGHT", "RegionInjection", "forward_with_native_signature", "inject_regions"]
