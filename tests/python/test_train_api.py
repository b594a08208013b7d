"""Optimizer and scheduler API: AdamW equals torch.optim.AdamW step for step, fp32 masters for
half-precision parameters, clipping as clip_grad_norm_, schedule properties (hypothesis)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import loratch


def make_params(seed: int, shapes: list[tuple[int, ...]], dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g).to(dtype).requires_grad_(True) for s in shapes]


@given(
    lr=st.floats(1e-4, 1e-1),
    wd=st.floats(0.0, 0.3),
    b1=st.floats(0.5, 0.99),
    b2=st.floats(0.9, 0.9999),
    seed=st.integers(0, 10_000),
)
def test_adamw_equals_torch_step_for_step(lr: float, wd: float, b1: float, b2: float, seed: int) -> None:
    shapes = [(4, 3), (5,), (2, 2, 2)]
    ours = make_params(seed, shapes)
    ref = [p.detach().clone().requires_grad_(True) for p in ours]
    opt = loratch.torch_optimizer_add_params(ours, lr, wd, betas=(b1, b2), eps=1e-8)
    ref_opt = torch.optim.AdamW(ref, lr=lr, weight_decay=wd, betas=(b1, b2), eps=1e-8)
    g = torch.Generator().manual_seed(seed + 1)
    for _ in range(5):
        grads = [torch.randn(p.shape, generator=g) for p in ours]
        loratch.torch_optimizer_zero_grad(opt)
        ref_opt.zero_grad()
        assert all(p.grad is None for p in ours)
        for p, q, gr in zip(ours, ref, grads):
            (p * gr).sum().backward()
            (q * gr).sum().backward()
        loratch.torch_optimizer_step(opt)
        ref_opt.step()
        for p, q in zip(ours, ref):
            assert (p - q).abs().max().item() <= 1e-6
    assert opt.step_count == 5


def test_half_precision_params_use_fp32_masters() -> None:
    ours = make_params(0, [(8, 8)], torch.bfloat16)
    ref = [ours[0].detach().float().requires_grad_(True)]
    opt = loratch.torch_optimizer_add_params(ours, 1e-3, 0.0)
    ref_opt = torch.optim.AdamW(ref, lr=1e-3, weight_decay=0.0)
    for i in range(20):
        gr = torch.full((8, 8), 1e-3 * (i + 1))
        (ours[0].float() * gr).sum().backward()
        (ref[0] * gr).sum().backward()
        loratch.torch_optimizer_step(opt)
        ref_opt.step()
        loratch.torch_optimizer_zero_grad(opt)
        ref_opt.zero_grad()
    # Updates of 1e-3 per step are below bf16's resolution near 1: without masters they vanish.
    assert torch.equal(ours[0], ref[0].detach().to(torch.bfloat16))
    assert opt.state_bytes == 3 * 64 * 4


def test_clip_grad_norm_matches_torch() -> None:
    ours = make_params(3, [(10,), (3, 3)])
    ref = [p.detach().clone().requires_grad_(True) for p in ours]
    for p, q in zip(ours, ref):
        (p * 3).pow(2).sum().backward()
        (q * 3).pow(2).sum().backward()
    opt = loratch.torch_optimizer_add_params(ours, 1e-3, 0.0)
    norm = loratch.torch_clip_grad_norm(opt, 1.0)
    ref_norm = torch.nn.utils.clip_grad_norm_(ref, 1.0).item()
    assert norm == pytest.approx(ref_norm, rel=1e-6)
    for p, q in zip(ours, ref):
        assert torch.allclose(p.grad, q.grad, rtol=1e-6, atol=1e-7)  # type: ignore[arg-type]


def test_bad_optimizer_arguments() -> None:
    p = make_params(0, [(2,)])
    with pytest.raises(loratch.ConfigError, match="lr|learning"):
        loratch.torch_optimizer_add_params(p, -1.0, 0.0)
    with pytest.raises(loratch.ConfigError, match="beta"):
        loratch.torch_optimizer_add_params(p, 1e-3, 0.0, betas=(1.0, 0.9))
    with pytest.raises(loratch.ConfigError):
        loratch.torch_optimizer_add_params([], 1e-3, 0.0)
    with pytest.raises(TypeError):
        loratch.torch_optimizer_add_params([1.0], 1e-3, 0.0)  # type: ignore[list-item]


KINDS = ["linear_warmup_cosine", "cosine", "linear", "linear_warmup_linear", "exponential", "step", "constant"]


@given(
    kind=st.sampled_from(KINDS),
    initial=st.floats(1e-5, 1e-1),
    min_frac=st.floats(0.0, 1.0),
    total=st.integers(1, 200),
    warm_frac=st.floats(0.0, 0.99),
    gamma=st.floats(0.05, 1.0),
    step_size=st.integers(1, 50),
)
def test_schedule_properties(
    kind: str, initial: float, min_frac: float, total: int, warm_frac: float, gamma: float, step_size: int
) -> None:
    warmup = int(warm_frac * total) if "warmup" in kind else 0
    min_lr = initial * min_frac
    opt = loratch.torch_optimizer_add_params(make_params(0, [(2,)]), 1.0, 0.0)
    s = loratch.torch_lr_scheduler(
        opt,
        kind,
        {"initial_lr": initial, "min_lr": min_lr, "total_steps": total, "warmup_steps": warmup,
         "gamma": gamma, "step_size": step_size},
    )
    assert opt.lr == loratch.torch_scheduler_get_lr(s) > 0, "the LR is set at creation"
    lrs = [opt.lr]
    for _ in range(total + 20):
        loratch.torch_scheduler_step(s)
        assert opt.lr == loratch.torch_scheduler_get_lr(s)
        lrs.append(opt.lr)
    eps = 1e-12 * initial
    assert all(min_lr - eps <= lr <= initial + eps for lr in lrs)
    assert all(lr == lrs[total] for lr in lrs[total:]), "holds after total_steps"
    if kind in ("cosine", "linear", "exponential", "step"):
        assert all(a >= b - eps for a, b in zip(lrs, lrs[1:])), "non-increasing"
    if kind == "linear_warmup_cosine" and warmup > 0:
        assert math.isclose(lrs[warmup], initial, rel_tol=1e-9)


def test_invalid_schedules_raise() -> None:
    opt = loratch.torch_optimizer_add_params(make_params(0, [(2,)]), 1e-3, 0.0)
    with pytest.raises(loratch.ConfigError, match="cosine"):
        loratch.torch_lr_scheduler(opt, "cosinus", {})
    with pytest.raises(loratch.ConfigError, match="warmup"):
        loratch.torch_lr_scheduler(opt, "linear_warmup_cosine", {"total_steps": 10, "warmup_steps": 10})
    with pytest.raises(loratch.ConfigError):
        loratch.torch_lr_scheduler(opt, "cosine", {"total_steps": -5})
    with pytest.raises(loratch.ConfigError, match="min_lr"):
        loratch.torch_lr_scheduler(opt, "cosine", {"initial_lr": 1e-3, "min_lr": 1e-2})
    with pytest.raises(loratch.ConfigError, match="unknown field `totl_steps`"):
        loratch.torch_lr_scheduler(opt, "cosine", {"totl_steps": 5})


def test_backward_grad_mode_sync_and_tensor_count() -> None:
    layer = loratch.torch_lora_linear(4, 2, 2, 2.0)
    loss = loratch.torch_lora_forward(layer, torch.randn(3, 4)).sum()
    loratch.torch_backward(loss, retain_graph=True)
    g1 = layer.lora_A.grad.clone()  # type: ignore[union-attr]
    loratch.torch_backward(loss)  # a second backward works because the graph was retained
    assert torch.allclose(layer.lora_A.grad, 2 * g1)  # type: ignore[arg-type]
    assert loratch.torch_set_grad_enabled(False) is True
    assert not torch.is_grad_enabled()
    assert not loratch.torch_lora_forward(layer, torch.randn(1, 4)).requires_grad
    assert loratch.torch_set_grad_enabled(True) is False and torch.is_grad_enabled()
    assert loratch.torch_mps_synchronize() is (torch.cuda.device_count() > 0)
    base = loratch.tensor_in_memory()
    keep = [torch.zeros(3) for _ in range(10)]
    assert loratch.tensor_in_memory() == base + 10
    del keep
    assert loratch.tensor_in_memory() == base
