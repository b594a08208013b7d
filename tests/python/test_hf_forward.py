"""Llama-family forward parity with transformers (fp32 logits without gradients: bit for bit),
padding, registry behaviour, threads, the GIL and bad inputs."""

from __future__ import annotations

import math
import threading
import time
from pathlib import Path

from typing import Any

import pytest
import torch
from helpers import assert_gil_released, assert_within_rounding, float32_errors, hf_model, logits_of, ticks_during
from tiny_models import FAMILIES, make_model

import loratch


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request: pytest.FixtureRequest, tiny_model: Any) -> tuple[str, Any, Path]:
    family: str = request.param
    d = tiny_model(family)
    name = f"tiny-{family}"
    loratch.torch_hf_load_model_lora(name, str(d))
    return name, hf_model(d), d


def test_logits_match_transformers(family_model: tuple[str, Any, Path]) -> None:
    """The forward without gradients runs transformers' ops in transformers' order: the logits
    are equal bit for bit (README), not merely close."""
    name, model, _ = family_model
    torch.manual_seed(1)
    ids = torch.randint(0, 97, (3, 19))
    with torch.no_grad():
        ref = model(ids).logits
        got = loratch.torch_hf_forward(name, ids)
    assert got.shape == ref.shape == (3, 19, 97)
    assert torch.equal(got, ref), f"max |diff| {(got - ref).abs().max().item():.3e}"


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_gives_unpadded_logits(family_model: tuple[str, Any, Path], side: str) -> None:
    """A padded row computes the same math as the row alone, over other shapes (other orders of
    summation): equal to float32 rounding, the reference's own error on the unpadded rows."""
    name, model, _ = family_model
    torch.manual_seed(2)
    lengths = [11, 7, 4]
    seqs = [torch.randint(0, 97, (n,)) for n in lengths]
    T = max(lengths)
    ids = torch.zeros(len(seqs), T, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(T - len(s), T) if side == "left" else slice(0, len(s))
        ids[i, sl] = s
        mask[i, sl] = 1
    with torch.no_grad():
        batched = loratch.torch_hf_forward(name, ids, mask)
        assert torch.isfinite(batched).all()
        for i, s in enumerate(seqs):
            alone = loratch.torch_hf_forward(name, s.unsqueeze(0))[0]
            _, err = float32_errors(model, lambda m: logits_of(m, s.unsqueeze(0)))
            sl = slice(T - len(s), T) if side == "left" else slice(0, len(s))
            assert_within_rounding(batched[i, sl], alone, err["logits"], f"row {i}")


def test_one_dim_input_is_batch_of_one(family_model: tuple[str, Any, Path]) -> None:
    name, _, _ = family_model
    ids = torch.randint(0, 97, (5,))
    with torch.no_grad():
        assert torch.equal(loratch.torch_hf_forward(name, ids), loratch.torch_hf_forward(name, ids[None]))


def test_registry_lists_replaces_and_unloads(tiny_model: Any) -> None:
    assert loratch.torch_hf_load_model_lora("reg-x", tiny_model("llama", 3)) == "reg-x"
    assert "reg-x" in loratch.torch_hf_list_models()
    ids = torch.randint(0, 97, (1, 6))
    with torch.no_grad():
        first = loratch.torch_hf_forward("reg-x", ids)
        loratch.torch_hf_load_model_lora("reg-x", str(tiny_model("qwen2", 4)))  # same name: replaced
        second = loratch.torch_hf_forward("reg-x", ids)
    assert not torch.allclose(first, second)
    loratch.torch_hf_unload("reg-x")
    assert "reg-x" not in loratch.torch_hf_list_models()
    with pytest.raises(loratch.ModelNotFoundError, match="reg-x"):
        loratch.torch_hf_forward("reg-x", ids)


def test_unknown_model_error_lists_loaded(family_model: tuple[str, Any, Path]) -> None:
    name, _, _ = family_model
    with pytest.raises(loratch.ModelNotFoundError) as e:
        loratch.torch_hf_forward("no-such-model", torch.zeros(1, 2, dtype=torch.long))
    assert "no-such-model" in str(e.value) and name in str(e.value)
    assert isinstance(e.value, KeyError)


def test_bad_inputs_raise_typed_errors(family_model: tuple[str, Any, Path]) -> None:
    name, _, _ = family_model
    with pytest.raises(loratch.InputError, match="vocab"):
        loratch.torch_hf_forward(name, torch.tensor([[1, 97]]))
    with pytest.raises(loratch.InputError, match="vocab"):
        loratch.torch_hf_forward(name, torch.tensor([[-1, 2]]))
    with pytest.raises(loratch.DTypeError, match="int64"):
        loratch.torch_hf_forward(name, torch.tensor([[1.0, 2.0]]))
    with pytest.raises(loratch.ShapeError):
        loratch.torch_hf_forward(name, torch.zeros(1, 2, 3, dtype=torch.long))
    with pytest.raises(loratch.ShapeError, match="empty"):
        loratch.torch_hf_forward(name, torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(loratch.ShapeError, match="attention_mask"):
        loratch.torch_hf_forward(name, torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 4, dtype=torch.long))
    with pytest.raises(TypeError):
        loratch.torch_hf_forward(name, [[1, 2]])


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        loratch.torch_hf_load_model_lora("bad", tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        loratch.torch_hf_load_model_lora("bad", tmp_path / "empty")
    d = tmp_path / "m"
    make_model("llama", d)
    text = (d / "config.json").read_text()
    (d / "config.json").write_text(text.replace("LlamaForCausalLM", "GPT2LMHeadModel"))
    with pytest.raises(loratch.ConfigError, match="GPT2LMHeadModel"):
        loratch.torch_hf_load_model_lora("bad", d)
    (d / "config.json").write_text("{not json")
    with pytest.raises(loratch.ConfigError, match="malformed"):
        loratch.torch_hf_load_model_lora("bad", d)
    (d / "config.json").write_text(text)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 3])
    with pytest.raises(loratch.CheckpointError, match="safetensors"):
        loratch.torch_hf_load_model_lora("bad", d)
    (d / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        loratch.torch_hf_load_model_lora("bad", d)
    with pytest.raises(loratch.ConfigError, match="unknown field `devise`, expected one of `device`, `dtype`, `quantize`"):
        loratch.torch_hf_load_model_lora("bad", d, {"devise": "cpu"})
    with pytest.raises(loratch.DeviceError):
        loratch.torch_hf_load_model_lora("bad", d, {"device": "cuda:3"})
    assert "bad" not in loratch.torch_hf_list_models()


def test_sharded_checkpoint_loads_the_same(tiny_model: Any, tmp_path: Path) -> None:
    one = tiny_model("llama", 5)
    hf_model(one).save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    loratch.torch_hf_load_model_lora("shard", tmp_path / "sharded")
    loratch.torch_hf_load_model_lora("single", one)
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        assert torch.equal(loratch.torch_hf_forward("shard", ids), loratch.torch_hf_forward("single", ids))
    loratch.torch_hf_unload("shard")
    loratch.torch_hf_unload("single")


def test_concurrent_forwards_match_sequential(family_model: tuple[str, Any, Path]) -> None:
    name, _, _ = family_model
    inputs = [torch.randint(0, 97, (2, 8)) for _ in range(6)]
    with torch.no_grad():
        expected = [loratch.torch_hf_forward(name, x) for x in inputs]
    results: list[torch.Tensor | None] = [None] * len(inputs)

    def run(i: int) -> None:
        with torch.no_grad():
            results[i] = loratch.torch_hf_forward(name, inputs[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for r, e in zip(results, expected):
        assert r is not None and torch.equal(r, e)


def test_bfloat16_load_is_close_to_float32(tiny_model: Any) -> None:
    d = tiny_model("qwen2", 8)
    loratch.torch_hf_load_model_lora("f32", d)
    loratch.torch_hf_load_model_lora("bf16", d, {"dtype": "bfloat16"})
    ids = torch.randint(0, 97, (2, 10))
    with torch.no_grad():
        a = loratch.torch_hf_forward("f32", ids)
        b = loratch.torch_hf_forward("bf16", ids)
    assert b.dtype == torch.bfloat16
    assert (a - b.float()).abs().max().item() < 0.1 * max(1.0, a.abs().max().item())
    assert loratch.torch_hf_memory_usage("bf16") * 2 == loratch.torch_hf_memory_usage("f32")
    loratch.torch_hf_unload("f32")
    loratch.torch_hf_unload("bf16")


def test_two_models_in_threads_and_gil_released(tiny_model: Any) -> None:
    a = tiny_model("llama", 9, num_hidden_layers=6, hidden_size=96, intermediate_size=256)
    loratch.torch_hf_load_model_lora("ta", a)
    loratch.torch_hf_load_model_lora("tb", tiny_model("qwen3", 10))
    xa, xb = torch.randint(0, 97, (4, 64)), torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        ea, eb = loratch.torch_hf_forward("ta", xa), loratch.torch_hf_forward("tb", xb)
    out: dict[str, torch.Tensor] = {}

    def work(name: str, x: torch.Tensor) -> None:
        with torch.no_grad():
            for _ in range(5):
                out[name] = loratch.torch_hf_forward(name, x)

    def both() -> None:
        threads = [threading.Thread(target=work, args=a) for a in (("ta", xa), ("tb", xb))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)

    both()
    assert torch.equal(out["ta"], ea) and torch.equal(out["tb"], eb)
    # The GIL: one long forward (at least ~0.6 s: the batch grows with the machine's speed) while
    # this thread counts in pure Python. A forward holding the GIL would stop the counting for its
    # whole length (a C call that holds it, sum(range(10**7)), leaves one gap of 93% of its
    # length); released, the longest gap is the OS scheduler's (milliseconds). One libtorch
    # thread, so the counting thread has a core of its own on a 2-core machine.
    rows = 16
    gen = torch.Generator().manual_seed(0)

    def forward() -> None:
        with torch.no_grad():
            loratch.torch_hf_forward("ta", torch.randint(0, 97, (rows, 256), generator=gen))

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t0 = time.perf_counter()
        forward()  # warm-up, and the time of 16 rows
        rows = max(16, math.ceil(16 * 0.6 / (time.perf_counter() - t0)))
        m = ticks_during(forward)
    finally:
        torch.set_num_threads(threads)
    assert_gil_released(m, "torch_hf_forward")
    loratch.torch_hf_unload("ta")
    loratch.torch_hf_unload("tb")
