"""Memory monitoring helpers of the spec's "Memory Management" section."""

from __future__ import annotations

import gc

import torch

__all__ = ["tensor_in_memory"]


def tensor_in_memory() -> int:
    """The number of live ``torch.Tensor`` objects (parameters included) that Python's garbage
    collector can see, after a collection. Tensors held only inside Rust (a loaded model's base
    weights) are not Python objects and are not counted: use ``torch_hf_memory_usage`` for
    those bytes."""
    gc.collect()
    # type(o), not isinstance: isinstance reads `o.__class__`, which on some torch objects (the
    # deprecated `torch.distributed.reduce_op`) emits a FutureWarning.
    return sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor))
