"""loratch: LoRA fine-tuning of language models with a Rust core on libtorch.

The API is function-style, after the LoRA guide it re-creates: ``torch_lora_linear``,
``torch_lora_forward``, ... Tensors in and out are ordinary ``torch.Tensor`` objects that share
storage and autograd with the Rust side (no copies).
"""

from __future__ import annotations

# torch must be imported before the native module: the extension uses the libtorch that this
# torch package loaded (one libtorch per process).
import torch as _torch  # noqa: F401

from loratch._loratch import (
    TORCH_VERSION,
    LoraLinear,
    __version__,
    torch_lora_apply_to_linear,
    torch_lora_forward,
    torch_lora_forward_with_gradients,
    torch_lora_linear,
    torch_lora_load_adapters,
    torch_lora_merge_weights,
    torch_lora_save_adapters,
    torch_lora_trainable_params,
    torch_lora_unmerge_weights,
)
from loratch.errors import (
    AdapterFormatError,
    ConfigError,
    DeviceError,
    DTypeError,
    LoraError,
    NonFiniteError,
    ShapeError,
    StateError,
    TorchError,
)

__all__ = [
    "TORCH_VERSION",
    "AdapterFormatError",
    "ConfigError",
    "DTypeError",
    "DeviceError",
    "LoraError",
    "LoraLinear",
    "NonFiniteError",
    "ShapeError",
    "StateError",
    "TorchError",
    "__version__",
    "torch_lora_apply_to_linear",
    "torch_lora_forward",
    "torch_lora_forward_with_gradients",
    "torch_lora_linear",
    "torch_lora_load_adapters",
    "torch_lora_merge_weights",
    "torch_lora_save_adapters",
    "torch_lora_trainable_params",
    "torch_lora_unmerge_weights",
]
