"""The memory table of `make bench` (issue 21): peak RSS and seconds per step of one LoRA training
step at batch 1 x 1024 tokens, for SmolLM2-135M and random-weight Llama-3.2-1B-, 3B- and
Llama-3.1-8B-shaped models.

Every row is its own process: the `loratch` binary (`loratch train --config`, as the fixed-step
table of train_bench.py runs it: its threads, allocator and oneMKL dispatch) or a PEFT +
transformers worker (this file with `--worker peft`: stock torch, a plain AdamW loop as
train_bench.py's). Both train LoRA r=16 alpha=32 on all 7 projections with AdamW + clip 1.0, on
the same 1024 token ids (one text of the FAQ data, truncated). Peak RSS is the process's own VmHWM
(/proc/self/status) read at the end of its last step (loratch's trainer logs it as
`peak_rss_bytes`): it includes loading (file pages mapped while the weights are read count). The
step time is the second step's (after one warm-up step) or, for the 3B and 8B rows, the first
step's (marked "first").

loratch rows: `dtype` float32 / bfloat16, `quantize = "q8_0" | "q4_0" | "nf4"` on the float
checkpoint (computed in float32), or the model given as a GGUF file (its blocks as stored), each
with `gradient_checkpointing` off or on. PEFT rows: float32, with and without
`gradient_checkpointing_enable()`, and bitsandbytes nf4 (`BitsAndBytesConfig(load_in_4bit=True)`,
installed with pip into WORK/bnb for that process only). A row whose feature is missing or fails
is recorded as "not available: <error>"; a process whose RSS passes the limit (`--max-rss-gib`,
or what the machine has free) is stopped and recorded as not fitting.

The random models (written once into WORK/models, never committed): Hugging Face directories of
bfloat16 safetensors (normal * 0.02, norms 1; loaded as float32 where the row says so) with
SmolLM2's tokenizer files, and Q4_0 GGUFs of random blocks (benches/gguf_random.py; the 8B one is
~4.5 GB and exists only as a GGUF).

    python benches/memory_table.py --dry-run            # the rows and their expected minutes
    python benches/memory_table.py --quick              # the 135M rows only
    python benches/memory_table.py --only '1b/.*ckpt'   # rows whose id matches a regex
    python benches/memory_table.py                      # the default table; --all for every row
    python benches/memory_table.py --work DIR           # models made by an earlier run in DIR

Writes its section of BENCHMARKS.md (`--out`), replacing the previous one.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import summary  # noqa: E402
from gguf_random import SHAPES, LlamaShape, write_random_llama_gguf  # noqa: E402
from train_bench import ALL7, LR, binary, faq_records, loratch_metrics, peak_rss, peft_steps, write_jsonl  # noqa: E402

SEQ = 1024
GIB = float(1 << 30)
SIZES = ["135m", "1b", "3b", "8b"]
TITLE = "## Memory table"
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"]
QUANTIZE = ("q8_0", "q4_0", "nf4")


@dataclasses.dataclass(frozen=True)
class Row:
    """One process: `side` (loratch, peft, peft-bnb) training a `size` model whose frozen base is
    `base` (float32, bfloat16, q8_0, q4_0, nf4, or gguf: the GGUF file as stored)."""

    size: str
    side: str
    base: str
    ckpt: bool

    @property
    def id(self) -> str:
        return f"{self.size}/{self.side}/{self.base}/{'ckpt' if self.ckpt else 'nockpt'}"

    @property
    def warmup(self) -> bool:
        """Whether a warm-up step runs before the measured one (not for the 3B and 8B rows)."""
        return self.size in ("135m", "1b")


def plan(sizes: list[str], everything: bool) -> list[Row]:
    """The rows of `sizes`: every combination at 135M; at 1B and 3B the default table keeps the
    rows the targets and the story need (`everything` adds the rest); at 8B the one row."""
    rows: list[Row] = []
    for size in sizes:
        if size == "8b":
            rows.append(Row("8b", "loratch", "gguf", True))
            continue
        full = everything or size == "135m"
        for base in ("float32", "bfloat16", *QUANTIZE, "gguf"):
            for ckpt in (False, True):
                keep = full or {
                    "1b": ckpt or base in ("float32", "bfloat16"),
                    "3b": ckpt and base in ("float32", "q4_0", "gguf"),
                }[size]
                if keep:
                    rows.append(Row(size, "loratch", base, ckpt))
        rows += [Row(size, "peft", "float32", False), Row(size, "peft", "float32", True)]
        if full or size == "1b":
            rows.append(Row(size, "peft-bnb", "nf4", True))
        if full:
            rows.append(Row(size, "peft-bnb", "nf4", False))
    return rows


# --- expected time -----------------------------------------------------------------------------


def step_flops(shape: LlamaShape, tokens: int) -> float:
    """FLOPs of one LoRA step with a frozen base: 4 per weight and token (forward, input
    gradient) plus the causal attention's products."""
    n = shape.n_params() - shape.vocab_size * shape.hidden_size * (0 if shape.tie_word_embeddings else 1)
    attention = 4 * shape.num_hidden_layers * tokens * tokens * shape.num_attention_heads * shape.head_dim_
    return 4.0 * n * tokens + attention


#: Calibrated on this project's 2-core machine (loratch float32 at 1 x 1024): effective GFLOP/s,
#: and each kind of row's time over loratch float32's without checkpointing. Rough (+-30%).
RATE = 120e9
FACTOR = {"float32": 1.0, "bfloat16": 1.3, "q8_0": 1.25, "q4_0": 1.25, "nf4": 1.3, "gguf": 1.25,
          "peft": 2.0, "peft-bnb": 2.5}


def expected_s(row: Row) -> float:
    shape = SHAPES[row.size]
    step = step_flops(shape, SEQ) / RATE * FACTOR[row.side if row.side != "loratch" else row.base]
    step *= 1.35 if row.ckpt else 1.0
    load = 5 + shape.n_params() * 2 / 0.5e9  # bf16 file read and converted
    return load + step * (2 if row.warmup else 1)


# --- models and data ---------------------------------------------------------------------------


def write_random_hf(directory: Path, shape: LlamaShape, tokenizer: Path, seed: int = 0) -> Path:
    """A Hugging Face directory of `shape` with random bfloat16 weights (normal * 0.02, norms 1),
    streamed one tensor at a time into one model.safetensors, plus `tokenizer`'s files."""
    if (directory / "model.safetensors").is_file():
        return directory
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shapes = list(shape.tensor_shapes())
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, s in shapes:
        n = 2 * int(torch.tensor(s).prod())
        header[name] = {"dtype": "BF16", "shape": list(s), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    g = torch.Generator().manual_seed(seed)
    with open(tmp / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for _, s in shapes:
            t = torch.ones(s) if len(s) == 1 else torch.randn(s, generator=g).mul_(0.02)
            f.write(t.to(torch.bfloat16).view(torch.int16).numpy().tobytes())
    (tmp / "config.json").write_text(json.dumps(shape.hf_config(), indent=2))
    for name in TOKENIZER_FILES:
        if (tokenizer / name).is_file():
            shutil.copy(tokenizer / name, tmp / name)
    shutil.rmtree(directory, ignore_errors=True)
    tmp.rename(directory)
    return directory


@dataclasses.dataclass
class Models:
    """Where each size's float directory and GGUF file are (made on first use)."""

    work: Path

    def float_dir(self, size: str) -> Path:
        from loratch.default_model import default_model_dir

        if size == "135m":
            return default_model_dir()
        return write_random_hf(self.work / "models" / f"{size}-bf16", SHAPES[size], default_model_dir())

    def gguf(self, size: str) -> Path:
        from loratch.default_model import gguf_path

        if size == "135m":
            return gguf_path()  # as shipped: Q4_1 projections, a Q8_0 embedding
        path = self.work / "models" / f"{size}-q4_0.gguf"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            write_random_llama_gguf(tmp, SHAPES[size], "Q4_0", name=f"random llama {size}")
            tmp.rename(path)
        return path


def write_data(work: Path, tokenizer: Path) -> Path:
    """data.jsonl: one text of more than SEQ tokens (FAQ answers), which both sides truncate."""
    from loratch import torch_hf_tokenizer_load

    tok = torch_hf_tokenizer_load(tokenizer)
    records, words = faq_records(), list[str]()
    while len(tok.encode(" ".join(words), add_special_tokens=True)) <= SEQ:
        words.append(records[len(words) % len(records)]["output"])
    path = work / "data.jsonl"
    write_jsonl(path, [{"text": " ".join(words)}])
    return path


# --- running one row ---------------------------------------------------------------------------


@dataclasses.dataclass
class Result:
    peak: float | None = None  # the process's VmHWM, bytes
    step_s: float | None = None
    seen: float = 0.0  # the largest RSS the parent saw while polling, bytes
    wall_s: float = 0.0
    note: str = ""  # why there are no numbers


def mem_available() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return float(line.split()[1]) * 1024
    return float("inf")


def rss_of(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return float(line.split()[1]) * 1024
    except OSError:
        pass
    return 0.0


def watched(cmd: list[str], env: dict[str, str], limit: float, timeout: float) -> tuple[int, str, str, Result]:
    """Runs `cmd`, polling its RSS: stopped (SIGKILL) when over `limit` bytes or `timeout` s.
    Returns (exit status, stdout, stderr, a Result with `seen`, `wall_s` and a note if stopped)."""
    res = Result()
    t0 = time.perf_counter()
    with open(os.devnull, "rb") as null:
        proc = subprocess.Popen(cmd, stdin=null, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env={**os.environ, **env}, text=True)
        # The pipes are drained by threads, so a chatty child never blocks on a full pipe.
        out_chunks: list[str] = []
        err_chunks: list[str] = []
        readers = [threading.Thread(target=lambda s=s, c=c: c.append(s.read()), daemon=True)
                   for s, c in ((proc.stdout, out_chunks), (proc.stderr, err_chunks))]
        for r in readers:
            r.start()
        while proc.poll() is None:
            res.seen = max(res.seen, rss_of(proc.pid))
            elapsed = time.perf_counter() - t0
            if res.seen > limit or elapsed > timeout:
                proc.kill()
                res.note = (f"stopped at {res.seen / GIB:.1f} GiB RSS (limit {limit / GIB:.1f} GiB): does not fit"
                            if res.seen > limit else f"stopped after {elapsed:.0f} s (timeout)")
                break
            time.sleep(0.2)
        proc.wait()
        for r in readers:
            r.join()
    res.wall_s = time.perf_counter() - t0
    return proc.returncode, "".join(out_chunks), "".join(err_chunks), res


def error_line(stderr: str) -> str:
    """The error of a failed run's stderr (the binary's last `error: ...` line, or a Python
    traceback's last line), shortened for a table cell."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if re.match(r"(error\b|\w*(Error|Exception)\b)", ln, re.IGNORECASE)]
    line = (errors or lines or ["no error output"])[-1]
    line = line.split(", expected one of")[0]  # serde's list of every valid key
    return re.sub(r"\s+", " ", line.replace("|", "/"))[:240]


def loratch_toml(row: Row, model: Path, data: Path, out: Path) -> str:
    lines = [f"model = {json.dumps(str(model))}", f"data = {json.dumps(str(data))}",
             f"output_dir = {json.dumps(str(out))}", "validation_split = 0.0"]
    if row.base in QUANTIZE:
        lines.append(f'quantize = "{row.base}"')
    training: dict[str, Any] = {
        "max_steps": 2 if row.warmup else 1, "batch_size": 1, "gradient_accumulation_steps": 1,
        "max_seq_length": SEQ, "learning_rate": LR, "max_grad_norm": 1.0, "logging_steps": 1, "save_steps": 0,
        "eval_steps": 0, "scheduler_type": "constant", "train_on_inputs": True, "packing": False,
        "dtype": "bfloat16" if row.base == "bfloat16" else "float32", "overwrite_output_dir": True,
    }
    if row.ckpt:  # absent when off, so rows without it run on a binary that lacks the key
        training["gradient_checkpointing"] = True
    lines += ["[lora]", "rank = 16", "alpha = 32", f"target_modules = {json.dumps(ALL7)}", "dropout = 0.0",
              "[training]", *(f"{k} = {json.dumps(v)}" for k, v in training.items())]
    return "\n".join(lines) + "\n"


def run_loratch(row: Row, models: Models, data: Path, work: Path, limit: float) -> Result:
    model = models.gguf(row.size) if row.base == "gguf" else models.float_dir(row.size)
    out = work / "runs" / row.id.replace("/", "-")
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    cfg = out.with_suffix(".toml")
    cfg.write_text(loratch_toml(row, model, data, out))
    rc, _, err, res = watched([str(binary()), "train", "--config", str(cfg)], {}, limit, timeout_s(row))
    if res.note:
        return res
    if rc != 0:
        res.note = f"not available: {error_line(err)}"
        return res
    records = [r for r in loratch_metrics(out) if "train_time_s" in r]
    times = [r["train_time_s"] for r in records]
    res.step_s = times[1] - times[0] if row.warmup else times[0]
    res.peak = float(records[-1]["peak_rss_bytes"])
    return res


def bnb_path(work: Path) -> tuple[Path | None, str]:
    """WORK/bnb holding bitsandbytes (pip install --target, --no-deps: the shared environment's
    torch stays the one used), or None and why not."""
    target = work / "bnb"
    if (target / "bitsandbytes").is_dir():
        return target, ""
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target), "bitsandbytes"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return None, f"pip install bitsandbytes failed: {error_line(proc.stderr)}"
    return target, ""


def run_peft(row: Row, models: Models, data: Path, work: Path, limit: float) -> Result:
    env: dict[str, str] = {}
    if row.side == "peft-bnb":
        target, why = bnb_path(work)
        if target is None:
            return Result(note=f"not available: {why}")
        env["PYTHONPATH"] = os.pathsep.join([str(target), *filter(None, [os.environ.get("PYTHONPATH")])])
    cmd = [sys.executable, __file__, "--worker", "peft", "--model", str(models.float_dir(row.size)),
           "--data", str(data), "--steps", str(2 if row.warmup else 1)]
    cmd += ["--ckpt"] if row.ckpt else []
    cmd += ["--bnb"] if row.side == "peft-bnb" else []
    rc, out, err, res = watched(cmd, env, limit, timeout_s(row))
    if res.note:
        return res
    if rc != 0:
        res.note = f"{'fails' if row.side == 'peft-bnb' else 'not available'}: {error_line(err)}"
        return res
    got = json.loads(out.strip().splitlines()[-1])
    res.step_s, res.peak = got["steps"][-1], got["peak"]
    return res


def timeout_s(row: Row) -> float:
    return max(900.0, 4 * expected_s(row))


def worker_peft(a: argparse.Namespace) -> None:
    """One PEFT process: load, (gradient checkpointing), LoRA, `--steps` steps; prints the step
    times and VmHWM as JSON."""
    import transformers as tf
    from peft import LoraConfig, get_peft_model

    from loratch import torch_hf_tokenizer_load

    text = json.loads(a.data.read_text().splitlines()[0])["text"]
    ids = torch.tensor([torch_hf_tokenizer_load(a.model).encode(text, add_special_tokens=True)[:SEQ]])
    assert ids.shape[1] == SEQ, ids.shape
    kwargs: dict[str, Any] = {}
    if a.bnb:
        kwargs["quantization_config"] = tf.BitsAndBytesConfig(  # type: ignore[no-untyped-call]
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
        kwargs["device_map"] = {"": "cpu"}
    base = tf.AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32, **kwargs)
    if a.ckpt:
        base.config.use_cache = False
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})  # type: ignore[no-untyped-call]
    cfg = LoraConfig(r=16, lora_alpha=32, target_modules=ALL7, lora_dropout=0.0, task_type="CAUSAL_LM")
    model = get_peft_model(base, cfg)
    model.train()
    times = peft_steps(model, ids, a.steps, "cpu")
    print(json.dumps({"steps": times, "peak": peak_rss()}))


# --- the report --------------------------------------------------------------------------------

MODEL_NAMES = {"135m": "SmolLM2-135M", "1b": "Llama-3.2-1B shape", "3b": "Llama-3.2-3B shape",
               "8b": "Llama-3.1-8B shape"}


def base_label(row: Row) -> str:
    if row.side == "peft-bnb":
        return "bitsandbytes nf4 (compute float32)"
    if row.base == "gguf":
        return "GGUF as shipped (Q4_1, Q8_0 embedding)" if row.size == "135m" else "GGUF Q4_0 (random blocks)"
    if row.base in QUANTIZE:
        return f"`quantize = \"{row.base}\"`"
    return row.base


def cells(res: Result, row: Row) -> tuple[str, str, str]:
    """(peak RSS, s/step, note) of a row's table line."""
    if res.note or res.peak is None or res.step_s is None:
        return "-", "-", res.note
    return f"{res.peak / GIB:.2f}", f"{res.step_s:.1f}{'' if row.warmup else ' (first)'}", ""


def target_lines(results: dict[Row, Result]) -> list[str]:
    def get(side: str, base: str, ckpt: bool) -> Result | None:
        r = results.get(Row("1b", side, base, ckpt))
        return r if r is not None and not r.note else None

    out = ["", "Targets (1B shape):", ""]
    peft, f32, f32c = get("peft", "float32", False), get("loratch", "float32", False), get("loratch", "float32", True)

    def mark(ok: bool) -> str:
        return "**met**" if ok else "**missed**"

    for base in ("gguf", "q4_0", "nf4"):
        four = get("loratch", base, True)
        name = f"4-bit base ({base_label(Row('1b', 'loratch', base, True))}) + checkpointing"
        target = f"Memory table, 1B, {name}: peak RSS vs PEFT float32 without checkpointing <= 0.3x"
        if four is None or peft is None:
            out.append(f"- {name}: peak RSS <= 0.3x PEFT float32 without checkpointing: not measured")
            summary.record(target, "not measured", None)
        else:
            ratio = four.peak / peft.peak  # type: ignore[operator]
            out.append(f"- {name}: peak RSS {ratio:.2f}x PEFT float32 without checkpointing "
                       f"(target <= 0.3x): {mark(ratio <= 0.3)}")
            summary.record(target, f"{ratio:.2f}x", ratio <= 0.3)
        target = f"Memory table, 1B, {name}: step vs loratch float32's <= 1.35x"
        if four is None or f32 is None:
            out.append(f"- {name}: step <= 1.35x loratch float32's: not measured")
            summary.record(target, "not measured", None)
        else:
            ratio = four.step_s / f32.step_s  # type: ignore[operator]
            out.append(f"- {name}: step {ratio:.2f}x loratch float32's (target <= 1.35x): {mark(ratio <= 1.35)}")
            summary.record(target, f"{ratio:.2f}x", ratio <= 1.35)
    target = "Memory table, 1B: checkpointing alone (loratch float32, on / off) step time <= 1.4x"
    if f32 is None or f32c is None:
        out.append("- checkpointing alone (loratch float32, on / off) <= 1.4x step time: not measured")
        summary.record(target, "not measured", None)
    else:
        ratio = f32c.step_s / f32.step_s  # type: ignore[operator]
        out.append(f"- checkpointing alone (loratch float32, on / off): {ratio:.2f}x step time "
                   f"(target <= 1.4x): {mark(ratio <= 1.4)}")
        summary.record(target, f"{ratio:.2f}x", ratio <= 1.4)
    return out


def report(rows: list[Row], results: dict[Row, Result], total_s: float) -> list[str]:
    lines = [
        f"{TITLE}: one training step at 1 x {SEQ} tokens (issue 21)",
        "",
        f"By `benches/memory_table.py` ({total_s / 60:.0f} min; {os.cpu_count()} cores, torch {torch.__version__}): LoRA r=16 alpha=32 on all 7 projections, AdamW + "
        "clip 1.0, batch 1 x 1024 tokens (the same ids on both sides), each row its own process. Peak RSS: the "
        "process's VmHWM at the end of its last step, loading included. s/step: the step after one warm-up step, "
        "or the first step where marked \"first\" (3B and 8B: a step takes minutes). loratch: the `loratch` binary's "
        "trainer; `quantize` rows quantize the float checkpoint on load and compute in float32; GGUF rows train "
        "on the file's blocks. PEFT: transformers + PEFT in a plain loop on stock torch. The 1B/3B/8B models have "
        "random weights (bfloat16 safetensors loaded as the row's dtype; Q4_0 GGUFs of random blocks), no rope "
        "scaling.",
        "",
        "| model | contender | frozen base | checkpointing | peak RSS GiB | s/step | note |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        who = {"loratch": "loratch", "peft": "PEFT + transformers", "peft-bnb": "PEFT + bitsandbytes"}[row.side]
        peak, step, note = cells(results[row], row)
        lines.append(f"| {MODEL_NAMES[row.size]} | {who} | {base_label(row)} | {'on' if row.ckpt else 'off'} | "
                     f"{peak} | {step} | {note} |")
    return lines + target_lines(results) + [""]


def replace_section(markdown: str, section: list[str]) -> str:
    """`markdown` with its memory-table section replaced by `section` (or inserted before the
    hand-written notes, else appended)."""
    lines = markdown.splitlines()
    start = next((i for i, ln in enumerate(lines) if ln.startswith(TITLE)), None)
    if start is not None:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    else:
        start = end = next((i for i, ln in enumerate(lines) if ln.startswith(("## Figures", "## Notes"))), len(lines))
    return "\n".join(lines[:start] + section + lines[end:]) + "\n"


def bench_memory_table(work: Path, sizes: list[str], only: str | None = None, everything: bool = False,
                       max_rss_gib: float = 21.0) -> list[str]:
    """Runs the rows of `sizes` (those whose id matches `only`) and returns the section's lines."""
    unknown = sorted(set(sizes) - set(SIZES))
    if unknown:
        raise ValueError(f"unknown memory-table sizes {unknown}; known: {SIZES}")
    rows = [r for r in plan(sizes, everything) if only is None or re.search(only, r.id)]
    work.mkdir(parents=True, exist_ok=True)
    models = Models(work)
    data = write_data(work, models.float_dir("135m"))
    print(f"memory table: {len(rows)} rows, expected ~{sum(map(expected_s, rows)) / 60:.0f} min "
          "(plus writing the random models once)", file=sys.stderr, flush=True)
    results: dict[Row, Result] = {}
    t0 = time.perf_counter()
    for row in rows:
        # Stop a row before the machine runs out: the limit, or what is free now (less 1 GiB).
        limit = min(max_rss_gib * GIB, mem_available() - GIB)
        print(f"  {row.id} (expected ~{expected_s(row) / 60:.1f} min) ...", file=sys.stderr, flush=True)
        run = run_loratch if row.side == "loratch" else run_peft
        try:
            res = run(row, models, data, work, limit)
        except (OSError, RuntimeError, ValueError, KeyError, IndexError) as e:
            res = Result(note=f"not available: {type(e).__name__}: {e}"[:240])
        results[row] = res
        peak, step, note = cells(res, row)
        print(f"    -> {peak} GiB, {step} s/step, {res.wall_s:.0f} s wall, RSS seen {res.seen / GIB:.2f} GiB {note}",
              file=sys.stderr, flush=True)
    return report(rows, results, time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default=",".join(SIZES), help=f"comma-separated, of {SIZES}")
    ap.add_argument("--quick", action="store_true", help="the 135M rows only (--sizes 135m)")
    ap.add_argument("--only", help="a regex: only rows whose id (e.g. 1b/loratch/q4_0/ckpt) it matches")
    ap.add_argument("--all", action="store_true", help="every combination at 1B and 3B too (hours)")
    ap.add_argument("--dry-run", action="store_true", help="list the rows and their expected time")
    ap.add_argument("--max-rss-gib", type=float, default=21.0, help="stop a row whose RSS passes this")
    ap.add_argument("--work", type=Path, default=ROOT / "target" / "memory-table",
                    help="models (kept between runs), data and run directories")
    ap.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md", help="its section is replaced")
    ap.add_argument("--worker", choices=["peft"], help=argparse.SUPPRESS)
    ap.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=2, help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--bnb", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        worker_peft(a)
        return
    sizes = ["135m"] if a.quick else [s for s in a.sizes.split(",") if s]
    unknown = set(sizes) - set(SIZES)
    if unknown:
        ap.error(f"unknown sizes {sorted(unknown)}; known: {SIZES}")
    if a.dry_run:
        rows = [r for r in plan(sizes, a.all) if a.only is None or re.search(a.only, r.id)]
        for r in rows:
            print(f"{r.id:32s} ~{expected_s(r) / 60:5.1f} min{'' if r.warmup else '  (first step only)'}")
        print(f"{len(rows)} rows, ~{sum(map(expected_s, rows)) / 60:.0f} min")
        return
    section = bench_memory_table(a.work.absolute(), sizes, a.only, a.all, a.max_rss_gib)
    print("\n".join(section))
    a.out.write_text(replace_section(a.out.read_text() if a.out.is_file() else "", section))


if __name__ == "__main__":
    main()
