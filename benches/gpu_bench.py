"""The benchmarks of `make bench` on one CUDA device in bfloat16 (issue #5's GPU table), run by
`benches/gpu.sh` on the GPU machine: loratch against PEFT + transformers on a model shaped like
Llama-3.2-1B with random weights (no real one is at hand there), alternated, medians.

1. Fixed-length training step, LoRA r=16 alpha=32 on all 7 projections, AdamW + clip 1.0, at
   1 x 256 tokens (the CPU table's shape) and 8 x 1024 (`--shapes`): tokens/s, ratio to PEFT,
   MFU against a measured bf16 matmul peak (8192^3).
2. Real data: the FAQ's first 256 examples, batch 8, max 256 tokens, one pass (loratch packs,
   PEFT pads): examples/s and each side's held-out loss.
3. Inference forward, 1 x 256 tokens: loratch unmerged, merged, base; PEFT unmerged,
   transformers base.
4. Peak GPU memory (`torch.cuda.max_memory_allocated`, which counts loratch's tensors too: both
   sides use the one libtorch caching allocator) of the runs of 1 and 2, each its own process.
5. Model load time.
6. Memory (issue 21): one training step at 1 x 1024 tokens, loratch in bfloat16 and with a 4-bit
   base (`quantize`), with and without gradient checkpointing, against PEFT bfloat16 with and
   without it: peak GPU memory and ms/step (`--memory-rows`; a row whose loratch feature is
   missing is recorded as "not available").

Each training run is its own process. `--device cpu --size tiny` runs the whole script on a CPU
with a tiny model (a check of the script itself; its numbers mean nothing).
`python benches/gpu_bench.py --worker ...` is one run (internal).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench import alternate_times, paired_change  # noqa: E402
from train_bench import (  # noqa: E402
    _param_counts, peak_rss, peft_model, peft_real_pass, peft_steps, sync, write_jsonl,
)

ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LR = 1e-3
STEPS = 8  # timed steps per fixed-length run, after two warm-up steps
WARMUP = 2
REAL_EXAMPLES, HELD_OUT, REAL_SEQ = 256, 48, 256
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"]

# Llama-3.2-1B's shape (its config.json), and a tiny one for checking the script on a CPU.
SIZES: dict[str, dict[str, Any]] = {
    "1b": dict(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
        rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True,
        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    ),
    "tiny": dict(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True,
    ),
}


def peak_memory(device: str) -> float:
    """Peak bytes: the CUDA caching allocator's high-water mark, or VmHWM on a CPU."""
    return float(torch.cuda.max_memory_allocated()) if device.startswith("cuda") else peak_rss()


def matmul_peak_tflops(device: str, dtype: torch.dtype) -> float:
    """Mean TFLOP/s of ten n^3 products after three warm-ups (n = 8192 on CUDA, 1024 on a CPU)."""
    n = 8192 if device.startswith("cuda") else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(10):
        a @ b
    sync(device)
    return 10 * 2 * n**3 / (time.perf_counter() - t0) / 1e12


# --- setup ---------------------------------------------------------------------------------------


def make_model(directory: Path, size: str, tokenizer: Path, device: str) -> None:
    """A random model of `size` in bfloat16 with SmolLM2's tokenizer files (its ids fit both
    vocabularies), saved to `directory`. Built on `device`: a 1B init on a CPU takes minutes."""
    import shutil

    import transformers as tf

    if (directory / "config.json").is_file():
        return
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(**SIZES[size])
    with torch.device(device):
        model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(directory)
    for name in TOKENIZER_FILES:
        if (tokenizer / name).is_file():
            shutil.copy(tokenizer / name, directory / name)


def write_data(work: Path, faq: Path, batch: int, seq: int, tokenizer: Path) -> None:
    """fixed-BxT.jsonl: `batch` texts of more than `seq` tokens; real-train / real-val: FAQ records."""
    import random

    from loratch import torch_hf_tokenizer_load

    records = [json.loads(line) for line in faq.read_text(encoding="utf-8").splitlines() if line.strip()]
    random.Random(0).shuffle(records)
    write_jsonl(work / "real-train.jsonl", records[:REAL_EXAMPLES])
    write_jsonl(work / "real-val.jsonl", records[REAL_EXAMPLES : REAL_EXAMPLES + HELD_OUT])
    tok = torch_hf_tokenizer_load(tokenizer)
    texts, i = [], 0
    for _ in range(batch):
        words: list[str] = []
        while len(tok.encode(" ".join(words), add_special_tokens=False)) <= seq:
            words.append(records[i % len(records)]["output"])
            i += 1
        texts.append({"text": " ".join(words)})
    write_jsonl(work / f"fixed-{batch}x{seq}.jsonl", texts)


# --- workers (each its own process) --------------------------------------------------------------


def loratch_train(a: argparse.Namespace, data: str, out: Path, val: str | None, training: dict[str, Any]) -> Path:
    import loratch

    config: dict[str, Any] = {
        "model": a.model, "data": a.work / data, "output_dir": out, "validation_split": 0.0,
        "lora": {"rank": 16, "alpha": 32, "target_modules": ALL7, "dropout": 0.0},
        "training": {"gradient_accumulation_steps": 1, "learning_rate": LR, "max_grad_norm": 1.0,
                     "logging_steps": 1, "save_steps": 0, "eval_steps": 0, "scheduler_type": "constant",
                     "device": a.device, "dtype": a.dtype, "overwrite_output_dir": True, **training},
    }
    if val is not None:
        config["validation_data"] = a.work / val
    loratch.train(config)
    return out / "metrics.jsonl"


def worker_loratch_fixed(a: argparse.Namespace) -> dict[str, float]:
    metrics = loratch_train(a, f"fixed-{a.batch}x{a.seq}.jsonl", a.work / "loratch-fixed", None, {
        "max_steps": WARMUP + STEPS, "batch_size": a.batch, "max_seq_length": a.seq, "train_on_inputs": True,
        "packing": False,
    })
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line]
    times = [r["train_time_s"] for r in rows if "train_time_s" in r]
    steps = [b - x for x, b in zip(times, times[1:])][WARMUP - 1 :]
    return {"step_s": statistics.median(steps), "peak": peak_memory(a.device)}


def worker_peft_fixed(a: argparse.Namespace) -> dict[str, float]:
    from loratch import torch_hf_tokenizer_load

    tok = torch_hf_tokenizer_load(a.model)
    texts = [json.loads(line)["text"] for line in (a.work / f"fixed-{a.batch}x{a.seq}.jsonl").read_text().splitlines()]
    ids = torch.tensor([tok.encode(t, add_special_tokens=False)[: a.seq] for t in texts], device=a.device)
    times = peft_steps(peft_model(a.model, getattr(torch, a.dtype), a.device), ids, WARMUP + STEPS, a.device)
    return {"step_s": statistics.median(times[WARMUP:]), "peak": peak_memory(a.device)}


MEMORY_SEQ = 1024


def worker_loratch_mem(a: argparse.Namespace) -> dict[str, float]:
    """One step's peak memory at 1 x 1024: loratch with `--quantize` and `--ckpt`."""
    import loratch

    config: dict[str, Any] = {
        "model": a.model, "data": a.work / f"fixed-1x{MEMORY_SEQ}.jsonl", "output_dir": a.work / "loratch-mem",
        "validation_split": 0.0,
        "lora": {"rank": 16, "alpha": 32, "target_modules": ALL7, "dropout": 0.0},
        "training": {"max_steps": WARMUP + 3, "batch_size": 1, "max_seq_length": MEMORY_SEQ,
                     "gradient_accumulation_steps": 1, "learning_rate": LR, "max_grad_norm": 1.0,
                     "logging_steps": 1, "save_steps": 0, "eval_steps": 0, "scheduler_type": "constant",
                     "train_on_inputs": True, "packing": False, "device": a.device, "dtype": a.dtype,
                     "overwrite_output_dir": True},
    }
    if a.quantize != "none":
        config["quantize"] = a.quantize
    if a.ckpt:
        config["training"]["gradient_checkpointing"] = True
    loratch.train(config)
    rows = [json.loads(line) for line in (a.work / "loratch-mem" / "metrics.jsonl").read_text().splitlines() if line]
    times = [r["train_time_s"] for r in rows if "train_time_s" in r]
    steps = [b - x for x, b in zip(times, times[1:])][WARMUP - 1 :]
    return {"step_s": statistics.median(steps), "peak": peak_memory(a.device)}


def worker_peft_mem(a: argparse.Namespace) -> dict[str, float]:
    """One step's peak memory at 1 x 1024: PEFT in `--dtype`, gradient checkpointing if `--ckpt`."""
    import transformers as tf
    from peft import LoraConfig, get_peft_model

    from loratch import torch_hf_tokenizer_load

    text = json.loads((a.work / f"fixed-1x{MEMORY_SEQ}.jsonl").read_text().splitlines()[0])["text"]
    ids = torch.tensor([torch_hf_tokenizer_load(a.model).encode(text, add_special_tokens=True)[:MEMORY_SEQ]],
                       device=a.device)
    base = tf.AutoModelForCausalLM.from_pretrained(a.model, dtype=getattr(torch, a.dtype)).to(a.device)
    if a.ckpt:
        base.config.use_cache = False
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    cfg = LoraConfig(r=16, lora_alpha=32, target_modules=ALL7, lora_dropout=0.0, task_type="CAUSAL_LM")
    model = get_peft_model(base, cfg)
    model.train()
    times = peft_steps(model, ids, WARMUP + 3, a.device)
    return {"step_s": statistics.median(times[WARMUP:]), "peak": peak_memory(a.device)}


def worker_loratch_real(a: argparse.Namespace) -> dict[str, float]:
    metrics = loratch_train(a, "real-train.jsonl", a.work / "loratch-real", "real-val.jsonl", {
        "num_epochs": 1, "batch_size": 8, "max_seq_length": REAL_SEQ, "packing": "examples",
    })
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line]
    return {
        "train_s": max(r["train_time_s"] for r in rows if "train_time_s" in r),
        "eval_loss": [r["eval_loss"] for r in rows if "eval_loss" in r][-1],
        "peak": peak_memory(a.device),
    }


def worker_peft_real(a: argparse.Namespace) -> dict[str, float]:
    return peft_real_pass(a.model, a.work, lambda: peak_memory(a.device), getattr(torch, a.dtype), a.device)


WORKERS: dict[str, Callable[[argparse.Namespace], dict[str, float]]] = {
    "loratch-fixed": worker_loratch_fixed,
    "peft-fixed": worker_peft_fixed,
    "loratch-real": worker_loratch_real,
    "peft-real": worker_peft_real,
    "loratch-mem": worker_loratch_mem,
    "peft-mem": worker_peft_mem,
}


def run_worker(a: argparse.Namespace, kind: str, extra: list[str] | None = None) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--worker", kind, "--model", str(a.model), "--work", str(a.work),
           "--device", a.device, "--dtype", a.dtype, "--batch", str(a.batch), "--seq", str(a.seq), *(extra or [])]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {kind} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    res: dict[str, float] = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"{kind}: {res}", flush=True)
    return res


# --- in-process tables ---------------------------------------------------------------------------


def alternate(cases: dict[str, Callable[[], object]], rounds: int, device: str) -> dict[str, list[float]]:
    """`bench.alternate_times` (A B C, C B A, ... after one warm-up round), each case ending
    with a device synchronize so its time includes its kernels."""

    def synced(fn: Callable[[], object]) -> Callable[[], object]:
        def call() -> None:
            fn()
            sync(device)

        return call

    return alternate_times({k: synced(fn) for k, fn in cases.items()}, rounds)


def forward_and_load(a: argparse.Namespace, rounds: int) -> list[str]:
    import transformers as tf
    from peft import PeftModel

    import loratch

    cfg = {"device": a.device, "dtype": a.dtype}
    dtype = getattr(torch, a.dtype)
    load = alternate({
        "loratch": lambda: loratch.torch_hf_load_model_lora("load", a.model, cfg),
        "transformers": lambda: tf.AutoModelForCausalLM.from_pretrained(a.model, dtype=dtype).to(a.device),
    }, 3, a.device)
    loratch.torch_hf_unload("load")
    ids = torch.randint(0, 49152, (1, 256), generator=torch.Generator().manual_seed(0)).to(a.device)
    loratch.torch_hf_load_model_lora("unmerged", a.model, cfg)
    loratch.torch_hf_lora_init("unmerged", 16, 32.0, ALL7)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in loratch.torch_hf_lora_get_parameters("unmerged"):
            if p.shape[0] != 16:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    adapter = a.work / "adapter"
    loratch.torch_hf_lora_save("unmerged", adapter)
    loratch.torch_hf_load_model_lora("merged", a.model, cfg)
    loratch.torch_hf_lora_load("merged", adapter)
    loratch.torch_hf_lora_merge("merged")
    loratch.torch_hf_load_model_lora("base", a.model, cfg)
    hf_base = tf.AutoModelForCausalLM.from_pretrained(a.model, dtype=dtype).to(a.device).eval()
    peft = PeftModel.from_pretrained(
        tf.AutoModelForCausalLM.from_pretrained(a.model, dtype=dtype).to(a.device), adapter
    ).eval()
    with torch.no_grad():
        ours, ref = loratch.torch_hf_forward("unmerged", ids).float(), peft(ids).logits.float()
        diff, scale = (ours - ref).abs().max().item(), ref.abs().max().item()
        times = alternate({
            "loratch unmerged": lambda: loratch.torch_hf_forward("unmerged", ids),
            "loratch merged": lambda: loratch.torch_hf_forward("merged", ids),
            "loratch base": lambda: loratch.torch_hf_forward("base", ids),
            "PEFT unmerged": lambda: peft(ids),
            "transformers base": lambda: hf_base(ids),
        }, rounds, a.device)
    for n in ("unmerged", "merged", "base"):
        loratch.torch_hf_unload(n)
    med = {k: statistics.median(v) for k, v in times.items()}
    lines = [
        f"### Forward of 1 x 256 tokens ({rounds} rounds, alternated)",
        "",
        f"Same random adapter (r=16, alpha=32, all 7) on both sides: max |logit diff| {diff:.3g} "
        f"(largest |logit| {scale:.3g}).",
        "",
        "| | median ms | vs PEFT unmerged |",
        "|---|---|---|",
        *[f"| {k} | {v * 1e3:.2f} | {med['PEFT unmerged'] / v:.2f}x |" for k, v in med.items()],
        "",
        "Changes: median of per-round ratios (ratio of medians in brackets).",
        "",
        f"- loratch unmerged vs merged: {100 * paired_change(times, 'loratch unmerged', 'loratch merged'):+.1f}% "
        f"({100 * (med['loratch unmerged'] / med['loratch merged'] - 1):+.1f}%; target: within +10%)",
        f"- loratch merged vs base: {100 * paired_change(times, 'loratch merged', 'loratch base'):+.1f}% "
        f"({100 * (med['loratch merged'] / med['loratch base'] - 1):+.1f}%; target: within 2%)",
        f"- model load (median of 3, alternated): loratch {statistics.median(load['loratch']) * 1e3:.0f} ms, "
        f"transformers {statistics.median(load['transformers']) * 1e3:.0f} ms",
        "",
    ]
    return lines


def report(a: argparse.Namespace, shapes: list[tuple[int, ...]], rounds: int, real_rounds: int,
           peak_tflops: float) -> list[str]:
    cfg = json.loads((a.model / "config.json").read_text())
    h, v = cfg["hidden_size"], cfg["vocab_size"]
    counts = _param_counts(a.model)
    non_embedding = sum(n for k, n in counts.items() if "embed_tokens" not in k and "lm_head" not in k)
    flops_per_token = 4 * (non_embedding + v * h)

    def med(runs: list[dict[str, float]], key: str) -> float:
        return statistics.median(r[key] for r in runs)

    gib = float(1 << 30)
    memory = "peak GPU memory GiB" if a.device.startswith("cuda") else "peak RSS GiB"
    lines = [
        "### Training step, fixed length (r=16 a=32 all 7, AdamW + clip 1.0)",
        "",
        f"{rounds} alternated runs per side and shape, each its own process; {STEPS} timed steps per run after "
        f"{WARMUP} warm-up steps. FLOPs per token = 4 x ({non_embedding / 1e6:.0f}M non-embedding params + "
        f"{v * h / 1e6:.0f}M head) = {flops_per_token / 1e9:.2f} GFLOP; MFU of the measured {a.dtype} matmul "
        f"peak, {peak_tflops:.3g} TFLOP/s.",
        "",
        f"| batch x tokens | | median ms/step | tokens/s | ratio to PEFT | MFU | {memory} | target |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for batch, seq in shapes:
        a.batch, a.seq = batch, seq
        fixed: dict[str, list[dict[str, float]]] = {"loratch": [], "peft": []}
        for _ in range(rounds):
            fixed["loratch"].append(run_worker(a, "loratch-fixed"))
            fixed["peft"].append(run_worker(a, "peft-fixed"))
        step = {k: med(r, "step_s") for k, r in fixed.items()}
        tps = {k: batch * seq / t for k, t in step.items()}
        mfu = {k: t * flops_per_token / (peak_tflops * 1e12) for k, t in tps.items()}
        mem = {k: med(r, "peak") / gib for k, r in fixed.items()}
        lines += [
            f"| {batch} x {seq} | loratch | {step['loratch'] * 1e3:.1f} | {tps['loratch']:.0f} | "
            f"{tps['loratch'] / tps['peft']:.2f}x | {100 * mfu['loratch']:.0f}% | {mem['loratch']:.2f} "
            f"({mem['loratch'] / mem['peft']:.2f}x) | >= 1.5x, MFU >= 70%, memory <= 0.7x |",
            f"| | PEFT + transformers | {step['peft'] * 1e3:.1f} | {tps['peft']:.0f} | 1.00 | "
            f"{100 * mfu['peft']:.0f}% | {mem['peft']:.2f} | |",
        ]
    real: dict[str, list[dict[str, float]]] = {"loratch": [], "peft": []}
    for _ in range(real_rounds):
        real["loratch"].append(run_worker(a, "loratch-real"))
        real["peft"].append(run_worker(a, "peft-real"))
    train_s = {k: med(r, "train_s") for k, r in real.items()}
    eps = {k: REAL_EXAMPLES / t for k, t in train_s.items()}
    loss = {k: med(r, "eval_loss") for k, r in real.items()}
    mem_r = {k: med(r, "peak") / gib for k, r in real.items()}
    return lines + [
        "",
        f"### Real data (FAQ, {REAL_EXAMPLES} examples, batch 8, max {REAL_SEQ} tokens, one pass, lr {LR})",
        "",
        f"loratch packs each step's examples into one row; PEFT pads each batch. {real_rounds} alternated run(s) "
        f"per side. Held-out loss: mean per answer token over {HELD_OUT} other records (the model is random, so "
        "only the two sides' losses are comparable, not their level).",
        "",
        f"| | train s | examples/s | ratio to PEFT | held-out loss | {memory} | target |",
        "|---|---|---|---|---|---|---|",
        f"| loratch | {train_s['loratch']:.2f} | {eps['loratch']:.1f} | {eps['loratch'] / eps['peft']:.2f}x | "
        f"{loss['loratch']:.3f} | {mem_r['loratch']:.2f} ({mem_r['loratch'] / mem_r['peft']:.2f}x) | "
        ">= 2x at comparable loss, memory <= 0.7x |",
        f"| PEFT plain loop | {train_s['peft']:.2f} | {eps['peft']:.1f} | 1.00 | {loss['peft']:.3f} | "
        f"{mem_r['peft']:.2f} | |",
        "",
    ]


def memory_rows(a: argparse.Namespace, rows: list[str]) -> list[str]:
    """Issue 21's rows on this device: each `SIDE:BASE:ckpt|nockpt` (SIDE loratch or peft, BASE
    none or a `quantize` name) one process, one line; failures are recorded, not raised."""
    memory = "peak GPU memory GiB" if a.device.startswith("cuda") else "peak RSS GiB"
    lines = [
        f"### Memory: one training step at 1 x {MEMORY_SEQ} tokens ({a.dtype}, r=16 a=32 all 7, AdamW + clip 1.0)",
        "",
        f"Each row its own process; the median of 3 steps after {WARMUP} warm-up steps. loratch's `quantize` "
        f"rows keep the frozen projections 4- or 8-bit and compute in {a.dtype}.",
        "",
        f"| contender | frozen base | checkpointing | {memory} | ms/step | note |",
        "|---|---|---|---|---|---|",
    ]
    peft_peak = None
    for spec in rows:
        side, base, ckpt = spec.split(":")
        extra = ["--quantize", base] + (["--ckpt"] if ckpt == "ckpt" else [])
        label = f"| {'loratch' if side == 'loratch' else 'PEFT + transformers'} | " \
                f"{a.dtype if base == 'none' else base} | {'on' if ckpt == 'ckpt' else 'off'} |"
        try:
            res = run_worker(a, f"{side}-mem", extra)
        except RuntimeError as e:
            tail = [ln for ln in str(e).splitlines() if ln.strip()][-1:]
            why = " ".join(tail).split(", expected one of")[0][:200].replace("|", "/")
            lines.append(f"{label} - | - | not available: {why} |")
            continue
        if side == "peft" and ckpt == "nockpt":
            peft_peak = res["peak"]
        ratio = f" ({res['peak'] / peft_peak:.2f}x PEFT without checkpointing)" if peft_peak and side != "peft" else ""
        lines.append(f"{label} {res['peak'] / 2**30:.2f}{ratio} | {res['step_s'] * 1e3:.0f} | |")
    return lines + [""]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", choices=sorted(WORKERS))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--size", choices=sorted(SIZES), default="1b")
    ap.add_argument("--model", type=Path, help="default: WORK/model-SIZE, made if missing")
    ap.add_argument("--work", type=Path, default=Path("/tmp/loratch-gpu-bench"))
    ap.add_argument("--tokenizer", type=Path, default=Path(".gpu/tokenizer"))
    ap.add_argument("--faq", type=Path, default=Path(".gpu/faq.jsonl"))
    ap.add_argument("--shapes", default="1x256,8x1024",
                    help="fixed-length steps, BATCHxTOKENS each (1x256 is the CPU table's)")
    ap.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)  # a worker's shape
    ap.add_argument("--seq", type=int, default=256, help=argparse.SUPPRESS)
    ap.add_argument("--rounds", type=int, default=2, help="fixed-length runs per side and shape")
    ap.add_argument("--real-rounds", type=int, default=1)
    ap.add_argument("--forward-rounds", type=int, default=25)
    ap.add_argument("--out", type=Path, default=Path("BENCHMARKS-cuda.md"))
    ap.add_argument("--memory-rows", default="peft:none:nockpt,peft:none:ckpt,loratch:none:nockpt,loratch:none:ckpt,"
                    "loratch:q4_0:ckpt,loratch:nf4:ckpt,loratch:q8_0:ckpt",
                    help="issue 21's rows at 1 x 1024, SIDE:BASE:ckpt|nockpt each (PEFT's first); '' for none")
    ap.add_argument("--quantize", default="none", help=argparse.SUPPRESS)  # a memory worker's base
    ap.add_argument("--ckpt", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    a.work = a.work.absolute()
    a.model = (a.model or a.work / f"model-{a.size}").absolute()
    if a.worker:
        print(json.dumps(WORKERS[a.worker](a)))
        return
    a.work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    make_model(a.model, a.size, a.tokenizer, a.device)
    shapes = [tuple(int(n) for n in shape.split("x")) for shape in a.shapes.split(",")]
    for batch, seq in {*shapes, (1, MEMORY_SEQ)}:
        write_data(a.work, a.faq, batch, seq, a.model)
    print(f"setup {time.perf_counter() - t0:.0f} s", flush=True)
    peak = matmul_peak_tflops(a.device, getattr(torch, a.dtype))
    name = torch.cuda.get_device_name() if a.device.startswith("cuda") else "CPU"
    head = [
        f"## {name}, {a.dtype}, model shaped like Llama-3.2-1B with random weights" if a.size == "1b"
        else f"## {name}, {a.dtype}, tiny random model (a check of the script, not a benchmark)",
        "",
        f"By `benches/gpu.sh`: torch {torch.__version__}, {a.device}; {a.dtype} matmul peak {peak:.3g} TFLOP/s "
        "(n^3, mean of 10 after 3 warm-ups). Medians; contenders alternated.",
        "",
    ]
    body = forward_and_load(a, a.forward_rounds)
    a.out.write_text("\n".join(head + body))  # partial results survive a later failure
    body += report(a, shapes, a.rounds, a.real_rounds, peak)
    a.out.write_text("\n".join(head + body))
    if a.memory_rows:
        body += memory_rows(a, a.memory_rows.split(","))
        a.out.write_text("\n".join(head + body))
    print("\n".join(head + body))


if __name__ == "__main__":
    main()
