"""transformers' tokenizer of a GGUF file, for the tests of `src/tokenizer/gguf.rs`.

Reads a JSON request on stdin:
    {"gguf": path}                 an existing file, or
    {"write": {fields}, "dir": d}  a file written first with gguf-py's GGUFWriter from the fields
                                   of `GgufTokenizerData` (`architecture`, `model`, `tokens`, ...)
    "texts": [str], "id_lists": [[int]], "messages": [{"role", "content"}], "chats": [messages]
    (all optional)
and prints JSON: the file's tokenizer metadata as gguf-py's GGUFReader reads it ("meta", named as
`GgufTokenizerData`'s fields), and what `AutoTokenizer.from_pretrained(dir, gguf_file=name)`
(transformers 5.24) makes of it: its backend serialization, special tokens, `len`, the ids of
every text with and without special tokens, the decoding of those ids and of `id_lists` with and
without `skip_special_tokens`, and the chat ("chat"; each of "chats") rendered without and with a
generation prompt (null without a template).
"""

import json
import os
import sys
import warnings

import gguf

KEYS = {
    "general.architecture": "architecture",
    "tokenizer.ggml.model": "model",
    "tokenizer.ggml.pre": "pre",
    "tokenizer.ggml.tokens": "tokens",
    "tokenizer.ggml.scores": "scores",
    "tokenizer.ggml.token_type": "token_type",
    "tokenizer.ggml.merges": "merges",
    "tokenizer.ggml.bos_token_id": "bos_token_id",
    "tokenizer.ggml.eos_token_id": "eos_token_id",
    "tokenizer.ggml.unknown_token_id": "unknown_token_id",
    "tokenizer.ggml.padding_token_id": "padding_token_id",
    "tokenizer.ggml.add_bos_token": "add_bos_token",
    "tokenizer.ggml.add_eos_token": "add_eos_token",
    "tokenizer.chat_template": "chat_template",
}


def write(path, f):
    """A GGUF with no tensors and the tokenizer `f` describes (plus the few hyper-parameters
    transformers' config reader wants)."""
    arch = f.get("architecture") or "llama"
    w = gguf.GGUFWriter(path, arch)
    for key, value in [("block_count", 1), ("context_length", 64), ("embedding_length", 8),
                       ("feed_forward_length", 16), ("attention.head_count", 2),
                       ("attention.head_count_kv", 1)]:
        w.add_uint32(f"{arch}.{key}", value)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_tokenizer_model(f["model"])
    if f.get("pre") is not None:
        w.add_tokenizer_pre(f["pre"])
    w.add_token_list(f["tokens"])
    if f.get("scores") is not None:
        w.add_token_scores(f["scores"])
    if f.get("token_type") is not None:
        w.add_token_types(f["token_type"])
    if f.get("merges") is not None:
        w.add_token_merges(f["merges"])
    for name in ["bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id"]:
        if f.get(name) is not None:
            w.add_uint32(f"tokenizer.ggml.{name}", f[name])
    for name in ["add_bos_token", "add_eos_token"]:
        if f.get(name) is not None:
            w.add_bool(f"tokenizer.ggml.{name}", f[name])
    if f.get("chat_template") is not None:
        w.add_chat_template(f["chat_template"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def read_meta(path):
    reader = gguf.GGUFReader(path)
    meta = {}
    for key, name in KEYS.items():
        field = reader.get_field(key)
        if field is not None:
            value = field.contents()
            meta[name] = [v.item() if hasattr(v, "item") else v for v in value] if isinstance(value, list) else value
    return meta


def main():
    request = json.load(sys.stdin)
    if "write" in request:
        os.makedirs(request["dir"], exist_ok=True)
        path = os.path.join(request["dir"], "tokenizer.gguf")
        write(path, request["write"])
    else:
        path = request["gguf"]
    out = {"meta": read_meta(path)}

    warnings.simplefilter("ignore")
    from transformers import AutoTokenizer
    from transformers.utils import logging

    logging.set_verbosity_error()
    tok = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    out["backend"] = tok.backend_tokenizer.to_str()
    out["special"] = {k: str(v) for k, v in tok.special_tokens_map.items()}
    out["special_ids"] = {k: tok.convert_tokens_to_ids(str(v)) for k, v in tok.special_tokens_map.items()}
    out["len"] = len(tok)
    out["clean_up"] = bool(tok.clean_up_tokenization_spaces)
    texts = request.get("texts", [])
    out["encode"] = [[tok.encode(t, add_special_tokens=False), tok.encode(t, add_special_tokens=True)] for t in texts]
    id_lists = [ids for pair in out["encode"] for ids in pair] + request.get("id_lists", [])
    out["decode"] = [[tok.decode(ids, skip_special_tokens=False), tok.decode(ids, skip_special_tokens=True)]
                     for ids in id_lists]
    out["tokens"] = [tok.convert_ids_to_tokens(ids) for ids in request.get("id_lists", [])]
    def render(messages):
        return [tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=g) for g in (False, True)]

    messages = request.get("messages")
    has_template = tok.chat_template is not None
    out["chat"] = render(messages) if messages and has_template else None
    out["chats"] = [render(m) for m in request.get("chats", [])] if has_template else None
    json.dump(out, sys.stdout, ensure_ascii=False)


main()
