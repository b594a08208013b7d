"""Llama-family GGUF files as llama.cpp's converter writes them, for benchmarks and tests.

Two writers, one layout:

- `write_random_llama_gguf(path, shape, "Q4_0")`: random quantized blocks written straight to
  the file, one tensor at a time (an 8B-shaped Q4_0 file is ~4.5 GB and never exists as floats,
  in memory or on disk). Each block gets a float16 scale near `std / (std of the block's codes)`,
  so the weights have about `std` (0.02) standard deviation, as a fresh Hugging Face init.
- `write_llama_gguf(path, shape, tensors, "Q8_0")`: given float tensors under Hugging Face names
  (`model.layers.0.self_attn.q_proj.weight`, ...), quantized with gguf-py's `quantize` (so they
  dequantize exactly as gguf-py's `dequantize`, which transformers uses) and with q/k rows
  permuted as llama.cpp's `convert_hf_to_gguf.py` permutes them. A test can load the same
  tensors as a float checkpoint and compare.

What the file holds (as `convert_hf_to_gguf.py` + `llama-quantize` write a Llama model):

- keys: `general.architecture = "llama"`, `general.type = "model"`, `general.name`,
  `general.file_type` (llama.cpp's `LlamaFileType` of the projections' type),
  `general.quantization_version = 2`, `llama.vocab_size`, `llama.context_length`,
  `llama.embedding_length`, `llama.block_count`, `llama.feed_forward_length`,
  `llama.attention.head_count`, `llama.attention.head_count_kv`, `llama.rope.freq_base`,
  `llama.rope.dimension_count` (head_dim), `llama.attention.layer_norm_rms_epsilon`,
  `llama.attention.key_length` / `value_length` (only when head_dim != hidden / heads, as the
  converter does). No rope scaling (no `rope_freqs.weight`): the random shapes use plain rope.
- tensors: `token_embd.weight`, `output_norm.weight`, `output.weight` (only when the head is not
  tied), and per layer `blk.N.attn_norm`, `attn_q`, `attn_k`, `attn_v`, `attn_output`,
  `ffn_norm`, `ffn_gate`, `ffn_up`, `ffn_down` (`.weight`). Norms are F32 (ones in the random
  files); the embedding, projections and head take the requested type unless `embed_type` /
  `output_type` say otherwise.
- tokenizer (`tokenizer="smollm2"`, the default): SmolLM2's gpt2 BPE tokenizer copied from the
  default model's GGUF (`tokenizer.ggml.model/pre/tokens/token_type/merges`, bos/eos/unk/pad
  ids, `add_bos_token`, `add_space_prefix`, `tokenizer.chat_template`), its token list padded to
  the shape's vocabulary with `[PAD{i}]` tokens of type UNUSED, which is what the converter does
  when a model's embedding has more rows than its tokenizer has tokens. So text encodes to the
  same ids as with SmolLM2 (all < 49152). Needs vocab >= 49152. `tokenizer="bytes"`: a byte-level
  gpt2 tokenizer (256 byte tokens, no merges, `<|endoftext|>` as bos/eos) for tiny vocabularies;
  `tokenizer=None`: no tokenizer keys.

`python benches/gguf_random.py OUT.gguf --shape 8b --type Q4_0` writes one file.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

import gguf
from gguf import GGMLQuantizationType as Q


@dataclasses.dataclass(frozen=True)
class LlamaShape:
    """The hyper-parameters of a Llama-family decoder (Hugging Face `LlamaConfig` names)."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool
    rope_theta: float = 500000.0
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 131072
    head_dim: int | None = None  # None: hidden_size / num_attention_heads

    @property
    def head_dim_(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    def hf_config(self) -> dict[str, Any]:
        """`config.json` of a `LlamaForCausalLM` of this shape."""
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
            "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers, "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads, "head_dim": self.head_dim_,
            "vocab_size": self.vocab_size, "tie_word_embeddings": self.tie_word_embeddings,
            "rope_theta": self.rope_theta, "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings, "attention_bias": False,
            "mlp_bias": False, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16",
        }

    def tensor_shapes(self) -> Iterator[tuple[str, tuple[int, ...]]]:
        """(Hugging Face name, PyTorch shape) of every weight, in checkpoint order."""
        h, f, d = self.hidden_size, self.intermediate_size, self.head_dim_
        yield "model.embed_tokens.weight", (self.vocab_size, h)
        for i in range(self.num_hidden_layers):
            p = f"model.layers.{i}."
            yield p + "input_layernorm.weight", (h,)
            yield p + "self_attn.q_proj.weight", (self.num_attention_heads * d, h)
            yield p + "self_attn.k_proj.weight", (self.num_key_value_heads * d, h)
            yield p + "self_attn.v_proj.weight", (self.num_key_value_heads * d, h)
            yield p + "self_attn.o_proj.weight", (h, self.num_attention_heads * d)
            yield p + "post_attention_layernorm.weight", (h,)
            yield p + "mlp.gate_proj.weight", (f, h)
            yield p + "mlp.up_proj.weight", (f, h)
            yield p + "mlp.down_proj.weight", (h, f)
        yield "model.norm.weight", (h,)
        if not self.tie_word_embeddings:
            yield "lm_head.weight", (self.vocab_size, h)

    def n_params(self) -> int:
        return sum(int(np.prod(s)) for _, s in self.tensor_shapes())


#: Llama-3.2-1B, Llama-3.2-3B and Llama-3.1-8B shapes (their config.json, without rope scaling),
#: SmolLM2-135M's, and a tiny one for tests.
SHAPES: dict[str, LlamaShape] = {
    "135m": LlamaShape(576, 30, 9, 3, 1536, 49152, True, rope_theta=100000.0, max_position_embeddings=8192),
    "1b": LlamaShape(2048, 16, 32, 8, 8192, 128256, True),
    "3b": LlamaShape(3072, 28, 24, 8, 8192, 128256, True),
    "8b": LlamaShape(4096, 32, 32, 8, 14336, 128256, False),
    "tiny": LlamaShape(64, 2, 4, 2, 128, 49152, True, rope_theta=10000.0, max_position_embeddings=2048),
}

_LAYER_NAMES = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}
_FILE_TYPE = {
    Q.F32: gguf.LlamaFileType.ALL_F32, Q.F16: gguf.LlamaFileType.MOSTLY_F16, Q.BF16: gguf.LlamaFileType.MOSTLY_BF16,
    Q.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0, Q.Q4_1: gguf.LlamaFileType.MOSTLY_Q4_1,
    Q.Q5_0: gguf.LlamaFileType.MOSTLY_Q5_0, Q.Q5_1: gguf.LlamaFileType.MOSTLY_Q5_1,
    Q.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0,
}


def gguf_name(hf_name: str) -> str:
    """llama.cpp's tensor name of a Hugging Face Llama weight."""
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    if hf_name == "lm_head.weight":
        return "output.weight"
    _, _, layer, rest = hf_name.split(".", 3)
    module = rest.removesuffix(".weight")
    return f"blk.{layer}.{_LAYER_NAMES[module]}.weight"


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter's `permute` of q/k rows (rotary halves interleaved per head)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _qtype(t: str | Q) -> Q:
    return t if isinstance(t, Q) else Q[t.upper()]


def _tensor_type(hf_name: str, shape: tuple[int, ...], qtype: Q, embed_type: Q | None, output_type: Q | None) -> Q:
    if len(shape) == 1:
        return Q.F32
    if hf_name == "model.embed_tokens.weight" and embed_type is not None:
        return embed_type
    if hf_name == "lm_head.weight" and output_type is not None:
        return output_type
    return qtype


# --- tokenizers -----------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _smollm2_tokenizer_fields() -> dict[str, Any]:
    """The default model's GGUF `tokenizer.*` values (read once: seconds for 49152 tokens)."""
    from gguf import GGUFReader

    from loratch.default_model import gguf_path

    fields = GGUFReader(gguf_path()).fields
    return {k: fields[k].contents() for k in fields if k.startswith("tokenizer.")}


def _smollm2_tokenizer(vocab: int) -> dict[str, Any]:
    value = dict(_smollm2_tokenizer_fields())
    tokens, types = list(value["tokenizer.ggml.tokens"]), list(value["tokenizer.ggml.token_type"])
    if vocab < len(tokens):
        raise ValueError(f"tokenizer 'smollm2' has {len(tokens)} tokens, more than the shape's vocab {vocab}")
    tokens += [f"[PAD{i}]" for i in range(len(tokens), vocab)]
    types += [int(gguf.TokenType.UNUSED)] * (vocab - len(types))
    value["tokenizer.ggml.tokens"], value["tokenizer.ggml.token_type"] = tokens, types
    return value


def _byte_tokenizer(vocab: int) -> dict[str, Any]:
    # GPT-2's byte-to-unicode table: the printable bytes map to themselves, the rest above 255.
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    extra = iter(range(256, 512))
    chars = {b: chr(b) if b in printable else chr(next(extra)) for b in range(256)}
    tokens = [chars[b] for b in range(256)] + ["<|endoftext|>"]
    if vocab < len(tokens):
        raise ValueError(f"tokenizer 'bytes' needs vocab >= {len(tokens)}, got {vocab}")
    types = [int(gguf.TokenType.NORMAL)] * 256 + [int(gguf.TokenType.CONTROL)]
    tokens += [f"[PAD{i}]" for i in range(len(tokens), vocab)]
    types += [int(gguf.TokenType.UNUSED)] * (vocab - len(types))
    return {
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "default", "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": [],
        "tokenizer.ggml.bos_token_id": 256, "tokenizer.ggml.eos_token_id": 256,
        "tokenizer.ggml.add_bos_token": False,
    }


def _add_tokenizer(w: gguf.GGUFWriter, kind: str | None, vocab: int) -> None:
    if kind is None:
        return
    value = {"smollm2": _smollm2_tokenizer, "bytes": _byte_tokenizer}[kind](vocab)
    w.add_tokenizer_model(value["tokenizer.ggml.model"])
    w.add_tokenizer_pre(value["tokenizer.ggml.pre"])
    w.add_token_list(value["tokenizer.ggml.tokens"])
    w.add_token_types(value["tokenizer.ggml.token_type"])
    w.add_token_merges(value["tokenizer.ggml.merges"])
    setters: dict[str, Callable[[Any], None]] = {
        "tokenizer.ggml.bos_token_id": w.add_bos_token_id, "tokenizer.ggml.eos_token_id": w.add_eos_token_id,
        "tokenizer.ggml.unknown_token_id": w.add_unk_token_id, "tokenizer.ggml.padding_token_id": w.add_pad_token_id,
        "tokenizer.ggml.add_bos_token": w.add_add_bos_token, "tokenizer.ggml.add_space_prefix": w.add_add_space_prefix,
        "tokenizer.chat_template": w.add_chat_template,
    }
    for key, setter in setters.items():
        if key in value:
            setter(value[key])


# --- the file --------------------------------------------------------------------------------------


def _writer(path: Path, shape: LlamaShape, qtype: Q, name: str, tokenizer: str | None) -> gguf.GGUFWriter:
    w = gguf.GGUFWriter(path, "llama")
    w.add_type("model")
    w.add_name(name)
    w.add_vocab_size(shape.vocab_size)
    w.add_context_length(shape.max_position_embeddings)
    w.add_embedding_length(shape.hidden_size)
    w.add_block_count(shape.num_hidden_layers)
    w.add_feed_forward_length(shape.intermediate_size)
    w.add_head_count(shape.num_attention_heads)
    w.add_head_count_kv(shape.num_key_value_heads)
    w.add_rope_freq_base(shape.rope_theta)
    w.add_layer_norm_rms_eps(shape.rms_norm_eps)
    w.add_rope_dimension_count(shape.head_dim_)
    if shape.head_dim_ != shape.hidden_size // shape.num_attention_heads:
        w.add_key_length(shape.head_dim_)
        w.add_value_length(shape.head_dim_)
    w.add_file_type(int(_FILE_TYPE.get(qtype, gguf.LlamaFileType.GUESSED)))
    _add_tokenizer(w, tokenizer, shape.vocab_size)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    return w


def _nbytes(shape: tuple[int, ...], qtype: Q) -> int:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    if shape[-1] % block:
        raise ValueError(f"a row of {shape[-1]} values is not a whole number of {qtype.name} blocks of {block}")
    return int(np.prod(shape)) // block * size


def _stream(
    path: Path, shape: LlamaShape, qtype: Q, name: str, tokenizer: str | None,
    types: list[tuple[str, tuple[int, ...], Q]], data: Any,
) -> None:
    """Writes the header, then each tensor's bytes from `data(hf_name, shape, type)` in turn."""
    w = _writer(path, shape, qtype, name, tokenizer)
    for hf, s, t in types:
        w.add_tensor_info(gguf_name(hf), s, np.dtype(np.float32), _nbytes(s, t), raw_dtype=t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for hf, s, t in types:
        w.write_tensor_data(data(hf, s, t))
    w.close()


#: Standard deviation of the codes of a random block: uniform int8 (Q8_0), uniform 0..15 (Q4_*).
_CODE_STD = {Q.Q8_0: float(np.sqrt((256**2 - 1) / 12)), Q.Q4_0: float(np.sqrt((16**2 - 1) / 12)),
             Q.Q4_1: float(np.sqrt((16**2 - 1) / 12))}


def random_blocks(rng: np.random.Generator, n_values: int, qtype: Q, std: float) -> np.ndarray:
    """`n_values` random weights of `qtype`, about `std` standard deviation: normal floats for
    F32/F16, else random code bytes under a float16 scale per block (drawn within +-20% of
    `std / code std`; Q4_1's minimum centres the block on zero)."""
    if qtype == Q.F32:
        return rng.standard_normal(n_values, dtype=np.float32) * np.float32(std)
    if qtype == Q.F16:
        return (rng.standard_normal(n_values, dtype=np.float32) * np.float32(std)).astype(np.float16)
    if qtype not in _CODE_STD:
        raise ValueError(f"random blocks of {qtype.name} are not supported (F32, F16, Q4_0, Q4_1, Q8_0)")
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    nb = n_values // block
    blocks = rng.integers(0, 256, size=(nb, size), dtype=np.uint8)
    d = (rng.uniform(0.8, 1.2, nb) * (std / _CODE_STD[qtype])).astype(np.float16)
    blocks[:, 0:2] = d.view(np.uint8).reshape(nb, 2)
    if qtype == Q.Q4_1:
        blocks[:, 2:4] = (d.astype(np.float32) * -7.5).astype(np.float16).view(np.uint8).reshape(nb, 2)
    return blocks


def write_random_llama_gguf(
    path: str | Path, shape: LlamaShape, qtype: str | Q = "Q4_0", *, seed: int = 0, std: float = 0.02,
    tokenizer: str | None = "smollm2", embed_type: str | Q | None = None, output_type: str | Q | None = None,
    name: str = "random llama",
) -> Path:
    """A GGUF of `shape` with random weights of `qtype` (F32, F16, Q4_0, Q4_1, Q8_0), written one
    tensor at a time. Returns `path`."""
    path, q = Path(path), _qtype(qtype)
    e, o = (None if t is None else _qtype(t) for t in (embed_type, output_type))
    types = [(hf, s, _tensor_type(hf, s, q, e, o)) for hf, s in shape.tensor_shapes()]
    rng = np.random.default_rng(seed)

    def data(hf: str, s: tuple[int, ...], t: Q) -> np.ndarray:
        if len(s) == 1:
            return np.ones(s, dtype=np.float32)
        return random_blocks(rng, int(np.prod(s)), t, std)

    _stream(path, shape, q, name, tokenizer, types, data)
    return path


def write_llama_gguf(
    path: str | Path, shape: LlamaShape, tensors: Mapping[str, Any], qtype: str | Q = "F32", *,
    tokenizer: str | None = "smollm2", embed_type: str | Q | None = None, output_type: str | Q | None = None,
    name: str = "llama",
) -> Path:
    """A GGUF of `shape` holding `tensors` (Hugging Face names; numpy arrays or torch tensors),
    quantized to `qtype` with gguf-py (any type its `quantize` supports) after llama.cpp's q/k row
    permutation. Returns `path`."""
    path, q = Path(path), _qtype(qtype)
    e, o = (None if t is None else _qtype(t) for t in (embed_type, output_type))
    types = [(hf, s, _tensor_type(hf, s, q, e, o)) for hf, s in shape.tensor_shapes()]
    missing = [hf for hf, _, _ in types if hf not in tensors]
    if missing:
        raise KeyError(f"tensors missing: {missing[:5]}")

    def data(hf: str, s: tuple[int, ...], t: Q) -> np.ndarray:
        x = tensors[hf]
        x = np.asarray(x.detach().float().cpu().numpy() if hasattr(x, "detach") else x, dtype=np.float32)
        if tuple(x.shape) != s:
            raise ValueError(f"{hf}: shape {tuple(x.shape)}, expected {s}")
        if hf.endswith("q_proj.weight"):
            x = permute_rows(x, shape.num_attention_heads)
        elif hf.endswith("k_proj.weight"):
            x = permute_rows(x, shape.num_key_value_heads)
        out = gguf.quants.quantize(x, t)
        return np.ascontiguousarray(out)

    _stream(path, shape, q, name, tokenizer, types, data)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    ap.add_argument("--type", default="Q4_0", help="F32, F16, Q4_0, Q4_1 or Q8_0")
    ap.add_argument("--tokenizer", choices=["smollm2", "bytes", "none"], default="smollm2")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    write_random_llama_gguf(a.out, SHAPES[a.shape], a.type, seed=a.seed,
                            tokenizer=None if a.tokenizer == "none" else a.tokenizer)
    print(a.out, a.out.stat().st_size)


if __name__ == "__main__":
    main()
