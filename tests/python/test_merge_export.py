"""Merged export: `loratch merge` and torch_hf_save_merged write a Hugging Face directory that
transformers loads, with logits equal to loratch's merged model and to PEFT's merge_and_unload."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
from tiny_models import make_model

import loratch

TOL = 1e-4


def hf(d: Path) -> Any:
    import transformers as tf

    return tf.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()


@pytest.fixture()
def adapted(tmp_path: Path) -> tuple[Path, Path]:
    d = tmp_path / "model"
    make_model("qwen2", d, seed=31)
    loratch.torch_hf_load_model_lora("exp", d)
    loratch.torch_hf_lora_init("exp", 4, 8.0, "all-linear")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in loratch.torch_hf_lora_get_parameters("exp"):
            p.normal_(0.0, 0.05, generator=g)
    loratch.torch_hf_lora_save("exp", tmp_path / "adapter")
    return d, tmp_path / "adapter"


def test_save_merged_loads_in_transformers(adapted: tuple[Path, Path], tmp_path: Path) -> None:
    from peft import PeftModel

    d, adapter = adapted
    ids = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        ours = loratch.torch_hf_forward("exp", ids)
    loratch.torch_hf_save_merged("exp", tmp_path / "merged")
    with torch.no_grad():
        exported = hf(tmp_path / "merged")(ids).logits
        peft_merged = PeftModel.from_pretrained(hf(d), adapter).merge_and_unload()(ids).logits
    assert (exported - ours).abs().max().item() <= TOL
    assert (exported - peft_merged).abs().max().item() <= TOL
    with torch.no_grad():
        again = loratch.torch_hf_forward("exp", ids)
    assert torch.equal(again, ours), "the loaded model is unchanged"
    with pytest.raises(FileExistsError):
        loratch.torch_hf_save_merged("exp", tmp_path / "merged")


def test_cli_merge(adapted: tuple[Path, Path], tmp_path: Path) -> None:
    d, adapter = adapted
    binary = os.environ.get("LORATCH_BIN") or str(Path(__file__).resolve().parents[2] / "target/release/loratch")
    out = subprocess.run(
        [binary, "merge", "--model", str(d), "--adapter", str(adapter), "--out", str(tmp_path / "m2")],
        capture_output=True, text=True,
    )
    assert out.returncode == 0, out.stderr
    ids = torch.randint(0, 97, (1, 9))
    with torch.no_grad():
        assert (hf(tmp_path / "m2")(ids).logits - loratch.torch_hf_forward("exp", ids)).abs().max().item() <= TOL
    bad = subprocess.run(
        [binary, "merge", "--model", str(d), "--adapter", str(tmp_path / "none"), "--out", str(tmp_path / "m3")],
        capture_output=True, text=True,
    )
    assert bad.returncode == 1 and "error:" in bad.stderr and not (tmp_path / "m3").exists()


def test_tied_head_cannot_be_adapted(tmp_path: Path) -> None:
    make_model("llama", tmp_path, seed=2)
    loratch.torch_hf_load_model_lora("tied", tmp_path)
    with pytest.raises(loratch.ConfigError, match="tied"):
        loratch.torch_hf_lora_init("tied", 2, 4.0, ["lm_head"])
