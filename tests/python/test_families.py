"""Gemma 2, Gemma 3 and Phi-3 (issue 22) against transformers and PEFT, on tiny random models
whose sliding window (6 positions) the inputs cross. The shared parity tests (test_hf_forward:
logits bit for bit, left/right padding; test_hf_generate: greedy with the KV cache, with PEFT
adapters) run these families too, through ``tiny_models.FAMILIES``; packed rows are
``src/model/tests.rs``. Here: adapters both ways, merge/unmerge, a training step's gradients,
target names, refused configs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import (
    AdapterCheck,
    assert_within_rounding,
    copy_into_peft,
    float32_errors,
    hf_model,
    peft_lora,
    peft_logits,
    peft_model,
    randomize_adapters,
)
from tiny_models import NEW_FAMILIES, WINDOW

import loratch

#: PEFT's module names of each family's linears ("all-linear" selects these).
LINEARS = {
    "gemma2": ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"],
    "gemma3": ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"],
    "phi3": ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"],
    "phi3-longrope": ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"],
}


@pytest.fixture(scope="module", params=NEW_FAMILIES)
def family(request: pytest.FixtureRequest, tiny_model: Any) -> tuple[str, Path]:
    return request.param, tiny_model(request.param, 7)


def ids_longer_than_window() -> torch.Tensor:
    ids = torch.randint(3, 97, (2, 3 * WINDOW + 1), generator=torch.Generator().manual_seed(5))
    assert ids.shape[1] > WINDOW
    return ids


def test_all_linear_selects_the_familys_modules(family: tuple[str, Path]) -> None:
    fam, d = family
    loratch.torch_hf_load_model_lora("fam-t", d)
    try:
        loratch.torch_hf_lora_init("fam-t", 4, 8.0, "all-linear")
        names = loratch.torch_hf_lora_named_parameters("fam-t")
        short = sorted({k.split(".")[-3] for k in names})
        assert short == LINEARS[fam]
        pm = peft_model(d, r=4, lora_alpha=8.0, target_modules="all-linear")
        assert set(peft_lora(pm)) == set(names)
        with pytest.raises(loratch.ConfigError) as err:
            loratch.torch_hf_lora_init("fam-t", 4, 8.0, ["q_prj"])
        assert ", ".join(LINEARS[fam]) in str(err.value)
    finally:
        loratch.torch_hf_unload("fam-t")


def test_adapters_both_ways_with_peft(family: tuple[str, Path], tmp_path: Path) -> None:
    """loratch's adapter loads in PEFT, and PEFT's in loratch: logits equal bit for bit (the
    same ops in the same order without gradients)."""
    fam, d = family
    ids = ids_longer_than_window()
    targets = LINEARS[fam][:2] if fam.startswith("phi3") else ["q_proj", "v_proj", "down_proj"]
    loratch.torch_hf_load_model_lora("fam-a", d)
    try:
        loratch.torch_hf_lora_init("fam-a", 4, 8.0, "all-linear")
        randomize_adapters("fam-a", 0.1, seed=3)
        loratch.torch_hf_lora_save("fam-a", tmp_path / "ours")
    finally:
        loratch.torch_hf_unload("fam-a")
    pm = peft_model(d, r=3, lora_alpha=6.0, target_modules=targets)
    with torch.no_grad():
        for p in peft_lora(pm).values():
            p.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(p.numel()))
    pm.save_pretrained(tmp_path / "theirs")
    plain = hf_model(d)(ids).logits.detach()
    for adapter in ("ours", "theirs"):
        # One fresh model per adapter: their layouts differ.
        with AdapterCheck(d, f"fam-check-{adapter}") as check:
            got = check.check(tmp_path / adapter, ids)
            assert got.shape == plain.shape == (2, ids.shape[1], 97)
            assert not torch.equal(got, plain), "the adapter changes the logits"


def test_merge_and_unmerge(family: tuple[str, Path]) -> None:
    """Merged logits equal PEFT's merged model's to float32 rounding (W + scaling * B @ A rounds
    to float32 on both sides), unmerging gives the unmerged logits back to that rounding."""
    fam, d = family
    ids = ids_longer_than_window()
    loratch.torch_hf_load_model_lora("fam-m", d)
    try:
        loratch.torch_hf_lora_init("fam-m", 4, 8.0, "all-linear")
        randomize_adapters("fam-m", 0.1, seed=4)
        pm = peft_model(d, r=4, lora_alpha=8.0, target_modules="all-linear")
        copy_into_peft(pm, loratch.torch_hf_lora_named_parameters("fam-m"))
        ref, err = float32_errors(pm, lambda m: peft_logits(m, ids))
        with torch.no_grad():
            before = loratch.torch_hf_forward("fam-m", ids)
            assert torch.equal(before, ref["logits"])
            loratch.torch_hf_lora_merge("fam-m")
            merged = loratch.torch_hf_forward("fam-m", ids)
            assert_within_rounding(merged, ref["merged"], err["merged"], f"{fam} merged")
            loratch.torch_hf_lora_unmerge("fam-m")
            after = loratch.torch_hf_forward("fam-m", ids)
            assert_within_rounding(after, before, err["merged"], f"{fam} unmerged")
    finally:
        loratch.torch_hf_unload("fam-m")


def test_training_step_gradients_equal_peft(family: tuple[str, Path]) -> None:
    """One causal-LM loss over a batch longer than the window: loratch's adapter gradients (its
    fused training kernels) equal PEFT's within the float32 error PEFT's own gradients carry
    (measured against float64), times the slack."""
    fam, d = family
    ids = ids_longer_than_window()
    loratch.torch_hf_load_model_lora("fam-g", d)
    try:
        loratch.torch_hf_lora_init("fam-g", 4, 8.0, "all-linear")
        randomize_adapters("fam-g", 0.1, seed=6)
        ours = loratch.torch_hf_lora_named_parameters("fam-g")
        logits = loratch.torch_hf_forward("fam-g", ids)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 97), ids[:, 1:].reshape(-1))
        loss.backward()
        grads = {k: v.grad.clone() for k, v in ours.items()}
        pm = peft_model(d, r=4, lora_alpha=8.0, target_modules="all-linear")
        copy_into_peft(pm, ours)

        def compute(m: Any) -> dict[str, torch.Tensor]:
            params = peft_lora(m)
            out = m(ids).logits
            l = torch.nn.functional.cross_entropy(out[:, :-1].reshape(-1, 97), ids[:, 1:].reshape(-1))
            return dict(zip(params, torch.autograd.grad(l, list(params.values())), strict=True))

        ref, err = float32_errors(pm, compute)
        for k, g in grads.items():
            assert_within_rounding(g, ref[k], err[k], f"{fam} {k}")
    finally:
        loratch.torch_hf_unload("fam-g")


@pytest.mark.parametrize(
    ("fam", "change", "key"),
    [
        ("phi3", {"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
        ("phi3", {"rope_parameters": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 10000.0}}, "yarn"),
        ("phi3", {"resid_pdrop": 0.1}, "resid_pdrop"),
        ("gemma2", {"hidden_activation": "relu"}, "hidden_activation"),
        ("gemma3", {"layer_types": ["sliding_attention", "chunked_attention", "full_attention"]}, "layer_types[1]"),
        ("gemma3", {"use_bidirectional_attention": True}, "use_bidirectional_attention"),
        ("gemma3", {"layer_types": ["full_attention"]}, "layer_types"),
    ],
)
def test_features_loratch_lacks_are_refused(tiny_model: Any, tmp_path: Path, fam: str, change: dict[str, Any],
                                            key: str) -> None:
    d = tmp_path / fam
    shutil.copytree(tiny_model(fam, 7), d)
    config = json.loads((d / "config.json").read_text())
    config.update(change)
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(loratch.ConfigError) as err:
        loratch.torch_hf_load_model_lora("fam-bad", d)
    assert key in str(err.value)
    assert "fam-bad" not in loratch.torch_hf_list_models()


def test_gemma_embedding_scale_and_norm_offset_in_bfloat16(tiny_model: Any) -> None:
    """bfloat16 weights: the embedding scale is cast to bfloat16 and Gemma's norm multiplies in
    float32 before its cast, as transformers does: logits equal transformers' bfloat16 model bit
    for bit."""
    d = tiny_model("gemma3", 7)
    loratch.torch_hf_load_model_lora("fam-bf", d, {"dtype": "bfloat16"})
    try:
        ids = ids_longer_than_window()
        with torch.no_grad():
            ref = hf_model(d, torch.bfloat16)(ids).logits
            got = loratch.torch_hf_forward("fam-bf", ids)
        assert torch.equal(got, ref), (got.float() - ref.float()).abs().max().item()
    finally:
        loratch.torch_hf_unload("fam-bf")

