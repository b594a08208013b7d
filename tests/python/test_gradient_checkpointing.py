"""Activation checkpointing (``torch_hf_gradient_checkpointing``, ``gradient_checkpointing`` in a
training config): each decoder layer keeps only its input and runs again in the backward. The
rerun computes the same ops in the same order on the same values, with the random generator as it
was in the forward, so logits and gradients equal those without checkpointing bit for bit on CPU
(``torch.equal``), with every target set, padding masks, LoRA dropout and bfloat16 models; a
training run gives the same losses and adapter. A failure inside the rerun is a typed error."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import VOLATILE, max_diff, metrics, randomize_adapters

import loratch
from loratch.errors import ModelNotFoundError, TorchError

MLP = ["gate_proj", "up_proj", "down_proj"]


def ids_and_mask() -> tuple[torch.Tensor, torch.Tensor]:
    """Two rows of 13 tokens, the second left-padded by 4."""
    ids = torch.randint(0, 97, (2, 13), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, 13, dtype=torch.int64)
    mask[1, :4] = 0
    return ids, mask


def logits_and_grads(name: str, checkpointing: bool) -> list[torch.Tensor]:
    """The logits, the gradients of every adapter tensor of ``sum(logits * upstream)`` and the
    generator's next draw, with checkpointing on or off. The generator is seeded first, so
    dropout draws the same masks in both runs."""
    loratch.torch_hf_gradient_checkpointing(name, checkpointing)
    params = loratch.torch_hf_lora_get_parameters(name)
    for p in params:
        p.grad = None
    ids, mask = ids_and_mask()
    torch.manual_seed(9)
    logits = loratch.torch_hf_forward(name, ids, mask)
    upstream = torch.sin(torch.arange(logits.numel(), dtype=torch.float32) * 0.37).view(logits.shape)
    loratch.torch_backward((logits.float() * upstream).sum())
    return [logits.detach(), torch.rand(4), *(p.grad for p in params)]


# Every family with each target set; an untied head (llama-untied) with an adapter on it too.
MODELS_AND_TARGETS = [
    (family, targets)
    for family in ["llama", "qwen3", "llama-untied"]
    for targets in ["all-linear", ["q_proj", "v_proj"], MLP]
] + [("llama-untied", ["q_proj", "v_proj", "lm_head"])]


@pytest.mark.parametrize(("family", "targets"), MODELS_AND_TARGETS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_gradients_equal_those_without_checkpointing(
    tiny_model: Any, family: str, targets: Any, dtype: str, dropout: float
) -> None:
    name = "ckpt"
    loratch.torch_hf_load_model_lora(name, tiny_model(family, 5), {"dtype": dtype})
    try:
        loratch.torch_hf_lora_init(name, 4, 8.0, targets, dropout=dropout)
        randomize_adapters(name, 0.1, seed=1)
        loratch.torch_hf_set_training(name, dropout > 0)
        plain = logits_and_grads(name, False)
        checkpointed = logits_and_grads(name, True)
        assert len(plain) > 2 and all(g is not None for g in plain[2:])
        for i, (a, b) in enumerate(zip(plain, checkpointed, strict=True)):
            assert torch.equal(a, b), f"tensor {i}: max diff {max_diff(a.float(), b.float()):.3e}"
    finally:
        loratch.torch_hf_unload(name)


def test_the_switch(tiny_model: Any) -> None:
    """Off after loading; on or off changes no result, without gradients either; unknown names and
    non-bools raise."""
    name = "ckpt-switch"
    loratch.torch_hf_load_model_lora(name, tiny_model("llama", 5))
    try:
        loratch.torch_hf_lora_init(name, 4, 8.0, "all-linear")
        randomize_adapters(name, 0.1)
        ids, mask = ids_and_mask()
        with torch.no_grad():
            off = loratch.torch_hf_forward(name, ids, mask)
        loratch.torch_hf_gradient_checkpointing(name, True)
        with torch.no_grad():
            on = loratch.torch_hf_forward(name, ids, mask)
        assert torch.equal(off, on) and not on.requires_grad
        assert loratch.torch_hf_forward(name, ids, mask).requires_grad
        out = loratch.torch_hf_generate(name, ids[0], 4, greedy=True)
        loratch.torch_hf_gradient_checkpointing(name, False)
        assert out == loratch.torch_hf_generate(name, ids[0], 4, greedy=True)
        with pytest.raises(TypeError):
            loratch.torch_hf_gradient_checkpointing(name, "yes")  # type: ignore[arg-type]
    finally:
        loratch.torch_hf_unload(name)
    with pytest.raises(ModelNotFoundError, match="nope"):
        loratch.torch_hf_gradient_checkpointing("nope", True)


def test_a_failure_in_the_recompute_is_a_typed_error(tiny_model: Any) -> None:
    """An adapter tensor swapped for one of the wrong shape between the forward and the backward
    makes the layer's rerun fail: ``torch_backward`` raises ``TorchError`` naming the rerun, and
    torch's own ``backward()`` its ``RuntimeError``; the process lives on."""
    name = "ckpt-error"
    loratch.torch_hf_load_model_lora(name, tiny_model("llama", 5))
    try:
        loratch.torch_hf_lora_init(name, 4, 8.0, ["q_proj"])
        loratch.torch_hf_gradient_checkpointing(name, True)
        ids, mask = ids_and_mask()
        for backward in [loratch.torch_backward, lambda loss: loss.backward()]:
            loss = loratch.torch_hf_forward(name, ids, mask).sum()
            a = loratch.torch_hf_lora_get_parameters(name)[0]
            good = a.data
            a.data = torch.zeros(3, 5)
            with pytest.raises(RuntimeError, match="recompute") as caught:
                backward(loss)
            if backward is loratch.torch_backward:
                assert isinstance(caught.value, TorchError)
            a.data = good
        loss = loratch.torch_hf_forward(name, ids, mask).sum()
        loratch.torch_backward(loss)
    finally:
        loratch.torch_hf_unload(name)


def test_a_training_run_is_unchanged(trainable_dir: Path, tmp_path: Path) -> None:
    """``gradient_checkpointing = true``: the same losses, evaluations and adapter, bit for bit
    (dropout on; the trainer's default packing)."""
    import safetensors.torch as st

    def run(checkpointing: bool) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor]]:
        out = tmp_path / f"run-{checkpointing}"
        loratch.train({
            "model": str(trainable_dir), "data": str(trainable_dir / "data.jsonl"),
            "output_dir": str(out), "seed": 3, "validation_split": 0.2,
            "lora": {"rank": 4, "alpha": 8, "target_modules": "all-linear", "dropout": 0.1},
            "training": {"max_steps": 3, "batch_size": 2, "gradient_accumulation_steps": 2,
                         "learning_rate": 3e-3, "logging_steps": 1, "save_steps": 0, "eval_steps": 2,
                         "max_seq_length": 64, "gradient_checkpointing": checkpointing},
        })
        adapter = st.load_file(str(out / "adapter_model.safetensors"))
        return metrics(out, drop=VOLATILE), adapter

    plain_metrics, plain = run(False)
    metrics_on, adapter = run(True)
    assert len(plain_metrics) >= 3
    assert metrics_on == plain_metrics
    assert plain.keys() == adapter.keys()
    for k in plain:
        assert torch.equal(plain[k], adapter[k]), k
