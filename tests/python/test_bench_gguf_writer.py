"""benches/gguf_random.py, the GGUF writer of the memory table (and of tests that need a GGUF):
its files read back as llama.cpp's converter would have written them."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benches"))
from gguf_random import SHAPES, LlamaShape, gguf_name, write_llama_gguf, write_random_llama_gguf  # noqa: E402


def test_float_tensors_load_in_transformers_with_equal_logits(tmp_path: Path) -> None:
    """An F32 file of a model's tensors: transformers (which undoes llama.cpp's q/k row
    permutation) gives the original model's logits bit for bit; Q8_0 to its rounding."""
    import transformers as tf

    shape = SHAPES["tiny"]
    cfg = {k: v for k, v in shape.hf_config().items() if k not in ("architectures", "torch_dtype")}
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(**cfg)).eval()
    ids = torch.randint(0, shape.vocab_size, (1, 12))
    for qtype, bound in (("F32", 0.0), ("Q8_0", 0.05)):
        write_llama_gguf(tmp_path / f"m-{qtype}.gguf", shape, model.state_dict(), qtype, tokenizer=None)
        other = tf.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=f"m-{qtype}.gguf", dtype=torch.float32)
        with torch.no_grad():
            diff = (other.eval()(ids).logits - model(ids).logits).abs().max().item()
        assert diff <= bound, (qtype, diff)


@pytest.mark.parametrize("qtype", ["F32", "F16", "Q4_0", "Q4_1", "Q8_0"])
def test_random_blocks_have_the_shapes_types_and_spread_asked_for(tmp_path: Path, qtype: str) -> None:
    shape = LlamaShape(64, 2, 4, 2, 128, 49408, False)  # untied head; vocab past SmolLM2's 49152
    path = write_random_llama_gguf(tmp_path / "r.gguf", shape, qtype, embed_type="Q8_0")
    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    assert set(tensors) == {gguf_name(n) for n, _ in shape.tensor_shapes()}
    for name, s in shape.tensor_shapes():
        t = tensors[gguf_name(name)]
        assert tuple(int(d) for d in t.shape[::-1]) == s, name  # GGUF dims are innermost-first
        want = "F32" if len(s) == 1 else ("Q8_0" if name == "model.embed_tokens.weight" else qtype)
        assert t.tensor_type.name == want, name
    w = gguf.quants.dequantize(tensors["blk.0.ffn_down.weight"].data, tensors["blk.0.ffn_down.weight"].tensor_type)
    assert 0.015 < float(np.std(w)) < 0.025
    assert np.all(gguf.quants.dequantize(tensors["output_norm.weight"].data, gguf.GGMLQuantizationType.F32) == 1)
    fields = reader.fields
    assert fields["general.architecture"].contents() == "llama"
    assert fields["llama.block_count"].contents() == 2
    assert fields["llama.attention.head_count_kv"].contents() == 2
    tokens = fields["tokenizer.ggml.tokens"].contents()
    assert len(tokens) == 49408 and tokens[-1] == "[PAD49407]"
    assert fields["tokenizer.ggml.token_type"].contents()[-1] == int(gguf.TokenType.UNUSED)


def test_the_padded_tokenizer_encodes_as_smollm2(tmp_path: Path) -> None:
    import transformers as tf

    from loratch import torch_hf_tokenizer_load
    from loratch.default_model import default_model_dir

    write_random_llama_gguf(tmp_path / "t.gguf", LlamaShape(64, 1, 4, 2, 128, 49408, True), "Q8_0")
    tok = tf.AutoTokenizer.from_pretrained(tmp_path, gguf_file="t.gguf")
    text = "What permits do I need to build an extension in Zaragoza?"
    want = torch_hf_tokenizer_load(default_model_dir()).encode(text, add_special_tokens=False)
    assert tok.encode(text, add_special_tokens=False) == want
