"""Training benchmarks of `make bench`: loratch's trainer (the `loratch` binary) against PEFT +
transformers with a plain PyTorch loop. Every run is its own process (so its peak RSS is its own),
runs alternate (loratch, PEFT, loratch, PEFT, ...), and medians are reported.

1. Fixed-length step: SmolLM2-135M fp32, batch 1 x 256 tokens, LoRA r=16 alpha=32 on all 7
   projections, AdamW + clip 1.0: tokens/s, ratio, MFU against the measured matmul peak. PEFT's
   process gets the binary's process-level settings (oneMKL's kernels by `LD_PRELOAD` of the
   vendor-check answer, malloc's thresholds by `GLIBC_TUNABLES`), so the ratio is of equal settings;
   a row of PEFT on stock settings shows what they are worth.
2. Real data: 256 FAQ examples, batch 8, max 256 tokens, one pass; loratch packs, PEFT pads
   dynamically (equal settings as in 1): examples/s and the held-out loss each reaches.
4. Peak RSS of each run (VmHWM, read by the run itself over its training phase).
5. Gemma-3-270M fixed-length step: the real model from its Q4_K_M GGUF, decoded to float32 on both
   sides (loratch `quantize = "none"`, transformers `gguf_file=`), batch 1 x 256, r=16 alpha=32 on
   all 7 projections, AdamW + clip 1.0: tokens/s and ratio, with the same process-level settings on
   both sides (threads, oneMKL's kernels, malloc's thresholds). Alone:
   `python benches/train_bench.py --only gemma3 [--rounds 3]` (prints the table).

`python benches/train_bench.py --worker peft-fixed|peft-real|peft-gemma3 ...` is the PEFT side
(internal).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from collections.abc import Callable
from typing import Any

import torch

import summary

ROOT = Path(__file__).resolve().parents[1]
ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SEQ = 256
FIXED_STEPS = 6  # per run, after one warm-up step
REAL_EXAMPLES = 256
HELD_OUT = 48
LR = 1e-3


def binary() -> Path:
    return Path(os.environ.get("LORATCH_BIN") or ROOT / "target" / "release" / "loratch")


def peak_rss() -> float:
    """This process's peak RSS in bytes (VmHWM). A parent's `ru_maxrss` of a child is no use: it
    keeps the high-water mark of the forked parent (this script holds GiBs) across exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return float(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def run(cmd: list[str], env: dict[str, str] | None = None) -> str:
    """Runs `cmd` (own process, with `env` added to the environment); returns its stdout."""
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc.stdout


# --- data ----------------------------------------------------------------------------------------


def faq_records() -> list[dict[str, str]]:
    import importlib.util

    spec = importlib.util.find_spec("zaragoza_construction_faq")
    assert spec is not None and spec.submodule_search_locations
    path = Path(spec.submodule_search_locations[0]) / "data" / "faq-en-alpaca.jsonl"
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    random.Random(0).shuffle(records)
    return records


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


def fixed_text() -> str:
    """A text of more than 256 tokens (truncated to 256 by both sides)."""
    records = faq_records()
    return " ".join(r["output"] for r in records[:12])


# --- loratch side --------------------------------------------------------------------------------


def loratch_config(
    model: Path, data: Path, out: Path, val: Path | None, training: dict[str, Any], top: dict[str, Any] | None = None
) -> Path:
    """A `loratch train` TOML; `top`: more top-level keys (e.g. `quantize`)."""
    lines = [
        f"model = {json.dumps(str(model))}",
        f"data = {json.dumps(str(data))}",
        f"output_dir = {json.dumps(str(out))}",
        "validation_split = 0.0",
    ]
    if val is not None:
        lines.append(f"validation_data = {json.dumps(str(val))}")
    lines += [f"{k} = {json.dumps(v)}" for k, v in (top or {}).items()]
    lines += ["[lora]", "rank = 16", "alpha = 32", f"target_modules = {json.dumps(ALL7)}", "dropout = 0.0", "[training]"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in training.items()]
    path = out.with_suffix(".toml")
    path.write_text("\n".join(lines) + "\n")
    return path


def loratch_metrics(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]


def loratch_fixed(model: Path, work: Path, tag: str, top: dict[str, Any] | None = None) -> tuple[float, float]:
    """(median seconds per step, peak RSS). `top`: more top-level config keys."""
    data = work / "fixed.jsonl"
    out = work / f"loratch-fixed-{tag}"
    cfg = loratch_config(model, data, out, None, {
        "max_steps": FIXED_STEPS + 1, "batch_size": 1, "gradient_accumulation_steps": 1, "max_seq_length": SEQ,
        "learning_rate": LR, "max_grad_norm": 1.0, "logging_steps": 1, "save_steps": 0, "eval_steps": 0,
        "scheduler_type": "constant", "train_on_inputs": True, "packing": False,
    }, top)
    run([str(binary()), "train", "--config", str(cfg)])
    metrics = loratch_metrics(out)
    rss = max(r["peak_rss_bytes"] for r in metrics if "peak_rss_bytes" in r)
    times = [r["train_time_s"] for r in metrics if "train_time_s" in r]
    steps = [b - a for a, b in zip(times, times[1:])]  # drops the first (warm-up) step
    # Each step, for the log: the machine has slow phases that show as runs of slower steps.
    print(f"loratch fixed-length run {tag}: steps {[round(s, 3) for s in steps]} s", flush=True)
    return statistics.median(steps), rss


def loratch_real(model: Path, work: Path, tag: str) -> tuple[float, float, float]:
    """(training seconds for one pass, final held-out loss, peak RSS)."""
    out = work / f"loratch-real-{tag}"
    cfg = loratch_config(model, work / "real-train.jsonl", out, work / "real-val.jsonl", {
        "num_epochs": 1, "batch_size": 8, "gradient_accumulation_steps": 1, "max_seq_length": SEQ,
        "learning_rate": LR, "max_grad_norm": 1.0, "logging_steps": 1, "save_steps": 0, "eval_steps": 0,
        "scheduler_type": "constant", "packing": "examples",
    })
    run([str(binary()), "train", "--config", str(cfg)])
    metrics = loratch_metrics(out)
    # The last record is logged after the last step; evaluation (no grad) needs less.
    rss = max(r["peak_rss_bytes"] for r in metrics if "peak_rss_bytes" in r)
    train_time = max(r["train_time_s"] for r in metrics if "train_time_s" in r)
    final = [r["eval_loss"] for r in metrics if "eval_loss" in r][-1]
    return train_time, final, rss


# --- PEFT side (worker processes) ----------------------------------------------------------------


def sync(device: str) -> None:
    """Waits for a CUDA device's queued work (nothing to wait for on a CPU)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peft_model(model_dir: Path, dtype: torch.dtype = torch.float32, device: str = "cpu", gguf_file: str | None = None) -> Any:
    """PEFT on transformers, r=16 alpha=32 on all 7 projections, in training mode. PEFT keeps the
    adapters in float32 whatever `dtype` is (autocast_adapter_dtype). `gguf_file`: load that GGUF
    of `model_dir` (transformers decodes it to `dtype`)."""
    import transformers as tf
    from peft import LoraConfig, get_peft_model

    gguf = {"gguf_file": gguf_file} if gguf_file is not None else {}
    base = tf.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, **gguf).to(device)
    cfg = LoraConfig(r=16, lora_alpha=32, target_modules=ALL7, lora_dropout=0.0, task_type="CAUSAL_LM")
    model = get_peft_model(base, cfg)
    model.train()
    return model


def peft_steps(model: Any, ids: torch.Tensor, steps: int, device: str) -> list[float]:
    """Seconds of each of `steps` training steps on `ids` (AdamW, clip 1.0, the loss read each
    step as loratch's trainer logs it)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.01)
    times = []
    for _ in range(steps):
        sync(device)
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        float(loss)
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def worker_peft_fixed(model_dir: Path, work: Path) -> None:
    from loratch import torch_hf_tokenizer_load

    tok = torch_hf_tokenizer_load(model_dir)
    ids = torch.tensor([tok.encode(fixed_text(), add_special_tokens=False)[:SEQ]])
    assert ids.shape[1] == SEQ
    times = peft_steps(peft_model(model_dir), ids, FIXED_STEPS + 1, "cpu")
    print(json.dumps({"step_s": statistics.median(times[1:]), "peak": peak_rss()}))


def worker_peft_gemma3(gguf: Path, work: Path) -> None:
    """PEFT's side of the Gemma-3-270M row: the GGUF decoded to float32 by transformers; the ids
    loratch trains on (its tokenizer of the same file, with BOS, as its text records get), so the
    first step's loss is the same number on both sides."""
    from loratch import torch_hf_tokenizer_load

    tok = torch_hf_tokenizer_load(gguf)
    ids = torch.tensor([tok.encode(fixed_text(), add_special_tokens=True)[:SEQ]])
    assert ids.shape[1] == SEQ
    model = peft_model(gguf.parent, gguf_file=gguf.name)
    with torch.no_grad():
        first_loss = float(model(input_ids=ids, labels=ids).loss)
    times = peft_steps(model, ids, FIXED_STEPS + 1, "cpu")
    print(json.dumps({
        "step_s": statistics.median(times[1:]), "steps": times[1:], "peak": peak_rss(), "loss": first_loss,
        "attention": model.base_model.model.config._attn_implementation, "threads": torch.get_num_threads(),
    }))


def encode_chat(tok: Any, record: dict[str, str]) -> tuple[list[int], list[int]]:
    """The same rendering as loratch's data pipeline: prompt masked, answer (to <|im_end|>) trained."""
    user = record["instruction"] + (("\n\n" + record["input"]) if record.get("input") else "")
    prompt = tok.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True)
    full = tok.apply_chat_template(
        [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}],
        add_generation_prompt=False,
    )
    p = tok.encode(prompt, add_special_tokens=False)
    answer = full[len(prompt):]
    end = answer.find("<|im_end|>")
    answer = answer[: end + len("<|im_end|>")] if end >= 0 else answer
    a = tok.encode(answer, add_special_tokens=False)
    ids = (p + a)[:SEQ]
    labels = ([-100] * len(p) + a)[:SEQ]
    return ids, labels


def padded(batch: list[tuple[list[int], list[int]]], pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = max(len(i) for i, _ in batch)
    ids = torch.full((len(batch), width), pad)
    labels = torch.full((len(batch), width), -100)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for r, (i, lab) in enumerate(batch):
        ids[r, : len(i)] = torch.tensor(i)
        labels[r, : len(lab)] = torch.tensor(lab)
        mask[r, : len(i)] = 1
    return ids, labels, mask


def token_loss_sum(model: Any, ids: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, int]:
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    target = labels[:, 1:]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100, reduction="sum")
    return loss, int((target != -100).sum())


def peft_real_pass(
    model_dir: Path, work: Path, peak: Callable[[], float], dtype: torch.dtype = torch.float32, device: str = "cpu"
) -> dict[str, float]:
    """PEFT's side of the real-data run: one pass over work/real-train.jsonl (8 examples a step,
    padded), then the held-out loss over work/real-val.jsonl. `peak` is read after training."""
    from loratch import torch_hf_tokenizer_load

    tok = torch_hf_tokenizer_load(model_dir)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    train = [encode_chat(tok, json.loads(line)) for line in (work / "real-train.jsonl").read_text().splitlines()]
    val = [encode_chat(tok, json.loads(line)) for line in (work / "real-val.jsonl").read_text().splitlines()]
    random.Random(0).shuffle(train)
    model = peft_model(model_dir, dtype, device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.01)

    def batch(rows: list[tuple[list[int], list[int]]]) -> list[torch.Tensor]:
        return [t.to(device) for t in padded(rows, pad)]

    sync(device)
    t0 = time.perf_counter()
    for start in range(0, len(train), 8):
        loss, n = token_loss_sum(model, *batch(train[start : start + 8]))
        (loss / n).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        float(loss)
    sync(device)
    train_time = time.perf_counter() - t0
    train_peak = peak()
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(val), 8):
            loss, n = token_loss_sum(model, *batch(val[start : start + 8]))
            total += float(loss)
            count += n
    return {"train_s": train_time, "eval_loss": total / count, "peak": train_peak}


def worker_peft_real(model_dir: Path, work: Path) -> None:
    print(json.dumps(peft_real_pass(model_dir, work, peak_rss)))


def peft_run(kind: str, model: Path, work: Path, env: dict[str, str] | None = None) -> tuple[dict[str, Any], float]:
    out = run([sys.executable, __file__, "--worker", kind, "--model", str(model), "--work", str(work)], env)
    res = json.loads(out.strip().splitlines()[-1])
    return res, float(res["peak"])


# --- the same oneMKL dispatch for PEFT ----------------------------------------------------------

SHIM_C = "int mkl_serv_intel_cpu(void) { return 1; }\nint mkl_serv_intel_cpu_true(void) { return 1; }\n"


def mkl_shim(work: Path) -> Path | None:
    """A one-file library answering oneMKL's vendor check as the `loratch` binary does
    (src/bin/loratch/mkl_dispatch.rs), for PEFT's process through LD_PRELOAD: so the table can
    show what the same GEMM kernels give PEFT. None when no C compiler is at hand, or when this
    CPU lacks AVX2/FMA (the binary does not override the check there either)."""
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    if " avx2" not in flags or " fma" not in flags:
        return None
    src, lib = work / "mkl_shim.c", work / "libmkl_shim.so"
    src.write_text(SHIM_C)
    try:
        subprocess.run(["cc", "-shared", "-fPIC", "-O2", "-o", str(lib), str(src)], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return lib


def binary_matmul_gflops() -> float:
    """The `loratch` binary's own fp32 matmul throughput (its oneMKL dispatch), 1024^3, best of 10."""
    return float(json.loads(run([str(binary()), "info", "--json", "--matmul-peak"]))["matmul_gflops"])


# --- Gemma-3-270M -------------------------------------------------------------------------------

# The malloc thresholds the `loratch` binary sets with mallopt (src/runtime.rs, keep_freed_memory),
# given to PEFT's process through glibc's tunables.
MALLOC_TUNABLES = "glibc.malloc.mmap_threshold=1073741824:glibc.malloc.trim_threshold=2147483648"


def bench_gemma3(work: Path, rounds: int) -> list[str]:
    """The Gemma-3-270M fixed-length table: loratch's trainer against PEFT, both in float32 from
    the same GGUF, with the same threads, oneMKL kernels and malloc thresholds."""
    from loratch.default_model import gemma3_gguf

    title = f"## Gemma-3-270M training step, fixed length (fp32, 1 x {SEQ} tokens, r=16 a=32 all 7, AdamW + clip 1.0)"
    try:
        gguf = gemma3_gguf()
    except FileNotFoundError as e:  # not installed: `make bench` goes on without the table
        return [title, "", f"Not measured: {e}", ""]
    write_jsonl(work / "fixed.jsonl", [{"text": fixed_text()}])
    shim = mkl_shim(work)
    env = {"GLIBC_TUNABLES": MALLOC_TUNABLES, **({"LD_PRELOAD": str(shim)} if shim is not None else {})}
    info = json.loads(run([str(binary()), "info", "--json"]))
    steps: dict[str, list[float]] = {"loratch": [], "peft": []}
    rss: dict[str, list[float]] = {"loratch": [], "peft": []}
    losses: dict[str, float] = {}
    peft: dict[str, Any] = {}
    loads = [os.getloadavg()[0]]  # the machine's 1-minute load before and after each run, for the text
    for r in range(rounds):
        s, m = loratch_fixed(gguf, work, f"gemma3-{r}", {"quantize": "none"})
        loads.append(os.getloadavg()[0])
        steps["loratch"].append(s)
        rss["loratch"].append(m)
        losses["loratch"] = loratch_metrics(work / f"loratch-fixed-gemma3-{r}")[0]["loss"]
        peft, m = peft_run("peft-gemma3", gguf, work, env)
        print(f"PEFT Gemma-3-270M run {r}: steps {[round(t, 3) for t in peft['steps']]} s", flush=True)
        steps["peft"].append(peft["step_s"])
        rss["peft"].append(m)
        losses["peft"] = peft["loss"]
        loads.append(os.getloadavg()[0])
    med = {k: statistics.median(v) for k, v in steps.items()}
    tps = {k: SEQ / v for k, v in med.items()}
    gib = 1 << 30
    by_features, own = "AVX2/AVX-512 by CPU features", "oneMKL's own choice"
    ours = f"{by_features} (the binary answers the vendor check)" if info.get("mkl_dispatch_forced") else own
    theirs = f"{by_features} (`LD_PRELOAD` of the same answer)" if shim is not None else own
    return [
        title,
        "",
        f"The real model from its Q4_K_M GGUF (`{gguf.name}`), decoded to float32 on both sides: loratch's trainer "
        f"with `quantize = \"none\"`, PEFT on transformers' `from_pretrained(dir, gguf_file=...)`, so both run "
        f"float32 matmuls on equal weights (first-step loss {losses['loratch']:.4f} and {losses['peft']:.4f}). "
        f"{rounds} alternated runs per side, each its own process; {FIXED_STEPS} timed steps per run after one "
        f"warm-up step; the machine's 1-minute load average read between runs: {min(loads):.1f} to {max(loads):.1f} "
        f"(on {os.cpu_count()} cores). At 256 tokens Gemma 3's sliding window (512) never binds.",
        "",
        "| | median s/step | tokens/s | ratio to PEFT | peak RSS GiB |",
        "|---|---|---|---|---|",
        f"| loratch | {med['loratch']:.3f} | {tps['loratch']:.0f} | {tps['loratch'] / tps['peft']:.2f}x | "
        f"{statistics.median(rss['loratch']) / gib:.2f} |",
        f"| PEFT + transformers | {med['peft']:.3f} | {tps['peft']:.0f} | 1.00 | {statistics.median(rss['peft']) / gib:.2f} |",
        "",
        "| process-level setting | loratch | PEFT + transformers |",
        "|---|---|---|",
        f"| torch threads | {info['threads']} | {peft['threads']} |",
        f"| oneMKL GEMM kernels | {ours} | {theirs} |",
        "| malloc | mmap threshold 1 GiB, trim threshold 2 GiB (`mallopt`) | the same (`GLIBC_TUNABLES`) |",
        f"| attention | loratch's blocked causal kernel | `{peft['attention']}` |",
        "| loss | chunked head, fused cross-entropy | transformers' `labels=` loss |",
        "",
    ]


# --- the report ----------------------------------------------------------------------------------


def bench_training(model: Path, work: Path, peak_gflops: float, rounds: int, real_rounds: int) -> list[str]:
    from loratch import torch_hf_tokenizer_load

    records = faq_records()
    tok = torch_hf_tokenizer_load(model)
    text = fixed_text()
    assert len(tok.encode(text, add_special_tokens=False)) > SEQ
    write_jsonl(work / "fixed.jsonl", [{"text": text}])
    write_jsonl(work / "real-train.jsonl", records[:REAL_EXAMPLES])
    write_jsonl(work / "real-val.jsonl", records[REAL_EXAMPLES : REAL_EXAMPLES + HELD_OUT])
    cfg = json.loads((model / "config.json").read_text())
    h, v = cfg["hidden_size"], cfg["vocab_size"]
    non_embedding = sum(n for k, n in _param_counts(model).items() if "embed_tokens" not in k and "lm_head" not in k)
    flops_per_token = 4 * (non_embedding + v * h)

    # MFU is against the best fp32 matmul this machine gave: stock torch (measured by the caller) or the
    # binary's, measured again around every fixed-length round, since the machine's speed drifts.
    binary_peaks = [binary_matmul_gflops()]
    # PEFT's headline runs get the binary's process-level settings (oneMKL's kernels, malloc's
    # thresholds); the stock run is the row that says what they are worth.
    shim = mkl_shim(work)
    equal = {"GLIBC_TUNABLES": MALLOC_TUNABLES, **({"LD_PRELOAD": str(shim)} if shim is not None else {})}
    info = json.loads(run([str(binary()), "info", "--json"]))

    fixed: dict[str, list[float]] = {"loratch": [], "peft": [], "peft-stock": []}
    rss: dict[str, list[float]] = {k: [] for k in ("loratch-fixed", "peft-fixed", "peft-stock", "loratch-real", "peft-real")}
    for r in range(rounds):
        s, m = loratch_fixed(model, work, str(r))
        fixed["loratch"].append(s)
        rss["loratch-fixed"].append(m)
        res, m = peft_run("peft-fixed", model, work, equal)
        fixed["peft"].append(res["step_s"])
        rss["peft-fixed"].append(m)
        res, m = peft_run("peft-fixed", model, work)
        fixed["peft-stock"].append(res["step_s"])
        rss["peft-stock"].append(m)
        binary_peaks.append(binary_matmul_gflops())
    torch_peak = peak_gflops
    peak_gflops = max([torch_peak, *binary_peaks])
    real: dict[str, list[float]] = {"loratch": [], "peft": [], "loratch-loss": [], "peft-loss": []}
    for r in range(real_rounds):
        t, loss, m = loratch_real(model, work, str(r))
        real["loratch"].append(t)
        real["loratch-loss"].append(loss)
        rss["loratch-real"].append(m)
        res, m = peft_run("peft-real", model, work, equal)
        real["peft"].append(res["train_s"])
        real["peft-loss"].append(res["eval_loss"])
        rss["peft-real"].append(m)

    med = {k: statistics.median(v) for k, v in fixed.items() if v}
    tps = {k: SEQ / v for k, v in med.items()}
    mfu = {k: t * flops_per_token / (peak_gflops * 1e9) for k, t in tps.items()}
    mrss = {k: statistics.median(v) for k, v in rss.items() if v}
    gib = 1 << 30
    ratio = tps["loratch"] / tps["peft"]
    summary.record("Trainer, fixed-length step: tokens/s vs PEFT on equal settings >= 1.5x", f"{ratio:.2f}x", ratio >= 1.5)
    summary.record("Trainer, fixed-length step: MFU (of the best measured fp32 matmul) >= 70%",
                   f"{mfu['loratch'] * 100:.0f}% of {peak_gflops:.0f} GFLOP/s", mfu["loratch"] >= 0.70)
    by_features, own = "AVX2/AVX-512 by CPU features", "oneMKL's own choice (generic kernels on AMD)"
    ours = f"{by_features} (the binary answers the vendor check)" if info.get("mkl_dispatch_forced") else own
    theirs = f"{by_features} (`LD_PRELOAD` of the same answer)" if shim is not None else own
    lines = [
        f"## Training step, fixed length (SmolLM2-135M fp32, 1 x {SEQ} tokens, r=16 a=32 all 7, AdamW + clip 1.0)",
        "",
        f"{rounds} alternated runs per side, each its own process; {FIXED_STEPS} timed steps per run after one warm-up "
        f"step; FLOPs per token = 4 x ({non_embedding / 1e6:.1f}M non-embedding params + {v * h / 1e6:.1f}M head) = "
        f"{flops_per_token / 1e9:.2f} GFLOP. MFU is of {peak_gflops:.0f} GFLOP/s, the best of the fp32 matmul "
        f"measurements (1024^3, best of 10 each): stock torch once at the start ({torch_peak:.0f}), the `loratch` "
        f"binary before the first and after every fixed-length round ({', '.join(f'{p:.0f}' for p in binary_peaks)}).",
        "",
        "The ratios are of equal process-level settings: PEFT's process gets the binary's (table below). The last "
        "row is PEFT on stock settings, alternated with the others: what those settings are worth to it.",
        "",
        "| | median s/step | tokens/s | ratio to PEFT | MFU (of measured peak) | target |",
        "|---|---|---|---|---|---|",
        f"| loratch | {med['loratch']:.3f} | {tps['loratch']:.0f} | {ratio:.2f}x | "
        f"{mfu['loratch'] * 100:.0f}% | >= 1.5x, MFU >= 70% |",
        f"| PEFT + transformers, equal settings | {med['peft']:.3f} | {tps['peft']:.0f} | 1.00 | {mfu['peft'] * 100:.0f}% | |",
        f"| PEFT + transformers, stock settings (differs: oneMKL's generic kernels, glibc's default malloc) | "
        f"{med['peft-stock']:.3f} | {tps['peft-stock']:.0f} | {tps['peft-stock'] / tps['peft']:.2f}x | "
        f"{mfu['peft-stock'] * 100:.0f}% | |",
        "",
        "| process-level setting | loratch | PEFT + transformers (equal settings) |",
        "|---|---|---|",
        f"| torch threads | {info['threads']} | {torch.get_num_threads()} |",
        f"| oneMKL GEMM kernels | {ours} | {theirs} |",
        "| malloc | mmap threshold 1 GiB, trim threshold 2 GiB (`mallopt`) | the same (`GLIBC_TUNABLES`) |",
        "",
    ]
    lines += real_table(real, real_rounds)
    lines += [
        "## Peak RSS (each run its own process)",
        "",
        "PEFT's runs on equal settings as above (the malloc thresholds keep freed memory: higher RSS than stock); "
        f"PEFT's fixed-length run on stock settings: {mrss['peft-stock'] / gib:.2f} GiB.",
        "",
        "| run | loratch GiB | PEFT GiB | ratio | target |",
        "|---|---|---|---|---|",
    ]
    fixed_rss = mrss["loratch-fixed"] / mrss["peft-fixed"]
    lines.append(f"| fixed-length training | {mrss['loratch-fixed'] / gib:.2f} | {mrss['peft-fixed'] / gib:.2f} | "
                 f"{fixed_rss:.2f} | <= 0.7 |")
    summary.record("Trainer, fixed-length step: peak RSS vs PEFT (equal settings) <= 0.7x", f"{fixed_rss:.2f}x",
                   fixed_rss <= 0.7)
    if real_rounds > 0:
        real_rss = mrss["loratch-real"] / mrss["peft-real"]
        lines.append(f"| real data | {mrss['loratch-real'] / gib:.2f} | {mrss['peft-real'] / gib:.2f} | "
                     f"{real_rss:.2f} | <= 0.7 |")
        summary.record("Trainer, real data: peak RSS vs PEFT (equal settings) <= 0.7x", f"{real_rss:.2f}x",
                       real_rss <= 0.7)
    return lines + [""]


def real_table(real: dict[str, list[float]], real_rounds: int) -> list[str]:
    """The real-data section; records its target."""
    title = f"## Real data (FAQ, {REAL_EXAMPLES} examples, batch 8, max {SEQ} tokens, one pass, lr {LR})"
    target = "Trainer, real data: examples/s vs PEFT (equal settings) >= 2x at comparable loss"
    if real_rounds == 0:
        summary.record(target, "skipped (--real-rounds 0)", None)
        return [title, "", "Not measured in this run (`--real-rounds 0`).", ""]
    rmed = {k: statistics.median(v) for k, v in real.items()}
    eps = {k: REAL_EXAMPLES / rmed[k] for k in ("loratch", "peft")}
    ratio = eps["loratch"] / eps["peft"]
    # "Comparable": the held-out losses within 2% of each other.
    comparable = abs(rmed["loratch-loss"] - rmed["peft-loss"]) <= 0.02 * rmed["peft-loss"]
    summary.record(target, f"{ratio:.2f}x, held-out loss {rmed['loratch-loss']:.3f} vs {rmed['peft-loss']:.3f}",
                   ratio >= 2 and comparable)
    return [
        title,
        "",
        f"loratch: its trainer, padding-free packing (`packing = \"examples\"`: the step's 8 examples, each of at most "
        f"{SEQ} tokens, laid end to end in one row with one causal attention call per example, so both sides take the "
        f"same {REAL_EXAMPLES // 8} optimizer steps on the same examples). PEFT: a plain loop, "
        f"dynamic padding, 8 examples per step, with the binary's process-level settings as in the fixed-length "
        f"table. Held-out loss: mean per answer token over {HELD_OUT} other FAQ records. "
        f"{real_rounds} alternated run(s) per side.",
        "",
        "| | train s | examples/s | ratio to PEFT | held-out loss | target |",
        "|---|---|---|---|---|---|",
        f"| loratch | {rmed['loratch']:.1f} | {eps['loratch']:.2f} | {ratio:.2f}x | "
        f"{rmed['loratch-loss']:.3f} | >= 2x at comparable loss |",
        f"| PEFT plain loop | {rmed['peft']:.1f} | {eps['peft']:.2f} | 1.00 | {rmed['peft-loss']:.3f} | |",
        "",
    ]


def _param_counts(model_dir: Path) -> dict[str, int]:
    """Parameter count of each checkpoint tensor (from the safetensors headers)."""
    from safetensors import safe_open

    out: dict[str, int] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            for k in st.keys():
                n = 1
                for d in st.get_slice(k).get_shape():
                    n *= d
                out[k] = n
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["gemma3"], help="run this table alone and print it")
    parser.add_argument("--rounds", type=int, default=3, help="runs per side of the table run by --only")
    parser.add_argument("--worker", choices=["peft-fixed", "peft-real", "peft-gemma3"], help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        workers = {"peft-fixed": worker_peft_fixed, "peft-real": worker_peft_real, "peft-gemma3": worker_peft_gemma3}
        workers[args.worker](args.model, args.work)
    elif args.only == "gemma3":
        import tempfile

        with tempfile.TemporaryDirectory() as work:
            print("\n".join(bench_gemma3(Path(work), args.rounds)))
    else:
        parser.error("give --only (or run `make bench`)")


if __name__ == "__main__":
    main()
