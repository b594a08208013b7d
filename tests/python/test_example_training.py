"""examples/lora_training.py runs end to end on a tiny random Llama (SmolLM2's tokenizer and
vocabulary size): the held-out loss falls, and the checkpoint it writes is a PEFT adapter
(same logits in PEFT as in loratch) with the guide's metadata."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from helpers import AdapterCheck
from tiny_models import write_records

import loratch

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "lora_training.py"
METADATA_KEYS = {"epoch", "global_step", "best_loss", "current_lr", "lora_config", "training_config"}


def printed_float(pattern: str, text: str) -> float:
    match = re.search(pattern + r"\s*([0-9.]+)", text)
    assert match, f"{pattern!r} not in the output:\n{text}"
    return float(match.group(1))


def printed_path(label: str, text: str) -> Path:
    match = re.search(rf"^{label}: (.+)$", text, re.MULTILINE)
    assert match, f"{label!r} not in the output:\n{text}"
    return Path(match.group(1))


def test_example_trains_and_writes_a_peft_checkpoint(trainable_dir: Path, tmp_path: Path) -> None:
    tiny_model_dir = trainable_dir
    data = tmp_path / "data.jsonl"
    write_records(data)
    out_dir = tmp_path / "run"
    # fmt: off
    cmd = [
        sys.executable, str(EXAMPLE),
        "--model", str(tiny_model_dir), "--data", str(data), "--output-dir", str(out_dir),
        "--max-steps", "8", "--num-epochs", "100", "--batch-size", "4", "--grad-accum", "2",
        "--lr", "1e-2", "--rank", "8", "--alpha", "16", "--max-seq-length", "64",
        "--seed", "0", "--eval-examples", "4", "--eval-steps", "4",
    ]
    # fmt: on
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    out = proc.stdout

    before = printed_float(r"held-out loss before:", out)
    after = printed_float(r"held-out loss after:", out)
    assert after < before, out
    assert len(re.findall(r"^step \d+/8 .*lr .* grad_norm ", out, re.MULTILINE)) == 8, out

    adapter_dir = printed_path("adapter saved", out)
    info_file = printed_path("metadata saved", out)
    assert adapter_dir.parent == out_dir and info_file.parent == out_dir
    assert (adapter_dir / "adapter_config.json").is_file()
    assert (adapter_dir / "adapter_model.safetensors").is_file()

    info: dict[str, Any] = json.loads(info_file.read_text())
    assert set(info) == METADATA_KEYS
    assert info["global_step"] == 8
    assert info["best_loss"] <= after + 1e-4
    assert 0 < info["current_lr"] <= 1e-2
    assert info["lora_config"]["rank"] == 8 and info["lora_config"]["alpha"] == 16
    assert info["training_config"]["gradient_accumulation_steps"] == 2

    # PEFT reads the adapter, and gives the logits loratch gives with it (bit for bit: the
    # example's scaling, alpha / rank = 2, is a power of two).
    from peft import PeftConfig

    assert PeftConfig.from_pretrained(adapter_dir).r == 8
    ids = torch.tensor([[1, 9690, 198, 2683, 359, 253, 5356, 2]])
    with AdapterCheck(tiny_model_dir, "example-checkpoint") as check:
        check.check(adapter_dir, ids)
        trained = loratch.torch_hf_lora_named_parameters("example-checkpoint")
        assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in trained.items())
