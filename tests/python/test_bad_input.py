"""Bad input to every public function of loratch beyond the basic LoRA layer (which
``test_errors.py`` covers): the HF model registry, adapters, generation, tokenizer, optimizer,
scheduler, autograd helpers and ``loratch.train``. Each case must raise its typed loratch
exception (or the matching built-in) with a message that names the problem, and must never
crash the interpreter.

The cases run in worker subprocesses (importing torch costs seconds, so one worker runs many
cases): a worker prints ``START <id>`` before and ``RESULT <id> ...`` after each case, so an
abort, a segfault or a hang (a per-case watchdog) is pinned on the case that caused it, which
then fails, and a new worker carries on with the remaining cases. Every case gets a fresh model
registry and its own temporary directory.

The table holds 295 cases (``test_case_table_size`` checks the count): 29 of them are real bugs
the table found, marked ``xfail(strict=True)`` with the bug in their reason (see ``BUGS``). The
six ``*-chmod`` cases need ``chmod 000`` to stop reads, which it does not for root: as root the
workers run without the two capabilities that let root read any file (``without_dac_override``),
so the cases run there too; they are skipped only where even that does not stop reads.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from helpers import run_py

# The worker: helpers shared by the cases, then the loop over the cases named in its spec.
WORKER = r'''
import builtins, faulthandler, json, os, shutil, sys, traceback
from pathlib import Path
import torch, loratch
import loratch.errors
import safetensors.torch as st

faulthandler.enable()  # a segfault or abort prints the Python stack of the case to stderr
SPEC = json.loads(Path(sys.argv[1]).read_text())
LLAMA = Path(SPEC["llama"])          # tiny random Llama, vocab 97, 2 layers, hidden 48
QWEN3 = Path(SPEC["qwen3"])          # tiny random Qwen3 (head_dim 16: other adapter shapes)
TRAINABLE = Path(SPEC["trainable"])  # tiny Llama with SmolLM2's vocab and tokenizer files
DATA = TRAINABLE / "data.jsonl"
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"]
tmp = None  # the current case's own directory

def reset():
    for name in loratch.torch_hf_list_models():
        loratch.torch_hf_unload(name)
    torch.set_grad_enabled(True)

def fresh(src=LLAMA, lora=None, name="m"):
    """Loads `src` as `name` (with rank-2 adapters on `lora` when given); returns the name."""
    loratch.torch_hf_load_model_lora(name, src)
    if lora:
        loratch.torch_hf_lora_init(name, 2, 4.0, lora)
    return name

def randomize(name):
    with torch.no_grad():
        for k, p in loratch.torch_hf_lora_named_parameters(name).items():
            if "lora_B" in k:
                p.normal_(0.0, 0.05)

def model_copy(src=LLAMA):
    d = tmp / "model"
    shutil.copytree(src, d)
    return d

def edit_config(d, remove=(), **changes):
    cfg = json.loads((d / "config.json").read_text())
    for k in remove:
        cfg.pop(k, None)
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))
    return d

def edit_weights(d, fn):
    p = d / "model.safetensors"
    tensors = st.load_file(p)
    fn(tensors)
    st.save_file(tensors, p, metadata={"format": "pt"})
    return d

def truncate(p, keep):
    b = Path(p).read_bytes()
    Path(p).write_bytes(b[:keep] if keep >= 0 else b[:len(b) + keep])
    return p

def as_directory(p):
    """Replaces the file `p` by a directory: unreadable as a file, for root too."""
    p = Path(p)
    p.unlink()
    p.mkdir()
    (p / "x").write_text("x")
    return p

def unreadable(p):
    os.chmod(p, 0)
    return p

def adapter(kind="dir", src=LLAMA, targets=("q_proj", "v_proj"), name="adapter"):
    """Saves random adapters of a model of `src`: a PEFT directory, a .safetensors or a .pt."""
    loratch.torch_hf_load_model_lora("_src", src)
    loratch.torch_hf_lora_init("_src", 2, 4.0, list(targets))
    randomize("_src")
    path = tmp / (name if kind == "dir" else f"{name}.{kind}")
    loratch.torch_hf_lora_save("_src", path)
    loratch.torch_hf_unload("_src")
    return path

def adapter_tensors(path):
    return st.load_file(path / "adapter_model.safetensors")

def rewrite_adapter(path, fn=None, config=None):
    """Rewrites a PEFT adapter directory: fn(tensors) edits the tensors, config(dict) the config."""
    if fn is not None:
        t = adapter_tensors(path)
        fn(t)
        st.save_file(t, path / "adapter_model.safetensors", metadata={"format": "pt"})
    if config is not None:
        cfg = json.loads((path / "adapter_config.json").read_text())
        config(cfg)
        (path / "adapter_config.json").write_text(json.dumps(cfg))
    return path

def ids(*values):
    return torch.tensor([list(values)])

def params():
    p = torch.randn(3, 2, requires_grad=True)
    q = torch.randn(4, requires_grad=True)
    ((p * 2).sum() + q.pow(2).sum()).backward()
    return [p, q]

def opt(lr=1e-3):
    return loratch.torch_optimizer_add_params(params(), lr, 0.0)

_tok = None
def tok():
    global _tok
    if _tok is None:
        _tok = loratch.torch_hf_tokenizer_load(TRAINABLE)
    return _tok

def tok_dir(**files):
    """A directory with the trainable model's tokenizer files; `files` replaces some."""
    d = tmp / "tok"
    d.mkdir()
    for f in TOKENIZER_FILES:
        if (TRAINABLE / f).is_file():
            shutil.copy(TRAINABLE / f, d / f)
    for f, text in files.items():
        f = f.replace("__", ".")
        if text is None:
            (d / f).unlink()
        else:
            (d / f).write_text(text)
    return d

def train_config(*, lora=None, training=None, **top):
    """A valid tiny training config (one step) with the given changes; None deletes a key."""
    config = {
        "model": str(TRAINABLE),
        "data": str(DATA),
        "output_dir": str(tmp / "out"),
        "validation_split": 0.0,
        "seed": 1,
        "lora": {"rank": 2, "alpha": 4.0, "target_modules": ["q_proj"], "dropout": 0.0},
        "training": {"max_steps": 1, "batch_size": 1, "gradient_accumulation_steps": 1,
                     "max_seq_length": 128, "logging_steps": 1, "save_steps": 0, "eval_steps": 0},
    }
    for section, changes in (("lora", lora), ("training", training), (None, top)):
        target = config if section is None else config[section]
        for k, v in (changes or {}).items():
            if v is None:
                target.pop(k, None)
            else:
                target[k] = v
    return config

def data_file(*lines, name="data.jsonl"):
    p = tmp / name
    p.write_text("".join(line + "\n" for line in lines))
    return p

GOOD = json.dumps({"instruction": "Who handles roofs?", "input": "", "output": "The municipality."})

def run_case(cid, code, exc):
    global tmp
    tmp = Path(SPEC["tmp"]) / cid
    tmp.mkdir(parents=True, exist_ok=True)
    reset()
    try:
        exec(compile(code, f"<case {cid}>", "exec"), dict(globals()))
    except BaseException as e:
        expected = getattr(loratch.errors, exc, None) or getattr(builtins, exc)
        where = traceback.extract_tb(e.__traceback__)[-1]
        # Needles are matched against the message with the case's and the fixtures' directories
        # blanked out, so a word in a temporary path never passes for a word of the message.
        msg = str(e).replace(str(tmp), "<tmp>")
        for key in ("llama", "qwen3", "trainable"):
            msg = msg.replace(SPEC[key], f"<{key}>")
        return {
            "raised": f"{type(e).__module__}.{type(e).__qualname__}",
            "ok": isinstance(e, expected),
            "msg": msg,
            "at": f"{where.filename}:{where.lineno} {where.name}",
        }
    return {"raised": None}

for cid, code, exc in SPEC["cases"]:
    print("START", cid, flush=True)
    faulthandler.dump_traceback_later(SPEC["case_timeout"], exit=True)
    result = run_case(cid, code, exc)
    faulthandler.cancel_dump_traceback_later()
    print("RESULT", cid, json.dumps(result), flush=True)
'''

def without_dac_override() -> None:
    """A ``preexec_fn`` for the workers when this process is root: drops CAP_DAC_OVERRIDE and
    CAP_DAC_READ_SEARCH from the capability bounding set, so the worker (root, exec'd after this)
    has neither, and file mode bits bind it as they bind any user: mode 000 stops its reads.
    Switching to an unprivileged user instead would need an interpreter and libraries that user
    can read (here they live under /root); root's own files stay readable by their owner."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH (linux/capability.h)
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


WORKER_PREEXEC = without_dac_override if os.geteuid() == 0 else None


def _chmod_blocks_reads() -> bool:
    """Whether a file with mode 000 is unreadable to a worker (root's without the capabilities
    above), checked in a worker-like child."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "probe"
        p.write_text("x")
        p.chmod(0)
        try:
            proc = subprocess.run([sys.executable, "-c", "import sys; open(sys.argv[1]).read()", str(p)],
                                  capture_output=True, text=True, preexec_fn=WORKER_PREEXEC)
        except OSError:  # the capabilities could not be dropped (no CAP_SETPCAP)
            return False
        return proc.returncode != 0 and "PermissionError" in proc.stderr


CHMOD_SKIP_REASON = (
    "chmod 000 does not stop reads for the workers (root that cannot drop CAP_DAC_OVERRIDE); "
    "the *-is-a-directory cases cover unreadable paths"
)
CHMOD_BLOCKS_READS = _chmod_blocks_reads()

# (id, code that must raise, expected exception class name, substring of its message)
CASES: list[tuple[str, str, str, str]] = [
    # --- torch_hf_load_model_lora: paths, config.json, weights, options ------------------------
    ("load-missing-dir", "loratch.torch_hf_load_model_lora('m', tmp / 'nowhere')", "FileNotFoundError", "nowhere"),
    ("load-empty-dir", "(tmp / 'e').mkdir(); loratch.torch_hf_load_model_lora('m', tmp / 'e')", "FileNotFoundError", "config.json"),
    # A file is read as a GGUF model: another file is refused by its magic, naming it.
    ("load-path-is-a-file", "d = model_copy(); loratch.torch_hf_load_model_lora('m', d / 'config.json')", "CheckpointError", "not a GGUF file"),
    ("load-path-type", "loratch.torch_hf_load_model_lora('m', 42)", "TypeError", "path"),
    ("load-name-type", "loratch.torch_hf_load_model_lora(None, LLAMA)", "TypeError", "model_name"),
    ("load-config-malformed", "d = model_copy(); (d / 'config.json').write_text('{not json'); loratch.torch_hf_load_model_lora('m', d)", "ConfigError", "malformed"),
    ("load-config-empty-file", "d = model_copy(); (d / 'config.json').write_text(''); loratch.torch_hf_load_model_lora('m', d)", "ConfigError", "config.json"),
    ("load-config-not-an-object", "d = model_copy(); (d / 'config.json').write_text('[1, 2]'); loratch.torch_hf_load_model_lora('m', d)", "ConfigError", "config.json"),
    ("load-config-unsupported-architecture", "d = edit_config(model_copy(), architectures=['GPT2LMHeadModel'], model_type='gpt2'); loratch.torch_hf_load_model_lora('m', d)", "ConfigError", "GPT2LMHeadModel"),
    ("load-config-no-architecture", "d = edit_config(model_copy(), remove=['architectures', 'model_type']); loratch.torch_hf_load_model_lora('m', d)", "ConfigError", "unsupported architecture"),
    ("load-config-missing-hidden-size", "d = edit_config(model_copy(), remove=['hidden_size']); loratch.torch_hf_load_model_lora('m', d)", "ConfigError", "hidden_size"),
    ("load-config-wrong-type", "d = edit_config(model_copy(), hidden_size='48'); loratch.torch_hf_load_model_lora('m', d)", "ConfigError", "hidden_size"),
    ("load-config-negative-vocab", "d = edit_config(model_copy(), vocab_size=-5); loratch.torch_hf_load_model_lora('m', d)", "ConfigError", "vocab_size"),
    ("load-config-zero-kv-heads", "d = edit_config(model_copy(), num_key_value_heads=0); loratch.torch_hf_load_model_lora('m', d)", "ConfigError", "num_key_value_heads (0)"),
    ("load-config-heads-disagree-with-weights", "d = edit_config(model_copy(), num_attention_heads=10); loratch.torch_hf_load_model_lora('m', d)", "CheckpointError", "q_proj.weight has shape"),
    ("load-config-negative-rms-norm-eps", "d = edit_config(model_copy(), rms_norm_eps=-1.0); loratch.torch_hf_load_model_lora('m', d); out = loratch.torch_hf_forward('m', ids(1, 2, 3)); print('finite logits:', bool(torch.isfinite(out).all()))", "ConfigError", "rms_norm_eps"),
    ("load-config-kv-heads-do-not-divide-heads", "d = edit_config(model_copy(), num_key_value_heads=4); loratch.torch_hf_load_model_lora('m', d)", "ConfigError", "num_key_value_heads"),
    ("load-config-zero-layers", "d = edit_config(model_copy(), num_hidden_layers=0); loratch.torch_hf_load_model_lora('m', d)", "ConfigError", "num_hidden_layers"),
    ("load-config-vocab-disagrees-with-weights", "d = edit_config(model_copy(), vocab_size=98); loratch.torch_hf_load_model_lora('m', d)", "CheckpointError", "embed_tokens"),
    ("load-config-more-layers-than-weights", "d = edit_config(model_copy(), num_hidden_layers=3); loratch.torch_hf_load_model_lora('m', d)", "CheckpointError", "layers.2"),
    ("load-config-is-a-directory", "d = model_copy(); as_directory(d / 'config.json'); loratch.torch_hf_load_model_lora('m', d)", "OSError", "config.json"),
    ("load-config-unreadable-chmod", "d = model_copy(); unreadable(d / 'config.json'); loratch.torch_hf_load_model_lora('m', d)", "PermissionError", "config.json"),
    ("load-weights-missing", "d = model_copy(); (d / 'model.safetensors').unlink(); loratch.torch_hf_load_model_lora('m', d)", "FileNotFoundError", "model.safetensors"),
    ("load-weights-truncated-header", "d = model_copy(); truncate(d / 'model.safetensors', 100); loratch.torch_hf_load_model_lora('m', d)", "CheckpointError", "safetensors"),
    ("load-weights-truncated-data", "d = model_copy(); truncate(d / 'model.safetensors', -64); loratch.torch_hf_load_model_lora('m', d)", "CheckpointError", "safetensors"),
    ("load-weights-garbage", "d = model_copy(); (d / 'model.safetensors').write_bytes(b'\\xff' * 256); loratch.torch_hf_load_model_lora('m', d)", "CheckpointError", "safetensors"),
    ("load-weights-empty-file", "d = model_copy(); (d / 'model.safetensors').write_bytes(b''); loratch.torch_hf_load_model_lora('m', d)", "CheckpointError", "safetensors"),
    ("load-weights-missing-tensor", "d = edit_weights(model_copy(), lambda t: t.pop('model.norm.weight')); loratch.torch_hf_load_model_lora('m', d)", "CheckpointError", "model.norm.weight"),
    ("load-weights-misshaped-tensor", "k = 'model.layers.0.self_attn.q_proj.weight'; d = edit_weights(model_copy(), lambda t: t.update({k: torch.zeros(47, 48)})); loratch.torch_hf_load_model_lora('m', d)", "CheckpointError", "q_proj"),
    ("load-weights-integer-dtype", "k = 'model.norm.weight'; d = edit_weights(model_copy(), lambda t: t.update({k: torch.ones(48, dtype=torch.int64)})); loratch.torch_hf_load_model_lora('m', d)", "CheckpointError", "model.norm.weight"),
    ("load-weights-is-a-directory", "d = model_copy(); as_directory(d / 'model.safetensors'); loratch.torch_hf_load_model_lora('m', d)", "OSError", "model.safetensors"),
    ("load-weights-unreadable-chmod", "d = model_copy(); unreadable(d / 'model.safetensors'); loratch.torch_hf_load_model_lora('m', d)", "PermissionError", "model.safetensors"),
    ("load-shard-index-malformed", "d = model_copy(); (d / 'model.safetensors').unlink(); (d / 'model.safetensors.index.json').write_text('{oops'); loratch.torch_hf_load_model_lora('m', d)", "CheckpointError", "index"),
    ("load-shard-missing", "d = model_copy(); names = list(st.load_file(d / 'model.safetensors')); (d / 'model.safetensors').unlink(); (d / 'model.safetensors.index.json').write_text(json.dumps({'metadata': {}, 'weight_map': {n: 'model-00001-of-00002.safetensors' for n in names}})); loratch.torch_hf_load_model_lora('m', d)", "FileNotFoundError", "model-00001-of-00002.safetensors"),
    ("load-options-not-a-dict", "loratch.torch_hf_load_model_lora('m', LLAMA, 'cpu')", "TypeError", "config"),
    ("load-options-value-not-a-string", "loratch.torch_hf_load_model_lora('m', LLAMA, {'device': 0})", "ConfigError", "device"),
    ("load-options-unknown-dtype", "loratch.torch_hf_load_model_lora('m', LLAMA, {'dtype': 'int8'})", "DTypeError", "int8"),
    ("load-options-malformed-device", "loratch.torch_hf_load_model_lora('m', LLAMA, {'device': 'gpu'})", "DeviceError", "gpu"),
    # --- registry -------------------------------------------------------------------------------
    ("unload-unknown-model", "loratch.torch_hf_unload('nope')", "ModelNotFoundError", "nope"),
    ("list-models-extra-argument", "loratch.torch_hf_list_models('m')", "TypeError", "argument"),
    ("memory-usage-unknown-model", "fresh(); loratch.torch_hf_memory_usage('nope')", "ModelNotFoundError", "nope"),
    ("memory-report-unknown-model", "loratch.torch_hf_memory_report('nope')", "ModelNotFoundError", "nope"),
    ("memory-usage-name-type", "loratch.torch_hf_memory_usage(3)", "TypeError", "model_name"),
    # --- torch_hf_forward -----------------------------------------------------------------------
    ("forward-unknown-model", "fresh(); loratch.torch_hf_forward('nope', ids(1, 2))", "ModelNotFoundError", "nope"),
    ("forward-id-equals-vocab", "loratch.torch_hf_forward(fresh(), ids(1, 97))", "InputError", "vocab"),
    ("forward-id-huge", "loratch.torch_hf_forward(fresh(), ids(1, 2**40))", "InputError", "vocab"),
    ("forward-id-negative", "loratch.torch_hf_forward(fresh(), ids(-3, 2))", "InputError", "-3"),
    ("forward-float-ids", "loratch.torch_hf_forward(fresh(), torch.tensor([[1.0, 2.0]]))", "DTypeError", "int64"),
    ("forward-nan-ids", "loratch.torch_hf_forward(fresh(), torch.tensor([[1.0, float('nan')]]))", "DTypeError", "int64"),
    ("forward-bool-ids", "loratch.torch_hf_forward(fresh(), torch.tensor([[True, False]]))", "DTypeError", "bool"),
    ("forward-3d-ids", "loratch.torch_hf_forward(fresh(), torch.zeros(1, 2, 3, dtype=torch.long))", "ShapeError", "input_ids"),
    ("forward-scalar-ids", "loratch.torch_hf_forward(fresh(), torch.tensor(3))", "ShapeError", "input_ids"),
    ("forward-empty-batch", "loratch.torch_hf_forward(fresh(), torch.zeros(0, 3, dtype=torch.long))", "ShapeError", "empty"),
    ("forward-ids-list", "loratch.torch_hf_forward(fresh(), [[1, 2]])", "TypeError", "torch.Tensor"),
    ("forward-ids-meta-device", "loratch.torch_hf_forward(fresh(), torch.zeros(1, 2, dtype=torch.long, device='meta'))", "DeviceError", "meta"),
    ("forward-mask-not-a-tensor", "loratch.torch_hf_forward(fresh(), ids(1, 2), [[1, 1]])", "TypeError", "torch.Tensor"),
    ("forward-mask-3d", "loratch.torch_hf_forward(fresh(), ids(1, 2), torch.ones(1, 1, 2, dtype=torch.long))", "ShapeError", "attention_mask"),
    ("forward-mask-float", "loratch.torch_hf_forward(fresh(), ids(1, 2), torch.tensor([[1.0, 0.5]]))", "DTypeError", "attention_mask"),
    ("forward-mask-values-not-0-or-1", "loratch.torch_hf_forward(fresh(), ids(1, 2), torch.tensor([[1, 2]]))", "InputError", "attention_mask"),
    # --- torch_hf_lora_init ---------------------------------------------------------------------
    ("lora-init-unknown-model", "fresh(); loratch.torch_hf_lora_init('nope', 2, 4.0, ['q_proj'])", "ModelNotFoundError", "nope"),
    ("lora-init-rank-zero", "loratch.torch_hf_lora_init(fresh(), 0, 4.0, ['q_proj'])", "ConfigError", "rank"),
    ("lora-init-rank-negative", "loratch.torch_hf_lora_init(fresh(), -2, 4.0, ['q_proj'])", "ConfigError", "rank"),
    ("lora-init-rank-float", "loratch.torch_hf_lora_init(fresh(), 2.5, 4.0, ['q_proj'])", "TypeError", "rank"),
    ("lora-init-alpha-zero", "loratch.torch_hf_lora_init(fresh(), 2, 0.0, ['q_proj'])", "ConfigError", "alpha"),
    ("lora-init-alpha-inf", "loratch.torch_hf_lora_init(fresh(), 2, float('inf'), ['q_proj'])", "ConfigError", "alpha"),
    ("lora-init-alpha-nan", "loratch.torch_hf_lora_init(fresh(), 2, float('nan'), ['q_proj'])", "ConfigError", "alpha"),
    ("lora-init-dropout-one", "loratch.torch_hf_lora_init(fresh(), 2, 4.0, ['q_proj'], dropout=1.0)", "ConfigError", "dropout"),
    ("lora-init-dropout-negative", "loratch.torch_hf_lora_init(fresh(), 2, 4.0, ['q_proj'], dropout=-0.1)", "ConfigError", "dropout"),
    ("lora-init-unknown-target", "loratch.torch_hf_lora_init(fresh(), 2, 4.0, ['q_proj', 'qkv_proj'])", "ConfigError", "qkv_proj"),
    ("lora-init-non-linear-target", "loratch.torch_hf_lora_init(fresh(), 2, 4.0, ['input_layernorm'])", "ConfigError", "input_layernorm"),
    ("lora-init-empty-target-list", "loratch.torch_hf_lora_init(fresh(), 2, 4.0, [])", "ConfigError", "target"),
    ("lora-init-target-type", "loratch.torch_hf_lora_init(fresh(), 2, 4.0, 7)", "TypeError", "target_modules"),
    ("lora-init-target-list-of-ints", "loratch.torch_hf_lora_init(fresh(), 2, 4.0, [1, 2])", "TypeError", "target_modules"),
    ("lora-init-invalid-regex", "loratch.torch_hf_lora_init(fresh(), 2, 4.0, '.*(q_proj')", "ConfigError", "regex"),
    ("lora-init-regex-matches-nothing", "loratch.torch_hf_lora_init(fresh(), 2, 4.0, '.*\\\\.zz_proj')", "ConfigError", "zz_proj"),
    ("lora-init-unknown-dtype", "loratch.torch_hf_lora_init(fresh(), 2, 4.0, ['q_proj'], 'float8')", "DTypeError", "float8"),
    ("lora-init-layer-out-of-range", "loratch.torch_hf_lora_init(fresh(), 2, 4.0, ['q_proj'], layers=[5])", "ConfigError", "5"),
    ("lora-init-layer-negative", "loratch.torch_hf_lora_init(fresh(), 2, 4.0, ['q_proj'], layers=[-1])", "ConfigError", "-1"),
    # --- adapter state functions -----------------------------------------------------------------
    ("get-parameters-unknown-model", "loratch.torch_hf_lora_get_parameters('nope')", "ModelNotFoundError", "nope"),
    ("get-parameters-before-init", "loratch.torch_hf_lora_get_parameters(fresh())", "StateError", "not initialised"),
    ("named-parameters-before-init", "loratch.torch_hf_lora_named_parameters(fresh())", "StateError", "not initialised"),
    ("named-parameters-unknown-model", "loratch.torch_hf_lora_named_parameters('nope')", "ModelNotFoundError", "nope"),
    ("enable-unknown-model", "loratch.torch_hf_lora_enable('nope', True)", "ModelNotFoundError", "nope"),
    ("enable-not-a-bool", "loratch.torch_hf_lora_enable(fresh(lora=['q_proj']), 'yes')", "TypeError", "enable"),
    ("enable-before-init", "loratch.torch_hf_lora_enable(fresh(), False)", "StateError", "not initialised"),
    ("merge-unknown-model", "loratch.torch_hf_lora_merge('nope')", "ModelNotFoundError", "nope"),
    ("merge-before-init", "loratch.torch_hf_lora_merge(fresh())", "StateError", "not initialised"),
    ("merge-inf-adapter", "m = fresh(lora=['q_proj']); loratch.torch_hf_lora_get_parameters(m)[1].data.fill_(float('inf')); loratch.torch_hf_lora_merge(m)", "NonFiniteError", "Inf"),
    ("unmerge-before-init", "loratch.torch_hf_lora_unmerge(fresh())", "StateError", "not initialised"),
    ("unmerge-unknown-model", "loratch.torch_hf_lora_unmerge('nope')", "ModelNotFoundError", "nope"),
    ("set-training-unknown-model", "loratch.torch_hf_set_training('nope', True)", "ModelNotFoundError", "nope"),
    ("set-training-not-a-bool", "loratch.torch_hf_set_training(fresh(), None)", "TypeError", "training"),
    ("checkpointing-unknown-model", "loratch.torch_hf_gradient_checkpointing('nope', True)", "ModelNotFoundError", "nope"),
    ("checkpointing-not-a-bool", "loratch.torch_hf_gradient_checkpointing(fresh(), 'yes')", "TypeError", "enabled"),
    ("checkpointing-recompute-fails", "m = fresh(lora=['q_proj']); loratch.torch_hf_gradient_checkpointing(m, True); loss = loratch.torch_hf_forward(m, torch.tensor([[1, 2, 3]])).sum(); loratch.torch_hf_lora_get_parameters(m)[0].data = torch.zeros(3, 5); loratch.torch_backward(loss)", "TorchError", "recompute"),
    # --- torch_hf_lora_save / torch_hf_save_merged ----------------------------------------------
    ("lora-save-unknown-model", "loratch.torch_hf_lora_save('nope', tmp / 'a')", "ModelNotFoundError", "nope"),
    ("lora-save-before-init", "loratch.torch_hf_lora_save(fresh(), tmp / 'a')", "StateError", "not initialised"),
    ("lora-save-missing-parent", "loratch.torch_hf_lora_save(fresh(lora=['q_proj']), tmp / 'no' / 'dir' / 'a.safetensors')", "FileNotFoundError", "no/dir"),
    ("lora-save-parent-is-a-file", "(tmp / 'f').write_text('x'); loratch.torch_hf_lora_save(fresh(lora=['q_proj']), tmp / 'f' / 'a.pt')", "OSError", "not a directory"),
    ("lora-save-path-type", "loratch.torch_hf_lora_save(fresh(lora=['q_proj']), 3.5)", "TypeError", "path"),
    ("save-merged-unknown-model", "loratch.torch_hf_save_merged('nope', tmp / 'out')", "ModelNotFoundError", "nope"),
    ("save-merged-into-non-empty-dir", "(tmp / 'out').mkdir(); (tmp / 'out' / 'x').write_text('x'); loratch.torch_hf_save_merged(fresh(lora=['q_proj']), tmp / 'out')", "FileExistsError", "<tmp>/out: output directory exists and is not empty"),
    ("save-merged-onto-a-file", "(tmp / 'out').write_text('x'); loratch.torch_hf_save_merged(fresh(lora=['q_proj']), tmp / 'out')", "OSError", "<tmp>/out: Not a directory"),
    ("save-merged-nan-adapter", "m = fresh(lora=['q_proj']); loratch.torch_hf_lora_get_parameters(m)[1].data.fill_(float('nan')); loratch.torch_hf_save_merged(m, tmp / 'out')", "NonFiniteError", "NaN"),
    ("save-merged-path-type", "loratch.torch_hf_save_merged(fresh(lora=['q_proj']), None)", "TypeError", "path"),
    # --- torch_hf_lora_load: PEFT directories ----------------------------------------------------
    ("lora-load-unknown-model", "a = adapter(); loratch.torch_hf_lora_load('nope', a)", "ModelNotFoundError", "nope"),
    ("lora-load-missing-path", "loratch.torch_hf_lora_load(fresh(), tmp / 'nowhere')", "FileNotFoundError", "nowhere"),
    ("lora-load-empty-dir", "(tmp / 'e').mkdir(); loratch.torch_hf_lora_load(fresh(), tmp / 'e')", "FileNotFoundError", "adapter_config.json"),
    ("lora-load-config-without-weights", "a = adapter(); (a / 'adapter_model.safetensors').unlink(); loratch.torch_hf_lora_load(fresh(), a)", "FileNotFoundError", "adapter_model"),
    ("lora-load-weights-without-config", "a = adapter(); (a / 'adapter_config.json').unlink(); loratch.torch_hf_lora_load(fresh(), a)", "FileNotFoundError", "adapter_config.json"),
    ("lora-load-config-empty-file", "a = adapter(); (a / 'adapter_config.json').write_text(''); loratch.torch_hf_lora_load(fresh(), a)", "AdapterFormatError", "adapter_config.json"),
    ("lora-load-config-truncated", "a = adapter(); truncate(a / 'adapter_config.json', 40); loratch.torch_hf_lora_load(fresh(), a)", "AdapterFormatError", "adapter_config.json"),
    ("lora-load-config-not-an-object", "a = adapter(); (a / 'adapter_config.json').write_text('[]'); loratch.torch_hf_lora_load(fresh(), a)", "AdapterFormatError", "adapter_config.json"),
    ("lora-load-config-rank-wrong-type", "a = rewrite_adapter(adapter(), config=lambda c: c.update(r='two')); loratch.torch_hf_lora_load(fresh(), a)", "AdapterFormatError", "adapter_config.json"),
    ("lora-load-config-rank-zero", "a = rewrite_adapter(adapter(), config=lambda c: c.update(r=0)); loratch.torch_hf_lora_load(fresh(), a)", "AdapterFormatError", "adapter_config.json"),
    ("lora-load-config-alpha-negative", "a = rewrite_adapter(adapter(), config=lambda c: c.update(lora_alpha=-4)); loratch.torch_hf_lora_load(fresh(), a)", "AdapterFormatError", "adapter_config.json"),
    ("lora-load-config-unknown-target", "a = rewrite_adapter(adapter(), config=lambda c: c.update(target_modules=['qkv_proj'])); loratch.torch_hf_lora_load(fresh(), a)", "AdapterFormatError", "qkv_proj"),
    ("lora-load-config-targets-wrong-type", "a = rewrite_adapter(adapter(), config=lambda c: c.update(target_modules=5)); loratch.torch_hf_lora_load(fresh(), a)", "AdapterFormatError", "target_modules"),
    ("lora-load-config-rslora-wrong-type", "a = rewrite_adapter(adapter(), config=lambda c: c.update(use_rslora='yes')); loratch.torch_hf_lora_load(fresh(), a)", "AdapterFormatError", "use_rslora"),
    ("lora-load-config-rank-disagrees-with-tensors", "a = rewrite_adapter(adapter(), config=lambda c: c.update(r=3)); loratch.torch_hf_lora_load(fresh(), a)", "AdapterFormatError", "shape"),
    ("lora-load-config-is-a-directory", "a = adapter(); as_directory(a / 'adapter_config.json'); loratch.torch_hf_lora_load(fresh(), a)", "OSError", "adapter_config.json"),
    ("lora-load-weights-truncated-data", "a = adapter(); truncate(a / 'adapter_model.safetensors', -16); loratch.torch_hf_lora_load(fresh(), a)", "AdapterFormatError", "safetensors"),
    ("lora-load-weights-garbage", "a = adapter(); (a / 'adapter_model.safetensors').write_bytes(b'\\x00' * 300); loratch.torch_hf_lora_load(fresh(), a)", "AdapterFormatError", "safetensors"),
    ("lora-load-weights-empty-file", "a = adapter(); (a / 'adapter_model.safetensors').write_bytes(b''); loratch.torch_hf_lora_load(fresh(), a)", "AdapterFormatError", "safetensors"),
    ("lora-load-weights-is-a-directory", "a = adapter(); as_directory(a / 'adapter_model.safetensors'); loratch.torch_hf_lora_load(fresh(), a)", "OSError", "directory"),
    ("lora-load-weights-unreadable-chmod", "a = adapter(); unreadable(a / 'adapter_model.safetensors'); loratch.torch_hf_lora_load(fresh(), a)", "PermissionError", "adapter_model.safetensors"),
    ("lora-load-weights-inf", "a = rewrite_adapter(adapter(), lambda t: [v.fill_(float('inf')) for k, v in t.items() if 'lora_B' in k]); loratch.torch_hf_lora_load(fresh(), a)", "AdapterFormatError", "finite"),
    ("lora-load-weights-integer-dtype", "a = rewrite_adapter(adapter(), lambda t: t.update({k: v.long() for k, v in t.items()})); loratch.torch_hf_lora_load(fresh(), a)", "AdapterFormatError", "floating-point"),
    ("lora-load-weights-1d-tensor", "a = rewrite_adapter(adapter(), lambda t: t.update({k: v.flatten() for k, v in t.items() if 'lora_A' in k})); loratch.torch_hf_lora_load(fresh(), a)", "AdapterFormatError", "shape"),
    ("lora-load-other-model-shapes", "a = adapter(src=QWEN3); loratch.torch_hf_lora_load(fresh(), a)", "AdapterFormatError", "shape"),
    ("lora-load-other-module-names", "a = rewrite_adapter(adapter(), lambda t: [t.__setitem__(k.replace('self_attn', 'attn'), t.pop(k)) for k in list(t)]); loratch.torch_hf_lora_load(fresh(), a)", "AdapterFormatError", "attn"),
    ("lora-load-layer-beyond-model", "a = rewrite_adapter(adapter(), lambda t: [t.__setitem__(k.replace('layers.1.', 'layers.7.'), t.pop(k)) for k in list(t)]); loratch.torch_hf_lora_load(fresh(), a)", "AdapterFormatError", "layers.7"),
    ("lora-load-layout-differs-from-init", "a = adapter(targets=['k_proj']); m = fresh(lora=['q_proj']); randomize(m); loratch.torch_hf_lora_load(m, a)", "AdapterFormatError", "layout"),
    ("lora-load-path-type", "loratch.torch_hf_lora_load(fresh(), ['a'])", "TypeError", "path"),
    # --- torch_hf_lora_load: single .safetensors and .pt files ----------------------------------
    ("lora-load-safetensors-missing", "loratch.torch_hf_lora_load(fresh(), tmp / 'none.safetensors')", "FileNotFoundError", "none.safetensors"),
    ("lora-load-safetensors-truncated", "a = adapter('safetensors'); truncate(a, 120); loratch.torch_hf_lora_load(fresh(), a)", "AdapterFormatError", "safetensors"),
    ("lora-load-safetensors-without-config", "a = adapter('safetensors'); st.save_file(st.load_file(a), a); loratch.torch_hf_lora_load(fresh(), a)", "AdapterFormatError", "config"),
    ("lora-load-safetensors-config-malformed", "a = adapter('safetensors'); st.save_file(st.load_file(a), a, metadata={'adapter_config': '{oops'}); loratch.torch_hf_lora_load(fresh(), a)", "AdapterFormatError", "malformed"),
    ("lora-load-pt-truncated", "a = adapter('pt'); truncate(a, -200); loratch.torch_hf_lora_load(fresh(lora=['q_proj', 'v_proj']), a)", "AdapterFormatError", "adapter.pt"),
    ("lora-load-pt-garbage", "a = tmp / 'g.pt'; a.write_bytes(b'\\x80\\x02garbage' * 20); loratch.torch_hf_lora_load(fresh(lora=['q_proj']), a)", "AdapterFormatError", "g.pt"),
    ("lora-load-pt-empty-file", "a = tmp / 'e.pt'; a.write_bytes(b''); loratch.torch_hf_lora_load(fresh(lora=['q_proj']), a)", "AdapterFormatError", "e.pt"),
    ("lora-load-pt-not-a-dict", "a = tmp / 'l.pt'; torch.save([torch.zeros(2)], a); loratch.torch_hf_lora_load(fresh(lora=['q_proj']), a)", "AdapterFormatError", "l.pt"),
    ("lora-load-pt-non-tensor-values", "a = adapter('pt'); torch.save({k: 1.5 for k in torch.load(a, weights_only=True)}, a); loratch.torch_hf_lora_load(fresh(lora=['q_proj', 'v_proj']), a)", "AdapterFormatError", "not a tensor"),
    ("lora-load-pt-int-values", "a = adapter('pt'); torch.save({k: 1 for k in torch.load(a, weights_only=True)}, a); loratch.torch_hf_lora_load(fresh(lora=['q_proj', 'v_proj']), a)", "AdapterFormatError", "is not a tensor"),
    ("lora-load-pt-other-model-shapes", "a = adapter('pt', src=QWEN3, targets=['q_proj']); loratch.torch_hf_lora_load(fresh(lora=['q_proj']), a)", "AdapterFormatError", "shape"),
    ("lora-load-pt-missing-keys", "a = adapter('pt', targets=['q_proj']); torch.save(torch.load(a, weights_only=True), a); loratch.torch_hf_lora_load(fresh(lora=['q_proj', 'v_proj']), a)", "AdapterFormatError", "v_proj"),
    ("lora-load-pt-nan", "a = adapter('pt'); t = torch.load(a, weights_only=True); [v.fill_(float('nan')) for v in t.values()]; torch.save(t, a); loratch.torch_hf_lora_load(fresh(lora=['q_proj', 'v_proj']), a)", "AdapterFormatError", "finite"),
    ("lora-load-pt-is-a-directory", "a = tmp / 'd.pt'; a.mkdir(); loratch.torch_hf_lora_load(fresh(lora=['q_proj']), a)", "OSError", "d.pt"),
    # --- torch_hf_generate ------------------------------------------------------------------------
    ("generate-unknown-model", "loratch.torch_hf_generate('nope', [1, 2], 3)", "ModelNotFoundError", "nope"),
    ("generate-empty-prompt", "loratch.torch_hf_generate(fresh(), [], 3)", "ShapeError", "empty"),
    ("generate-id-equals-vocab", "loratch.torch_hf_generate(fresh(), [1, 97], 3)", "InputError", "vocab"),
    ("generate-id-negative", "loratch.torch_hf_generate(fresh(), [1, -1], 3)", "InputError", "-1"),
    ("generate-batch-of-two", "loratch.torch_hf_generate(fresh(), torch.zeros(2, 3, dtype=torch.long), 3)", "ShapeError", "one sequence"),
    ("generate-float-tensor-prompt", "loratch.torch_hf_generate(fresh(), torch.tensor([1.7, 2.2]), 3)", "DTypeError", "float"),
    ("generate-prompt-string", "loratch.torch_hf_generate(fresh(), 'hello', 3)", "TypeError", "input_ids"),
    ("generate-max-new-tokens-negative", "loratch.torch_hf_generate(fresh(), [1, 2], -1)", "ConfigError", "max_new_tokens"),
    ("generate-max-new-tokens-float", "loratch.torch_hf_generate(fresh(), [1, 2], 2.5)", "TypeError", "max_new_tokens"),
    ("generate-temperature-zero", "loratch.torch_hf_generate(fresh(), [1, 2], 3, temperature=0.0)", "ConfigError", "temperature"),
    ("generate-temperature-nan", "loratch.torch_hf_generate(fresh(), [1, 2], 3, temperature=float('nan'))", "ConfigError", "temperature"),
    ("generate-top-k-zero", "loratch.torch_hf_generate(fresh(), [1, 2], 3, top_k=0)", "ConfigError", "top_k"),
    ("generate-top-p-zero", "loratch.torch_hf_generate(fresh(), [1, 2], 3, top_p=0.0)", "ConfigError", "top_p"),
    ("generate-top-p-above-one", "loratch.torch_hf_generate(fresh(), [1, 2], 3, top_p=1.5)", "ConfigError", "top_p"),
    ("generate-eos-wrong-type", "loratch.torch_hf_generate(fresh(), [1, 2], 3, eos_token_id='</s>')", "TypeError", "eos_token_id"),
    ("generate-seed-negative", "loratch.torch_hf_generate(fresh(), [1, 2], 3, seed=-1)", "ConfigError", "seed"),
    # --- torch_hf_tokenizer_load and Tokenizer ---------------------------------------------------
    ("tokenizer-load-dir-without-tokenizer-json", "d = tok_dir(tokenizer__json=None); loratch.torch_hf_tokenizer_load(d)", "FileNotFoundError", "tokenizer.json"),
    ("tokenizer-load-empty-file", "d = tok_dir(tokenizer__json=''); loratch.torch_hf_tokenizer_load(d)", "TokenizerError", "tokenizer.json"),
    ("tokenizer-load-not-a-tokenizer", "d = tok_dir(tokenizer__json='{}'); loratch.torch_hf_tokenizer_load(d / 'tokenizer.json')", "TokenizerError", "tokenizer.json"),
    ("tokenizer-load-truncated", "d = tok_dir(); truncate(d / 'tokenizer.json', 5000); loratch.torch_hf_tokenizer_load(d)", "TokenizerError", "tokenizer.json"),
    ("tokenizer-load-not-utf8", "d = tok_dir(); (d / 'tokenizer.json').write_bytes(b'\\xff\\xfe{}'); loratch.torch_hf_tokenizer_load(d)", "TokenizerError", "tokenizer.json"),
    ("tokenizer-load-json-is-a-directory", "d = tok_dir(); as_directory(d / 'tokenizer.json'); loratch.torch_hf_tokenizer_load(d)", "OSError", "tokenizer.json"),
    ("tokenizer-load-unreadable-chmod", "d = tok_dir(); unreadable(d / 'tokenizer.json'); loratch.torch_hf_tokenizer_load(d)", "PermissionError", "tokenizer.json"),
    ("tokenizer-load-config-malformed", "d = tok_dir(tokenizer_config__json='{oops'); loratch.torch_hf_tokenizer_load(d)", "TokenizerError", "tokenizer_config.json"),
    ("tokenizer-load-special-token-wrong-type", "cfg = json.loads((TRAINABLE / 'tokenizer_config.json').read_text()); cfg['bos_token'] = 5; d = tok_dir(tokenizer_config__json=json.dumps(cfg)); loratch.torch_hf_tokenizer_load(d)", "TokenizerError", "bos_token"),
    ("tokenizer-load-path-type", "loratch.torch_hf_tokenizer_load(None)", "TypeError", "path"),
    ("tokenizer-chat-template-syntax-error", "d = tok_dir(chat_template__jinja='{% for m in messages %}{{ m.content }'); t = loratch.torch_hf_tokenizer_load(d); t.apply_chat_template([{'role': 'user', 'content': 'hi'}])", "TokenizerError", "template"),
    ("tokenizer-chat-template-raises", "d = tok_dir(chat_template__jinja=\"{{ raise_exception('only user turns please') }}\"); t = loratch.torch_hf_tokenizer_load(d); t.apply_chat_template([{'role': 'user', 'content': 'hi'}])", "TokenizerError", "only user turns please"),
    ("tokenizer-no-chat-template", "cfg = json.loads((TRAINABLE / 'tokenizer_config.json').read_text()); cfg.pop('chat_template', None); d = tok_dir(chat_template__jinja=None, tokenizer_config__json=json.dumps(cfg)); loratch.torch_hf_tokenizer_load(d).apply_chat_template([{'role': 'user', 'content': 'hi'}])", "TokenizerError", "chat template"),
    ("tokenizer-encode-not-a-string", "tok().encode(42)", "TypeError", "text"),
    ("tokenizer-encode-bytes", "tok().encode(b'hello')", "TypeError", "text"),
    ("tokenizer-decode-string", "tok().decode('hello')", "TypeError", "argument 'ids'"),
    # A token id out of range is an InputError, as torch_hf_forward raises for one.
    ("tokenizer-decode-negative-id", "tok().decode([1, -1])", "InputError", "argument 'ids'[1]"),
    ("tokenizer-token-to-id-not-a-string", "tok().token_to_id(5)", "TypeError", "token"),
    ("tokenizer-id-to-token-negative", "tok().id_to_token(-1)", "InputError", "argument 'id'"),
    ("tokenizer-chat-not-a-list", "tok().apply_chat_template('hello')", "TypeError", "messages"),
    ("tokenizer-chat-message-not-a-dict", "tok().apply_chat_template([('user', 'hi')])", "TypeError", "messages"),
    ("tokenizer-chat-missing-content", "tok().apply_chat_template([{'role': 'user'}])", "TypeError", "content"),
    ("tokenizer-chat-content-not-a-string", "tok().apply_chat_template([{'role': 'user', 'content': 3}])", "TypeError", "content"),
    # --- optimizer ------------------------------------------------------------------------------------
    ("optimizer-no-params", "loratch.torch_optimizer_add_params([], 1e-3, 0.0)", "ConfigError", "param"),
    ("optimizer-params-not-tensors", "loratch.torch_optimizer_add_params([1.0, 2.0], 1e-3, 0.0)", "TypeError", "torch.Tensor"),
    ("optimizer-params-not-a-list", "loratch.torch_optimizer_add_params(torch.randn(3, requires_grad=True), 1e-3, 0.0)", "TypeError", "params"),
    ("optimizer-param-without-grad", "loratch.torch_optimizer_add_params([torch.randn(3)], 1e-3, 0.0)", "ConfigError", "require grad"),
    ("optimizer-param-not-a-leaf", "p = torch.randn(3, requires_grad=True) * 2; loratch.torch_optimizer_add_params([p], 1e-3, 0.0)", "ConfigError", "leaf"),
    ("optimizer-duplicate-param", "p = torch.randn(3, requires_grad=True); loratch.torch_optimizer_add_params([p, p], 1e-3, 0.0)", "ConfigError", "same tensor"),
    ("optimizer-lr-negative", "loratch.torch_optimizer_add_params(params(), -1e-3, 0.0)", "ConfigError", "lr must be"),
    ("optimizer-lr-nan", "loratch.torch_optimizer_add_params(params(), float('nan'), 0.0)", "ConfigError", "lr must be"),
    ("optimizer-weight-decay-negative", "loratch.torch_optimizer_add_params(params(), 1e-3, -0.1)", "ConfigError", "weight_decay"),
    ("optimizer-beta1-one", "loratch.torch_optimizer_add_params(params(), 1e-3, 0.0, betas=(1.0, 0.999))", "ConfigError", "beta"),
    ("optimizer-beta2-negative", "loratch.torch_optimizer_add_params(params(), 1e-3, 0.0, betas=(0.9, -0.1))", "ConfigError", "beta"),
    ("optimizer-betas-wrong-arity", "loratch.torch_optimizer_add_params(params(), 1e-3, 0.0, betas=(0.9,))", "ConfigError", "betas must be a pair of floats, got 1"),
    ("optimizer-betas-not-numbers", "loratch.torch_optimizer_add_params(params(), 1e-3, 0.0, betas=('a', 'b'))", "TypeError", "betas"),
    ("optimizer-eps-zero", "loratch.torch_optimizer_add_params(params(), 1e-3, 0.0, eps=0.0)", "ConfigError", "eps"),
    ("optimizer-lr-string", "loratch.torch_optimizer_add_params(params(), '1e-3', 0.0)", "TypeError", "learning_rate"),
    ("zero-grad-not-an-optimizer", "loratch.torch_optimizer_zero_grad(params())", "TypeError", "Optimizer"),
    ("step-not-an-optimizer", "loratch.torch_optimizer_step(None)", "TypeError", "Optimizer"),
    ("clip-max-norm-negative", "loratch.torch_clip_grad_norm(opt(), -1.0)", "ConfigError", "max_norm"),
    ("clip-max-norm-nan", "loratch.torch_clip_grad_norm(opt(), float('nan'))", "ConfigError", "max_norm"),
    ("clip-not-an-optimizer", "loratch.torch_clip_grad_norm('adam', 1.0)", "TypeError", "Optimizer"),
    # --- torch_backward / torch_set_grad_enabled / misc -----------------------------------------------
    ("backward-not-a-tensor", "loratch.torch_backward(1.0)", "TypeError", "torch.Tensor"),
    ("backward-non-scalar-loss", "p = torch.randn(3, requires_grad=True); loratch.torch_backward(p * 2)", "LoraError", "scalar"),
    ("backward-without-graph", "loratch.torch_backward(torch.tensor(1.0))", "LoraError", "does not require grad"),
    ("backward-twice-without-retain", "p = torch.randn(3, requires_grad=True); l = (p.exp()).sum(); loratch.torch_backward(l); loratch.torch_backward(l)", "LoraError", "retain_graph"),
    ("backward-retain-graph-not-a-bool", "p = torch.randn(3, requires_grad=True); loratch.torch_backward(p.sum(), 'yes')", "TypeError", "retain_graph"),
    ("set-grad-enabled-not-a-bool", "loratch.torch_set_grad_enabled('yes')", "TypeError", "flag"),
    ("set-grad-enabled-none", "loratch.torch_set_grad_enabled(None)", "TypeError", "flag"),
    ("mps-synchronize-extra-argument", "loratch.torch_mps_synchronize(0)", "TypeError", "argument"),
    ("tensor-in-memory-extra-argument", "loratch.tensor_in_memory(1)", "TypeError", "argument"),
    # --- scheduler -------------------------------------------------------------------------------------
    ("scheduler-unknown-type", "loratch.torch_lr_scheduler(opt(), 'warp_drive')", "ConfigError", "warp_drive"),
    ("scheduler-type-not-a-string", "loratch.torch_lr_scheduler(opt(), 3)", "TypeError", "scheduler_type"),
    ("scheduler-not-an-optimizer", "loratch.torch_lr_scheduler(params(), 'cosine')", "TypeError", "Optimizer"),
    ("scheduler-config-not-a-dict", "loratch.torch_lr_scheduler(opt(), 'cosine', [('total_steps', 10)])", "TypeError", "config"),
    ("scheduler-unknown-config-key", "loratch.torch_lr_scheduler(opt(), 'cosine', {'total_step': 10})", "ConfigError", "total_step"),
    ("scheduler-value-not-a-number", "loratch.torch_lr_scheduler(opt(), 'cosine', {'min_lr': 'low'})", "ConfigError", "min_lr"),
    ("scheduler-steps-not-an-integer", "loratch.torch_lr_scheduler(opt(), 'cosine', {'total_steps': 10.5})", "ConfigError", "total_steps"),
    ("scheduler-total-steps-negative", "loratch.torch_lr_scheduler(opt(), 'cosine', {'total_steps': -5})", "ConfigError", "total_steps"),
    ("scheduler-total-steps-zero", "loratch.torch_lr_scheduler(opt(), 'cosine', {'total_steps': 0})", "ConfigError", "total_steps"),
    ("scheduler-warmup-above-total", "loratch.torch_lr_scheduler(opt(), 'linear_warmup_cosine', {'total_steps': 10, 'warmup_steps': 20})", "ConfigError", "warmup_steps"),
    ("scheduler-min-lr-above-initial", "loratch.torch_lr_scheduler(opt(), 'cosine', {'initial_lr': 1e-3, 'min_lr': 1e-2})", "ConfigError", "min_lr"),
    ("scheduler-initial-lr-nan", "loratch.torch_lr_scheduler(opt(), 'cosine', {'initial_lr': float('nan')})", "ConfigError", "initial_lr"),
    ("scheduler-initial-lr-negative", "loratch.torch_lr_scheduler(opt(), 'constant', {'initial_lr': -1.0})", "ConfigError", "initial_lr"),
    ("scheduler-gamma-zero", "loratch.torch_lr_scheduler(opt(), 'exponential', {'gamma': 0.0})", "ConfigError", "gamma"),
    ("scheduler-gamma-above-one", "loratch.torch_lr_scheduler(opt(), 'step', {'gamma': 1.5})", "ConfigError", "gamma"),
    ("scheduler-step-size-zero", "loratch.torch_lr_scheduler(opt(), 'step', {'step_size': 0})", "ConfigError", "step_size"),
    ("scheduler-step-not-a-scheduler", "loratch.torch_scheduler_step(opt())", "TypeError", "Scheduler"),
    ("scheduler-get-lr-not-a-scheduler", "loratch.torch_scheduler_get_lr(None)", "TypeError", "Scheduler"),
    # --- LoRA layer functions not in test_errors.py ----------------------------------------------------
    ("lora-forward-grad-wrong-shape", "l = loratch.torch_lora_linear(8, 4, 2, 4.0); loratch.torch_lora_forward_with_gradients(l, torch.randn(3, 5))", "ShapeError", "in_features"),
    ("lora-forward-grad-wrong-dtype", "l = loratch.torch_lora_linear(8, 4, 2, 4.0); loratch.torch_lora_forward_with_gradients(l, torch.randn(3, 8).half())", "DTypeError", "float16"),
    ("lora-forward-grad-not-a-layer", "loratch.torch_lora_forward_with_gradients(torch.nn.Linear(8, 4), torch.randn(3, 8))", "TypeError", "LoraLinear"),
    ("lora-forward-meta-input", "l = loratch.torch_lora_linear(8, 4, 2, 4.0); loratch.torch_lora_forward(l, torch.randn(3, 8, device='meta'))", "DeviceError", "meta"),
    ("lora-trainable-params-not-a-layer", "loratch.torch_lora_trainable_params(torch.nn.Linear(8, 4))", "TypeError", "LoraLinear"),
    ("lora-merge-not-a-layer", "loratch.torch_lora_merge_weights(None)", "TypeError", "LoraLinear"),
    ("lora-unmerge-not-a-layer", "loratch.torch_lora_unmerge_weights('layer')", "TypeError", "LoraLinear"),
    ("lora-apply-rank-zero", "loratch.torch_lora_apply_to_linear(torch.nn.Linear(8, 4), 0, 4.0)", "ConfigError", "rank"),
    ("lora-apply-dropout-negative", "loratch.torch_lora_apply_to_linear(torch.nn.Linear(8, 4), 2, 4.0, dropout=-0.5)", "ConfigError", "dropout"),
    ("lora-apply-not-a-module", "loratch.torch_lora_apply_to_linear(torch.randn(4, 8), 2, 4.0)", "TypeError", "Linear"),
    ("lora-linear-dtype-not-a-string", "loratch.torch_lora_linear(8, 4, 2, 4.0, dtype=torch.float32)", "TypeError", "dtype"),
    ("lora-linear-features-negative", "loratch.torch_lora_linear(8, -4, 2, 4.0)", "ConfigError", "out_features"),
    ("lora-save-adapters-onto-a-directory", "l = loratch.torch_lora_linear(8, 4, 2, 4.0); (tmp / 'd').mkdir(); loratch.torch_lora_save_adapters(l, tmp / 'd')", "OSError", "<tmp>/d: Is a directory"),
    ("lora-load-adapters-pt-file", "l = loratch.torch_lora_linear(8, 4, 2, 4.0); p = tmp / 'a.pt'; torch.save({'lora_A.weight': l.lora_A.detach()}, p); loratch.torch_lora_load_adapters(l, p)", "AdapterFormatError", "safetensors"),
    ("lora-load-adapters-unreadable-chmod", "l = loratch.torch_lora_linear(8, 4, 2, 4.0); p = tmp / 'a.safetensors'; loratch.torch_lora_save_adapters(l, p); unreadable(p); loratch.torch_lora_load_adapters(l, p)", "PermissionError", "a.safetensors"),
    # --- loratch.train: the configuration ------------------------------------------------------------
    ("train-unknown-top-level-key", "loratch.train(train_config(optimizer={'lr': 1}))", "ConfigError", "optimizer"),
    ("train-unknown-training-key", "loratch.train(train_config(training={'warmup_ratoi': 0.1}))", "ConfigError", "did you mean `warmup_ratio`"),
    ("train-unknown-lora-key", "loratch.train(train_config(lora={'lora_alpha': 8}))", "ConfigError", "lora_alpha"),
    ("train-missing-model", "loratch.train(train_config(model=None))", "ConfigError", "model"),
    ("train-missing-output-dir", "loratch.train(train_config(output_dir=None))", "ConfigError", "output_dir"),
    ("train-config-not-a-dict", "loratch.train([('model', 'x')])", "TypeError", "dict"),
    ("train-training-not-a-dict", "loratch.train(train_config(training=None) | {'training': 'fast'})", "ConfigError", "training"),
    ("train-batch-size-string", "loratch.train(train_config(training={'batch_size': '2'}))", "ConfigError", "batch_size"),
    ("train-batch-size-negative", "loratch.train(train_config(training={'batch_size': -1}))", "ConfigError", "batch_size"),
    ("train-batch-size-zero", "loratch.train(train_config(training={'batch_size': 0}))", "ConfigError", "batch_size"),
    ("train-rank-string", "loratch.train(train_config(lora={'rank': '8'}))", "ConfigError", "rank"),
    ("train-rank-zero", "loratch.train(train_config(lora={'rank': 0}))", "ConfigError", "lora.rank"),
    ("train-alpha-negative", "loratch.train(train_config(lora={'alpha': -1.0}))", "ConfigError", "lora.alpha"),
    ("train-dropout-one", "loratch.train(train_config(lora={'dropout': 1.0}))", "ConfigError", "lora.dropout"),
    ("train-target-modules-wrong-type", "loratch.train(train_config(lora={'target_modules': 5}))", "ConfigError", "target_modules"),
    ("train-unknown-target-module", "loratch.train(train_config(lora={'target_modules': ['qkv_proj']}))", "ConfigError", "qkv_proj"),
    ("train-learning-rate-nan", "loratch.train(train_config(training={'learning_rate': float('nan')}))", "ConfigError", "learning_rate"),
    ("train-learning-rate-inf", "loratch.train(train_config(training={'learning_rate': float('inf')}))", "ConfigError", "learning_rate"),
    ("train-learning-rate-zero", "loratch.train(train_config(training={'learning_rate': 0.0}))", "ConfigError", "learning_rate"),
    ("train-weight-decay-negative", "loratch.train(train_config(training={'weight_decay': -0.5}))", "ConfigError", "weight_decay"),
    ("train-unknown-scheduler", "loratch.train(train_config(training={'scheduler_type': 'warp_drive'}))", "ConfigError", "warp_drive"),
    ("train-unknown-device", "loratch.train(train_config(training={'device': 'tpu'}))", "DeviceError", "tpu"),
    ("train-unknown-dtype", "loratch.train(train_config(training={'dtype': 'int8'}))", "DTypeError", "int8"),
    ("train-validation-split-above-one", "loratch.train(train_config(validation_split=1.5))", "ConfigError", "validation_split"),
    ("train-max-steps-zero", "loratch.train(train_config(training={'max_steps': 0}))", "ConfigError", "nothing to train"),
    ("train-seed-negative", "loratch.train(train_config(seed=-1))", "ConfigError", "seed"),
    ("train-value-not-json", "loratch.train(train_config(seed=object()))", "TypeError", "object"),
    # --- loratch.train: files --------------------------------------------------------------------------
    ("train-missing-model-dir", "loratch.train(train_config(model=str(tmp / 'no-model')))", "FileNotFoundError", "no-model"),
    ("train-model-without-tokenizer", "d = model_copy(TRAINABLE); (d / 'tokenizer.json').unlink(); loratch.train(train_config(model=str(d)))", "FileNotFoundError", "tokenizer.json"),
    ("train-model-vocab-smaller-than-tokenizer", "d = model_copy(LLAMA); [shutil.copy(TRAINABLE / f, d / f) for f in TOKENIZER_FILES if (TRAINABLE / f).is_file()]; loratch.train(train_config(model=str(d)))", "InputError", "vocab"),
    ("train-missing-data-file", "loratch.train(train_config(data=str(tmp / 'missing.jsonl')))", "FileNotFoundError", "missing.jsonl"),
    ("train-missing-validation-file", "loratch.train(train_config(validation_data=str(tmp / 'val.jsonl')))", "FileNotFoundError", "val.jsonl"),
    ("train-data-is-a-directory", "(tmp / 'data.jsonl').mkdir(); loratch.train(train_config(data=str(tmp / 'data.jsonl')))", "OSError", "data.jsonl"),
    ("train-data-unreadable-chmod", "p = data_file(GOOD, GOOD); unreadable(p); loratch.train(train_config(data=str(p)))", "PermissionError", "data.jsonl"),
    ("train-data-empty", "loratch.train(train_config(data=str(data_file())))", "InputError", "no records"),
    ("train-data-bad-json-line", "p = data_file(GOOD, GOOD, '{\"instruction\": oops}'); loratch.train(train_config(data=str(p)))", "InputError", "data.jsonl:3"),
    ("train-data-unknown-record-shape", "p = data_file(GOOD, json.dumps({'question': 'q', 'answer': 'a'})); loratch.train(train_config(data=str(p)))", "InputError", "data.jsonl:2"),
    ("train-data-field-wrong-type", "p = data_file(GOOD, GOOD, GOOD, json.dumps({'instruction': 'q', 'output': 5})); loratch.train(train_config(data=str(p)))", "InputError", "data.jsonl:4"),
    ("train-data-mixed-formats", "p = data_file(GOOD, json.dumps({'text': 'plain'})); loratch.train(train_config(data=str(p)))", "InputError", "data.jsonl:2"),
    ("train-data-record-not-an-object", "p = data_file(GOOD, '[1, 2]'); loratch.train(train_config(data=str(p)))", "InputError", "data.jsonl:2"),
    ("train-data-empty-messages", "p = data_file(json.dumps({'messages': []})); loratch.train(train_config(data=str(p)))", "InputError", "data.jsonl:1"),
    ("train-data-bad-json-array", "p = data_file('[' + GOOD + ',', name='data.json'); loratch.train(train_config(data=str(p)))", "InputError", "data.json"),
    ("train-validation-bad-record", "p = data_file(GOOD, '{broken', name='val.jsonl'); loratch.train(train_config(validation_data=str(p)))", "InputError", "val.jsonl:2"),
    ("train-output-dir-is-a-file", "(tmp / 'out').write_text('x'); loratch.train(train_config())", "OSError", "<tmp>/out"),
    ("train-resume-missing", "loratch.train(train_config(), resume=tmp / 'no-ckpt')", "FileNotFoundError", "no-ckpt"),
    ("train-resume-dir-without-checkpoint", "(tmp / 'empty').mkdir(); loratch.train(train_config(), resume=tmp / 'empty')", "CheckpointError", "checkpoint"),
    ("train-resume-corrupt-state", "c = tmp / 'out' / 'checkpoint-1'; c.mkdir(parents=True); (c / 'trainer_state.json').write_text('{oops'); loratch.train(train_config(), resume=c)", "CheckpointError", "trainer_state.json"),
]

# Real bugs the table found: case id -> reason (the case is an expected failure until fixed).
BUGS: dict[str, str] = {
}

CHMOD_CASES = {cid for cid, *_ in CASES if cid.endswith("-chmod")}
CASE_TIMEOUT_S = 60
CASE_COUNT = len(CASES)


def _params() -> list[Any]:
    out = []
    for cid, code, exc, needle in CASES:
        marks: list[Any] = []
        if cid in BUGS:
            marks.append(pytest.mark.xfail(strict=True, reason=f"BUG: {BUGS[cid]}"))
        if cid in CHMOD_CASES and not CHMOD_BLOCKS_READS:
            marks.append(pytest.mark.skip(reason=CHMOD_SKIP_REASON))
        out.append(pytest.param(cid, exc, needle, id=cid, marks=marks))
    return out


def _run_workers(cases: list[tuple[str, str, str]], dirs: dict[str, str], tmp: Path) -> dict[str, dict[str, Any]]:
    """Runs `cases` in worker processes; a case that kills its worker is recorded as a crash and a
    new worker continues after it."""
    results: dict[str, dict[str, Any]] = {}
    pending = list(cases)
    attempt = 0
    while pending:
        attempt += 1
        spec = tmp / f"spec-{attempt}.json"
        spec.write_text(json.dumps({**dirs, "tmp": str(tmp / "cases"), "case_timeout": CASE_TIMEOUT_S, "cases": pending}))
        proc = run_py(WORKER, spec, timeout=CASE_TIMEOUT_S * len(pending) + 120, preexec_fn=WORKER_PREEXEC)
        started = None
        for line in proc.stdout.splitlines():
            if line.startswith("START "):
                started = line.split(" ", 1)[1]
            elif line.startswith("RESULT "):
                _, cid, payload = line.split(" ", 2)
                results[cid] = json.loads(payload)
                started = None
        done = {c[0] for c in pending if c[0] in results}
        if started is not None:  # this case killed the worker
            results[started] = {"crash": proc.returncode, "stderr": proc.stderr[-3000:]}
            done.add(started)
        elif len(done) < len(pending):  # the worker died outside any case (e.g. in its setup)
            for cid, *_ in pending:
                results.setdefault(cid, {"crash": proc.returncode, "stderr": proc.stderr[-3000:]})
            break
        pending = [c for c in pending if c[0] not in done]
    return results


@pytest.fixture(scope="module")
def results(tiny_model: Any, trainable_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    base = tmp_path_factory.mktemp("bad-input")
    dirs = {"llama": tiny_model("llama"), "qwen3": tiny_model("qwen3"), "trainable": trainable_dir}
    skipped = set() if CHMOD_BLOCKS_READS else CHMOD_CASES
    cases = [(cid, code, exc) for cid, code, exc, _ in CASES if cid not in skipped]
    # Two workers (one per core) over interleaved halves of the table.
    import concurrent.futures

    halves = [cases[0::2], cases[1::2]]
    for i in range(2):
        (base / f"w{i}").mkdir()
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        futures = [
            pool.submit(_run_workers, half, {k: str(v) for k, v in dirs.items()}, base / f"w{i}")
            for i, half in enumerate(halves)
        ]
        merged: dict[str, dict[str, Any]] = {}
        for f in futures:
            merged.update(f.result())
    return merged


@pytest.mark.parametrize(("cid", "exc", "needle"), _params())
def test_bad_input_raises_typed_error(results: dict[str, dict[str, Any]], cid: str, exc: str, needle: str) -> None:
    r = results[cid]
    assert "crash" not in r, f"{cid}: the worker died (rc={r.get('crash')}):\n{r.get('stderr')}"
    assert r["raised"] is not None, f"{cid}: no exception (expected {exc})"
    assert r["ok"], f"{cid}: expected {exc}, got {r['raised']}: {r['msg']!r} (raised at {r['at']})"
    assert needle in r["msg"], f"{cid}: the {r['raised']} message {r['msg']!r} does not name {needle!r}"
    assert "PanicException" not in r["raised"] and "panicked" not in r["msg"], r


def test_case_table_size() -> None:
    ids = [c[0] for c in CASES]
    assert len(ids) == len(set(ids)), "duplicate case ids"
    assert set(BUGS) <= set(ids)
    print(f"\n{CASE_COUNT} bad-input cases ({len(BUGS)} known bugs, xfail)")
    assert CASE_COUNT >= 290
