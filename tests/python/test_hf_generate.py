"""Generation with the KV cache: greedy equals transformers' greedy generate, with and without
LoRA; sampling is seeded and respects its filters."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import hf_model

import loratch


# The issue-22 families: their sliding window (6) is crossed by every prompt + continuation.
@pytest.fixture(scope="module", params=["llama", "qwen3", "gemma2", "gemma3", "phi3", "phi3-longrope"])
def gen_model(request: pytest.FixtureRequest, tiny_model: Any) -> tuple[str, Any, Path]:
    d = tiny_model(request.param, 21)
    name = f"gen-{request.param}"
    loratch.torch_hf_load_model_lora(name, d)
    return name, hf_model(d), d


def hf_greedy(model: Any, prompt: list[int], n: int, eos: int | None = None) -> list[int]:
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=eos, pad_token_id=0,
            min_new_tokens=0,
        )
    return out[0, len(prompt):].tolist()  # type: ignore[no-any-return]


def test_greedy_equals_transformers(gen_model: tuple[str, Any, Path]) -> None:
    name, model, _ = gen_model
    for seed in range(3):
        prompt = torch.randint(0, 97, (7,), generator=torch.Generator().manual_seed(seed)).tolist()
        ours = loratch.torch_hf_generate(name, prompt, 20, greedy=True)
        assert ours == hf_greedy(model, prompt, 20)


def test_greedy_with_lora_equals_peft(gen_model: tuple[str, Any, Path], tmp_path: Path) -> None:
    from peft import PeftModel

    name, _, d = gen_model
    loratch.torch_hf_load_model_lora("gen-lora", d)
    loratch.torch_hf_lora_init("gen-lora", 4, 8.0, "all-linear")
    with torch.no_grad():
        for p in loratch.torch_hf_lora_get_parameters("gen-lora"):
            p.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(p.numel()))
    loratch.torch_hf_lora_save("gen-lora", tmp_path / "ad")
    pm = PeftModel.from_pretrained(hf_model(d), tmp_path / "ad")
    prompt = [5, 17, 33, 2, 90]
    ours = loratch.torch_hf_generate("gen-lora", torch.tensor([prompt]), 16, greedy=True)
    assert ours == hf_greedy(pm.eval(), prompt, 16)
    assert ours != loratch.torch_hf_generate(name, prompt, 16, greedy=True), "LoRA changes the output"
    loratch.torch_hf_unload("gen-lora")


def test_eos_stops_generation(gen_model: tuple[str, Any, Path]) -> None:
    name, model, _ = gen_model
    prompt = [3, 4, 5]
    full = loratch.torch_hf_generate(name, prompt, 12, greedy=True)
    stop = full[4]
    cut = loratch.torch_hf_generate(name, prompt, 12, greedy=True, eos_token_id=stop)
    assert cut == full[: full.index(stop) + 1]
    assert cut == hf_greedy(model, prompt, 12, eos=stop)


def test_sampling_is_seeded_and_filtered(gen_model: tuple[str, Any, Path]) -> None:
    name, _, _ = gen_model
    prompt = [1, 2, 3]
    state = torch.get_rng_state()
    a = loratch.torch_hf_generate(name, prompt, 15, temperature=1.5, seed=7)
    b = loratch.torch_hf_generate(name, prompt, 15, temperature=1.5, seed=7)
    assert a == b and torch.equal(state, torch.get_rng_state()), "seeded, torch's RNG untouched"
    assert len({tuple(loratch.torch_hf_generate(name, prompt, 15, temperature=1.5, seed=s)) for s in range(5)}) > 1
    greedy = loratch.torch_hf_generate(name, prompt, 10, greedy=True)
    assert loratch.torch_hf_generate(name, prompt, 10, top_k=1, seed=3) == greedy
    assert loratch.torch_hf_generate(name, prompt, 10, top_p=1e-9, seed=4) == greedy


def test_generate_bad_inputs(gen_model: tuple[str, Any, Path]) -> None:
    name, _, _ = gen_model
    with pytest.raises(loratch.ConfigError, match="temperature"):
        loratch.torch_hf_generate(name, [1, 2], 3, temperature=0.0)
    with pytest.raises(loratch.ConfigError, match="top_p"):
        loratch.torch_hf_generate(name, [1, 2], 3, top_p=1.5)
    with pytest.raises(loratch.InputError, match="vocab"):
        loratch.torch_hf_generate(name, [1, 500], 3, greedy=True)
    with pytest.raises(loratch.ShapeError, match="empty"):
        loratch.torch_hf_generate(name, [], 3, greedy=True)
    with pytest.raises(loratch.ShapeError, match="one sequence"):
        loratch.torch_hf_generate(name, torch.zeros(2, 3, dtype=torch.long), 3, greedy=True)


def hf_batched_greedy(model: Any, prompts: list[list[int]], n: int, eos: int | None = None) -> list[list[int]]:
    """transformers' greedy generate of left-padded prompts; each row cut after its stop token."""
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=mask, max_new_tokens=n, do_sample=False, eos_token_id=eos, pad_token_id=0,
            min_new_tokens=0,
        )
    rows = out[:, width:].tolist()
    return [r[: r.index(eos) + 1] if eos is not None and eos in r else r for r in rows]


BATCH = [[5, 17, 33, 2, 90, 41, 8], [3, 4, 5], [60, 1, 77, 12, 9]]


def test_batch_rows_equal_each_prompt_alone(gen_model: tuple[str, Any, Path]) -> None:
    name, model, _ = gen_model
    got = loratch.torch_hf_generate(name, BATCH, 14, greedy=True)
    assert got == [loratch.torch_hf_generate(name, p, 14, greedy=True) for p in BATCH]
    assert loratch.torch_hf_generate(name, [torch.tensor(p) for p in BATCH], 14, greedy=True) == got
    if name != "gen-phi3-longrope":  # generated row by row: its rope switch is per row
        assert got == hf_batched_greedy(model, BATCH, 14)


def test_batch_rows_stop_on_their_own(gen_model: tuple[str, Any, Path]) -> None:
    name, model, _ = gen_model
    alone = [loratch.torch_hf_generate(name, p, 12, greedy=True) for p in BATCH]
    stop = alone[1][2]  # row 1 stops at its third token; the others where (if) they emit it
    got = loratch.torch_hf_generate(name, BATCH, 12, greedy=True, eos_token_id=stop)
    assert got == [loratch.torch_hf_generate(name, p, 12, greedy=True, eos_token_id=stop) for p in BATCH]
    assert len(got[1]) <= 3 and got[1][-1] == stop
    assert max(map(len, got)) > len(got[1]), "another row runs past row 1's stop"
    if name != "gen-phi3-longrope":
        assert got == hf_batched_greedy(model, BATCH, 12, eos=stop)


def test_batch_sampling_is_seeded_and_bad_prompts_are_named(gen_model: tuple[str, Any, Path]) -> None:
    name, _, _ = gen_model
    a = loratch.torch_hf_generate(name, BATCH, 8, temperature=1.5, seed=11)
    assert a == loratch.torch_hf_generate(name, BATCH, 8, temperature=1.5, seed=11)
    assert [len(r) for r in a] == [8, 8, 8]
    assert loratch.torch_hf_generate(name, BATCH, 6, top_k=1, seed=2) == loratch.torch_hf_generate(
        name, BATCH, 6, greedy=True
    )
    with pytest.raises(loratch.ShapeError, match="prompt 1 is empty"):
        loratch.torch_hf_generate(name, [[1, 2], []], 3)
    with pytest.raises(loratch.InputError, match="vocab"):
        loratch.torch_hf_generate(name, [[1, 2], [1, 97]], 3)
    with pytest.raises(TypeError, match=r"input_ids\[1\]"):
        loratch.torch_hf_generate(name, [[1, 2], "hello"], 3)  # type: ignore[list-item]
