"""Writes the seed corpora of the fuzz targets: small valid (and a few near-valid) inputs, one
folder per target. Run with a Python that has torch and safetensors (the project's venv):

    python fuzz/gen_seeds.py OUT_DIR

Every file is a few KB at most; libFuzzer mutates from here.
"""

from __future__ import annotations

import io
import json
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import save as st_save

torch.manual_seed(0)


def write(out: Path, target: str, name: str, data: bytes | str) -> None:
    d = out / target
    d.mkdir(parents=True, exist_ok=True)
    raw = data.encode() if isinstance(data, str) else data
    assert len(raw) < 10_000, (target, name, len(raw))
    (d / name).write_bytes(raw)


def torch_bytes(obj: object, **kw: object) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf, **kw)  # type: ignore[arg-type]
    return buf.getvalue()


def peft_keys(modules: list[str], rank: int, d_in: int, d_out: int) -> dict[str, torch.Tensor]:
    t = {}
    for m in modules:
        t[f"base_model.model.{m}.lora_A.weight"] = torch.randn(rank, d_in)
        t[f"base_model.model.{m}.lora_B.weight"] = torch.randn(d_out, rank)
    return t


def adapter_config(**over: object) -> dict[str, object]:
    cfg: dict[str, object] = {
        "alpha_pattern": {}, "base_model_name_or_path": "m", "bias": "none", "fan_in_fan_out": False,
        "inference_mode": True, "init_lora_weights": True, "layers_pattern": None, "layers_to_transform": None,
        "lora_alpha": 16, "lora_dropout": 0.05, "modules_to_save": None, "peft_type": "LORA", "r": 4,
        "rank_pattern": {}, "target_modules": ["q_proj", "v_proj"], "task_type": "CAUSAL_LM",
        "use_dora": False, "use_rslora": False,
    }
    cfg.update(over)
    return cfg


def gguf_bytes(build: Callable[[Any], None]) -> bytes:
    """A GGUF file written by gguf-py's GGUFWriter; `build(writer)` adds keys and tensors."""
    import tempfile

    from gguf import GGUFWriter

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "seed.gguf"
        w = GGUFWriter(path, "llama")
        build(w)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return path.read_bytes()


def gguf_seeds(out: Path) -> None:
    import numpy as np
    from gguf import GGMLQuantizationType as T
    from gguf import GGUFValueType as V
    from gguf import quants

    rng = np.random.default_rng(0)

    def model(w: Any) -> None:
        w.add_uint32("llama.block_count", 1)
        w.add_float32("llama.rope.freq_base", 10000.0)
        w.add_bool("tokenizer.ggml.add_bos_token", True)
        w.add_array("tokenizer.ggml.tokens", ["<s>", "a", "b"])
        w.add_array("tokenizer.ggml.token_type", [3, 1, 1])
        w.add_tensor("token_embd.weight", rng.standard_normal((3, 8)).astype(np.float32))
        w.add_tensor("blk.0.attn_q.weight", rng.standard_normal((2, 8)).astype(np.float16))
        x = rng.standard_normal((2, 32)).astype(np.float32)
        w.add_tensor("blk.0.ffn_up.weight", quants.quantize(x, T.Q8_0), raw_dtype=T.Q8_0)
        w.add_tensor("blk.0.ffn_down.weight", quants.quantize(x, T.Q4_0), raw_dtype=T.Q4_0)

    def kquants(w: Any) -> None:
        for ty in (T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.Q4_1, T.Q5_0, T.Q5_1, T.BF16):
            block, size = quants.GGML_QUANT_SIZES[ty]
            raw = np.zeros((1, size * (2 if block == 1 else 1)), dtype=np.uint8)
            raw[0, : min(size, 64)] = rng.integers(0, 256, min(size, 64), dtype=np.uint8)
            w.add_tensor(f"t.{ty.name}", raw, raw_dtype=ty)

    def metadata(w: Any) -> None:
        for k, t, v in [("u8", V.UINT8, 1), ("i16", V.INT16, -2), ("u64", V.UINT64, 3), ("f64", V.FLOAT64, 0.5),
                        ("s", V.STRING, "x")]:
            w.add_key_value(f"k.{k}", v, t)
        w.add_key_value("k.nested", [[1, 2], [3]], V.ARRAY)
        w.add_key_value("general.alignment", 64, V.UINT32)

    write(out, "gguf", "model", gguf_bytes(model))
    write(out, "gguf", "kquants", gguf_bytes(kquants))
    write(out, "gguf", "metadata", gguf_bytes(metadata))


def main(out: Path) -> None:
    mods = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]

    # safetensors: adapters, model-weight-like files, every dtype, empty and scalar tensors.
    write(out, "safetensors", "peft", st_save(peft_keys(mods, 2, 8, 8), {"format": "pt"}))
    write(out, "safetensors", "single-file-adapter",
          st_save(peft_keys(mods[:1], 2, 4, 4), {"format": "pt", "adapter_config": json.dumps(adapter_config(r=2))}))
    dtypes = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32,
              torch.int16, torch.int8, torch.uint8, torch.bool]
    write(out, "safetensors", "dtypes", st_save({str(dt): (torch.arange(6) % 2).to(dt).reshape(2, 3) for dt in dtypes}))
    write(out, "safetensors", "empty-and-scalar", st_save({"e": torch.zeros(0, 3), "s": torch.tensor(1.5)}))
    write(out, "safetensors", "no-tensors", st_save({}, {"k": "v"}))
    write(out, "safetensors", "fp8", st_save({"f8": torch.zeros(4, dtype=torch.float8_e4m3fn)}))

    # single-layer adapter files (loratch's LoraLinear format) for a 6 -> 5 layer, rank 2, alpha 4.
    meta = {"format": "pt", "loratch_format": "loratch.lora_linear", "rank": "2", "alpha": "4",
            "dropout": "0", "use_rslora": "false", "in_features": "6", "out_features": "5"}
    ab = {"lora_A.weight": torch.randn(2, 6), "lora_B.weight": torch.randn(5, 2)}
    write(out, "linear_adapter", "valid", st_save(ab, meta))
    write(out, "linear_adapter", "bf16", st_save({k: v.bfloat16() for k, v in ab.items()}, meta))
    write(out, "linear_adapter", "nan", st_save({**ab, "lora_B.weight": torch.full((5, 2), float("nan"))}, meta))
    write(out, "linear_adapter", "rank-3", st_save({"lora_A.weight": torch.randn(3, 6), "lora_B.weight": torch.randn(5, 3)},
                                                   {**meta, "rank": "3"}))

    # torch.save files: PEFT's adapter_model.bin, views sharing a storage, Parameters, dtypes.
    write(out, "torch_pickle", "peft-bin", torch_bytes(peft_keys(mods, 2, 4, 4)))
    base = torch.arange(24, dtype=torch.float32)
    write(out, "torch_pickle", "shared-views",
          torch_bytes(OrderedDict(a=base.view(4, 6), b=base[6:18].view(3, 4), c=base.view(4, 6).t(), d=base[::5])))
    write(out, "torch_pickle", "parameter", torch_bytes({"p": torch.nn.Parameter(torch.randn(2, 3))}))
    write(out, "torch_pickle", "dtypes", torch_bytes({str(dt): torch.ones(3, dtype=dt) for dt in dtypes}))
    write(out, "torch_pickle", "empty", torch_bytes({"e": torch.zeros(0, 4), "s": torch.tensor(2.0)}))
    write(out, "torch_pickle", "non-tensor-values", torch_bytes({"f": 1.5, "i": 3, "s": "x", "n": None}))
    write(out, "torch_pickle", "legacy-format", torch_bytes({"a": torch.ones(2)}, _use_new_zipfile_serialization=False))

    # adapter_config.json: PEFT's defaults and the features loratch reads.
    write(out, "adapter_config", "peft", json.dumps(adapter_config(), indent=2))
    write(out, "adapter_config", "patterns", json.dumps(adapter_config(
        rank_pattern={"q_proj": 8, r"layers\.1\..*": 2}, alpha_pattern={"v_proj": 32.5}, use_rslora=True,
        layers_to_transform=[0, 1], target_modules="all-linear")))
    write(out, "adapter_config", "regex-targets", json.dumps(adapter_config(target_modules=r".*\.(q|k)_proj", layers_to_transform=1)))
    write(out, "adapter_config", "null-targets", json.dumps({"r": 2, "lora_alpha": 4, "target_modules": None}))
    write(out, "adapter_config", "unsupported", json.dumps(adapter_config(use_dora=True, bias="all", modules_to_save=["lm_head"])))

    # config.json of each supported architecture.
    smol = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 49152, "hidden_size": 576,
            "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
            "rms_norm_eps": 1e-5, "rope_theta": 100000, "tie_word_embeddings": True, "eos_token_id": 2,
            "hidden_act": "silu", "max_position_embeddings": 8192}
    write(out, "model_config", "smollm2", json.dumps(smol, indent=2))
    write(out, "model_config", "llama31", json.dumps({**smol, "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}, "eos_token_id": [128001, 128008], "attention_bias": False}))
    write(out, "model_config", "mistral", json.dumps({**smol, "architectures": ["MistralForCausalLM"],
                                                      "sliding_window": None, "head_dim": 64}))
    write(out, "model_config", "qwen2", json.dumps({**smol, "architectures": ["Qwen2ForCausalLM"],
                                                    "use_sliding_window": False, "sliding_window": 4096}))
    write(out, "model_config", "qwen3", json.dumps({**smol, "architectures": ["Qwen3ForCausalLM"], "head_dim": 128,
                                                    "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}))

    # training records: every shape, JSONL and a JSON array.
    recs = {
        "text": {"text": "hello world"},
        "prompt-completion": {"prompt": "2+2=", "completion": "4"},
        "alpaca": {"instruction": "Add.", "input": "2 and 2", "output": "4"},
        "instruction-response": {"instruction": "Say hi.", "response": "hi"},
        "messages": {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                                  {"role": "assistant", "content": "hello"}]},
        "sharegpt": {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
    }
    for name, r in recs.items():
        write(out, "records", f"{name}.jsonl", "\n".join(json.dumps(r) for _ in range(3)) + "\n\n")
        write(out, "records", f"{name}.json", json.dumps([r, r], indent=1))

    # GGUF files (gguf-py's writer): a tiny model, K-quant and other block types, metadata kinds.
    gguf_seeds(out)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: gen_seeds.py OUT_DIR")
    main(Path(sys.argv[1]))
