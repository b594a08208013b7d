"""GGUF files of tiny random models for the tests, written with gguf-py as llama.cpp's converter
writes them: llama.cpp tensor names, `<arch>.*` hyper-parameters, q/k rows of Llama weights
permuted, projections in the requested block formats (gguf-py's own quantizer; K-quants, which it
cannot make, as random blocks with finite scales), and a tokenizer (SmolLM2's, copied from the
default model's GGUF when the vocabulary sizes agree, else a small byte-level one)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

PROJECTIONS = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
NORMS = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
}
ARCH = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}


def permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp converter's q/k row order (the inverse of transformers' reverse_permute)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def random_blocks(qtype: Any, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Random blocks of `qtype` whose f16 scales are small and finite (a random K-quant tensor)."""
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[qtype]
    nblocks = rows * cols // block
    raw = rng.integers(0, 256, size=(nblocks, size), dtype=np.uint8)
    # Every f16 field of a K-quant sits at an even offset; write small scales where the layout
    # keeps them (the block's last 2 or 4 bytes for Q2_K/Q3_K/Q6_K, its first 4 bytes otherwise).
    scale = rng.uniform(1e-5, 5e-5, size=(nblocks, 2)).astype(np.float16).view(np.uint8)
    name = qtype.name
    if name in ("Q2_K", "Q4_K", "Q5_K"):
        if name == "Q2_K":
            raw[:, -4:] = scale
        else:
            raw[:, :4] = scale
    elif name in ("Q3_K", "Q6_K"):
        raw[:, -2:] = scale[:, :2]
    else:
        raise ValueError(f"random_blocks: not a K-quant: {name}")
    return raw.reshape(rows, cols // block * size)


def write_gguf(
    model: Any,
    path: Path,
    projection_type: str = "F32",
    types: dict[str, str] | None = None,
    embedding_type: str = "F32",
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Writes the transformers `model` as a GGUF at `path`: projections in `projection_type`
    (a GGMLQuantizationType name; `types` overrides it per projection short name such as
    "ffn_down"), the embedding/head in `embedding_type`, norms in F32. Returns the float32
    weights transformers will read back from the file (dequantized; random K-quant blocks
    replace the model's values), by checkpoint key, for tests that need them."""
    import gguf
    from gguf.quants import dequantize, quantize

    cfg = model.config
    arch = ARCH[cfg.architectures[0]]
    w = gguf.GGUFWriter(str(path), arch)
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_theta if hasattr(cfg, "rope_theta") else cfg.rope_parameters["rope_theta"])
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    if arch == "qwen3" or head_dim != cfg.hidden_size // heads:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(0)
    write_tokenizer(w, cfg.vocab_size)
    rng = np.random.default_rng(seed)
    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    readback: dict[str, np.ndarray] = {}

    def add(name: str, key: str, value: np.ndarray, qname: str, rows_permuted: int = 0) -> None:
        qtype = gguf.GGMLQuantizationType[qname]
        stored = permute(value, rows_permuted) if rows_permuted else value
        if qname == "F32":
            data, raw = stored.astype(np.float32), None
        elif qname in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"):
            data, raw = random_blocks(qtype, *stored.shape, rng), qtype
        else:
            data, raw = quantize(stored.astype(np.float32), qtype), qtype
        w.add_tensor(name, data, raw_dtype=raw)
        back = dequantize(data, qtype) if raw is not None else data
        back = back.reshape(stored.shape).astype(np.float32)
        if rows_permuted:  # undo llama.cpp's permutation: the checkpoint's row order
            back = back.reshape(rows_permuted, back.shape[0] // rows_permuted // 2, 2, *back.shape[1:])
            back = back.swapaxes(1, 2).reshape(stored.shape)
        readback[key] = back

    add("token_embd.weight", "model.embed_tokens.weight", state["model.embed_tokens.weight"], embedding_type)
    for i in range(cfg.num_hidden_layers):
        for hf, short in NORMS.items():
            key = f"model.layers.{i}.{hf}.weight"
            if key in state:
                add(f"blk.{i}.{short}.weight", key, state[key], "F32")
        for hf, short in PROJECTIONS.items():
            key = f"model.layers.{i}.{hf}.weight"
            qname = (types or {}).get(short, projection_type)
            perm = {"attn_q": heads, "attn_k": kv}.get(short, 0) if arch == "llama" else 0
            add(f"blk.{i}.{short}.weight", key, state[key], qname, perm)
            bias = f"model.layers.{i}.{hf}.bias"
            if bias in state:
                add(f"blk.{i}.{short}.bias", bias, state[bias], "F32", perm)
    add("output_norm.weight", "model.norm.weight", state["model.norm.weight"], "F32")
    if not cfg.tie_word_embeddings:
        add("output.weight", "lm_head.weight", state["lm_head.weight"], embedding_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return readback


def write_tokenizer(w: Any, vocab: int) -> None:
    """SmolLM2's tokenizer keys (from the default model's GGUF) when `vocab` is its 49152, else a
    byte-level BPE of `vocab` tokens: single characters and one merge."""
    if vocab == 49152:
        import gguf
        from loratch.default_model import gguf_path

        src = gguf.GGUFReader(str(gguf_path()))
        for field in src.fields.values():
            if not field.name.startswith("tokenizer."):
                continue
            value = field.contents()
            if field.name == "tokenizer.ggml.tokens":
                w.add_token_list(value)
            elif field.name == "tokenizer.ggml.merges":
                w.add_token_merges(value)
            elif field.name == "tokenizer.ggml.token_type":
                w.add_token_types(value)
            elif field.name == "tokenizer.ggml.model":
                w.add_tokenizer_model(value)
            elif field.name == "tokenizer.ggml.pre":
                w.add_tokenizer_pre(value)
            elif field.name == "tokenizer.chat_template":
                w.add_chat_template(value)
            elif isinstance(value, bool):
                w.add_bool(field.name, value)
            elif isinstance(value, int):
                w.add_uint32(field.name, value)
        return
    tokens = [chr(0x100 + i) if i >= 94 else chr(33 + i) for i in range(vocab - 1)] + ['!"']
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([1] * vocab)
    w.add_token_merges(['! "'])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)


def hf_from_gguf(path: Path) -> Any:
    """transformers' model of the GGUF at `path` (float32, eval mode)."""
    import transformers as tf

    return tf.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
