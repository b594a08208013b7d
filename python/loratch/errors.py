"""The exceptions loratch raises. Each also subclasses the matching built-in, so code that
catches ``ValueError`` or ``TypeError`` keeps working. Missing files raise ``FileNotFoundError``,
unreadable ones ``PermissionError``."""

from __future__ import annotations

__all__ = [
    "LoraWarning",
    "LoraError",
    "ShapeError",
    "DTypeError",
    "ConfigError",
    "DeviceError",
    "AdapterFormatError",
    "StateError",
    "InputError",
    "CheckpointError",
    "ModelNotFoundError",
    "NonFiniteError",
    "TorchError",
    "TokenizerError",
    "MergeCheckError",
]


class LoraWarning(UserWarning):
    """A likely mistake that does not stop loratch, e.g. ``target_modules`` that matched only
    some layers (``torch_hf_lora_init``). Filter it, or make it an error, with ``warnings``."""


class LoraError(Exception):
    """Base class of every loratch error."""


class ShapeError(LoraError, ValueError):
    """A tensor has the wrong shape (e.g. last input dim != in_features)."""


class DTypeError(LoraError, TypeError):
    """A tensor has the wrong dtype, or a dtype name is unknown."""


class ConfigError(LoraError, ValueError):
    """An invalid argument or configuration value (rank <= 0, alpha <= 0, ...)."""


class DeviceError(LoraError, RuntimeError):
    """A device string is malformed or names a device that is not available."""


class AdapterFormatError(LoraError, ValueError):
    """An adapter file is corrupt, truncated, or does not fit the layer or model."""


class StateError(LoraError, RuntimeError):
    """The operation is invalid in the current state (e.g. merging twice)."""


class NonFiniteError(LoraError, ValueError):
    """NaN or Inf where finite values are required (e.g. a merge delta)."""


class TorchError(LoraError, RuntimeError):
    """libtorch reported an error that loratch's own checks did not anticipate."""


class TokenizerError(LoraError, ValueError):
    """A tokenizer file is malformed, or a chat template failed to compile or render."""


class InputError(LoraError, ValueError):
    """An input value is out of range (e.g. a token id >= vocab size)."""


class CheckpointError(LoraError, ValueError):
    """A model checkpoint is missing pieces, corrupt, or inconsistent with its config."""


class ModelNotFoundError(LoraError, KeyError):
    """No model is loaded under the given name (the message lists the loaded ones)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class MergeCheckError(LoraError, ValueError):
    """A merge verification failed: the merged model's logits differ from base + adapter beyond
    float rounding, or equal the base's (the merge changes nothing). Nothing was written."""
