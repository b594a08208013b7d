"""``torch_hf_loss`` (issue 25 item 1) against transformers' ``model(..., labels=...).loss`` under
PEFT: the loss and the adapters' gradients, on every tiny family (Gemma 2's soft-capped logits
included), with -100 labels, padding and a batch of 2; its defaults, edge cases and errors. And
``torch_hf_forward`` with gradients: a mask of ones takes the trainer's kernels (no mask)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import assert_within_rounding, copy_into_peft, float32_errors, peft_lora, peft_model, randomize_adapters
from tiny_models import FAMILIES

import loratch

VOCAB = 97


def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two rows of 13 tokens, the second right-padded by 4 (pad id 0); labels: the ids with the
    first row's 3-token "prompt" and the second row's padding labelled -100."""
    ids = torch.randint(3, VOCAB, (2, 13), generator=torch.Generator().manual_seed(11))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    ids[1, 9:] = 0
    labels = ids.clone()
    labels[0, :3] = -100
    labels[1, 9:] = -100
    return ids, mask, labels


def transformers_loss(m: Any, ids: torch.Tensor, labels: torch.Tensor | None, mask: torch.Tensor | None) -> torch.Tensor:
    """transformers' causal-LM loss of ``m``'s logits in their own dtype: ``ForCausalLMLoss``
    (pad the labels with -100, shift, mean cross-entropy) without its cast to float32, so that a
    float64 twin computes it in float64 (``float32_errors``). The float32 model's value is
    checked against ``m(..., labels=...).loss`` itself in the test."""
    logits = m(input_ids=ids, attention_mask=mask).logits
    labels = ids if labels is None else labels
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), shifted.reshape(-1), ignore_index=-100)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", ["labels-and-mask", "default-labels-padded"])
def test_loss_and_gradients_equal_peft(tiny_model: Any, family: str, case: str) -> None:
    """The loss and every adapter gradient equal PEFT + transformers' within the float32 error
    their own values carry (measured against a float64 twin), times the slack of
    ``helpers.ROUNDING_SLACK``. With default labels the padding counts, as in transformers."""
    d = tiny_model(family, 3)
    ids, mask, labels = batch()
    given: torch.Tensor | None = labels if case == "labels-and-mask" else None
    name = f"loss-{family}"
    loratch.torch_hf_load_model_lora(name, d)
    try:
        loratch.torch_hf_lora_init(name, 4, 8.0, "all-linear")
        randomize_adapters(name, 0.1, seed=4)
        ours = loratch.torch_hf_lora_named_parameters(name)
        with torch.no_grad():  # libtorch's ops throughout, no graph
            plain = loratch.torch_hf_loss(name, ids, given, mask)
        loss = loratch.torch_hf_loss(name, ids, given, mask)
        assert loss.dim() == 0 and loss.dtype == torch.float32 and not plain.requires_grad
        loratch.torch_backward(loss)
        grads = {k: v.grad.clone() for k, v in ours.items()}
        pm = peft_model(d, r=4, lora_alpha=8.0, target_modules="all-linear")
        copy_into_peft(pm, ours)

        def compute(m: Any) -> dict[str, torch.Tensor]:
            params = peft_lora(m)
            value = transformers_loss(m, ids, given, mask)
            grads = torch.autograd.grad(value, list(params.values()))
            return {"loss": value, **dict(zip(params, grads, strict=True))}

        ref, err = float32_errors(pm, compute)
        hf = pm(input_ids=ids, labels=ids if given is None else given, attention_mask=mask).loss
        assert_within_rounding(hf.detach(), ref["loss"], err["loss"], f"{family}: the reference is transformers' loss")
        assert_within_rounding(loss.detach(), ref["loss"], err["loss"], f"{family} loss")
        assert_within_rounding(plain, ref["loss"], err["loss"], f"{family} loss without gradients")
        for k, g in grads.items():
            assert_within_rounding(g, ref[k], err[k], f"{family} {k}")
    finally:
        loratch.torch_hf_unload(name)


def test_defaults_no_grad_and_no_targets(tiny_model: Any) -> None:
    """Labels default to the ids; without gradients the same value, no graph; with every label
    -100 the loss is NaN and the gradients zero (transformers' mean over no token); a loss
    scaled before the backward scales the gradients."""
    d = tiny_model("llama", 3)
    ids, mask, _ = batch()
    loratch.torch_hf_load_model_lora("loss-d", d)
    try:
        loratch.torch_hf_lora_init("loss-d", 4, 8.0, "all-linear")
        randomize_adapters("loss-d", 0.1, seed=4)
        params = loratch.torch_hf_lora_get_parameters("loss-d")
        default = loratch.torch_hf_loss("loss-d", ids)
        explicit = loratch.torch_hf_loss("loss-d", ids, ids)
        assert torch.equal(default, explicit) and default.requires_grad
        loratch.torch_backward(default)
        once = [p.grad.clone() for p in params]
        for p in params:
            p.grad = None
        loratch.torch_backward(explicit * 2.0)
        for g1, p in zip(once, params, strict=True):
            assert torch.equal(p.grad, g1 * 2.0)
        with torch.no_grad():
            plain = loratch.torch_hf_loss("loss-d", ids)
        assert not plain.requires_grad and plain.dim() == 0
        for p in params:
            p.grad = None
        none = loratch.torch_hf_loss("loss-d", ids, torch.full_like(ids, -100), mask)
        assert none.requires_grad and math.isnan(none.detach().item())
        loratch.torch_backward(none)
        assert all(p.grad is not None and not p.grad.any() for p in params)
    finally:
        loratch.torch_hf_unload("loss-d")


@pytest.mark.parametrize(
    ("labels", "error", "text"),
    [
        (torch.zeros(2, 12, dtype=torch.long), loratch.ShapeError, "labels"),
        (torch.zeros(2, 13), loratch.DTypeError, "labels"),
        (torch.full((2, 13), VOCAB), loratch.InputError, "label ids"),
        (torch.full((2, 13), -3), loratch.InputError, "label ids"),
    ],
)
def test_bad_labels_raise(tiny_model: Any, labels: torch.Tensor, error: type[Exception], text: str) -> None:
    ids, _, _ = batch()
    loratch.torch_hf_load_model_lora("loss-e", tiny_model("llama", 3))
    try:
        with pytest.raises(error, match=text):
            loratch.torch_hf_loss("loss-e", ids, labels)
    finally:
        loratch.torch_hf_unload("loss-e")


def test_forward_with_a_mask_of_ones_takes_the_trainers_kernels(tiny_model: Any) -> None:
    """With gradients, a mask of ones changes nothing, bit for bit: the forward drops it and takes
    the fused causal attention, as without a mask (a masked attention rounds differently)."""
    d: Path = tiny_model("llama", 3)
    ids = torch.randint(3, VOCAB, (2, 13), generator=torch.Generator().manual_seed(2))
    loratch.torch_hf_load_model_lora("loss-m", d)
    try:
        loratch.torch_hf_lora_init("loss-m", 4, 8.0, "all-linear")
        randomize_adapters("loss-m", 0.1, seed=4)
        plain = loratch.torch_hf_forward("loss-m", ids)
        ones = loratch.torch_hf_forward("loss-m", ids, attention_mask=torch.ones_like(ids))
        assert plain.requires_grad and torch.equal(plain, ones)
    finally:
        loratch.torch_hf_unload("loss-m")
