"""Loading defaults shared by every PerceptionGPT family: the attention implementation and safetensors only."""

import torch
from transformers.utils import is_flash_attn_2_available, is_flash_attn_4_available


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


class PerceptionGPTLoadingMixin:
    """Placed before a `PreTrainedModel` in the bases."""

    @classmethod
    def is_custom_code(cls) -> bool:
        """False, although the classes live outside transformers. transformers guards custom code that writes its
        init in place by skipping every module whose own tensors look initialized, which also skips modules without
        tensors of their own: CLIP initializes q/k/v in CLIPAttention, so a CLIP tower loaded with missing weights
        got the generic init. Our `_init_weights` uses `transformers.initialization`, which the per-tensor flags
        govern; our class names and model types match no native checkpoint mapping (Qwen's is registered)."""
        return False

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


__all__ = ["PerceptionGPTLoadingMixin", "preferred_attn_implementation"]
