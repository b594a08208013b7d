"""Llama-family forward parity with transformers (fp32, max |diff| <= 1e-4), padding, autograd,
registry behaviour and bad inputs."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from tiny_models import FAMILIES, make_model

import loratch

TOL = 1e-4


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, object, Path]:
    family: str = request.param
    d = tmp_path_factory.mktemp(family)
    model = make_model(family, d)
    name = f"tiny-{family}"
    loratch.torch_hf_load_model_lora(name, str(d))
    return name, model, d


def test_logits_match_transformers(family_model: tuple[str, object, Path]) -> None:
    name, model, _ = family_model
    torch.manual_seed(1)
    ids = torch.randint(0, 97, (3, 19))
    with torch.no_grad():
        ref = model(ids).logits  # type: ignore[operator]
        got = loratch.torch_hf_forward(name, ids)
    assert got.shape == ref.shape == (3, 19, 97)
    assert (got - ref).abs().max().item() <= TOL


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_gives_unpadded_logits(family_model: tuple[str, object, Path], side: str) -> None:
    name, _, _ = family_model
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
            sl = slice(T - len(s), T) if side == "left" else slice(0, len(s))
            assert (batched[i, sl] - alone).abs().max().item() <= TOL


def test_one_dim_input_is_batch_of_one(family_model: tuple[str, object, Path]) -> None:
    name, _, _ = family_model
    ids = torch.randint(0, 97, (5,))
    with torch.no_grad():
        assert torch.equal(loratch.torch_hf_forward(name, ids), loratch.torch_hf_forward(name, ids[None]))


def test_registry_lists_replaces_and_unloads(tmp_path: Path) -> None:
    make_model("llama", tmp_path / "a", seed=3)
    make_model("qwen2", tmp_path / "b", seed=4)
    assert loratch.torch_hf_load_model_lora("reg-x", tmp_path / "a") == "reg-x"
    assert "reg-x" in loratch.torch_hf_list_models()
    ids = torch.randint(0, 97, (1, 6))
    with torch.no_grad():
        first = loratch.torch_hf_forward("reg-x", ids)
        loratch.torch_hf_load_model_lora("reg-x", str(tmp_path / "b"))  # same name: replaced
        second = loratch.torch_hf_forward("reg-x", ids)
    assert not torch.allclose(first, second)
    loratch.torch_hf_unload("reg-x")
    assert "reg-x" not in loratch.torch_hf_list_models()
    with pytest.raises(loratch.ModelNotFoundError, match="reg-x"):
        loratch.torch_hf_forward("reg-x", ids)


def test_unknown_model_error_lists_loaded(family_model: tuple[str, object, Path]) -> None:
    name, _, _ = family_model
    with pytest.raises(loratch.ModelNotFoundError) as e:
        loratch.torch_hf_forward("no-such-model", torch.zeros(1, 2, dtype=torch.long))
    assert "no-such-model" in str(e.value) and name in str(e.value)
    assert isinstance(e.value, KeyError)


def test_bad_inputs_raise_typed_errors(family_model: tuple[str, object, Path]) -> None:
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
    with pytest.raises(loratch.ConfigError, match="unknown field `devise`, expected `device` or `dtype`"):
        loratch.torch_hf_load_model_lora("bad", d, {"devise": "cpu"})
    with pytest.raises(loratch.DeviceError):
        loratch.torch_hf_load_model_lora("bad", d, {"device": "cuda:3"})
    assert "bad" not in loratch.torch_hf_list_models()


def test_sharded_checkpoint_loads_the_same(tmp_path: Path) -> None:
    model = make_model("llama", tmp_path / "one", seed=5)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")  # type: ignore[attr-defined]
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    loratch.torch_hf_load_model_lora("shard", tmp_path / "sharded")
    loratch.torch_hf_load_model_lora("single", tmp_path / "one")
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        assert torch.equal(loratch.torch_hf_forward("shard", ids), loratch.torch_hf_forward("single", ids))
    loratch.torch_hf_unload("shard")
    loratch.torch_hf_unload("single")


def test_concurrent_forwards_match_sequential(family_model: tuple[str, object, Path]) -> None:
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


def test_bfloat16_load_is_close_to_float32(tmp_path: Path) -> None:
    make_model("qwen2", tmp_path, seed=8)
    loratch.torch_hf_load_model_lora("f32", tmp_path)
    loratch.torch_hf_load_model_lora("bf16", tmp_path, {"dtype": "bfloat16"})
    ids = torch.randint(0, 97, (2, 10))
    with torch.no_grad():
        a = loratch.torch_hf_forward("f32", ids)
        b = loratch.torch_hf_forward("bf16", ids)
    assert b.dtype == torch.bfloat16
    assert (a - b.float()).abs().max().item() < 0.1 * max(1.0, a.abs().max().item())
    assert loratch.torch_hf_memory_usage("bf16") * 2 == loratch.torch_hf_memory_usage("f32")
    loratch.torch_hf_unload("f32")
    loratch.torch_hf_unload("bf16")


def test_two_models_in_threads_and_gil_released(tmp_path: Path) -> None:
    make_model("llama", tmp_path / "a", seed=9, num_hidden_layers=6, hidden_size=96, intermediate_size=256)
    make_model("qwen3", tmp_path / "b", seed=10)
    loratch.torch_hf_load_model_lora("ta", tmp_path / "a")
    loratch.torch_hf_load_model_lora("tb", tmp_path / "b")
    xa, xb = torch.randint(0, 97, (4, 64)), torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        ea, eb = loratch.torch_hf_forward("ta", xa), loratch.torch_hf_forward("tb", xb)
    out: dict[str, torch.Tensor] = {}
    ticks = 0
    done = threading.Event()

    def work(name: str, x: torch.Tensor) -> None:
        with torch.no_grad():
            for _ in range(5):
                out[name] = loratch.torch_hf_forward(name, x)

    def ticker() -> None:  # pure-Python work: progresses only while the forwards release the GIL
        nonlocal ticks
        while not done.is_set():
            ticks += 1

    threads = [threading.Thread(target=work, args=a) for a in (("ta", xa), ("tb", xb))]
    tick = threading.Thread(target=ticker)
    tick.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    done.set()
    tick.join()
    assert torch.equal(out["ta"], ea) and torch.equal(out["tb"], eb)
    assert ticks > 1000
    loratch.torch_hf_unload("ta")
    loratch.torch_hf_unload("tb")
