"""The guide's Python training loop in `make bench` (issue 25 item 1): SmolLM2-135M float32,
1 x 256 tokens, LoRA r=16 alpha=32 on all 7 projections, AdamW + clip 1.0, written as a Python
user writes it with loratch's functions:

    loss = torch_hf_loss(name, ids)                       # (a) the trainer's chunked head + fused CE
    loss = F.cross_entropy(torch_hf_forward(name, ids)[0, :-1], ids[0, 1:])  # (b) the user's own CE
    torch_backward(loss); torch_clip_grad_norm(opt, 1.0); torch_optimizer_step(opt); zero_grad

against PEFT + transformers' loop (`model(input_ids=ids, labels=ids).loss`, backward,
`clip_grad_norm_`, `AdamW.step`).

Speed: the three loops in one process, alternated (a round runs each loop's steps in turn, in
reverse order every other round), so they share every process-level setting (threads, oneMKL's
kernels, malloc). The table is measured twice, each time in a fresh process: with stock settings
(what a Python user gets) and with the `loratch` binary's settings given to the whole process
(oneMKL's AVX2 kernels through `LD_PRELOAD` of the vendor-check answer, the binary's malloc
thresholds through `GLIBC_TUNABLES`). Peak RSS: each loop alone in its own process (VmHWM at the
end of its steps), stock settings.

`python benches/loop_bench.py [--rounds 7] [--steps 3]` prints the section alone;
`--worker speed|rss ...` is internal.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import summary

HERE = Path(__file__).resolve().parent
ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SEQ = 256
LR = 1e-3
CONTENDERS = ("loratch torch_hf_loss", "loratch torch_hf_forward + F.cross_entropy", "PEFT + transformers")
TARGETS = {"loratch torch_hf_loss": 1.5, "loratch torch_hf_forward + F.cross_entropy": 1.3}
RSS_TARGET = 0.7


def fixed_ids(model_dir: Path) -> torch.Tensor:
    """The fixed-length table's 256 tokens (train_bench.fixed_text), as `[1, 256]` int64."""
    from loratch import torch_hf_tokenizer_load
    from train_bench import fixed_text

    tok = torch_hf_tokenizer_load(model_dir)
    ids = torch.tensor([tok.encode(fixed_text(), add_special_tokens=False)[:SEQ]])
    assert ids.shape[1] == SEQ
    return ids


def loratch_step_fn(model_dir: Path, name: str, own_ce: bool, ids: torch.Tensor) -> Callable[[], float]:
    """One step of the guide's loop on a fresh loratch model `name`; returns the loss."""
    import torch.nn.functional as F

    import loratch

    loratch.torch_hf_load_model_lora(name, model_dir)
    loratch.torch_hf_lora_init(name, 16, 32.0, ALL7)
    loratch.torch_hf_set_training(name, True)
    opt = loratch.torch_optimizer_add_params(loratch.torch_hf_lora_get_parameters(name), LR, 0.01)
    mask = torch.ones_like(ids)

    def step() -> float:
        if own_ce:
            logits = loratch.torch_hf_forward(name, ids, attention_mask=mask)
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
        else:
            loss = loratch.torch_hf_loss(name, ids, attention_mask=mask)
        loratch.torch_backward(loss)
        loratch.torch_clip_grad_norm(opt, 1.0)
        loratch.torch_optimizer_step(opt)
        loratch.torch_optimizer_zero_grad(opt)
        return float(loss)

    return step


def peft_step_fn(model_dir: Path, ids: torch.Tensor) -> Callable[[], float]:
    from train_bench import peft_model

    model = peft_model(model_dir)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.01)
    mask = torch.ones_like(ids)

    def step() -> float:
        loss = model(input_ids=ids, labels=ids, attention_mask=mask).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    return step


def step_fn(side: str, model_dir: Path, ids: torch.Tensor) -> Callable[[], float]:
    if side == CONTENDERS[2]:
        return peft_step_fn(model_dir, ids)
    return loratch_step_fn(model_dir, f"loop-{CONTENDERS.index(side)}", side == CONTENDERS[1], ids)


def peak_rss() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return float(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def worker_speed(model_dir: Path, rounds: int, steps: int) -> dict[str, Any]:
    """Seconds per step of each loop, alternated; first losses (the loops train the same model)."""
    ids = fixed_ids(model_dir)
    fns = {side: step_fn(side, model_dir, ids) for side in CONTENDERS}
    first = {side: fn() for side, fn in fns.items()}  # warm-up step; its loss: equal weights on all sides
    times: dict[str, list[float]] = {side: [] for side in CONTENDERS}
    for r in range(rounds):
        for side in CONTENDERS if r % 2 == 0 else CONTENDERS[::-1]:
            for _ in range(steps):
                t0 = time.perf_counter()
                fns[side]()
                times[side].append(time.perf_counter() - t0)
    return {"times": times, "first_loss": first, "threads": torch.get_num_threads()}


def worker_rss(model_dir: Path, side: str, steps: int) -> dict[str, Any]:
    ids = fixed_ids(model_dir)
    fn = step_fn(side, model_dir, ids)
    for _ in range(steps + 1):
        fn()
    return {"peak": peak_rss()}


def run_worker(args: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        raise RuntimeError(f"loop_bench worker {args[:2]} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def binary_settings(work: Path) -> dict[str, str] | None:
    """The `loratch` binary's process-level settings as environment variables for a Python
    process: oneMKL's vendor-check answer (`LD_PRELOAD`) and malloc's thresholds; None where the
    shim cannot be built or does not apply (no C compiler, no AVX2/FMA)."""
    from train_bench import MALLOC_TUNABLES, mkl_shim

    shim = mkl_shim(work)
    if shim is None:
        return None
    return {"LD_PRELOAD": str(shim), "GLIBC_TUNABLES": MALLOC_TUNABLES}


def bench_python_loop(model_dir: Path, work: Path, rounds: int, steps: int = 3) -> list[str]:
    """The section (see the module docstring); records its targets in the summary."""
    title = f"## The guide's Python loop (SmolLM2-135M fp32, 1 x {SEQ} tokens, r=16 a=32 all 7, AdamW + clip 1.0)"
    settings: dict[str, dict[str, str] | None] = {"stock": {}, "binary's": binary_settings(work)}
    loads = [os.getloadavg()[0]]
    speed: dict[str, dict[str, Any]] = {}
    for label, env in settings.items():
        if env is None:
            continue
        speed[label] = run_worker(["--worker", "speed", "--model", str(model_dir), "--rounds", str(rounds),
                                   "--steps", str(steps)], env)
        loads.append(os.getloadavg()[0])
    rss = {side: run_worker(["--worker", "rss", "--model", str(model_dir), "--side", side, "--steps", str(steps)])["peak"]
           for side in CONTENDERS}
    loads.append(os.getloadavg()[0])
    lines = [
        title,
        "",
        f"`benches/loop_bench.py`: the loop a Python user writes with loratch's functions (`torch_hf_loss`, or "
        f"`torch_hf_forward` and `F.cross_entropy` on its logits; then `torch_backward`, `torch_clip_grad_norm`, "
        f"`torch_optimizer_step`) against PEFT + transformers' loop (`labels=` loss, `AdamW`, `clip_grad_norm_`), "
        f"attention mask of ones on every side. The three loops alternate in one process ({rounds} rounds of "
        f"{steps} steps each after one warm-up step; medians of the steps), so every process-level setting is the "
        f"same on all sides; measured in two processes, one with stock settings and one with the `loratch` "
        f"binary's (oneMKL AVX2 kernels by `LD_PRELOAD` of the vendor-check answer, malloc thresholds by "
        f"`GLIBC_TUNABLES`: see README, \"oneMKL kernels in Python\"). Peak RSS: each loop alone in its own "
        f"process, stock settings. 1-minute load average between runs {min(loads):.1f} to {max(loads):.1f} "
        f"(on {os.cpu_count()} cores).",
        "",
        "| process settings | loop | median s/step | tokens/s | ratio to PEFT | target | peak RSS GiB | RSS ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    gib = 1 << 30
    for label, res in speed.items():
        med = {side: statistics.median(res["times"][side]) for side in CONTENDERS}
        peft = med[CONTENDERS[2]]
        for side in CONTENDERS:
            ratio = peft / med[side]
            bar = TARGETS.get(side)
            target = f">= {bar}x" if bar else ""
            rss_cells = ["", ""]
            if label == "stock":
                rss_cells = [f"{rss[side] / gib:.2f}", f"{rss[side] / rss[CONTENDERS[2]]:.2f}"]
                if side == CONTENDERS[0]:
                    target += f", RSS <= {RSS_TARGET}x"
            lines.append(f"| {label} | {side} | {med[side]:.3f} | {SEQ / med[side]:.0f} | {ratio:.2f}x | {target} | "
                         f"{rss_cells[0]} | {rss_cells[1]} |")
            if bar is not None:
                summary.record(f"Python loop, {side.removeprefix('loratch ')}: tokens/s vs PEFT, {label} settings "
                               f">= {bar}x", f"{ratio:.2f}x", ratio >= bar)
        lines.append(f"| {label} | first-step losses | " + " / ".join(f"{res['first_loss'][s]:.4f}" for s in CONTENDERS)
                     + f" | | | threads {res['threads']} | | |")
    ratio = rss[CONTENDERS[0]] / rss[CONTENDERS[2]]
    summary.record(f"Python loop, torch_hf_loss: peak RSS vs PEFT <= {RSS_TARGET}x", f"{ratio:.2f}x", ratio <= RSS_TARGET)
    if settings["binary's"] is None:
        lines.append("")
        lines.append("Not measured with the binary's settings: no C compiler, or no AVX2/FMA on this CPU.")
    return lines + [""]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per contender per round")
    ap.add_argument("--model", type=Path, default=None, help="default: the embedded SmolLM2-135M-Instruct")
    ap.add_argument("--worker", choices=["speed", "rss"], help=argparse.SUPPRESS)
    ap.add_argument("--side", choices=CONTENDERS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    model = args.model
    if model is None:
        from loratch.default_model import default_model_dir

        model = default_model_dir()
    if args.worker == "speed":
        print(json.dumps(worker_speed(model, args.rounds, args.steps)))
    elif args.worker == "rss":
        print(json.dumps(worker_rss(model, args.side, args.steps)))
    else:
        with tempfile.TemporaryDirectory() as work:
            print("\n".join(bench_python_loop(model, Path(work), args.rounds, args.steps)))
            print("\n".join(summary.table()))


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    main()
