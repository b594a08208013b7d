"""The same checks on every device this machine has: the CPU always, and the first CUDA device
where one is present. These are loratch's CUDA tests; on a machine without a GPU they run on the
CPU alone (nothing is skipped). References are plain torch, transformers and PEFT on the same
device and dtype, in the same run.

Tolerances: float32 forwards without gradients on the CPU equal transformers' and PEFT's bit for
bit (README); on CUDA, and with gradients (fused kernels), loratch is held to float32 rounding:
the LoRA layer to the rigorous bound of its sums (``helpers.sum_rounding_bound``), models to a
few times the reference's own float32 error (``helpers.float32_errors``). bfloat16 runs are held
to their float32 reference: loratch's error may be at most twice transformers' own bfloat16
error, plus a little."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    AdapterCheck,
    assert_within_rounding,
    assert_within_sum_rounding,
    copy_into_peft,
    float32_errors,
    hf_model,
    logits_of,
    max_diff,
    metrics,
    peft_logits,
    peft_lora,
    peft_model,
)

import loratch

DEVICES = ["cpu"] + (["cuda:0"] if torch.cuda.is_available() else [])
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def model_dir(tiny_model: Any) -> Path:
    return tiny_model("llama", 5)  # type: ignore[no-any-return]


def ids_on(device: str) -> torch.Tensor:
    return torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(7)).to(device)


def lse_loss(logits: torch.Tensor) -> torch.Tensor:
    """A loss that reaches every logit (no cast: float64 twins keep float64)."""
    return logits.logsumexp(-1).mean()


def assert_float32_match(got: torch.Tensor, want: torch.Tensor, error: float, device: str, what: str) -> None:
    """A float32 forward without gradients: bit for bit on the CPU (README); on CUDA, whose
    kernels choose their own orders of summation, within float32 rounding (``error``: the
    reference's own, from ``float32_errors``)."""
    if device == "cpu":
        assert torch.equal(got, want), f"{what}: max |diff| {max_diff(got, want):.3e}"
    else:
        assert_within_rounding(got, want, error, what)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_lora_linear_forward_and_backward_match_torch(device: str, dtype: str) -> None:
    torch.manual_seed(0)
    layer = loratch.torch_lora_linear(64, 48, 8, 16.0, dtype=dtype, device=device)
    assert layer.lora_A.device == torch.device(device) and layer.lora_A.dtype == DTYPES[dtype]
    with torch.no_grad():
        layer.lora_B.normal_(0.0, 0.1)
    x = torch.randn(5, 64, device=device, dtype=DTYPES[dtype], requires_grad=True)
    y = loratch.torch_lora_forward(layer, x)
    assert y.device == torch.device(device) and y.dtype == DTYPES[dtype]
    g = torch.randn(5, 48, generator=torch.Generator().manual_seed(1)).to(device, DTYPES[dtype])
    (y * g).sum().backward()
    ours = [y.detach(), x.grad, layer.lora_A.grad, layer.lora_B.grad]
    # The reference: PEFT's formula in plain torch ops, in float32 on the same device ...
    w, bias = layer.weight.detach().float(), layer.bias
    assert bias is not None

    def formula(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, a: torch.Tensor, bb: torch.Tensor,
                g: torch.Tensor) -> list[torch.Tensor]:
        x, a, bb = (t.detach().clone().requires_grad_() for t in (x, a, bb))
        y = F.linear(x, w, b) + F.linear(F.linear(x, a), bb) * layer.scaling
        (y * g).sum().backward()
        return [y.detach(), x.grad, a.grad, bb.grad]  # type: ignore[list-item]

    ops = [x.detach(), w, bias.detach(), layer.lora_A.detach(), layer.lora_B.detach(), g]
    refs = formula(*(t.float() for t in ops))
    # ... and its value on the operands' absolute values in float64: the sums of |terms| that
    # bound float32 rounding. Every output and gradient sums at most in + out + rank + rows
    # products, plus a few scalings and additions.
    mags = formula(*(t.double().abs() for t in ops))
    roundings = 64 + 48 + 8 + 5 + 4
    for name, got, want, mag in zip(["output", "x.grad", "A.grad", "B.grad"], ours, refs, mags, strict=True):
        assert got is not None and want is not None
        if dtype == "float32":
            assert_within_sum_rounding(got, want, mag, roundings, name)
        else:
            scale = want.abs().max().item()
            assert max_diff(got, want) <= 2e-2 * scale, (name, max_diff(got, want), scale)


@pytest.mark.parametrize("device", DEVICES)
def test_model_forward_matches_transformers(model_dir: Path, device: str) -> None:
    ids = ids_on(device)
    want, err = float32_errors(hf_model(model_dir, device=device), lambda m: logits_of(m, ids))
    with torch.no_grad():
        want_bf16 = hf_model(model_dir, torch.bfloat16, device)(ids).logits
    loratch.torch_hf_load_model_lora("dev32", model_dir, {"device": device})
    loratch.torch_hf_load_model_lora("dev16", model_dir, {"device": device, "dtype": "bfloat16"})
    try:
        with torch.no_grad():
            got = loratch.torch_hf_forward("dev32", ids)
            got_bf16 = loratch.torch_hf_forward("dev16", ids)
        assert got.device == torch.device(device) and got_bf16.dtype == torch.bfloat16
        assert_float32_match(got, want["logits"], err["logits"], device, "logits")
        hf_err = max_diff(want_bf16, want["logits"])
        assert 0.0 < hf_err < 1.0, "bfloat16 rounds, but not wildly"
        assert max_diff(got_bf16, want["logits"]) <= 2 * hf_err + 1e-2, (max_diff(got_bf16, want["logits"]), hf_err)
        # Training mode (gradients recorded, fused kernels) computes the same logits, to rounding.
        loratch.torch_hf_set_training("dev32", True)
        assert_within_rounding(loratch.torch_hf_forward("dev32", ids), want["logits"], err["logits"], "training mode")
    finally:
        loratch.torch_hf_unload("dev32")
        loratch.torch_hf_unload("dev16")


@pytest.mark.parametrize("device", DEVICES)
def test_lora_logits_gradients_and_merge_match_peft(model_dir: Path, device: str) -> None:
    ids = ids_on(device)
    loratch.torch_hf_load_model_lora("devlora", model_dir, {"device": device})
    try:
        loratch.torch_hf_lora_init("devlora", 4, 8.0, ALL7)
        g = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for t in loratch.torch_hf_lora_get_parameters("devlora"):
                assert t.device == torch.device(device)
                t.copy_(torch.randn(t.shape, generator=g) * 0.05)
        pm = peft_model(model_dir, device=device, r=4, lora_alpha=8, target_modules=ALL7)
        ours = loratch.torch_hf_lora_named_parameters("devlora")
        copy_into_peft(pm, ours)
        # Logits and the gradients of every adapter tensor, from the same loss; PEFT's, and the
        # float32 error each carries (against PEFT's float64 twin).
        def loss_and_grads(m: Any) -> dict[str, torch.Tensor]:
            m.train()
            m.zero_grad(set_to_none=True)  # the float64 twin is a copy, gradients included
            loss = lse_loss(m(ids).logits)
            loss.backward()
            return {"loss": loss, **{k: v.grad for k, v in peft_lora(m).items()}}

        ref, err = float32_errors(pm, loss_and_grads)
        loratch.torch_hf_set_training("devlora", True)
        loss = lse_loss(loratch.torch_hf_forward("devlora", ids))
        loss.backward()
        assert_within_rounding(loss.detach(), ref["loss"], err["loss"], "loss")
        for k, t in ours.items():
            assert t.grad is not None and t.grad.device == torch.device(device)
            assert_within_rounding(t.grad, ref[k], err[k], k)
        # Without gradients: PEFT's logits (bit for bit on the CPU); merged, to rounding.
        want, err = float32_errors(pm.eval(), lambda m: peft_logits(m, ids))
        loratch.torch_hf_set_training("devlora", False)
        with torch.no_grad():
            unmerged = loratch.torch_hf_forward("devlora", ids)
            loratch.torch_hf_lora_merge("devlora")
            merged = loratch.torch_hf_forward("devlora", ids)
        assert_float32_match(unmerged, want["logits"], err["logits"], device, "unmerged vs PEFT")
        assert_within_rounding(merged, unmerged, max(err["logits"], err["merged"]), "merged")
    finally:
        loratch.torch_hf_unload("devlora")


@pytest.mark.parametrize("device", DEVICES)
def test_float32_adapters_on_a_bfloat16_model_match_peft(model_dir: Path, device: str) -> None:
    """The trainer's layout: float32 adapters on a bfloat16 model (PEFT's too: it keeps adapters
    in float32). Logits and adapter gradients, each side's error against the same adapters on the
    float32 model: loratch's at most twice PEFT's, plus a little."""
    ids = ids_on(device)
    results: dict[str, tuple[torch.Tensor, dict[str, torch.Tensor]]] = {}
    g = torch.Generator().manual_seed(4)
    values: dict[str, torch.Tensor] = {}
    for dtype in ["float32", "bfloat16"]:
        loratch.torch_hf_load_model_lora("mixed", model_dir, {"device": device, "dtype": dtype})
        try:
            loratch.torch_hf_lora_init("mixed", 4, 8.0, ALL7)  # float32 adapters
            named = loratch.torch_hf_lora_named_parameters("mixed")
            with torch.no_grad():
                for k, t in named.items():
                    assert t.dtype == torch.float32
                    t.copy_(values.setdefault(k, torch.randn(t.shape, generator=g) * 0.05))
            loratch.torch_hf_set_training("mixed", True)
            out = loratch.torch_hf_forward("mixed", ids)
            assert out.dtype == DTYPES[dtype]
            out.float().logsumexp(-1).mean().backward()
            results[f"loratch-{dtype}"] = (out.detach().float(), {k: t.grad.clone() for k, t in named.items()})
        finally:
            loratch.torch_hf_unload("mixed")
    pm = peft_model(model_dir, torch.bfloat16, device, r=4, lora_alpha=8, target_modules=ALL7).train()
    copy_into_peft(pm, values)
    out = pm(ids).logits
    out.float().logsumexp(-1).mean().backward()
    grads = {k: v.grad for k, v in peft_lora(pm).items()}
    results["peft-bfloat16"] = (out.detach().float(), grads)
    ref_out, ref_grads = results["loratch-float32"]
    ours_out, ours_grads = results["loratch-bfloat16"]
    peft_out, peft_grads = results["peft-bfloat16"]
    peft_err = max_diff(peft_out, ref_out)
    assert max_diff(ours_out, ref_out) <= 2 * peft_err + 1e-2, (max_diff(ours_out, ref_out), peft_err)
    assert max_diff(ours_out, ref_out) > 0.0, "the bfloat16 model does run in bfloat16"
    for k, ref in ref_grads.items():
        scale = ref.abs().max().item()
        peft_gerr = max_diff(peft_grads[k], ref)
        assert max_diff(ours_grads[k], ref) <= 2 * peft_gerr + 1e-2 * scale, (k, max_diff(ours_grads[k], ref), peft_gerr)


@pytest.mark.parametrize("device", DEVICES)
def test_greedy_generation_matches_transformers(model_dir: Path, device: str) -> None:
    prompt = ids_on(device)[:1]
    ref = hf_model(model_dir, device=device)
    with torch.no_grad():
        want = ref.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0, min_new_tokens=0)
    loratch.torch_hf_load_model_lora("devgen", model_dir, {"device": device})
    try:
        got = loratch.torch_hf_generate("devgen", prompt, 12, greedy=True)
    finally:
        loratch.torch_hf_unload("devgen")
    assert len(got) == 12 and got == want[0, prompt.shape[1]:].tolist()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_trainer_learns_and_peft_loads_its_adapter(device: str, dtype: str, trainable_dir: Path,
                                                  tmp_path: Path) -> None:
    d = trainable_dir
    config: dict[str, Any] = {
        "model": d,
        "data": d / "data.jsonl",
        "output_dir": tmp_path / "out",
        "seed": 3,
        "validation_split": 0.2,
        "lora": {"rank": 8, "alpha": 16, "target_modules": ALL7, "dropout": 0.0},
        "training": {"max_steps": 6, "batch_size": 2, "learning_rate": 1e-2, "logging_steps": 1,
                     "max_seq_length": 64, "eval_steps": 6, "device": device, "dtype": dtype},
    }
    result = loratch.train(config)
    assert result["global_step"] == 6 and not result["interrupted"]
    first, last = result["initial_eval_loss"], result["final_eval_loss"]
    assert first is not None and last is not None and last < first
    assert len([r for r in metrics(tmp_path / "out") if r.get("loss") is not None]) == 6
    # The adapter is a float32 PEFT adapter: on the CPU in float32, PEFT and loratch agree with it
    # (bit for bit), and it is not the base model.
    adapter = Path(str(result["adapter_dir"]))
    ids = torch.tensor([[1, 500, 1000, 42, 7, 9000, 3]])
    with AdapterCheck(d, "devtrained") as check:
        ours = check.check(adapter, ids)
        assert all(t.dtype == torch.float32 for t in loratch.torch_hf_lora_get_parameters("devtrained"))
        with torch.no_grad():
            base = check.base(ids).logits
    assert max_diff(ours, base) > 1e-3, "training changed the adapter"
