"""The basic LoRA layer against PEFT's formula computed with plain torch ops (hypothesis): the
forward bit for bit where the scaling is a power of two (see ``assert_peft_forward``; elsewhere
bit for bit with loratch's own order of operations and to float32 rounding with PEFT's),
gradients and merges to float32 rounding."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_within_sum_rounding, max_diff, run_py
from hypothesis import given
from hypothesis import strategies as st

import loratch


def formula(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, a: torch.Tensor, bb: torch.Tensor,
            scaling: float, xd: torch.Tensor | None = None) -> torch.Tensor:
    """PEFT's LoRA Linear forward, op for op: base_layer(x) + lora_B(lora_A(dropout(x))) * scaling
    (``xd``: dropout(x), default x)."""
    return F.linear(x, w, b) + F.linear(F.linear(x if xd is None else xd, a), bb) * scaling


def loratch_order(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, a: torch.Tensor, bb: torch.Tensor,
                  scaling: float, xd: torch.Tensor | None = None) -> torch.Tensor:
    """The same formula in the order of loratch's node (csrc/lora_linear.cpp): the rank-r
    activation is scaled before B, (scaling * x_d A^T) B^T, then added to x W^T + b."""
    return F.linear(x, w, b) + F.linear(F.linear(x if xd is None else xd, a) * scaling, bb)


def power_of_two(v: float) -> bool:
    return v > 0 and math.frexp(v)[0] == 0.5


def assert_peft_forward(y: torch.Tensor, layer: loratch.LoraLinear, x: torch.Tensor,
                        xd: torch.Tensor | None = None) -> None:
    """The README's claim: the forward equals PEFT's formula bit for bit (row-major inputs). That
    holds where multiplying by the scaling is exact, a power of two (every model-level test's
    alpha/rank): loratch scales the rank-r activation before B, PEFT scales the product after
    it, and other scalings round differently there. For those, the forward is loratch's order
    bit for bit and PEFT's to float32 rounding."""
    args = (x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.scaling, xd)
    with torch.no_grad():
        peft = formula(*args)
        if power_of_two(layer.scaling):
            assert_equal(y.detach(), peft, "PEFT's formula")
        else:
            assert_equal(y.detach(), loratch_order(*args), "loratch's order")
            assert_within_sum_rounding(y.detach(), peft, magnitude(layer, x, xd), roundings(layer), "PEFT's formula")


def magnitude(layer: loratch.LoraLinear, x: torch.Tensor, xd: torch.Tensor | None = None) -> torch.Tensor:
    """The formula on the operands' absolute values, in float64: each output's sum of |terms|."""
    b = layer.bias.detach().double().abs() if layer.bias is not None else None
    parts = (x, layer.weight, layer.lora_A, layer.lora_B)
    xa, w, a, bb = (t.detach().double().abs() for t in parts)
    xda = xd.detach().double().abs() if xd is not None else None
    return formula(xa, w, b, a, bb, abs(layer.scaling), xda)


def roundings(layer: loratch.LoraLinear, rows: int = 0) -> int:
    """The most roundings on one term's path in the layer's sums, forward or backward: the
    longest sum (in, out or rank features, or rows for a weight gradient) plus a few scalings
    and additions."""
    return layer.in_features + layer.out_features + layer.rank + rows + 6


def assert_equal(got: torch.Tensor, want: torch.Tensor, what: str = "") -> None:
    assert got.shape == want.shape, (what, got.shape, want.shape)
    assert torch.equal(got, want), f"{what}: max |diff| {max_diff(got, want):.3e}"


def randomize_b(layer: loratch.LoraLinear, std: float = 0.2) -> None:
    with torch.no_grad():
        layer.lora_B.normal_(0.0, std)


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
    assert_peft_forward(y, layer, x)
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

    y_ours = loratch.torch_lora_forward(layer, x).detach()

    def grads(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor,
              g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a2 = a.detach().clone().requires_grad_(True)
        b2 = b.detach().clone().requires_grad_(True)
        (formula(x, w, bias, a2, b2, layer.scaling) * g).sum().backward()
        return a2.grad, b2.grad  # type: ignore[return-value]

    # The loss's gradient with respect to the output, 2 (y - target), as each side computed it:
    # the same forward (bit for bit), so the same vector.
    g = 2 * (y_ours - target)
    want_a, want_b = grads(x, layer.weight.detach(), layer.bias, a, b, g)
    bias = layer.bias.detach().double().abs() if layer.bias is not None else None
    mag_a, mag_b = grads(*(t.detach().double().abs() for t in (x, layer.weight)), bias,
                         *(t.detach().double().abs() for t in (a, b, g)))
    rows = math.prod(p["batch"])
    assert_within_sum_rounding(got_a, want_a, mag_a, roundings(layer, rows), "A.grad")
    assert_within_sum_rounding(got_b, want_b, mag_b, roundings(layer, rows), "B.grad")
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

    def peft(x0: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor,
             g: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        """Autograd's gradients of PEFT's forward (dropout as the same mask) times 2."""
        x2, a2, b2 = (t.detach().clone().requires_grad_(True) for t in (x0, a, b))
        y2 = formula(x2, w, bias, a2, b2, layer.scaling, x2 * mask if mask is not None else None) * 2.0
        (y2 * g).sum().backward()
        return x2.grad, a2.grad, b2.grad  # type: ignore[return-value]

    # The mask torch's dropout draws from the same seed (its scaling 1/(1-p) included).
    torch.manual_seed(p["seed"] + 1)
    mask = F.dropout(torch.ones_like(x0), dropout, training=True) if dropout else None
    bias = layer.bias.detach() if layer.bias is not None else None
    assert_peft_forward(y.detach() / 2.0, layer, x0, x0 * mask if mask is not None else None)
    want = peft(x0, layer.weight.detach(), bias, a, b, g, mask)
    absd = [t.detach().double().abs() if t is not None else None for t in (x0, layer.weight, bias, a, b, g, mask)]
    mags = peft(*absd)  # type: ignore[arg-type]
    rows = math.prod(p["batch"])
    for name, got, w, m in zip(["x.grad", "A.grad", "B.grad"], [x.grad, a.grad, b.grad], want, mags):
        assert got is not None and w is not None
        assert_within_sum_rounding(got, w, m, roundings(layer, rows), name)


@given(shapes)
def test_merge_same_output_and_unmerge_restores(p: dict) -> None:
    torch.manual_seed(p["seed"])
    layer = loratch.torch_lora_linear(p["in_f"], p["out_f"], p["rank"], p["alpha"])
    randomize_b(layer, 0.05)
    x = torch.randn(*p["batch"], p["in_f"])
    w0 = layer.weight.clone()
    with torch.no_grad():
        y0 = loratch.torch_lora_forward(layer, x)
        mag = magnitude(layer, x)
        loratch.torch_lora_merge_weights(layer)
        assert layer.merged
        y1 = loratch.torch_lora_forward(layer, x)
        # The merged weight is W + scaling * B @ A (here in float64): rank products, a scaling and
        # an addition per weight, and then the weight's rounding to float32.
        a64, b64 = layer.lora_A.double(), layer.lora_B.double()
        delta = layer.scaling * (b64 @ a64)
        w_mag = w0.double().abs() + abs(layer.scaling) * (b64.abs() @ a64.abs())
        assert_within_sum_rounding(layer.weight, w0.double() + delta, w_mag / 2, layer.rank + 3, "merged W")
        # The merged forward is x (W + delta)^T + b: the same terms as the unmerged one, summed
        # in another order, plus the merged weights' rounding (carried by the bound's extra steps).
        assert_within_sum_rounding(y1, y0, mag, roundings(layer) + layer.rank, "merged forward")
        loratch.torch_lora_unmerge_weights(layer)
    assert not layer.merged
    # Unmerged: W + delta - delta, rounded twice per weight on the way.
    assert_within_sum_rounding(layer.weight, w0, w_mag, layer.rank + 3, "unmerged W")


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
    assert_peft_forward(loratch.torch_lora_forward(layer, x), layer, x)
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
    w0 = lin.weight.detach().clone()
    with torch.no_grad():
        loratch.torch_lora_merge_weights(layer)
        # Merging wrote into the nn.Linear's own weight: W + scaling * B @ A, to rounding.
        a64, b64 = layer.lora_A.double(), layer.lora_B.double()
        w_mag = w0.double().abs() + abs(layer.scaling) * (b64.abs() @ a64.abs())
        assert_within_sum_rounding(lin.weight, w0.double() + layer.scaling * (b64 @ a64), w_mag / 2, layer.rank + 3)


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
    layer = loratch.torch_lora_linear(4, 4, 2, 2.0)
    path = tmp_path / "a.safetensors"
    loratch.torch_lora_save_adapters(layer, path)
    before = path.read_bytes()
    proc = run_py(SAVE_UNDER_FSIZE_LIMIT, path)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "OSError" in proc.stdout and str(path) in proc.stdout
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]
