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

import pytest
import torch
from tiny_models import make_trainable_model, write_records

import loratch

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "lora_training.py"
METADATA_KEYS = {"epoch", "global_step", "best_loss", "current_lr", "lora_config", "training_config"}


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("tiny-smollm2")
    make_trainable_model(d)
    return d


def printed_float(pattern: str, text: str) -> float:
    match = re.search(pattern + r"\s*([0-9.]+)", text)
    assert match, f"{pattern!r} not in the output:\n{text}"
    return float(match.group(1))


def printed_path(label: str, text: str) -> Path:
    match = re.search(rf"^{label}: (.+)$", text, re.MULTILINE)
    assert match, f"{label!r} not in the output:\n{text}"
    return Path(match.group(1))


def test_example_trains_and_writes_a_peft_checkpoint(tiny_model_dir: Path, tmp_path: Path) -> None:
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

    # PEFT reads the adapter, and gives the logits loratch gives with it.
    import transformers as tf
    from peft import PeftModel

    base: Any = tf.AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    peft_model: Any = PeftModel.from_pretrained(base.eval(), adapter_dir)
    peft_model.eval()
    assert peft_model.peft_config["default"].r == 8
    ids = torch.tensor([[1, 9690, 198, 2683, 359, 253, 5356, 2]])
    name = "example-checkpoint"
    loratch.torch_hf_load_model_lora(name, tiny_model_dir)
    try:
        loratch.torch_hf_lora_load(name, adapter_dir)
        trained = loratch.torch_hf_lora_named_parameters(name)
        assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in trained.items())
        with torch.no_grad():
            ours = loratch.torch_hf_forward(name, ids)
            theirs = peft_model(ids).logits
        assert (ours - theirs).abs().max().item() <= 1e-4
    finally:
        loratch.torch_hf_unload(name)
