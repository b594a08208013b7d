"""transformers' tokenizer and chat-template results for a fixed set of inputs: the reference that
loratch's Rust tokenizer (``src/tokenizer``) must reproduce exactly.

``reference(dir)`` loads ``AutoTokenizer.from_pretrained(dir)`` (offline) and returns a JSON-able
dict; ``python tests/python/tokenizer_reference.py [DIR]`` prints it (DIR defaults to
``$LORATCH_DEFAULT_MODEL_DIR``). The expected values hard-coded in the Rust tests
(``src/tokenizer/mod.rs``, ``src/tokenizer/chat/``) were produced with this script on the
SmolLM2-135M-Instruct directory made by ``python -m loratch.default_model``.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

#: Strings to encode (each with and without special tokens) and decode back.
TEXTS: list[str] = [
    "Hello, world!",
    "What is the capital of France?",
    "Hej! Smörgåsbord på svenska: åäö ÅÄÖ",
    "  leading and trailing spaces  \n\nnew lines\ttabs",
    "<|im_start|>user\nHi<|im_end|>\n",
    "Emoji 🤗 and CJK 日本語, Ελληνικά, русский",
    "Hello , world . Don 't do it !",
    "1234567890 3.14159 x=y+1;",
    "",
]

#: Id sequences to decode, with and without skipping special tokens.
DECODE_IDS: list[list[int]] = [
    [1, 9690, 198, 19556, 2, 198],
    [0, 1, 2, 3, 255, 256, 49151],
]

SYSTEM = "You are a terse assistant. Svara på svenska."

#: Conversations to render (each with add_generation_prompt False and True).
CHATS: list[list[dict[str, str]]] = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "Vad heter huvudstaden i Sverige? åäö"},
    ],
    [
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "  Tell me a joke.\n"},
    ],
    [{"role": "system", "content": ""}, {"role": "user", "content": "🤗"}],
]


def reference(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """transformers' results for ``TEXTS``, ``DECODE_IDS`` and ``CHATS`` on the tokenizer in
    ``directory``."""
    import transformers
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(directory))
    encode = [
        {"text": text, "add_special_tokens": add, "ids": tok.encode(text, add_special_tokens=add)}
        for text in TEXTS
        for add in (False, True)
    ]
    decode_texts = [
        {"ids": e["ids"], "skip_special_tokens": skip, "text": tok.decode(e["ids"], skip_special_tokens=skip)}
        for e in encode
        for skip in (False, True)
    ]
    decode_ids = [
        {"ids": ids, "skip_special_tokens": skip, "text": tok.decode(ids, skip_special_tokens=skip)}
        for ids in DECODE_IDS
        for skip in (False, True)
    ]
    chat = [
        {
            "messages": messages,
            "add_generation_prompt": gen,
            "text": tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen),
        }
        for messages in CHATS
        for gen in (False, True)
    ]
    special = {
        name: getattr(tok, name, None) for name in ("bos_token", "eos_token", "pad_token", "unk_token")
    }
    return {
        "transformers_version": transformers.__version__,
        "tokenizer_class": type(tok).__name__,
        "len": len(tok),
        "vocab_size": tok.vocab_size,
        "special_tokens": special,
        "special_token_ids": {name: tok.convert_tokens_to_ids(t) for name, t in special.items() if t},
        "id_to_token": {i: tok.convert_ids_to_tokens(i) for i in (0, 1, 2, 198, 9690, 49151)},
        "encode": encode,
        "decode": decode_texts + decode_ids,
        "chat": chat,
    }


if __name__ == "__main__":
    target = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("LORATCH_DEFAULT_MODEL_DIR")
    if not target:
        sys.exit("usage: tokenizer_reference.py DIR (or set LORATCH_DEFAULT_MODEL_DIR)")
    json.dump(reference(target), sys.stdout, ensure_ascii=False, indent=1)
    print()
