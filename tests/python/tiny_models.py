"""Tiny random Llama-family models made with transformers and saved to a directory, for the
parity tests (no hub access: every model is built from a config here)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import torch

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "llama3-scaled", "llama-untied", "gemma2", "gemma3", "phi3", "phi3-longrope"]
#: The families added by issue 22 (their own test file, tests/python/test_families.py, covers what
#: the shared tests do not): each has a sliding window of WINDOW positions, so the shared tests'
#: sequences (up to 19 tokens) cross it.
NEW_FAMILIES = ["gemma2", "gemma3", "phi3", "phi3-longrope"]
WINDOW = 6


def tiny_config(family: str, **overrides: Any) -> Any:
    import transformers as tf

    common: dict[str, Any] = dict(
        vocab_size=97,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=True,
    )
    if family == "llama":
        cfg = tf.LlamaConfig(**common)
    elif family == "llama-untied":
        cfg = tf.LlamaConfig(**{**common, "tie_word_embeddings": False, "num_key_value_heads": 6})
    elif family == "llama3-scaled":
        cfg = tf.LlamaConfig(
            **{**common, "rope_theta": 500000.0},
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
        )
    elif family == "mistral":
        cfg = tf.MistralConfig(**{**common, "tie_word_embeddings": False}, sliding_window=None)
    elif family == "qwen2":
        cfg = tf.Qwen2Config(**common)
    elif family == "qwen3":
        cfg = tf.Qwen3Config(**{**common, "head_dim": 16})
    elif family == "gemma2":
        # Caps low enough to bite on the random weights' scores and logits.
        cfg = tf.Gemma2Config(
            **common, head_dim=16, query_pre_attn_scalar=24, sliding_window=WINDOW,
            attn_logit_softcapping=2.0, final_logit_softcapping=4.0, hidden_activation="gelu_pytorch_tanh",
        )
    elif family == "gemma3":
        cfg = tf.Gemma3TextConfig(
            **{**common, "num_hidden_layers": 3}, head_dim=16, query_pre_attn_scalar=24, sliding_window=WINDOW,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            rope_parameters={
                "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1000000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            },
        )
        cfg.architectures = ["Gemma3ForCausalLM"]
    elif family == "phi3":
        cfg = tf.Phi3Config(**{**common, "tie_word_embeddings": False}, sliding_window=WINDOW, pad_token_id=0,
                            eos_token_id=1, bos_token_id=2)
    elif family == "phi3-longrope":
        # Past 12 positions the long factors apply (the shared tests' 19-token rows switch).
        half = 4
        cfg = tf.Phi3Config(
            **{**common, "tie_word_embeddings": False, "max_position_embeddings": 48},
            original_max_position_embeddings=12, pad_token_id=0, eos_token_id=1, bos_token_id=2,
            rope_scaling={
                "rope_type": "longrope",
                "short_factor": [1.0 + 0.1 * i for i in range(half)],
                "long_factor": [1.5 + 0.5 * i for i in range(half)],
            },
        )
    else:
        raise ValueError(family)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def make_model(family: str, directory: Path, seed: int = 0, **overrides: Any) -> Any:
    """Builds a random model of `family`, saves it (safetensors) to `directory`, returns it in
    eval mode with fp32 weights."""
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tiny_config(family, **overrides)
    model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # larger weights than the default init exercise more of the math
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif p.dim() == 1:
                p.normal_(0.0, 0.1)
            else:
                p.normal_(0.0, 0.08)
    model.eval()
    model.save_pretrained(directory)
    return model


TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"]
TOPICS = ["building permits", "roof repairs", "drainage", "facade changes", "extensions", "fire safety"]


def tokenizer_source() -> Path:
    """Where SmolLM2's tokenizer files are taken from: $LORATCH_TOKENIZER_DIR (set by
    benches/gpu.sh on the GPU machine, which has no default model), else the default model."""
    import os

    env = os.environ.get("LORATCH_TOKENIZER_DIR")
    if env:
        return Path(env)
    from loratch.default_model import default_model_dir

    return default_model_dir()


def make_trainable_model(directory: Path, seed: int = 0) -> Any:
    """A tiny random Llama with SmolLM2's vocabulary size and its tokenizer files (copied from the
    default model), so the trainer can tokenize real text for it. Returns the transformers model."""
    import shutil

    model = make_model("llama", directory, seed=seed, vocab_size=49152)
    source = tokenizer_source()
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy(source / name, directory / name)
    return model


def write_records(path: Path, n: int = 24) -> None:
    """Alpaca records whose answers share their wording: learnable by a tiny random model."""
    import json

    with path.open("w", encoding="utf-8") as f:
        for i in range(n):
            topic = TOPICS[i % len(TOPICS)]
            record = {
                "instruction": f"Question {i}: who handles {topic}?",
                "input": "In Helsingborg." if i % 3 == 0 else "",
                "output": f"The municipality handles {topic}. Ask the building committee first.",
            }
            f.write(json.dumps(record) + "\n")


def trainer_toml(model_dir: Path, out: Path, *, seed: int, lora: dict[str, Any], training: dict[str, Any]) -> str:
    """A `loratch train` TOML config over `model_dir` and its `data.jsonl` (validation split 0.2)."""
    def table(values: dict[str, Any]) -> str:
        return "\n".join(f"{k} = {json.dumps(v)}" for k, v in values.items())

    head = textwrap.dedent(
        f"""\
        model = {json.dumps(str(model_dir))}
        data = {json.dumps(str(model_dir / "data.jsonl"))}
        output_dir = {json.dumps(str(out))}
        seed = {seed}
        validation_split = 0.2
        """
    )
    return f"{head}\n[lora]\n{table(lora)}\n\n[training]\n{table(training)}\n"
