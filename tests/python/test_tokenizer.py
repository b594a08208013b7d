"""The Rust tokenizer and chat template through Python, against transformers on the real
SmolLM2 tokenizer: ``tokenizer_reference.reference`` computes transformers' side in the same run
(the script that produced the Rust tests' expected values), and every entry of it is compared."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from tokenizer_reference import CHATS, DECODE_IDS, TEXTS, reference

import loratch
from loratch.default_model import default_model_dir


@pytest.fixture(scope="module")
def ref() -> tuple[Any, dict[str, Any]]:
    d = default_model_dir()
    return loratch.torch_hf_tokenizer_load(d), reference(str(d))


def test_encode_decode_equal_transformers(ref: tuple[Any, dict[str, Any]]) -> None:
    ours, want = ref
    # Every text with and without special tokens; every encoding and id list decoded both ways.
    assert len(want["encode"]) == 2 * len(TEXTS)
    assert len(want["decode"]) == 2 * len(want["encode"]) + 2 * len(DECODE_IDS)
    for e in want["encode"]:
        assert ours.encode(e["text"], add_special_tokens=e["add_special_tokens"]) == e["ids"], e
    for e in want["decode"]:
        assert ours.decode(e["ids"], skip_special_tokens=e["skip_special_tokens"]) == e["text"], e


def test_vocabulary_and_special_tokens_equal_transformers(ref: tuple[Any, dict[str, Any]]) -> None:
    ours, want = ref
    assert ours.vocab_size == want["len"]
    special = want["special_tokens"]
    assert (ours.bos_token, ours.eos_token, ours.pad_token) == (special["bos_token"], special["eos_token"],
                                                                 special["pad_token"])
    ids = want["special_token_ids"]
    for name in ("bos", "eos", "pad"):
        assert getattr(ours, f"{name}_token_id") == ids.get(f"{name}_token"), name
    assert ours.token_to_id("<|im_end|>") == ids["eos_token"]
    for i, token in want["id_to_token"].items():
        assert ours.id_to_token(int(i)) == token, i
        assert ours.token_to_id(token) == int(i), token


def test_chat_template_equals_transformers(ref: tuple[Any, dict[str, Any]]) -> None:
    ours, want = ref
    assert len(want["chat"]) == 2 * len(CHATS)
    for c in want["chat"]:
        assert ours.apply_chat_template(c["messages"], add_generation_prompt=c["add_generation_prompt"]) == c["text"], c


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


def test_strftime_now_is_local_time_as_in_transformers(tmp_path: Path) -> None:
    """A template with ``strftime_now`` (as Llama 3.1's) renders transformers' local time: in a
    process with TZ at UTC+14 both equal, and differ from the UTC time."""
    d = default_model_dir()
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
