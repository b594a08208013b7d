"""Tensors cross the Python/Rust boundary without copies: same storage, same autograd graph,
in-place changes visible both ways, identity kept for live tensors."""

from __future__ import annotations

import gc
import weakref

import torch
import torch.nn.functional as F

import loratch


def test_parameters_are_live_and_identical_objects() -> None:
    layer = loratch.torch_lora_linear(6, 4, 2, 2.0)
    a1, b1 = loratch.torch_lora_trainable_params(layer)
    assert a1 is layer.lora_A and b1 is layer.lora_B
    assert a1.requires_grad and b1.requires_grad and a1.is_leaf


def test_in_place_changes_are_seen_both_ways() -> None:
    layer = loratch.torch_lora_linear(6, 4, 2, 2.0)
    x = torch.randn(3, 6)
    with torch.no_grad():
        layer.lora_B.fill_(0.5)  # Python writes, Rust reads
    # PEFT's formula (scaling 1, a power of two: bit for bit, see test_lora_linear).
    expected = F.linear(x, layer.weight, layer.bias) + F.linear(F.linear(x, layer.lora_A), layer.lora_B) * layer.scaling
    assert torch.equal(loratch.torch_lora_forward(layer, x), expected.detach())
    w = layer.weight
    w_before = w.clone()
    loratch.torch_lora_merge_weights(layer)  # Rust writes, Python's handle sees it
    assert not torch.equal(w, w_before)
    assert torch.allclose(w, w_before + layer.scaling * layer.lora_B @ layer.lora_A, atol=1e-6)


def test_input_is_not_copied_and_autograd_reaches_it() -> None:
    layer = loratch.torch_lora_linear(5, 3, 2, 2.0)
    x = torch.randn(2, 5, requires_grad=True)
    y = loratch.torch_lora_forward(layer, x)
    y.sum().backward()
    # d(sum y)/dx = sum over outputs of W (B = 0 so no adapter term)
    assert x.grad is not None
    assert torch.allclose(x.grad, layer.weight.sum(0).expand(2, 5), atol=1e-6)


def test_grads_accumulate_like_torch() -> None:
    layer = loratch.torch_lora_linear(5, 3, 2, 2.0)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(2, 5)
    loratch.torch_lora_forward(layer, x).sum().backward()
    g1 = layer.lora_A.grad.clone()  # type: ignore[union-attr]
    loratch.torch_lora_forward(layer, x).sum().backward()
    assert torch.allclose(layer.lora_A.grad, 2 * g1)  # type: ignore[arg-type]


def test_returned_tensor_outlives_the_layer() -> None:
    layer = loratch.torch_lora_linear(5, 3, 2, 2.0)
    a = layer.lora_A
    ref = a.clone()
    probe = weakref.ref(layer)
    del layer
    gc.collect()
    assert probe() is None
    assert torch.equal(a, ref)  # the tensor keeps its own reference to the storage


def test_many_round_trips_do_not_leak_python_objects() -> None:
    layer = loratch.torch_lora_linear(16, 16, 4, 4.0)
    x = torch.randn(4, 16)
    gc.collect()
    before = len([o for o in gc.get_objects() if isinstance(o, torch.Tensor)])
    for _ in range(200):
        loratch.torch_lora_forward(layer, x)
        loratch.torch_lora_trainable_params(layer)
    gc.collect()
    after = len([o for o in gc.get_objects() if isinstance(o, torch.Tensor)])
    assert after - before <= 2
