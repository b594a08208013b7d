"""Merged export: `loratch merge` and torch_hf_save_merged write a Hugging Face directory that
transformers loads, with logits equal to loratch's merged model and to PEFT's merge_and_unload
(to the float32 rounding of the merged weights)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import assert_within_rounding, float32_errors, peft_logits, randomize_adapters, run_cli
from helpers import hf_model as hf

import loratch


@pytest.fixture()
def adapted(tiny_model: Any, tmp_path: Path) -> tuple[Path, Path]:
    d = tiny_model("qwen2", 31)
    loratch.torch_hf_load_model_lora("exp", d)
    loratch.torch_hf_lora_init("exp", 4, 8.0, "all-linear")
    randomize_adapters("exp", 0.05, seed=0)
    loratch.torch_hf_lora_save("exp", tmp_path / "adapter")
    return d, tmp_path / "adapter"


def merge_errors(d: Path, adapter: Path, ids: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """PEFT's logits with ``adapter``, unmerged and merged, and their float32 errors."""
    from peft import PeftModel

    return float32_errors(PeftModel.from_pretrained(hf(d), adapter), lambda m: peft_logits(m, ids))


def test_save_merged_loads_in_transformers(adapted: tuple[Path, Path], tmp_path: Path) -> None:
    d, adapter = adapted
    ids = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        ours = loratch.torch_hf_forward("exp", ids)
    loratch.torch_hf_save_merged("exp", tmp_path / "merged")
    with torch.no_grad():
        exported = hf(tmp_path / "merged")(ids).logits
    # The exported weights are W + scaling * B @ A rounded to float32: the unmerged logits and
    # PEFT's merge agree with them to the merged model's float32 rounding.
    ref, err = merge_errors(d, adapter, ids)
    assert_within_rounding(exported, ours, max(err["logits"], err["merged"]), "exported vs unmerged")
    assert_within_rounding(exported, ref["merged"], err["merged"], "exported vs PEFT's merge")
    with torch.no_grad():
        again = loratch.torch_hf_forward("exp", ids)
    assert torch.equal(again, ours), "the loaded model is unchanged"
    with pytest.raises(FileExistsError):
        loratch.torch_hf_save_merged("exp", tmp_path / "merged")


def test_cli_merge(adapted: tuple[Path, Path], binary: Path, tmp_path: Path) -> None:
    d, adapter = adapted
    out = run_cli(binary, "merge", "--model", d, "--adapter", adapter, "--out", tmp_path / "m2")
    assert out.returncode == 0, out.stderr
    ids = torch.randint(0, 97, (1, 9))
    with torch.no_grad():
        exported, ours = hf(tmp_path / "m2")(ids).logits, loratch.torch_hf_forward("exp", ids)
    _, err = merge_errors(d, adapter, ids)
    assert_within_rounding(exported, ours, max(err["logits"], err["merged"]), "CLI export vs unmerged")
    bad = run_cli(binary, "merge", "--model", d, "--adapter", tmp_path / "none", "--out", tmp_path / "m3")
    assert bad.returncode == 1 and "error:" in bad.stderr and not (tmp_path / "m3").exists()


def test_tied_head_cannot_be_adapted(tiny_model: Any) -> None:
    loratch.torch_hf_load_model_lora("tied", tiny_model("llama", 2))
    with pytest.raises(loratch.ConfigError, match="tied"):
        loratch.torch_hf_lora_init("tied", 2, 4.0, ["lm_head"])
