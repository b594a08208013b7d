"""``torch_lora_forward_with_gradients``: the LoRA forward recorded for autograd even inside
``torch.no_grad()``, with the guide's ``retain_graph``: the graph of the returned output survives
a backward through it when ``retain_graph`` is true (so several losses built on one output can
each be back-propagated), and is freed by the first one otherwise, as PyTorch does; a second
backward then raises ``StateError``."""

from __future__ import annotations

from typing import Any

import torch

from loratch._loratch import LoraLinear, torch_lora_forward
from loratch.errors import StateError

__all__ = ["torch_lora_forward_with_gradients"]


class _LoraForward(torch.autograd.Function):
    """The layer's own forward (its graph to A, B and x) behind one node that decides whether
    that graph outlives a backward."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, layer: LoraLinear, retain: bool
    ) -> torch.Tensor:
        with torch.enable_grad():
            inner_x = x.detach().requires_grad_(x.requires_grad)
            y = torch_lora_forward(layer, inner_x)
        ctx.graph = (y, (inner_x, a, b)) if y.requires_grad else None
        ctx.retain = retain
        ctx.used = False
        return y.detach()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        if ctx.graph is None:
            raise StateError(
                "torch_lora_forward_with_gradients: the graph of this output was freed by an "
                "earlier backward; pass retain_graph=True to back-propagate through it again"
                if ctx.used
                else "torch_lora_forward_with_gradients: this output has no graph"
            )
        y, inputs = ctx.graph
        ctx.used = True
        if not ctx.retain:
            ctx.graph = None
        wanted = [t for t in inputs if t.requires_grad]
        grads = iter(torch.autograd.grad(y, wanted, grad, retain_graph=ctx.retain, allow_unused=True))
        gx, ga, gb = (next(grads) if t.requires_grad else None for t in inputs)
        return gx, ga, gb, None, None


def torch_lora_forward_with_gradients(
    layer: LoraLinear, x: torch.Tensor, retain_graph: bool = False
) -> torch.Tensor:
    """The forward with autograd recording forced on (even inside ``torch.no_grad()``).

    ``retain_graph=True`` keeps the graph of the output through backward passes (backward twice
    works, as with ``loss.backward(retain_graph=True)``) and lets the output keep its own
    ``.grad`` (``Tensor.retain_grad()``). With ``retain_graph=False`` the first backward frees
    it and a second raises ``StateError``.

    Raises:
        TypeError: layer is not a LoraLinear, or x not a tensor.
        ShapeError, DTypeError, DeviceError: as ``torch_lora_forward``.
    """
    if not isinstance(layer, LoraLinear):
        raise TypeError(f"expected a LoraLinear, got {type(layer).__name__}")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    with torch.enable_grad():
        y: torch.Tensor = _LoraForward.apply(x, layer.lora_A, layer.lora_B, layer, retain_graph)  # type: ignore[no-untyped-call]
    if retain_graph and y.requires_grad:
        y.retain_grad()
    return y
