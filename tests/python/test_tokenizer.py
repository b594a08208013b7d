"""The Rust tokenizer and chat template through Python, against transformers on the real
SmolLM2 tokenizer (tokenizer_reference.py computes transformers' side in the same run)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from tokenizer_reference import reference

import loratch
from loratch.default_model import default_model_dir


@pytest.fixture(scope="module")
def ref() -> tuple[Path, dict[str, Any]]:
    d = default_model_dir()
    return d, reference(str(d))


def test_encode_decode_equal_transformers(ref: tuple[Path, dict[str, Any]]) -> None:
    import transformers as tf

    d, _ = ref
    ours = loratch.torch_hf_tokenizer_load(d)
    theirs = tf.AutoTokenizer.from_pretrained(d)
    texts = ["Hello, world!", "Hej! Smörgåsbord på svenska: åäö ÅÄÖ", "Emoji 🤗 日本語", "  spaces \n\ttabs", ""]
    for text in texts:
        for special in (True, False):
            ids = ours.encode(text, add_special_tokens=special)
            assert ids == theirs.encode(text, add_special_tokens=special), text
            for skip in (True, False):
                assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip)
    assert ours.vocab_size == len(theirs)
    assert (ours.bos_token, ours.eos_token, ours.pad_token) == (theirs.bos_token, theirs.eos_token, theirs.pad_token)
    assert ours.eos_token_id == theirs.eos_token_id and ours.token_to_id("<|im_end|>") == theirs.eos_token_id
    assert ours.id_to_token(ours.eos_token_id or 0) == "<|im_end|>"


def test_chat_template_equals_transformers(ref: tuple[Path, dict[str, Any]]) -> None:
    import transformers as tf

    d, _ = ref
    ours = loratch.torch_hf_tokenizer_load(d)
    theirs = tf.AutoTokenizer.from_pretrained(d)
    conversations = [
        [{"role": "user", "content": "What is the capital of France?"}],
        [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hej!"}],
        [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello! How can I help?"},
            {"role": "user", "content": "Tell me a joke."},
        ],
    ]
    for conv in conversations:
        for gen in (True, False):
            expected = theirs.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)
            assert ours.apply_chat_template(conv, add_generation_prompt=gen) == expected


#: Renders the chat template in ``sys.argv[1]`` with loratch and with transformers, the same
#: minute, in this process's time zone; prints both and the UTC time in the template's format.
_RENDER_NOW = """
import json, sys
from datetime import datetime, timezone
import transformers as tf
import loratch
d, fmt, conv = sys.argv[1], sys.argv[2], [{"role": "user", "content": "Hi"}]
ours = loratch.torch_hf_tokenizer_load(d).apply_chat_template(conv)
theirs = tf.AutoTokenizer.from_pretrained(d).apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
print(json.dumps([ours, theirs, datetime.now(timezone.utc).strftime(fmt)]))
"""


def test_strftime_now_is_local_time_as_in_transformers(ref: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    """A template with ``strftime_now`` (as Llama 3.1's) renders transformers' local time: in a
    process with TZ at UTC+14 both equal, and differ from the UTC time."""
    d, _ = ref
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        shutil.copy(d / name, tmp_path / name)
    fmt = "%d %b %Y %H:%M %A %j %-d"
    (tmp_path / "chat_template.jinja").write_text(
        '{{- "Today Date: " + strftime_now("' + fmt + '") }}\n'
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    )
    env = {**os.environ, "TZ": "XYZ-14"}  # POSIX TZ: 14 hours east of UTC
    for _ in range(3):  # the minute may turn between the two renders
        out = subprocess.run(
            [sys.executable, "-c", _RENDER_NOW, str(tmp_path), fmt],
            env=env, capture_output=True, text=True, check=True,
        )
        ours, theirs, utc = json.loads(out.stdout)
        if ours == theirs:
            break
    assert ours == theirs
    assert ours.startswith("Today Date: ") and utc not in ours


def test_tokenizer_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        loratch.torch_hf_tokenizer_load(tmp_path / "missing" / "tokenizer.json")
    (tmp_path / "tokenizer.json").write_text("{broken")
    with pytest.raises(loratch.TokenizerError):
        loratch.torch_hf_tokenizer_load(tmp_path / "tokenizer.json")
    tok = loratch.torch_hf_tokenizer_load(default_model_dir())
    with pytest.raises(TypeError, match="role"):
        tok.apply_chat_template([{"content": "no role"}])
