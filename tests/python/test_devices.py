"""The same checks on every device this machine has: the CPU always, and the first CUDA device
where one is present. These are loratch's CUDA tests; on a machine without a GPU they run on the
CPU alone (nothing is skipped). References are plain torch, transformers and PEFT on the same
device and dtype, in the same run.

Tolerances: float32 1e-4 (as the CPU parity tests). bfloat16 runs are held to their float32
reference: loratch's error may be at most twice transformers' own bfloat16 error, plus a little."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from tiny_models import make_model, make_trainable_model, write_records

import loratch

DEVICES = ["cpu"] + (["cuda:0"] if torch.cuda.is_available() else [])
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TOL = 1e-4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("llama-devices")
    make_model("llama", d, seed=5)
    return d


def hf_model(d: Path, device: str, dtype: torch.dtype) -> Any:
    import transformers as tf

    return tf.AutoModelForCausalLM.from_pretrained(d, dtype=dtype).to(device).eval()


def ids_on(device: str) -> torch.Tensor:
    return torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(7)).to(device)


def peft_lora(pm: Any) -> dict[str, torch.Tensor]:
    """PEFT's adapter tensors under loratch's names (no ".default")."""
    return {k.replace(".default", ""): v for k, v in pm.named_parameters() if "lora_" in k}


def copy_into_peft(pm: Any, values: dict[str, torch.Tensor]) -> None:
    """Sets PEFT's adapter tensors to `values` (keyed by loratch's names); they must be float32."""
    theirs = peft_lora(pm)
    assert set(theirs) == set(values)
    with torch.no_grad():
        for k, v in theirs.items():
            assert v.dtype == torch.float32
            v.copy_(values[k])


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


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
    y.square().sum().backward()
    ours = [y.detach(), x.grad, layer.lora_A.grad, layer.lora_B.grad]
    # The reference: the same tensors in plain torch ops, in float32 on the same device.
    x32 = x.detach().float().requires_grad_()
    a32 = layer.lora_A.detach().float().requires_grad_()
    b32 = layer.lora_B.detach().float().requires_grad_()
    w, bias = layer.weight.detach().float(), layer.bias
    assert bias is not None
    ref = x32 @ w.T + bias.detach().float() + layer.scaling * (x32 @ a32.T) @ b32.T
    ref.square().sum().backward()
    refs = [ref.detach(), x32.grad, a32.grad, b32.grad]
    for name, got, want in zip(["output", "x.grad", "A.grad", "B.grad"], ours, refs, strict=True):
        assert got is not None and want is not None
        scale = want.abs().max().item()
        tol = TOL * max(1.0, scale) if dtype == "float32" else 2e-2 * scale
        assert max_diff(got, want) <= tol, (name, max_diff(got, want), scale)


@pytest.mark.parametrize("device", DEVICES)
def test_model_forward_matches_transformers(model_dir: Path, device: str) -> None:
    ids = ids_on(device)
    ref32 = hf_model(model_dir, device, torch.float32)
    with torch.no_grad():
        want = ref32(ids).logits
        want_bf16 = hf_model(model_dir, device, torch.bfloat16)(ids).logits
    loratch.torch_hf_load_model_lora("dev32", model_dir, {"device": device})
    loratch.torch_hf_load_model_lora("dev16", model_dir, {"device": device, "dtype": "bfloat16"})
    try:
        with torch.no_grad():
            got = loratch.torch_hf_forward("dev32", ids)
            got_bf16 = loratch.torch_hf_forward("dev16", ids)
        assert got.device == torch.device(device) and got_bf16.dtype == torch.bfloat16
        assert max_diff(got, want) <= TOL
        hf_err = max_diff(want_bf16, want)
        assert 0.0 < hf_err < 1.0, "bfloat16 rounds, but not wildly"
        assert max_diff(got_bf16, want) <= 2 * hf_err + 1e-2, (max_diff(got_bf16, want), hf_err)
        # Training mode (gradients recorded) computes the same logits.
        loratch.torch_hf_set_training("dev32", True)
        assert max_diff(loratch.torch_hf_forward("dev32", ids), want) <= TOL
    finally:
        loratch.torch_hf_unload("dev32")
        loratch.torch_hf_unload("dev16")


@pytest.mark.parametrize("device", DEVICES)
def test_lora_logits_gradients_and_merge_match_peft(model_dir: Path, device: str) -> None:
    from peft import LoraConfig, get_peft_model

    ids = ids_on(device)
    loratch.torch_hf_load_model_lora("devlora", model_dir, {"device": device})
    try:
        loratch.torch_hf_lora_init("devlora", 4, 8.0, ALL7)
        g = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for t in loratch.torch_hf_lora_get_parameters("devlora"):
                assert t.device == torch.device(device)
                t.copy_(torch.randn(t.shape, generator=g) * 0.05)
        cfg = LoraConfig(r=4, lora_alpha=8, target_modules=ALL7, lora_dropout=0.0, task_type="CAUSAL_LM")
        pm = get_peft_model(hf_model(model_dir, device, torch.float32), cfg)
        ours = loratch.torch_hf_lora_named_parameters("devlora")
        copy_into_peft(pm, ours)
        # Logits and the gradients of every adapter tensor, from the same loss.
        loratch.torch_hf_set_training("devlora", True)
        pm.train()
        loss = loratch.torch_hf_forward("devlora", ids).float().logsumexp(-1).mean()
        loss.backward()
        ref_loss = pm(ids).logits.float().logsumexp(-1).mean()
        ref_loss.backward()
        assert abs(loss.item() - ref_loss.item()) <= TOL
        ref_grads = {k: v.grad for k, v in peft_lora(pm).items()}
        for k, t in ours.items():
            assert t.grad is not None and t.grad.device == torch.device(device)
            assert max_diff(t.grad, ref_grads[k]) <= TOL * max(1.0, ref_grads[k].abs().max().item()), k
        # Merged logits equal the unmerged ones.
        loratch.torch_hf_set_training("devlora", False)
        with torch.no_grad():
            unmerged = loratch.torch_hf_forward("devlora", ids)
            loratch.torch_hf_lora_merge("devlora")
            merged = loratch.torch_hf_forward("devlora", ids)
        assert max_diff(merged, unmerged) <= TOL
        assert max_diff(unmerged, pm.eval()(ids).logits.detach()) <= TOL
    finally:
        loratch.torch_hf_unload("devlora")


@pytest.mark.parametrize("device", DEVICES)
def test_float32_adapters_on_a_bfloat16_model_match_peft(model_dir: Path, device: str) -> None:
    """The trainer's layout: float32 adapters on a bfloat16 model (PEFT's too: it keeps adapters
    in float32). Logits and adapter gradients, each side's error against the same adapters on the
    float32 model: loratch's at most twice PEFT's, plus a little."""
    from peft import LoraConfig, get_peft_model

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
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=ALL7, lora_dropout=0.0, task_type="CAUSAL_LM")
    pm = get_peft_model(hf_model(model_dir, device, torch.bfloat16), cfg).train()
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
    ref = hf_model(model_dir, device, torch.float32)
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
def test_trainer_learns_and_peft_loads_its_adapter(device: str, dtype: str, tmp_path: Path) -> None:
    from peft import PeftModel

    d = tmp_path / "model"
    make_trainable_model(d, seed=1)
    write_records(d / "data.jsonl")
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
    losses = [json.loads(line).get("loss") for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert len([x for x in losses if x is not None]) == 6
    # The adapter is a float32 PEFT adapter: on the CPU in float32, PEFT and loratch agree with it.
    adapter = Path(str(result["adapter_dir"]))
    import transformers as tf

    pm = PeftModel.from_pretrained(tf.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32), adapter).eval()
    ids = torch.tensor([[1, 500, 1000, 42, 7, 9000, 3]])
    loratch.torch_hf_load_model_lora("devtrained", d)
    try:
        loratch.torch_hf_lora_load("devtrained", adapter)
        assert all(t.dtype == torch.float32 for t in loratch.torch_hf_lora_get_parameters("devtrained"))
        with torch.no_grad():
            ours = loratch.torch_hf_forward("devtrained", ids)
            want = pm(ids).logits
            with pm.disable_adapter():
                base = pm(ids).logits
    finally:
        loratch.torch_hf_unload("devtrained")
    assert max_diff(ours, want) <= TOL
    assert max_diff(ours, base) > 1e-3, "training changed the adapter"
