"""Turn a checkpoint of a supported VLM family into a PerceptionGPT, keeping every pretrained tensor bit-identical."""

import torch
from tokenizers import AddedToken
from torch import nn
from transformers import (
    AutoConfig,
    Idefics3ForConditionalGeneration,
    LlavaForConditionalGeneration,
    PreTrainedModel,
    Qwen2_5_VLForConditionalGeneration,
    SmolVLMForConditionalGeneration,
)

from .configuration_perceptiongpt import PerceptionGPTConfig
from .configuration_perceptiongpt_idefics3 import PerceptionGPTIdefics3Config, PerceptionGPTSmolVLMConfig
from .configuration_perceptiongpt_qwen2_5_vl import PerceptionGPTQwen2_5_VLConfig
from .heads_perceptiongpt import OPTIONAL_PERCEPTION_MODULES, PERCEPTION_MODULE_NAMES
from .modeling_perceptiongpt import PerceptionGPTForConditionalGeneration
from .modeling_perceptiongpt_idefics3 import (
    PerceptionGPTIdefics3ForConditionalGeneration,
    PerceptionGPTSmolVLMForConditionalGeneration,
)
from .modeling_perceptiongpt_qwen2_5_vl import PerceptionGPTQwen2_5_VLForConditionalGeneration


def add_vis_token(tokenizer, vis_token: str = "<vis>") -> int:
    """Adds `vis_token` to `tokenizer` (or a processor's `.tokenizer`) in place as a named special token; returns its id.

    The token strips the whitespace before it (`lstrip`), so " <vis>" is ONE token: a Llama/Metaspace tokenizer
    (LLaVA-1.5's) would otherwise emit a lone "▁" before every `<vis>`, and a byte-level one a "Ġ", doubling the
    generated tokens per object. Decoding then loses that space; the processor puts it back in its text output.
    """
    tok = getattr(tokenizer, "tokenizer", tokenizer)
    token = AddedToken(vis_token, special=True, normalized=False, lstrip=True)
    tok.add_special_tokens({"additional_special_tokens": [token]}, replace_extra_special_tokens=False)
    tok.vis_token = vis_token
    return tok.convert_tokens_to_ids(vis_token)


# model_type of a native family -> (native class, PerceptionGPT config class, PerceptionGPT model class)
FAMILIES = {
    "llava": (LlavaForConditionalGeneration, PerceptionGPTConfig, PerceptionGPTForConditionalGeneration),
    "qwen2_5_vl": (
        Qwen2_5_VLForConditionalGeneration,
        PerceptionGPTQwen2_5_VLConfig,
        PerceptionGPTQwen2_5_VLForConditionalGeneration,
    ),
    "idefics3": (
        Idefics3ForConditionalGeneration,
        PerceptionGPTIdefics3Config,
        PerceptionGPTIdefics3ForConditionalGeneration,
    ),
    "smolvlm": (
        SmolVLMForConditionalGeneration,
        PerceptionGPTSmolVLMConfig,
        PerceptionGPTSmolVLMForConditionalGeneration,
    ),
}
SUPPORTED_FAMILIES = tuple(FAMILIES)


def load_base_model(base_model_or_path, **kwargs):
    """A supported native model, loaded from a path / repo id when it is not a model already."""
    if isinstance(base_model_or_path, PreTrainedModel):
        model_type = base_model_or_path.config.model_type
    else:
        model_type = AutoConfig.from_pretrained(base_model_or_path, **kwargs).model_type
    if model_type not in SUPPORTED_FAMILIES:
        raise ValueError(
            f"`base_model_or_path` is a {model_type!r} model; PerceptionGPT supports the families "
            f"{list(SUPPORTED_FAMILIES)}."
        )
    native = FAMILIES[model_type][0]
    if isinstance(base_model_or_path, PreTrainedModel):
        if type(base_model_or_path) is not native:
            raise TypeError(
                f"`base_model_or_path` must be a `{native.__name__}` (the {model_type!r} family's model with its LM "
                f"head), got `{type(base_model_or_path).__name__}`."
            )
        return base_model_or_path
    return native.from_pretrained(base_model_or_path, **kwargs)


def convert_base_model(base_model, tokenizer=None, vis_token: str = "<vis>", **config_overrides):
    """A PerceptionGPT model of `base_model`'s family around its tensors, kept bit-identical.

    Args:
        base_model: a loaded native model of a supported family (`load_base_model`).
        tokenizer: optional tokenizer (or processor with `.tokenizer`). `vis_token` is added to it in place as a named
            special token, and its id becomes `vis_token_id`. Without one, `<vis>` takes the next free id.
        config_overrides: perception config fields (heads, loss weights, `fuse_llm_features` on LLaVA, ...).

    The new perception modules are freshly initialized. The `<vis>` rows of the embedding matrix (and of an untied
    lm_head) are the mean of the tokenizer's rows, also when `<vis>` fits in the padded vocabulary (Qwen: 151,665
    tokens, 151,936 rows); the matrix grows only when it must.
    """
    _, config_class, model_class = FAMILIES[base_model.config.model_type]
    vocab_size = base_model.get_input_embeddings().weight.shape[0]
    if tokenizer is not None:
        # rows past the tokenizer are padding (llava-1.5-hf: 32,002 tokens, 32,064 rows): not part of the mean
        known_rows = min(vocab_size, len(getattr(tokenizer, "tokenizer", tokenizer)))
        vis_token_id = add_vis_token(tokenizer, vis_token)
        new_vocab_size = max(vocab_size, len(getattr(tokenizer, "tokenizer", tokenizer)))
    else:
        known_rows, vis_token_id, new_vocab_size = vocab_size, vocab_size, vocab_size + 1
    config_dict = base_model.config.to_dict()
    for key in ("model_type", "architectures", "auto_map", "transformers_version"):
        config_dict.pop(key, None)
    config_dict["text_config"]["vocab_size"] = new_vocab_size
    config = config_class(**{**config_dict, "vis_token_id": vis_token_id, **config_overrides})
    config._attn_implementation = base_model.config._attn_implementation

    state = base_model.state_dict()
    # the input and (tied or not) output embedding matrices, whatever the family calls them
    storages = {
        base_model.get_input_embeddings().weight.data_ptr(),
        base_model.get_output_embeddings().weight.data_ptr(),
    }
    for key in [key for key, tensor in state.items() if tensor.data_ptr() in storages]:
        if key in state:
            old = state[key]
            mean = old[:known_rows].float().mean(0, keepdim=True).to(old.dtype)  # (1, D)
            rows = torch.cat([old, mean.expand(new_vocab_size - old.shape[0], -1)])  # new rows: the mean
            rows[vis_token_id] = mean[0]  # also when `<vis>` takes a padding row
            state[key] = rows
    model = _assign_into_new_model(model_class, config, state, base_model.device, base_model.dtype)
    model.generation_config = base_model.generation_config
    return model


def from_llava(llava_model_or_path, tokenizer=None, vis_token: str = "<vis>", **config_overrides):
    """`convert_base_model` for a `LlavaForConditionalGeneration` (or a path / repo id loadable as one)."""
    llava = llava_model_or_path
    if not isinstance(llava, LlavaForConditionalGeneration):
        llava = LlavaForConditionalGeneration.from_pretrained(llava_model_or_path)
    return convert_base_model(llava, tokenizer, vis_token, **config_overrides)


def _materialize_meta_tensors(module, device, dtype) -> None:
    """Gives `module`'s own meta parameters and buffers storage on `device` (floating ones in `dtype`), leaving its
    loaded tensors alone."""
    for store in (module._parameters, module._buffers):
        for name, tensor in store.items():
            if tensor is None or not tensor.is_meta:
                continue
            empty = torch.empty_like(tensor, device=device, dtype=dtype if tensor.is_floating_point() else None)
            store[name] = (
                nn.Parameter(empty, requires_grad=tensor.requires_grad) if store is module._parameters else empty
            )


def _assign_into_new_model(model_class, config, state, device, dtype):
    """A PerceptionGPT built on the meta device around `state`'s tensors (`assign=True`: no second full model in
    memory, no init of what is loaded); only what `state` lacks (the heads, non-persistent buffers) is materialized
    on `device` and initialized by `_init_weights`."""
    with torch.device("meta"):
        model = model_class(config)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    new_modules = (*PERCEPTION_MODULE_NAMES, *OPTIONAL_PERCEPTION_MODULES.values())
    wrong = [key for key in missing if key.split(".")[0] not in new_modules and ".llm_feature_fusion." not in key]
    if wrong or unexpected:
        raise ValueError(
            f"`base_model` does not match the {model_class.__name__} layout: missing {wrong[:5]}, "
            f"unexpected {unexpected[:5]}."
        )
    for module in model.modules():
        _materialize_meta_tensors(module, device, dtype)
        module.__dict__.pop("_is_hf_initialized", None)  # set by the meta-device init, which wrote nothing
    loaded = [model.get_parameter_or_buffer(name) for name in state]
    for tensor in loaded:  # transformers' init functions skip these: the pretrained tensors stay as they are
        tensor._is_hf_initialized = True
    model.initialize_weights()  # each sub-model's own `_init_weights` (CLIP's position ids, the heads, ...)
    for tensor in loaded:
        del tensor._is_hf_initialized
    model.tie_weights()
    return model


__all__ = ["FAMILIES", "SUPPORTED_FAMILIES", "add_vis_token", "convert_base_model", "from_llava", "load_base_model"]
