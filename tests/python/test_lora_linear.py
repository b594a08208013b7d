"""The basic LoRA layer against the formula computed with plain torch ops (hypothesis)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import loratch

FP32_TOL = 1e-5  # relative to the output scale; fp32 matmuls in a different order


def reference(layer: loratch.LoraLinear, x: torch.Tensor) -> torch.Tensor:
    """PEFT's formula with plain torch ops: x W^T + b + scaling * (x A^T) B^T."""
    w, b, a, bb = layer.weight, layer.bias, layer.lora_A, layer.lora_B
    y = x @ w.T + (b if b is not None else 0.0)
    return y + layer.scaling * ((x @ a.T) @ bb.T)


def randomize_b(layer: loratch.LoraLinear, std: float = 0.2) -> None:
    with torch.no_grad():
        layer.lora_B.normal_(0.0, std)


def close(a: torch.Tensor, b: torch.Tensor, tol: float = FP32_TOL) -> bool:
    scale = max(1.0, b.abs().max().item()) if b.numel() else 1.0
    return (a - b).abs().max().item() <= tol * scale if a.numel() else a.shape == b.shape


shapes = st.fixed_dictionaries(
    {
        "in_f": st.integers(1, 48),
        "out_f": st.integers(1, 48),
        "rank": st.integers(1, 16),
        "alpha": st.floats(0.25, 64.0),
        "batch": st.lists(st.integers(0, 4), min_size=0, max_size=3),
        "rslora": st.booleans(),
        "bias": st.booleans(),
        "seed": st.integers(0, 2**31 - 1),
    }
)


@given(shapes)
def test_forward_equals_formula(p: dict) -> None:
    torch.manual_seed(p["seed"])
    layer = loratch.torch_lora_linear(
        p["in_f"], p["out_f"], p["rank"], p["alpha"], bias=p["bias"], use_rslora=p["rslora"]
    )
    randomize_b(layer)
    x = torch.randn(*p["batch"], p["in_f"])
    y = loratch.torch_lora_forward(layer, x)
    assert y.shape == (*p["batch"], p["out_f"])
    assert close(y, reference(layer, x))
    expected_scaling = p["alpha"] / (math.sqrt(p["rank"]) if p["rslora"] else p["rank"])
    assert layer.scaling == pytest.approx(expected_scaling, rel=1e-12)


@given(shapes)
def test_gradients_equal_autograd_on_reference(p: dict) -> None:
    torch.manual_seed(p["seed"])
    layer = loratch.torch_lora_linear(p["in_f"], p["out_f"], p["rank"], p["alpha"], bias=p["bias"])
    randomize_b(layer)
    x = torch.randn(*p["batch"], p["in_f"])
    target = torch.randn(*p["batch"], p["out_f"])
    a, b = loratch.torch_lora_trainable_params(layer)

    ((loratch.torch_lora_forward(layer, x) - target) ** 2).sum().backward()
    got_a, got_b = a.grad.clone(), b.grad.clone()  # type: ignore[union-attr]

    a2 = a.detach().clone().requires_grad_(True)
    b2 = b.detach().clone().requires_grad_(True)
    w, bias = layer.weight, layer.bias
    y = x @ w.T + (bias if bias is not None else 0.0) + layer.scaling * ((x @ a2.T) @ b2.T)
    ((y - target) ** 2).sum().backward()
    assert close(got_a, a2.grad, 1e-4)  # type: ignore[arg-type]
    assert close(got_b, b2.grad, 1e-4)  # type: ignore[arg-type]
    assert layer.weight.grad is None, "the base weight is frozen"


@given(shapes, st.sampled_from([0.0, 0.25]))
def test_input_gradient_and_dropout_equal_autograd_on_reference(p: dict, dropout: float) -> None:
    """The layer is one fused autograd node: the gradient reaching x (through the frozen base
    and the adapter, dropout included) must equal autograd's on the formula with the same mask.
    Its output is an ordinary tensor that later in-place ops may modify."""
    torch.manual_seed(p["seed"])
    layer = loratch.torch_lora_linear(
        p["in_f"], p["out_f"], p["rank"], p["alpha"], bias=p["bias"], dropout=dropout
    )
    randomize_b(layer)
    x0 = torch.randn(*p["batch"], p["in_f"])
    g = torch.randn(*p["batch"], p["out_f"])
    a, b = loratch.torch_lora_trainable_params(layer)

    x = x0.clone().requires_grad_(True)
    torch.manual_seed(p["seed"] + 1)
    y = loratch.torch_lora_forward(layer, x)
    y.mul_(2.0)
    (y * g).sum().backward()

    x2 = x0.clone().requires_grad_(True)
    a2 = a.detach().clone().requires_grad_(True)
    b2 = b.detach().clone().requires_grad_(True)
    torch.manual_seed(p["seed"] + 1)
    xd = torch.nn.functional.dropout(x2, dropout, training=True) if dropout else x2
    bias = layer.bias if layer.bias is not None else 0.0
    y2 = x2 @ layer.weight.T + bias + layer.scaling * ((xd @ a2.T) @ b2.T)
    (2.0 * y2 * g).sum().backward()
    assert close(y, 2.0 * y2.detach())
    for got, want in [(x.grad, x2.grad), (a.grad, a2.grad), (b.grad, b2.grad)]:
        assert got is not None and want is not None
        assert close(got, want, 1e-4)


@given(shapes)
def test_merge_same_output_and_unmerge_restores(p: dict) -> None:
    torch.manual_seed(p["seed"])
    layer = loratch.torch_lora_linear(p["in_f"], p["out_f"], p["rank"], p["alpha"])
    randomize_b(layer, 0.05)
    x = torch.randn(*p["batch"], p["in_f"])
    w0 = layer.weight.clone()
    with torch.no_grad():
        y0 = loratch.torch_lora_forward(layer, x)
        loratch.torch_lora_merge_weights(layer)
        assert layer.merged
        y1 = loratch.torch_lora_forward(layer, x)
        assert close(y1, y0, 1e-5)
        # The merged weight is W + scaling * B @ A (computed here in float64).
        delta = layer.scaling * (layer.lora_B.double() @ layer.lora_A.double())
        assert close(layer.weight.double(), w0.double() + delta, 1e-6)
        loratch.torch_lora_unmerge_weights(layer)
    assert not layer.merged
    rel = (layer.weight - w0).abs().max().item() / max(w0.abs().max().item(), 1e-12)
    assert rel <= 1e-6


@given(shapes)
def test_save_load_roundtrip_exact(tmp_path_factory: pytest.TempPathFactory, p: dict) -> None:
    torch.manual_seed(p["seed"])
    src = loratch.torch_lora_linear(p["in_f"], p["out_f"], p["rank"], p["alpha"], use_rslora=p["rslora"])
    randomize_b(src)
    path = tmp_path_factory.mktemp("ad") / "a.safetensors"
    loratch.torch_lora_save_adapters(src, path)
    dst = loratch.torch_lora_linear(p["in_f"], p["out_f"], p["rank"], p["alpha"], use_rslora=p["rslora"])
    live_a, live_b = loratch.torch_lora_trainable_params(dst)
    loratch.torch_lora_load_adapters(dst, str(path))
    assert torch.equal(live_a, src.lora_A) and torch.equal(live_b, src.lora_B)


def test_fresh_adapter_changes_nothing_and_init_is_kaiming() -> None:
    torch.manual_seed(0)
    layer = loratch.torch_lora_linear(256, 64, 128, 16.0)
    x = torch.randn(5, 256)
    y = loratch.torch_lora_forward(layer, x)
    assert torch.equal(y, torch.nn.functional.linear(x, layer.weight, layer.bias))
    bound = 1 / math.sqrt(256)
    a = layer.lora_A
    assert a.abs().max().item() <= bound
    # U(-bound, bound) has std bound/sqrt(3); 32768 samples pin it within ~1%.
    assert a.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.03)
    assert torch.count_nonzero(layer.lora_B).item() == 0


def test_dropout_only_in_training_mode() -> None:
    torch.manual_seed(0)
    layer = loratch.torch_lora_linear(32, 16, 4, 8.0, dropout=0.5)
    randomize_b(layer)
    x = torch.randn(64, 32)
    assert layer.training
    y_train_1 = loratch.torch_lora_forward(layer, x)
    y_train_2 = loratch.torch_lora_forward(layer, x)
    assert not torch.equal(y_train_1, y_train_2), "dropout masks differ between calls"
    layer.eval()
    assert not layer.training
    assert close(loratch.torch_lora_forward(layer, x), reference(layer, x))
    assert layer.train() is layer and layer.training


def test_torch_optim_reduces_loss_on_toy_regression() -> None:
    torch.manual_seed(1)
    layer = loratch.torch_lora_linear(16, 8, 2, 4.0)
    hidden = (torch.randn(8, 2) @ torch.randn(2, 16)) * 0.3
    x = torch.randn(256, 16)
    with torch.no_grad():
        y = x @ (layer.weight + hidden).T + layer.bias
    opt = torch.optim.AdamW(loratch.torch_lora_trainable_params(layer), lr=2e-2, weight_decay=0.0)
    losses = []
    for _ in range(150):
        loss = torch.nn.functional.mse_loss(loratch.torch_lora_forward(layer, x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.05 * losses[0]


def test_apply_to_linear_shares_weight_and_freezes_it() -> None:
    torch.manual_seed(2)
    lin = torch.nn.Linear(12, 6)
    layer = loratch.torch_lora_apply_to_linear(lin, 3, 6.0)
    assert layer.weight.data_ptr() == lin.weight.data_ptr()
    assert layer.bias is not None and layer.bias.data_ptr() == lin.bias.data_ptr()
    assert not lin.weight.requires_grad and not lin.bias.requires_grad
    x = torch.randn(4, 12)
    assert torch.equal(loratch.torch_lora_forward(layer, x), lin(x))
    randomize_b(layer)
    with torch.no_grad():
        loratch.torch_lora_merge_weights(layer)
        # Merging wrote into the nn.Linear's own weight.
        assert close(lin(x), reference_unmerged(layer, x, lin))


def reference_unmerged(layer: loratch.LoraLinear, x: torch.Tensor, lin: torch.nn.Linear) -> torch.Tensor:
    delta = layer.scaling * (layer.lora_B @ layer.lora_A)
    return x @ (lin.weight - delta).T + lin.bias + layer.scaling * ((x @ layer.lora_A.T) @ layer.lora_B.T)


def test_apply_to_linear_without_bias_and_half_precision() -> None:
    lin = torch.nn.Linear(8, 4, bias=False).to(torch.bfloat16)
    layer = loratch.torch_lora_apply_to_linear(lin, 2, 4.0)
    assert layer.bias is None and layer.dtype == "bfloat16"
    assert layer.lora_A.dtype == torch.bfloat16
    y = loratch.torch_lora_forward(layer, torch.randn(3, 8, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and y.shape == (3, 4)


def test_forward_with_gradients_inside_no_grad() -> None:
    layer = loratch.torch_lora_linear(6, 3, 2, 2.0)
    x = torch.randn(2, 6)
    with torch.no_grad():
        assert not loratch.torch_lora_forward(layer, x).requires_grad
        y = loratch.torch_lora_forward_with_gradients(layer, x, retain_graph=True)
    assert y.requires_grad
    y.sum().backward()
    assert layer.lora_B.grad is not None and y.grad is not None
    assert torch.equal(y.grad, torch.ones_like(y))


def test_repr_and_properties() -> None:
    layer = loratch.torch_lora_linear(10, 7, 2, 5.0, bias=False, use_rslora=True)
    text = repr(layer)
    for part in ("in_features=10", "out_features=7", "rank=2", "alpha=5", "use_rslora=True", "bias=False"):
        assert part in text, text
    assert (layer.in_features, layer.out_features, layer.rank, layer.alpha) == (10, 7, 2, 5.0)
    assert layer.scaling == pytest.approx(5.0 / math.sqrt(2))
    assert layer.weight.shape == (7, 10) and layer.lora_A.shape == (2, 10) and layer.lora_B.shape == (7, 2)
    assert layer.device == "cpu" and layer.dtype == "float32" and not layer.merged


SAVE_UNDER_FSIZE_LIMIT = """
import resource, signal, sys, torch, loratch
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
layer = loratch.torch_lora_linear(256, 256, 32, 8.0)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
try:
    loratch.torch_lora_save_adapters(layer, sys.argv[1])
except OSError as e:
    print("OSError", e)
    sys.exit(3)
"""


def test_failed_save_keeps_the_previous_file(tmp_path: Path) -> None:
    """A save that dies mid-write (file size limit: like a full disk) raises OSError and leaves
    the previous adapter file byte-for-byte intact, with no temp files left behind."""
    import subprocess
    import sys

    layer = loratch.torch_lora_linear(4, 4, 2, 2.0)
    path = tmp_path / "a.safetensors"
    loratch.torch_lora_save_adapters(layer, path)
    before = path.read_bytes()
    proc = subprocess.run(
        [sys.executable, "-c", SAVE_UNDER_FSIZE_LIMIT, str(path)], capture_output=True, text=True
    )
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "OSError" in proc.stdout and str(path) in proc.stdout
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]
