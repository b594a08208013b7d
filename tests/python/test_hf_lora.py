"""LoRA on loaded models against PEFT (same adapter values -> the same logits, bit for bit in
fp32 without gradients), parameter order and names, enable/merge/unmerge (to float32 rounding),
and adapter files that round-trip with PEFT."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import (
    assert_within_rounding,
    copy_into_peft,
    float32_errors,
    hf_model,
    logits_of,
    max_diff,
    peft_logits,
    peft_model,
    randomize_adapters,
)
from hypothesis import example, given, settings
from hypothesis import strategies as st

import loratch

ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def randomize(name: str, std: float = 0.05, seed: int = 0) -> None:
    randomize_adapters(name, std, seed)


def peft_twin(name: str, d: Path, **lora: Any) -> Any:
    """PEFT's model over ``d`` with loratch model ``name``'s adapter values."""
    pm = peft_model(d, **lora)
    copy_into_peft(pm, loratch.torch_hf_lora_named_parameters(name))
    return pm


def assert_equal_logits(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    """Without gradients, loratch's LoRA model computes PEFT's: bit for bit (README) where every
    scaling alpha/rank is a power of two, as in these tests (see test_lora_linear's
    ``assert_peft_forward`` for other scalings)."""
    assert torch.equal(ours, theirs), f"max |loratch - PEFT| {max_diff(ours, theirs):.3e}"


@pytest.fixture(scope="module")
def model_dir(tiny_model: Any) -> Path:
    return tiny_model("llama", 11)  # type: ignore[no-any-return]


@pytest.fixture()
def ids() -> torch.Tensor:
    return torch.randint(0, 97, (2, 13), generator=torch.Generator().manual_seed(3))


def load(name: str, d: Path) -> str:
    return loratch.torch_hf_load_model_lora(name, d)


def logits(name: str, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return loratch.torch_hf_forward(name, ids)


@pytest.mark.parametrize(
    ("targets", "peft_targets", "kwargs"),
    [
        (["q_proj", "v_proj"], ["q_proj", "v_proj"], {}),
        (ALL7, ALL7, {"use_rslora": True}),
        ("all-linear", "all-linear", {}),
        (r".*\.1\.mlp\.(gate|down)_proj", r".*\.1\.mlp\.(gate|down)_proj", {}),
    ],
    ids=["qv", "all7-rslora", "all-linear", "regex"],
)
def test_logits_equal_peft_with_same_adapters(
    model_dir: Path, ids: torch.Tensor, targets: Any, peft_targets: Any, kwargs: dict[str, Any]
) -> None:
    load("m", model_dir)
    base = logits("m", ids)
    # The regex matches layer 1 only: the partial-match warning names layer 0.
    partial = isinstance(targets, str) and targets != "all-linear"
    expect = (pytest.warns(loratch.LoraWarning, match=r"not in layers 0")
              if partial else contextlib.nullcontext())
    with expect:
        assert loratch.torch_hf_lora_init("m", 4, 8.0, targets, **kwargs) is True
    assert torch.equal(logits("m", ids), base), "a fresh adapter changes nothing"
    randomize("m")
    pm = peft_twin("m", model_dir, r=4, lora_alpha=8, target_modules=peft_targets, **kwargs)
    with torch.no_grad():
        ref = pm(ids).logits
    ours = logits("m", ids)
    assert_equal_logits(ours, ref)
    assert max_diff(ours, base) > 1e-3, "the adapters do change the output"


def test_parameter_order_and_names(model_dir: Path) -> None:
    load("m", model_dir)
    loratch.torch_hf_lora_init("m", 2, 4.0, ["down_proj", "q_proj", "o_proj"])
    named = loratch.torch_hf_lora_named_parameters("m")
    keys = list(named)
    expected = []
    for i in range(2):
        for mod in ["self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj"]:
            for ab in "AB":
                expected.append(f"base_model.model.model.layers.{i}.{mod}.lora_{ab}.weight")
    assert keys == expected
    params = loratch.torch_hf_lora_get_parameters("m")
    assert all(p is named[k] for p, k in zip(params, keys)), "the same live tensors"
    assert all(p.requires_grad and p.is_leaf for p in params)
    assert named[keys[0]].shape == (2, 48) and named[keys[1]].shape == (48, 2)


def test_unknown_target_lists_valid_names(model_dir: Path) -> None:
    load("m", model_dir)
    with pytest.raises(loratch.ConfigError, match="qproj.*valid module names: down_proj, gate_proj"):
        loratch.torch_hf_lora_init("m", 2, 4.0, ["qproj"])
    with pytest.raises(loratch.ConfigError, match="rank"):
        loratch.torch_hf_lora_init("m", 0, 4.0, ["q_proj"])
    with pytest.raises(loratch.StateError, match="not initialised"):
        loratch.torch_hf_lora_get_parameters("m")


def test_enable_disable_gives_base_model(model_dir: Path, ids: torch.Tensor) -> None:
    load("m", model_dir)
    with torch.no_grad():
        base_hf = hf_model(model_dir)(ids).logits
    loratch.torch_hf_lora_init("m", 4, 16.0, ALL7)
    randomize("m", 0.1)
    adapted = logits("m", ids)
    loratch.torch_hf_lora_enable("m", False)
    # Exactly the base model (README), which equals transformers' bit for bit.
    assert torch.equal(logits("m", ids), base_hf)
    loratch.torch_hf_lora_enable("m", True)
    assert torch.equal(logits("m", ids), adapted)


def test_merge_unmerge(model_dir: Path, ids: torch.Tensor) -> None:
    weights_file = (model_dir / "model.safetensors").read_bytes()
    load("m", model_dir)
    loratch.torch_hf_lora_init("m", 4, 8.0, ALL7)
    randomize("m", 0.05)
    unmerged = logits("m", ids)
    # The float32 rounding of the adapted model and of its merged twin (PEFT's, against float64).
    ref, err = float32_errors(peft_twin("m", model_dir, r=4, lora_alpha=8, target_modules=ALL7),
                              lambda m: peft_logits(m, ids))
    either = max(err["logits"], err["merged"])
    loratch.torch_hf_lora_merge("m")
    merged = logits("m", ids)
    # Merging rounds W + scaling * B @ A once per weight: the logits move by float32 rounding.
    assert_within_rounding(merged, unmerged, either, "merged vs unmerged")
    with pytest.raises(loratch.StateError, match="already merged"):
        loratch.torch_hf_lora_merge("m")
    # A merged model's forward is a base forward over the merged weights: PEFT's merge, up to
    # the rounding of the merged weights (each side computes the delta its own way).
    assert_within_rounding(merged, ref["merged"], err["merged"], "merged vs PEFT's merge")
    loratch.torch_hf_lora_unmerge("m")
    assert_within_rounding(logits("m", ids), unmerged, either, "unmerged again")
    with pytest.raises(loratch.StateError, match="not merged"):
        loratch.torch_hf_lora_unmerge("m")
    # Weights are zero-copy views of a private mapping: merging never writes the checkpoint file.
    assert (model_dir / "model.safetensors").read_bytes() == weights_file


def test_non_finite_merge_raises_and_changes_nothing(model_dir: Path, ids: torch.Tensor) -> None:
    load("m", model_dir)
    loratch.torch_hf_lora_init("m", 2, 4.0, ["q_proj", "down_proj"])
    randomize("m")
    before = logits("m", ids)
    params = loratch.torch_hf_lora_get_parameters("m")
    saved = params[-1][0, 0].item()
    with torch.no_grad():
        params[-1][0, 0] = float("inf")  # the last module's B: checked before anything is merged
    with pytest.raises(loratch.NonFiniteError):
        loratch.torch_hf_lora_merge("m")
    with torch.no_grad():
        params[-1][0, 0] = saved
    # No base weight changed (q_proj, merged first in order, would otherwise hold its delta twice).
    assert torch.equal(logits("m", ids), before)
    loratch.torch_hf_lora_merge("m")  # works once finite again
    loratch.torch_hf_lora_unmerge("m")


@settings(max_examples=8, deadline=None)
@given(scale=st.floats(0.001, 0.3), rank=st.integers(1, 6), alpha=st.floats(0.5, 32.0), seed=st.integers(0, 10_000))
@example(scale=0.25, rank=1, alpha=28.0, seed=0)
def test_merge_unmerge_enable_properties(model_dir: Path, scale: float, rank: int, alpha: float, seed: int) -> None:
    ids = torch.randint(0, 97, (1, 9), generator=torch.Generator().manual_seed(seed))
    load("p", model_dir)
    base = logits("p", ids)
    loratch.torch_hf_lora_init("p", rank, alpha, "all-linear")
    randomize("p", scale, seed)
    unmerged = logits("p", ids)
    # The float32 rounding of this adapted model and of its merged twin (PEFT's): merging rounds
    # W + delta once per weight, which a large delta makes the larger of the two.
    pm = peft_twin("p", model_dir, r=rank, lora_alpha=alpha, target_modules="all-linear")
    _, err = float32_errors(pm, lambda m: peft_logits(m, ids))
    either = max(err["logits"], err["merged"])
    loratch.torch_hf_lora_merge("p")
    assert_within_rounding(logits("p", ids), unmerged, either, "merged")
    loratch.torch_hf_lora_enable("p", False)  # unmerges first
    # Unmerging subtracts in float32 the delta that merging added: each weight comes back up to
    # the rounding of |W + delta|, the merged model's rounding, not the base model's (a large
    # delta makes it the larger).
    assert_within_rounding(logits("p", ids), base, err["merged"], "unmerged base")
    loratch.torch_hf_lora_enable("p", True)
    assert_within_rounding(logits("p", ids), unmerged, either, "re-enabled")


def test_autograd_reaches_adapters_and_torch_optim_trains(model_dir: Path, ids: torch.Tensor) -> None:
    load("m", model_dir)
    loratch.torch_hf_lora_init("m", 4, 8.0, ALL7)
    params = loratch.torch_hf_lora_get_parameters("m")
    opt = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for _ in range(8):
        out = loratch.torch_hf_forward("m", ids)
        loss = torch.nn.functional.cross_entropy(out[:, :-1].reshape(-1, 97), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is not None for p in params)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_save_directory_loads_in_peft(model_dir: Path, ids: torch.Tensor, tmp_path: Path) -> None:
    from peft import PeftModel

    load("m", model_dir)
    loratch.torch_hf_lora_init("m", 4, 8.0, ALL7, use_rslora=True)
    randomize("m")
    ours = logits("m", ids)
    loratch.torch_hf_lora_save("m", tmp_path / "adapter")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8 and cfg["use_rslora"]
    pm = PeftModel.from_pretrained(hf_model(model_dir), tmp_path / "adapter").eval()
    with torch.no_grad():
        assert_equal_logits(ours, pm(ids).logits)


@pytest.mark.parametrize("fmt", ["dir", "safetensors"])
def test_save_load_roundtrip_into_fresh_model(model_dir: Path, ids: torch.Tensor, tmp_path: Path, fmt: str) -> None:
    load("src", model_dir)
    loratch.torch_hf_lora_init("src", 3, 6.0, ["q_proj", "up_proj"], dropout=0.1)
    randomize("src")
    path = tmp_path / ("ad" if fmt == "dir" else "ad.safetensors")
    loratch.torch_hf_lora_save("src", path)
    load("dst", model_dir)
    loratch.torch_hf_lora_load("dst", path)  # initialises LoRA from the file's config
    src, dst = loratch.torch_hf_lora_named_parameters("src"), loratch.torch_hf_lora_named_parameters("dst")
    assert list(src) == list(dst) and all(torch.equal(src[k], dst[k]) for k in src)
    assert torch.equal(logits("src", ids), logits("dst", ids))


def test_peft_written_adapter_loads_with_patterns(model_dir: Path, ids: torch.Tensor, tmp_path: Path) -> None:
    torch.manual_seed(5)
    pm = peft_model(
        model_dir,
        r=4,
        lora_alpha=8,
        target_modules=r".*\.(q_proj|v_proj|down_proj)",
        rank_pattern={"down_proj": 2},
        alpha_pattern={r"layers\.1\.self_attn\.v_proj": 3},
        use_rslora=True,
    )
    with torch.no_grad():
        for k, p in pm.named_parameters():
            if "lora_B" in k:
                p.normal_(0.0, 0.05)
    ref, err = float32_errors(pm, lambda m: logits_of(m, ids))
    pm.save_pretrained(tmp_path / "peft")
    load("m", model_dir)
    loratch.torch_hf_lora_load("m", tmp_path / "peft")
    # The patterns give scalings 8/sqrt(2) (down_proj) and 3/sqrt(4) (one v_proj): not powers of
    # two, where loratch's node (scaling the rank-r activation before B) and PEFT (scaling the
    # product after it) round differently (test_lora_linear.assert_peft_forward): float32
    # rounding, not bit for bit.
    assert_within_rounding(logits("m", ids), ref["logits"], err["logits"], "PEFT with patterns")
    named = loratch.torch_hf_lora_named_parameters("m")
    assert named["base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"].shape[0] == 2


def test_peft_all_linear_adapter_loads(model_dir: Path, ids: torch.Tensor, tmp_path: Path) -> None:
    pm = peft_model(model_dir, r=2, lora_alpha=4, target_modules="all-linear")
    with torch.no_grad():
        for k, p in pm.named_parameters():
            if "lora_B" in k:
                p.normal_(0.0, 0.05)
        ref = pm(ids).logits
    pm.save_pretrained(tmp_path / "peft")
    load("m", model_dir)
    loratch.torch_hf_lora_load("m", tmp_path / "peft")
    assert_equal_logits(logits("m", ids), ref)


def test_switching_adapters_leaves_no_trace(model_dir: Path, ids: torch.Tensor, tmp_path: Path) -> None:
    load("m", model_dir)
    loratch.torch_hf_lora_init("m", 2, 4.0, ALL7)
    for seed, name in [(1, "one"), (2, "two")]:
        randomize("m", seed=seed)
        loratch.torch_hf_lora_save("m", tmp_path / name)
    load("fresh", model_dir)
    loratch.torch_hf_lora_load("fresh", tmp_path / "two")
    only_two = logits("fresh", ids)
    loratch.torch_hf_lora_load("m", tmp_path / "one")
    loratch.torch_hf_lora_load("m", tmp_path / "two")
    assert torch.equal(logits("m", ids), only_two)


def test_bad_adapter_files_raise_and_leave_model_unchanged(model_dir: Path, ids: torch.Tensor, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    load("m", model_dir)
    loratch.torch_hf_lora_init("m", 2, 4.0, ["q_proj", "v_proj"])
    randomize("m")
    loratch.torch_hf_lora_save("m", tmp_path / "good")
    before = logits("m", ids)
    good = load_file(tmp_path / "good" / "adapter_model.safetensors")
    cfg = (tmp_path / "good" / "adapter_config.json").read_text()

    def variant(name: str, tensors: dict[str, torch.Tensor], config: str = cfg) -> Path:
        d = tmp_path / name
        d.mkdir()
        save_file(tensors, d / "adapter_model.safetensors", metadata={"format": "pt"})
        (d / "adapter_config.json").write_text(config)
        return d

    first = next(iter(good))
    cases = {
        "missing": (variant("missing", {k: v for k, v in good.items() if k != first}), "missing"),
        "unexpected": (variant("unexpected", {**good, "base_model.model.x.lora_A.weight": torch.zeros(2, 2)}), "unexpected"),
        "misshaped": (variant("misshaped", {**good, first: torch.zeros(3, 48)}), "shape"),
        "rank": (variant("rank", {k: (v[:1] if "lora_A" in k else v[:, :1]).contiguous() for k, v in good.items()},
                         cfg.replace('"r": 2', '"r": 1')), "disagrees"),
        "nan": (variant("nan", {**good, first: torch.full_like(good[first], float("nan"))}), "finite"),
    }
    for case, (path, needle) in cases.items():
        with pytest.raises(loratch.AdapterFormatError, match=needle):
            loratch.torch_hf_lora_load("m", path)
        assert torch.equal(logits("m", ids), before), case
    (tmp_path / "trunc").mkdir()
    data = (tmp_path / "good" / "adapter_model.safetensors").read_bytes()
    (tmp_path / "trunc" / "adapter_model.safetensors").write_bytes(data[:100])
    (tmp_path / "trunc" / "adapter_config.json").write_text(cfg)
    with pytest.raises(loratch.AdapterFormatError, match="safetensors"):
        loratch.torch_hf_lora_load("m", tmp_path / "trunc")
    with pytest.raises(FileNotFoundError):
        loratch.torch_hf_lora_load("m", tmp_path / "nowhere")
    (tmp_path / "badjson").mkdir()
    (tmp_path / "badjson" / "adapter_config.json").write_text("{oops")
    with pytest.raises(loratch.AdapterFormatError, match="malformed"):
        loratch.torch_hf_lora_load("m", tmp_path / "badjson")
    assert torch.equal(logits("m", ids), before)


def test_adapter_for_another_model_is_rejected(model_dir: Path, tiny_model: Any, tmp_path: Path) -> None:
    load("q", tiny_model("qwen3"))
    loratch.torch_hf_lora_init("q", 2, 4.0, ["q_proj"])
    loratch.torch_hf_lora_save("q", tmp_path / "qwen3-adapter")
    load("m", model_dir)
    with pytest.raises(loratch.AdapterFormatError, match="shape"):
        loratch.torch_hf_lora_load("m", tmp_path / "qwen3-adapter")
    with pytest.raises(loratch.StateError):
        loratch.torch_hf_lora_get_parameters("m")  # the failed load initialised nothing


def test_memory_usage_counts_weights_and_adapters(model_dir: Path) -> None:
    load("m", model_dir)
    hf = hf_model(model_dir)
    weights = sum(p.numel() * 4 for p in hf.parameters())  # tied head counted once
    assert loratch.torch_hf_memory_usage("m") == weights
    loratch.torch_hf_lora_init("m", 4, 8.0, ["q_proj"])
    report = loratch.torch_hf_memory_report("m")
    adapters = sum(p.numel() * 4 for p in loratch.torch_hf_lora_get_parameters("m"))
    assert report == {
        "weights": weights, "adapters": adapters, "adapter_grads": 0, "optimizer_state": 0, "total": weights + adapters
    }
    params = loratch.torch_hf_lora_get_parameters("m")
    opt = loratch.torch_optimizer_add_params(params, 1e-3, 0.0)
    logits("m", torch.zeros(1, 3, dtype=torch.long))
    loratch.torch_hf_forward("m", torch.zeros(1, 3, dtype=torch.long)).sum().backward()
    loratch.torch_optimizer_step(opt)
    report = loratch.torch_hf_memory_report("m")
    assert report["adapter_grads"] == adapters and report["optimizer_state"] == 2 * adapters == opt.state_bytes
    assert loratch.torch_hf_memory_usage("m") == weights + 4 * adapters
    del opt
    assert loratch.torch_hf_memory_report("m")["optimizer_state"] == 0


def test_pt_format_roundtrip_and_torch_load(model_dir: Path, ids: torch.Tensor, tmp_path: Path) -> None:
    load("m", model_dir)
    loratch.torch_hf_lora_init("m", 2, 4.0, ["q_proj", "down_proj"])
    randomize("m")
    for ext in ("pt", "pth", "bin"):
        path = tmp_path / f"adapter.{ext}"
        loratch.torch_hf_lora_save("m", path)
        sd = torch.load(path, weights_only=True)
        named = loratch.torch_hf_lora_named_parameters("m")
        assert list(sd) == list(named) and all(torch.equal(sd[k], named[k]) for k in sd)
    # The file carries its config: a fresh model loads it without torch_hf_lora_init.
    load("dst", model_dir)
    loratch.torch_hf_lora_load("dst", tmp_path / "adapter.pt")
    assert torch.equal(logits("dst", ids), logits("m", ids))
    # A bare state dict (torch.save of the tensors alone) fits only an initialised LoRA.
    torch.save(torch.load(tmp_path / "adapter.pt", weights_only=True), tmp_path / "bare.pt")
    load("dst", model_dir)
    with pytest.raises(loratch.AdapterFormatError, match="no config"):
        loratch.torch_hf_lora_load("dst", tmp_path / "bare.pt")
    loratch.torch_hf_lora_init("dst", 2, 4.0, ["q_proj", "down_proj"])
    loratch.torch_hf_lora_load("dst", tmp_path / "bare.pt")
    assert torch.equal(logits("dst", ids), logits("m", ids))


def test_peft_legacy_bin_directory_loads(model_dir: Path, ids: torch.Tensor, tmp_path: Path) -> None:
    pm = peft_model(model_dir, r=2, lora_alpha=4, target_modules=["k_proj", "up_proj"])
    with torch.no_grad():
        for k, p in pm.named_parameters():
            if "lora_B" in k:
                p.normal_(0.0, 0.05)
        ref = pm(ids).logits
    pm.save_pretrained(tmp_path / "legacy", safe_serialization=False)
    assert (tmp_path / "legacy" / "adapter_model.bin").exists()
    load("m", model_dir)
    loratch.torch_hf_lora_load("m", tmp_path / "legacy")
    assert_equal_logits(logits("m", ids), ref)


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        import os

        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_never_executed(model_dir: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    torch.save({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": _Evil(marker)}, tmp_path / "evil.pt")
    load("m", model_dir)
    loratch.torch_hf_lora_init("m", 2, 4.0, ["q_proj"])
    with pytest.raises(loratch.AdapterFormatError, match="not allowed"):
        loratch.torch_hf_lora_load("m", tmp_path / "evil.pt")
    assert not marker.exists()
