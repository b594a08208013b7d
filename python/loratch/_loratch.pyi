"""Type stub of the native module ``loratch._loratch`` (hand-written; checked by mypy.stubtest)."""

import os
from typing import final

import torch

__all__ = [
    "LoraLinear",
    "TORCH_VERSION",
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

__version__: str
TORCH_VERSION: str

@final
class LoraLinear:
    """A linear layer ``y = x W^T + b`` with a LoRA adapter ``scaling * B(A(dropout(x)))``."""

    @property
    def weight(self) -> torch.Tensor:
        """The frozen base weight ``[out_features, in_features]`` (live)."""
    @property
    def bias(self) -> torch.Tensor | None:
        """The frozen bias ``[out_features]`` (live), or None."""
    @property
    def lora_A(self) -> torch.Tensor:
        """LoRA A ``[rank, in_features]`` (live, requires grad)."""
    @property
    def lora_B(self) -> torch.Tensor:
        """LoRA B ``[out_features, rank]`` (live, requires grad)."""
    @property
    def rank(self) -> int: ...
    @property
    def alpha(self) -> float: ...
    @property
    def dropout(self) -> float: ...
    @property
    def use_rslora(self) -> bool: ...
    @property
    def scaling(self) -> float:
        """``alpha / rank``, or ``alpha / sqrt(rank)`` with rsLoRA."""
    @property
    def merged(self) -> bool: ...
    @property
    def training(self) -> bool: ...
    @property
    def in_features(self) -> int: ...
    @property
    def out_features(self) -> int: ...
    @property
    def dtype(self) -> str:
        """The dtype name, e.g. ``"float32"``."""
    @property
    def device(self) -> str:
        """The device name, e.g. ``"cpu"`` or ``"cuda:0"``."""
    def train(self) -> LoraLinear:
        """Training mode (dropout active). Returns the layer."""
    def eval(self) -> LoraLinear:
        """Evaluation mode (dropout off). Returns the layer."""

def torch_lora_linear(
    in_features: int,
    out_features: int,
    rank: int,
    alpha: float,
    *,
    bias: bool = True,
    dropout: float = 0.0,
    use_rslora: bool = False,
    dtype: str = "float32",
    device: str = "cpu",
) -> LoraLinear:
    """Create a LoRA linear layer. The base weight and bias are initialised like
    ``torch.nn.Linear`` and frozen; A is kaiming-uniform (a=sqrt(5)), B zeros.

    Raises:
        ConfigError: rank <= 0, alpha <= 0, dropout outside [0, 1), features <= 0.
        DTypeError: unknown dtype name.
        DeviceError: unknown or unavailable device.
    """

def torch_lora_apply_to_linear(
    linear: torch.nn.Linear,
    rank: int,
    alpha: float,
    *,
    dropout: float = 0.0,
    use_rslora: bool = False,
) -> LoraLinear:
    """Wrap a ``torch.nn.Linear``. Its weight and bias are **shared, not copied** (merging writes
    into them) and frozen (``requires_grad=False``). A and B take the weight's dtype and device."""

def torch_lora_forward(layer: LoraLinear, x: torch.Tensor) -> torch.Tensor:
    """``x W^T + b + scaling * B(A(dropout(x)))`` for ``x`` of shape ``[..., in_features]``.

    Raises:
        TypeError: x is not a tensor.
        ShapeError: the last dim of x is not in_features.
        DTypeError: x's dtype differs from the layer's.
        DeviceError: x is on another device.
    """

def torch_lora_forward_with_gradients(
    layer: LoraLinear, x: torch.Tensor, retain_graph: bool = False
) -> torch.Tensor:
    """The forward with autograd recording forced on (even inside ``torch.no_grad()``).
    With ``retain_graph=True`` the output also keeps its ``.grad`` after backward."""

def torch_lora_merge_weights(layer: LoraLinear) -> None:
    """``W += scaling * B @ A`` (float32 math); later forwards skip the adapter.

    Raises:
        StateError: already merged.
        NonFiniteError: the delta has NaN/Inf (W is left untouched).
    """

def torch_lora_unmerge_weights(layer: LoraLinear) -> None:
    """``W -= scaling * B @ A``. Raises StateError if not merged."""

def torch_lora_trainable_params(layer: LoraLinear) -> list[torch.Tensor]:
    """The live ``[lora_A, lora_B]`` (``requires_grad=True``), for any optimizer."""

def torch_lora_save_adapters(layer: LoraLinear, path: str | os.PathLike[str]) -> None:
    """Save A, B and metadata (rank, alpha, features, use_rslora) as safetensors, atomically."""

def torch_lora_load_adapters(layer: LoraLinear, path: str | os.PathLike[str]) -> None:
    """Load adapters saved by ``torch_lora_save_adapters`` into the layer, in place.

    Raises:
        FileNotFoundError: no such file.
        AdapterFormatError: corrupt/truncated file, or rank/alpha/shape mismatch.
        StateError: the layer is merged.
    """
