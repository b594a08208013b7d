"""GGUF files as models: loratch's forward of a GGUF (its projections kept in their block formats
and decoded on use) equals transformers' model of the same file (`from_pretrained(gguf_file=)`),
`quantize` on load, the quantized bytes in the memory report, adapters trained on a GGUF base
loaded by PEFT over transformers' model of the file, merging, the CLI, and bad files."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from gguf_models import hf_from_gguf, write_gguf
from helpers import (
    assert_within_rounding,
    float32_errors,
    hf_model,
    max_diff,
    peft_logits,
    randomize_adapters,
    run_cli,
)
from tiny_models import make_model, write_records

import loratch

# Rows of 256 elements: every block format (K-quants hold 256 per block) fits every matrix.
SHAPE = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, head_dim=64)
ALL_TYPES = {  # one projection per block format, the rest Q8_0
    "attn_q": "Q4_0",
    "attn_k": "Q4_1",
    "attn_v": "Q5_0",
    "attn_output": "Q5_1",
    "ffn_gate": "Q2_K",
    "ffn_up": "Q3_K",
    "ffn_down": "Q4_K",
}
MORE_TYPES = {"attn_q": "Q5_K", "attn_k": "Q6_K", "attn_v": "F16", "attn_output": "BF16"}


@pytest.fixture(scope="module")
def ggufs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny GGUFs: Llama (q/k permuted) in every block format, Qwen2 (biases, untied F16 head),
    Qwen3 (q/k norms) and an F32 Llama."""
    d = tmp_path_factory.mktemp("gguf")
    out = {}
    specs: list[tuple[str, str, dict[str, Any], str, dict[str, str] | None, str]] = [
        ("llama-all", "llama", {}, "Q8_0", ALL_TYPES, "Q6_K"),
        ("llama-more", "llama", {}, "Q8_0", MORE_TYPES, "Q4_0"),
        ("llama-f32", "llama", {}, "F32", None, "F32"),
        ("qwen2", "qwen2", {"tie_word_embeddings": False}, "Q4_0", None, "F16"),
        # transformers' GGUF reader takes Qwen3's head_dim from its config default (128), not from
        # qwen3.attention.key_length: a 128-wide head keeps both readers on one shape.
        ("qwen3", "qwen3", {"num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 128}, "Q8_0", None, "Q8_0"),
    ]
    for name, family, extra, ptype, types, etype in specs:
        model = make_model(family, d / name, seed=len(out), vocab_size=97, **{**SHAPE, **extra})
        write_gguf(model, d / f"{name}.gguf", ptype, types, etype, seed=len(out))
        out[name] = d / f"{name}.gguf"
    return out


def ids_and_mask() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 97, (2, 13), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    return ids, mask


@pytest.mark.parametrize("name", ["llama-all", "llama-more", "llama-f32", "qwen2", "qwen3"])
def test_logits_equal_transformers_model_of_the_file(ggufs: dict[str, Path], name: str) -> None:
    """Same decoded values (loratch's decoders equal gguf-py's bit for bit), same products (each
    weight fits one decoding chunk, so the product is libtorch's own `linear` on it, or, for 16
    rows or more, tiles of 64k rows whose oneMKL sums equal it: csrc/quant_linear.cpp): equal bit
    for bit without padding."""
    path = ggufs[name]
    hf = hf_from_gguf(path)
    ids, mask = ids_and_mask()
    loratch.torch_hf_load_model_lora("g", path)
    try:
        with torch.no_grad():
            assert torch.equal(loratch.torch_hf_forward("g", ids), hf(ids).logits), name
            ours = loratch.torch_hf_forward("g", ids, mask)
        # Padded rows: transformers' masked attention kernel sums in other orders than
        # loratch's; equal to the float32 rounding the reference itself carries.
        ref, err = float32_errors(hf, lambda m: logits_of_masked(m, ids, mask))
        keep = mask.bool()
        assert_within_rounding(ours[keep], ref["logits"][keep], err["logits"], name)
    finally:
        loratch.torch_hf_unload("g")


def logits_of_masked(m: Any, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return {"logits": m(ids, attention_mask=mask).logits}


def gguf_bytes(path: Path) -> int:
    import gguf

    return sum(int(t.n_bytes) for t in gguf.GGUFReader(str(path)).tensors)


def test_quantized_bytes_are_what_memory_counts(ggufs: dict[str, Path]) -> None:
    """The weights take the file's bytes (blocks kept as stored, norms float32, the tied head
    shared with the embedding); "none" decodes them to float32 and changes no logit."""
    path = ggufs["llama-all"]
    ids, _ = ids_and_mask()
    loratch.torch_hf_load_model_lora("q", path)
    loratch.torch_hf_load_model_lora("f", path, {"quantize": "none"})
    try:
        report = loratch.torch_hf_memory_report("q")
        assert report["weights"] == gguf_bytes(path)
        params = sum(p.numel() for p in hf_from_gguf(path).parameters())
        assert loratch.torch_hf_memory_report("f")["weights"] == 4 * params
        assert loratch.torch_hf_memory_usage("q") < loratch.torch_hf_memory_usage("f") / 3
        with torch.no_grad():
            assert torch.equal(loratch.torch_hf_forward("q", ids), loratch.torch_hf_forward("f", ids))
    finally:
        loratch.torch_hf_unload("q")
        loratch.torch_hf_unload("f")


@pytest.mark.parametrize("qtype", ["q8_0", "q4_0"])
def test_quantize_on_load_equals_gguf_py_round_trip(tiny_model: Any, qtype: str) -> None:
    """`quantize` on a float checkpoint: the projections and the embedding become gguf-py's
    blocks (loratch's quantizer equals gguf-py's `quantize` bit for bit), so the logits equal
    transformers' on the weights gguf-py quantizes and decodes; memory shrinks to the blocks."""
    from gguf.quants import GGMLQuantizationType, dequantize, quantize

    d = tiny_model("llama", 3, vocab_size=97, **SHAPE)
    hf = hf_model(d)
    t = GGMLQuantizationType[qtype.upper()]
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if p.dim() == 2:
                q = dequantize(quantize(p.numpy(), t), t).reshape(p.shape)
                p.copy_(torch.from_numpy(np.ascontiguousarray(q)))
    loratch.torch_hf_load_model_lora("qd", d, {"quantize": qtype})
    ids, mask = ids_and_mask()
    try:
        with torch.no_grad():
            assert torch.equal(loratch.torch_hf_forward("qd", ids), hf(ids).logits)
        matrices = sum(p.numel() for p in hf.parameters() if p.dim() == 2)
        vectors = sum(p.numel() for p in hf.parameters() if p.dim() == 1)
        per_block = {"q8_0": 34, "q4_0": 18}[qtype]
        assert loratch.torch_hf_memory_report("qd")["weights"] == matrices // 32 * per_block + 4 * vectors
    finally:
        loratch.torch_hf_unload("qd")


def nf4_round_trip(w: np.ndarray) -> np.ndarray:
    """QLoRA's NF4 (bitsandbytes' code book, blocks of 64 scaled by their absmax), written out
    here in numpy as the reference: the code of x / absmax (a value on a midpoint between two
    codes takes the lower one, as bitsandbytes' CPU kernel), times absmax."""
    codes = np.array(
        [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
         -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
         0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
         0.7229568362236023, 1.0], dtype=np.float32)
    blocks = w.astype(np.float32).reshape(-1, 64)
    absmax = np.abs(blocks).max(axis=1, keepdims=True)
    # bitsandbytes' CPU quantize_4bit: scale by the reciprocal, clamp, count the midpoints below.
    scaled = np.clip(blocks * (np.float32(1) / np.maximum(absmax, np.float32(1e-38))), -1, 1)
    mids = ((codes[:-1] + codes[1:]) / np.float32(2)).astype(np.float32)
    idx = (mids < scaled[..., None]).sum(axis=-1)
    return (codes[idx] * absmax).reshape(w.shape)


def test_nf4_on_load_is_qlora_nf4(tiny_model: Any) -> None:
    d = tiny_model("llama", 3, vocab_size=97, **SHAPE)
    hf = hf_model(d)
    with torch.no_grad():
        for _, p in hf.named_parameters():
            if p.dim() == 2:
                p.copy_(torch.from_numpy(nf4_round_trip(p.numpy())))
    loratch.torch_hf_load_model_lora("n4", d, {"quantize": "nf4"})
    ids, _ = ids_and_mask()
    try:
        with torch.no_grad():
            assert torch.equal(loratch.torch_hf_forward("n4", ids), hf(ids).logits)
        matrices = sum(p.numel() for p in hf.parameters() if p.dim() == 2)
        vectors = sum(p.numel() for p in hf.parameters() if p.dim() == 1)
        assert loratch.torch_hf_memory_report("n4")["weights"] == matrices // 64 * 36 + 4 * vectors
    finally:
        loratch.torch_hf_unload("n4")


def test_adapter_on_gguf_base_loads_in_peft(ggufs: dict[str, Path], tmp_path: Path) -> None:
    """An adapter laid and changed on a GGUF base, saved in PEFT's format, loads in PEFT over
    transformers' model of the same file: logits and LoRA gradients agree. Forward: the same
    products in the same order (bit for bit). Gradients: the quantized node's input gradient is
    one `mm` as libtorch's, but the sums around it may associate differently; bound: the
    float32 error PEFT's own gradients carry (measured against float64), times the slack."""
    from peft import PeftModel

    path = ggufs["llama-all"]
    loratch.torch_hf_load_model_lora("pa", path)
    try:
        loratch.torch_hf_lora_init("pa", 8, 16.0, ["q_proj", "v_proj", "down_proj", "gate_proj"])
        randomize_adapters("pa", 0.05, seed=1)
        loratch.torch_hf_lora_save("pa", tmp_path / "adapter")
        ids, mask = ids_and_mask()
        pm = PeftModel.from_pretrained(hf_from_gguf(path), tmp_path / "adapter").eval()
        with torch.no_grad():
            theirs = pm(ids).logits
            assert torch.equal(loratch.torch_hf_forward("pa", ids), theirs)
        # With gradients recorded loratch runs its fused training kernels (float rounding apart).
        ours = loratch.torch_hf_forward("pa", ids)
        # Gradients of one loss through the quantized base.
        target = torch.randn_like(ours)
        (ours * target).sum().backward()
        grads = {n: p.grad.clone() for n, p in loratch.torch_hf_lora_named_parameters("pa").items()}
        for p in pm.parameters():
            p.requires_grad_(False)
        lora = {k.replace(".default", ""): v for k, v in pm.named_parameters() if "lora_" in k}
        for v in lora.values():
            v.requires_grad_(True)

        def compute(m: Any) -> dict[str, torch.Tensor]:
            params = {k.replace(".default", ""): v for k, v in m.named_parameters() if "lora_" in k}
            out = (m(ids).logits * target.to(m.dtype if hasattr(m, "dtype") else torch.float32)).sum()
            gs = torch.autograd.grad(out, list(params.values()))
            return dict(zip(params, gs, strict=True))

        ref, err = float32_errors(pm, compute)
        for k, g in grads.items():
            assert_within_rounding(g, ref[k], err[k], k)
    finally:
        loratch.torch_hf_unload("pa")


def test_merge_on_quantized_base_writes_float(ggufs: dict[str, Path], tmp_path: Path, binary: Path) -> None:
    """Merging on a quantized base writes the decoded base plus the delta in float, says so, and
    transformers loads the result with PEFT's merged logits (to the merge's float32 rounding)."""
    from peft import PeftModel

    path = ggufs["qwen2"]
    loratch.torch_hf_load_model_lora("mq", path)
    try:
        loratch.torch_hf_lora_init("mq", 4, 8.0, "all-linear")
        randomize_adapters("mq", 0.05, seed=2)
        loratch.torch_hf_lora_save("mq", tmp_path / "adapter")
    finally:
        loratch.torch_hf_unload("mq")
    out = run_cli(binary, "merge", "--model", path, "--adapter", tmp_path / "adapter", "--out", tmp_path / "merged")
    assert out.returncode == 0, out.stderr
    assert "quantized" in out.stderr and "float32" in out.stderr, out.stderr
    ids, _ = ids_and_mask()
    ref, err = float32_errors(PeftModel.from_pretrained(hf_from_gguf(path), tmp_path / "adapter"), lambda m: peft_logits(m, ids))
    with torch.no_grad():
        merged = hf_model(tmp_path / "merged")(ids).logits
    assert_within_rounding(merged, ref["merged"], err["merged"], "merged GGUF vs PEFT merge")
    # The function API merges in place the same way (the quantized weights become float).
    loratch.torch_hf_load_model_lora("mq", path)
    try:
        loratch.torch_hf_lora_load("mq", tmp_path / "adapter")
        before = loratch.torch_hf_memory_report("mq")["weights"]
        unmerged = loratch.torch_hf_forward("mq", ids).detach()
        loratch.torch_hf_lora_merge("mq")
        assert loratch.torch_hf_memory_report("mq")["weights"] > before
        with torch.no_grad():
            assert_within_rounding(loratch.torch_hf_forward("mq", ids), unmerged, err["merged"], "merged in place")
    finally:
        loratch.torch_hf_unload("mq")


def test_default_gguf_equals_its_converted_directory() -> None:
    """The real SmolLM2 Q4_1 GGUF, loaded directly, gives the logits of the float32 directory
    transformers converted from it (the same decoded values)."""
    from loratch.default_model import default_model_dir, gguf_path

    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314, 2]])
    loratch.torch_hf_load_model_lora("gg", gguf_path())
    loratch.torch_hf_load_model_lora("dd", default_model_dir())
    try:
        with torch.no_grad():
            ours, dense = loratch.torch_hf_forward("gg", ids), loratch.torch_hf_forward("dd", ids)
        # The tied head (49152 x 576) is decoded in two chunks, whose products may sum in another
        # order than one product over the whole float head: equal to float32 rounding.
        _, err = float32_errors(hf_model(default_model_dir()), lambda m: {"logits": m(ids).logits.detach()})
        assert_within_rounding(ours, dense, err["logits"], "GGUF vs its float32 directory")
        assert loratch.torch_hf_memory_report("gg")["weights"] == gguf_bytes(gguf_path())
    finally:
        loratch.torch_hf_unload("gg")
        loratch.torch_hf_unload("dd")


def test_cli_generate_from_gguf(binary: Path) -> None:
    """`loratch generate --model x.gguf` needs nothing but the file (tokenizer and chat template
    from its metadata) and answers as the converted directory does."""
    from loratch.default_model import default_model_dir, gguf_path

    args = ["generate", "--prompt", "What is the capital of France?", "--max-new-tokens", "12"]
    a = run_cli(binary, *args, "--model", gguf_path())
    b = run_cli(binary, *args, "--model", default_model_dir())
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    assert a.stdout == b.stdout and "Paris" in a.stdout, (a.stdout, b.stdout)


def test_train_from_gguf(trainable_dir: Path, binary: Path, tmp_path: Path) -> None:
    """A training config whose model is a GGUF (tokenizer from the file), with `quantize`, runs
    and its adapter loads in PEFT over transformers' model of the file with loratch's logits."""
    from peft import PeftModel
    from tiny_models import trainer_toml

    src = tmp_path / "src"
    model = make_model("llama", src, seed=4, vocab_size=49152, hidden_size=64, intermediate_size=128,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    path = tmp_path / "tiny.gguf"
    write_gguf(model, path, "Q8_0", None, "Q8_0")
    data = tmp_path / "data"
    data.mkdir()
    write_records(data / "data.jsonl", 20)
    shutil.copy(data / "data.jsonl", tmp_path / "data.jsonl")
    toml = trainer_toml(data, tmp_path / "out", seed=1, lora={"rank": 4, "alpha": 8},
                        training={"max_steps": 3, "batch_size": 2, "learning_rate": 0.01, "logging_steps": 1})
    toml = toml.replace(f'model = "{data}"', f'model = "{path}"\nquantize = "q4_0"')
    (tmp_path / "cfg.toml").write_text(toml)
    out = run_cli(binary, "train", "--config", tmp_path / "cfg.toml")
    assert out.returncode == 0, out.stderr
    adapter = tmp_path / "out"
    assert (adapter / "adapter_model.safetensors").is_file()
    ids = torch.randint(0, 49152, (1, 9))
    loratch.torch_hf_load_model_lora("tg", path)
    try:
        loratch.torch_hf_lora_load("tg", adapter)
        with torch.no_grad():
            ours = loratch.torch_hf_forward("tg", ids)
            theirs = PeftModel.from_pretrained(hf_from_gguf(path), adapter).eval()(ids).logits
        assert torch.equal(ours, theirs), max_diff(ours, theirs)
    finally:
        loratch.torch_hf_unload("tg")


# --- bad files -----------------------------------------------------------------------------------


def expect_load_error(path: Path, exc: type[BaseException], *words: str, config: dict[str, Any] | None = None) -> None:
    """Loading `path` under an existing name raises `exc` naming `words` and keeps the model."""
    with pytest.raises(exc) as info:
        loratch.torch_hf_load_model_lora("keep", path, config)
    msg = str(info.value)
    for w in words:
        assert w in msg, (w, msg)
    assert "keep" in loratch.torch_hf_list_models()
    with pytest.raises(exc):
        loratch.torch_hf_load_model_lora("fresh", path, config)
    assert "fresh" not in loratch.torch_hf_list_models()


def test_bad_files_are_typed_errors_and_load_nothing(ggufs: dict[str, Path], tmp_path: Path) -> None:
    import gguf

    good = ggufs["qwen3"]
    loratch.torch_hf_load_model_lora("keep", ggufs["qwen2"])
    try:
        ids, _ = ids_and_mask()
        with torch.no_grad():
            before = loratch.torch_hf_forward("keep", ids)
        data = good.read_bytes()
        truncated = tmp_path / "truncated.gguf"
        truncated.write_bytes(data[: len(data) - 1000])
        expect_load_error(truncated, loratch.CheckpointError, str(truncated))
        header = tmp_path / "header.gguf"
        header.write_bytes(data[:40])
        expect_load_error(header, loratch.CheckpointError, str(header))
        magic = tmp_path / "magic.gguf"
        magic.write_bytes(b"GGUX" + data[4:])
        expect_load_error(magic, loratch.CheckpointError, str(magic))

        # An unsupported architecture, an unknown tensor type, a tensor of the wrong shape.
        def rewrite(name: str, arch: str = "qwen3", edit: Any = None) -> Path:
            out = tmp_path / name
            src = gguf.GGUFReader(str(good))
            w = gguf.GGUFWriter(str(out), arch)
            for f in src.fields.values():
                if f.name.startswith(("GGUF.", "general.architecture")):
                    continue
                key = f.name.replace("qwen3.", f"{arch}.")
                vtype = f.types[0]
                if vtype == gguf.GGUFValueType.ARRAY:
                    w.add_array(key, f.contents())
                else:
                    w.add_key_value(key, f.contents(), vtype)
            for t in src.tensors:
                arr, ty = np.array(t.data), t.tensor_type
                if edit is not None:
                    arr, ty = edit(t.name, arr, ty)
                w.add_tensor(t.name, arr, raw_shape=None if ty != gguf.GGMLQuantizationType.F32 else None,
                             raw_dtype=None if ty == gguf.GGMLQuantizationType.F32 else ty)
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
            w.close()
            return out

        expect_load_error(rewrite("falcon.gguf", arch="falcon"), loratch.CheckpointError, "falcon", "general.architecture")

        def with_type(name: str, tensor: str, type_id: int) -> Path:
            """`good` with the type id of `tensor` in its header replaced."""
            raw = bytearray(data)
            key = tensor.encode()
            at = raw.index(len(key).to_bytes(8, "little") + key) + 8 + len(key)
            n_dims = int.from_bytes(raw[at : at + 4], "little")
            at += 4 + 8 * n_dims
            raw[at : at + 4] = type_id.to_bytes(4, "little")
            out = tmp_path / name
            out.write_bytes(bytes(raw))
            return out

        # IQ4_NL (20) is a GGML type loratch does not decode; 99 is no type at all.
        expect_load_error(with_type("iq.gguf", "blk.1.ffn_up.weight", 20), loratch.CheckpointError, "blk.1.ffn_up.weight", "IQ4_NL")
        expect_load_error(with_type("t99.gguf", "blk.1.ffn_up.weight", 99), loratch.CheckpointError, "blk.1.ffn_up.weight", "99")

        def narrow(name: str, arr: np.ndarray, ty: Any) -> tuple[np.ndarray, Any]:
            if name == "blk.0.ffn_down.weight":
                return arr[:128], ty
            return arr, ty

        expect_load_error(rewrite("narrow.gguf", edit=narrow), loratch.CheckpointError, "blk.0.ffn_down.weight", "shape")
        expect_load_error(good, loratch.ConfigError, "q3_k", "nf4", config={"quantize": "q3_k"})
        with torch.no_grad():
            assert torch.equal(loratch.torch_hf_forward("keep", ids), before)
    finally:
        loratch.torch_hf_unload("keep")
