"""The guide's basic functions as the guide means them: `.pt` adapters that carry their config,
`torch_lora_forward_with_gradients`' retain_graph, `torch_lora_trainable_params` over a module,
`torch_mps_synchronize` (MPS where present, else CUDA)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import randomize_adapters

import loratch


def randomized(in_f: int = 8, out_f: int = 5, rank: int = 2, alpha: float = 4.0) -> loratch.LoraLinear:
    layer = loratch.torch_lora_linear(in_f, out_f, rank, alpha)
    with torch.no_grad():
        layer.lora_B.normal_(0.0, 1.0)
    return layer


def test_linear_pt_adapter_carries_its_config(tmp_path: Path) -> None:
    src = randomized()
    path = tmp_path / "adapters.pt"
    loratch.torch_lora_save_adapters(src, path)
    # A torch.save file (torch.load reads the tensors and ignores the config record).
    sd = torch.load(path, weights_only=True)
    assert list(sd) == ["lora_A.weight", "lora_B.weight"] and torch.equal(sd["lora_B.weight"], src.lora_B)
    fresh = loratch.torch_lora_linear(8, 5, 2, 4.0)
    with torch.no_grad():
        fresh.weight.copy_(src.weight)
        fresh.bias.copy_(src.bias)
    loratch.torch_lora_load_adapters(fresh, path)
    x = torch.randn(3, 8)
    assert torch.equal(loratch.torch_lora_forward(fresh, x), loratch.torch_lora_forward(src, x))
    with pytest.raises(loratch.AdapterFormatError, match="alpha is 4"):
        loratch.torch_lora_load_adapters(loratch.torch_lora_linear(8, 5, 2, 8.0), path)


def test_model_pt_adapter_loads_into_a_fresh_model(tiny_model: Any, tmp_path: Path) -> None:
    d = tiny_model("llama", 3)
    ids = torch.randint(0, 97, (1, 7))
    loratch.torch_hf_load_model_lora("pt-src", d)
    loratch.torch_hf_load_model_lora("pt-dst", d)
    try:
        loratch.torch_hf_lora_init("pt-src", 2, 4.0, ["q_proj", "down_proj"])
        randomize_adapters("pt-src")
        loratch.torch_hf_lora_save("pt-src", tmp_path / "a.pt")
        loratch.torch_hf_lora_load("pt-dst", tmp_path / "a.pt")  # no torch_hf_lora_init first
        with torch.no_grad():
            assert torch.equal(loratch.torch_hf_forward("pt-dst", ids), loratch.torch_hf_forward("pt-src", ids))
        # A bare torch.save dict (PEFT's adapter_model.bin alone) still needs the LoRA set up first.
        torch.save(torch.load(tmp_path / "a.pt", weights_only=True), tmp_path / "bare.pt")
        loratch.torch_hf_unload("pt-dst")
        loratch.torch_hf_load_model_lora("pt-dst", d)
        with pytest.raises(loratch.AdapterFormatError, match="no config"):
            loratch.torch_hf_lora_load("pt-dst", tmp_path / "bare.pt")
    finally:
        loratch.torch_hf_unload("pt-src")
        loratch.torch_hf_unload("pt-dst")


def test_forward_with_gradients_retain_graph() -> None:
    layer = randomized()
    x = torch.randn(4, 8)
    y = loratch.torch_lora_forward_with_gradients(layer, x, retain_graph=True)
    (y ** 2).sum().backward()
    first = layer.lora_A.grad.clone()
    y.sum().backward()  # a second loss on the same output: the graph is still there
    layer.lora_A.grad = None
    y.sum().backward()
    second = layer.lora_A.grad.clone()
    ref = loratch.torch_lora_forward(layer, x)
    layer.lora_A.grad = None
    ref.sum().backward()
    assert torch.equal(second, layer.lora_A.grad) and not torch.equal(first, second)
    y = loratch.torch_lora_forward_with_gradients(layer, x, retain_graph=False)
    y.sum().backward()
    with pytest.raises(loratch.StateError, match="retain_graph=True"):
        y.sum().backward()


def test_forward_with_gradients_matches_the_plain_forward() -> None:
    layer = randomized()
    x = torch.randn(2, 3, 8, requires_grad=True)
    y = loratch.torch_lora_forward_with_gradients(layer, x)
    assert torch.equal(y, loratch.torch_lora_forward(layer, x))
    (g,) = torch.autograd.grad(y.sum(), [x])
    x2 = x.detach().requires_grad_()
    (g2,) = torch.autograd.grad(loratch.torch_lora_forward(layer, x2).sum(), [x2])
    assert torch.equal(g, g2)


class Holder(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q = randomized()
        self.inner = torch.nn.Sequential(torch.nn.Linear(2, 2))
        self.layers = [randomized(), randomized()]


def test_trainable_params_of_a_module_a_list_and_a_model(tiny_model: Any) -> None:
    m = Holder()
    params = loratch.torch_lora_trainable_params(m)
    want = [t for layer in (m.q, *m.layers) for t in (layer.lora_A, layer.lora_B)]
    assert [p.data_ptr() for p in params] == [w.data_ptr() for w in want]
    assert len(loratch.torch_lora_trainable_params({"a": m.q, "b": [m.q, m.layers[0]]})) == 4
    loratch.torch_hf_load_model_lora("tp", tiny_model("llama", 0))
    try:
        loratch.torch_hf_lora_init("tp", 2, 4.0, ["q_proj"])
        named = loratch.torch_lora_trainable_params("tp")
        assert [p.data_ptr() for p in named] == [p.data_ptr() for p in loratch.torch_hf_lora_get_parameters("tp")]
    finally:
        loratch.torch_hf_unload("tp")
    with pytest.raises(TypeError, match="LoraLinear"):
        loratch.torch_lora_trainable_params(torch.nn.Linear(2, 2))


def test_mps_synchronize_prefers_mps(monkeypatch: pytest.MonkeyPatch) -> None:
    expected = torch.cuda.is_available() or torch.backends.mps.is_available()
    assert loratch.torch_mps_synchronize() is expected
    calls: list[str] = []
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(torch.mps, "synchronize", lambda: calls.append("mps"))
    assert loratch.torch_mps_synchronize() is True and calls == ["mps"]
