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
    torch_hf_forward,
    torch_hf_list_models,
    torch_hf_load_model_lora,
    torch_hf_lora_enable,
    torch_hf_lora_get_parameters,
    torch_hf_lora_init,
    torch_hf_lora_load,
    torch_hf_lora_save,
    torch_hf_lora_merge,
    torch_hf_lora_named_parameters,
    torch_hf_lora_unmerge,
    torch_hf_memory_report,
    torch_hf_memory_usage,
    torch_hf_set_training,
    torch_hf_unload,
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
    CheckpointError,
    ConfigError,
    DeviceError,
    DTypeError,
    InputError,
    LoraError,
    ModelNotFoundError,
    NonFiniteError,
    ShapeError,
    StateError,
    TorchError,
)

__all__ = [
    "TORCH_VERSION",
    "AdapterFormatError",
    "CheckpointError",
    "InputError",
    "ModelNotFoundError",
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
    "torch_hf_forward",
    "torch_hf_list_models",
    "torch_hf_load_model_lora",
    "torch_hf_lora_enable",
    "torch_hf_lora_get_parameters",
    "torch_hf_lora_init",
    "torch_hf_lora_load",
    "torch_hf_lora_save",
    "torch_hf_lora_merge",
    "torch_hf_lora_named_parameters",
    "torch_hf_lora_unmerge",
    "torch_hf_memory_report",
    "torch_hf_memory_usage",
    "torch_hf_set_training",
    "torch_hf_unload",
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
