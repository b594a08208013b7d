"""`make bench`: loratch against PEFT + transformers, side by side in one run (A B A B ...,
after a warm-up), medians and ratios, written to BENCHMARKS.md with the core count and a measured
fp32 matmul peak. Speed targets live here, never in unit tests.

BENCHMARKS.md opens with a summary table of every target (benches/summary.py): each section hands
its targets to it with `summary.record(target, value, met)`; a section in a module of its own
(benches/gen_bench.py) exposes `bench_generation(model_dir, quick) -> list[str]` and
`rows() -> list[dict]` (`{"target", "value", "met"}`), which `main` collects. The hand-written
sections at the end of BENCHMARKS.md ("## Figures ...", "## Notes ...") are kept as they are.

`--quick` runs every section at one or two rounds (no memory table, no Gemma-3 table, no real-data
run, no criterion) and writes target/bench-quick.md unless `--out` is given: a check that the
benches run end to end, not numbers to quote."""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import loratch
import summary
from criterion_summary import criterion_dir, summary_lines

ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def alternate_times(
    cases: dict[str, Callable[[], object]], rounds: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Seconds of each case per round, `rounds` rounds after `warmup` ones. The cases run in turn,
    in reverse order every other round (A B C, C B A, A B C, ...), so no case always runs right
    after the same one."""
    times: dict[str, list[float]] = {k: [] for k in cases}
    names = list(cases)
    for r in range(warmup + rounds):
        for k in names if r % 2 == 0 else names[::-1]:
            t = timed(cases[k])
            if r >= warmup:
                times[k].append(t)
    return times


def alternate(cases: dict[str, Callable[[], object]], rounds: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds of each case, run in turn as `alternate_times` runs them."""
    return {k: statistics.median(v) for k, v in alternate_times(cases, rounds, warmup).items()}


def paired_change(times: dict[str, list[float]], a: str, b: str) -> float:
    """Median over rounds of a's time over b's in the same round, minus 1: the machine's slow and
    fast phases (minutes long) hit both cases of a round alike, so they cancel in each ratio."""
    return statistics.median(x / y for x, y in zip(times[a], times[b], strict=True)) - 1


def matmul_peak_gflops(n: int = 1024, reps: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = min(timed(lambda: a @ b) for _ in range(reps))
    return 2 * n**3 / best / 1e9


def bench_lora_linear(rounds: int) -> list[str]:
    """The basic layer: forward+backward of a 1024x1024 r=16 LoRA linear on 256x1024 inputs."""
    from peft import LoraConfig, get_peft_model

    class One(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(1024, 1024)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.proj(x)  # type: ignore[no-any-return]

    torch.manual_seed(0)
    ours = loratch.torch_lora_linear(1024, 1024, 16, 32.0)
    peft = get_peft_model(One(), LoraConfig(r=16, lora_alpha=32, target_modules=["proj"], lora_dropout=0.0))
    x = torch.randn(256, 1024)

    def run_ours() -> None:
        loratch.torch_lora_forward(ours, x).sum().backward()

    def run_peft() -> None:
        peft(x).sum().backward()

    med = alternate({"loratch": run_ours, "peft": run_peft}, rounds, warmup=3)
    return [
        "## LoRA linear forward+backward (1024x1024, r=16, 256 rows)",
        "",
        "| | median ms | ratio to PEFT |",
        "|---|---|---|",
        f"| loratch | {med['loratch'] * 1e3:.2f} | {med['peft'] / med['loratch']:.2f}x faster |",
        f"| PEFT | {med['peft'] * 1e3:.2f} | 1.00 |",
        "",
    ]


def bench_rust_lora_linear() -> list[str]:
    """`cargo bench --bench lora_linear` (criterion; benches/lora_linear.rs): the Rust LoraLinear
    against the same ops written in plain tch. Results land in $CARGO_TARGET_DIR/criterion."""
    head = ["## Rust LoRA linear (criterion)", ""]
    if shutil.which("cargo") is None:
        return head + ["Skipped: `cargo` is not on PATH.", ""]
    repo = Path(__file__).resolve().parent.parent
    started = time.time()
    # criterion's report goes to stderr so that this script's stdout stays the markdown.
    subprocess.run(
        ["cargo", "bench", "--bench", "lora_linear"], cwd=repo, check=True, stdout=sys.stderr
    )
    # Only this run's results (older ones may linger in the target dir).
    table = summary_lines(criterion_dir(), since=started - 1)
    return head + [
        "fp32 CPU, 256 rows (1 in `forward_1row`), r=16, alpha=32, no bias, torch threads as libtorch sets them. `loratch` "
        "is `LoraLinear::forward`; `raw_tch` the same layer's tensors in plain tch ops, "
        "`x W^T + scaling * (x A^T) B^T`. `forward`, `forward_1row` and `merge` run under no_grad; `forward_backward` "
        "adds `sum().backward()` and reads/zeroes the grads of A and B. Criterion runs the contenders one "
        "after the other (not alternated): 20 samples of 3 s after 1 s of warm-up; medians.",
        "",
        *table,
        "",
    ]


def bench_model(model_dir: Path, rounds: int) -> list[str]:
    import transformers as tf
    from peft import PeftModel

    ids = torch.randint(0, 49152, (1, 256), generator=torch.Generator().manual_seed(0))
    # Load time, alternated.
    load = alternate(
        {
            "loratch": lambda: loratch.torch_hf_load_model_lora("bench-load", model_dir),
            "transformers": lambda: tf.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
        },
        rounds=5,
    )
    loratch.torch_hf_unload("bench-load")
    # Same adapters everywhere: r=16, alpha=32, 7 projections, B random.
    loratch.torch_hf_load_model_lora("unmerged", model_dir)
    loratch.torch_hf_lora_init("unmerged", 16, 32.0, ALL7)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in loratch.torch_hf_lora_get_parameters("unmerged"):
            if p.shape[0] != 16:
                p.normal_(0.0, 0.02, generator=g)
    with tempfile.TemporaryDirectory() as tmp:
        adapter = Path(tmp) / "adapter"
        save_s = statistics.median(timed(lambda: loratch.torch_hf_lora_save("unmerged", adapter)) for _ in range(5))
        loratch.torch_hf_load_model_lora("merged", model_dir)
        load_ad_s = statistics.median(timed(lambda: loratch.torch_hf_lora_load("merged", adapter)) for _ in range(5))
        loratch.torch_hf_lora_merge("merged")
        loratch.torch_hf_load_model_lora("base", model_dir)
        hf_base = tf.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        peft = PeftModel.from_pretrained(
            tf.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), adapter
        ).eval()
        with torch.no_grad():
            diff = (loratch.torch_hf_forward("unmerged", ids) - peft(ids).logits).abs().max().item()

            def fwd(name: str) -> Callable[[], object]:
                return lambda: loratch.torch_hf_forward(name, ids)

            times = alternate_times(
                {
                    "loratch unmerged": fwd("unmerged"),
                    "loratch merged": fwd("merged"),
                    "loratch base": fwd("base"),
                    "PEFT unmerged": lambda: peft(ids),
                    "transformers base": lambda: hf_base(ids),
                },
                rounds,
            )
    med = {k: statistics.median(v) for k, v in times.items()}
    for n in ("unmerged", "merged", "base"):
        loratch.torch_hf_unload(n)
    peft_ms = med["PEFT unmerged"]
    unmerged = paired_change(times, "loratch unmerged", "loratch merged")
    merged = paired_change(times, "loratch merged", "loratch base")
    summary.record("Forward 1x256: loratch unmerged vs merged within +10%", f"{100 * unmerged:+.1f}%", unmerged <= 0.10)
    summary.record("Forward 1x256: loratch merged vs base within 2%", f"{100 * merged:+.1f}%", abs(merged) <= 0.02)
    lines = [
        f"## SmolLM2-135M-Instruct fp32, forward of 1x256 tokens (medians of {rounds}, alternated)",
        "",
        "LoRA r=16, alpha=32 on q,k,v,o,gate,up,down with the same random adapter in loratch and PEFT "
        f"(max |logit diff| {diff:.2e}).",
        "",
        "| | median ms | vs PEFT unmerged |",
        "|---|---|---|",
    ]
    for k, v in med.items():
        lines.append(f"| {k} | {v * 1e3:.1f} | {peft_ms / v:.2f}x |")
    lines += [
        "",
        "- Changes below: the median over rounds of the ratio of the two times in the same round "
        "(a round runs each contender once), then the ratio of the medians above.",
        f"- loratch unmerged vs merged: {100 * paired_change(times, 'loratch unmerged', 'loratch merged'):+.1f}% "
        f"({100 * (med['loratch unmerged'] / med['loratch merged'] - 1):+.1f}%; target: within +10%)",
        f"- loratch merged vs loratch base: {100 * paired_change(times, 'loratch merged', 'loratch base'):+.1f}% "
        f"({100 * (med['loratch merged'] / med['loratch base'] - 1):+.1f}%; target: within 2%)",
        f"- PEFT unmerged vs transformers base: {100 * paired_change(times, 'PEFT unmerged', 'transformers base'):+.1f}% "
        f"({100 * (peft_ms / med['transformers base'] - 1):+.1f}%)",
        f"- load (median of 5, alternated): loratch {load['loratch'] * 1e3:.0f} ms, "
        f"transformers {load['transformers'] * 1e3:.0f} ms (ratio {load['transformers'] / load['loratch']:.2f}x)",
        f"- adapter save {save_s * 1e3:.1f} ms, load {load_ad_s * 1e3:.1f} ms (PEFT directory, 7 projections x 30 layers)",
        "",
    ]
    return lines


HAND_WRITTEN = ("## Figures", "## Notes")
MEMORY_TABLE = "## Memory table"


def previous_section(path: Path, heading: str) -> list[str]:
    """The section of `path` whose heading starts with `heading`, up to the next "## " heading,
    or [] (a section this run does not measure keeps the previous run's figures, marked as such)."""
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    start = next((i for i, ln in enumerate(lines) if ln.startswith(heading)), None)
    if start is None:
        return []
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    kept = [ln for ln in lines[start:end] if not ln.startswith("Not re-measured by this run")]
    note = ("Not re-measured by this run of `make bench` (`--memory-sizes ''`): the figures are the previous "
            "run's, as its own text describes them.")
    return [kept[0], "", note, *kept[1:]]


def hand_written(path: Path) -> list[str]:
    """The hand-written sections at the end of `path` (from its first "## Figures" or "## Notes"
    heading on), kept when `make bench` rewrites the file."""
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    start = next((i for i, ln in enumerate(lines) if ln.startswith(HAND_WRITTEN)), len(lines))
    return lines[start:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one or two rounds of each table, the slow ones skipped, "
                    "written to target/bench-quick.md (an end-to-end check, not numbers to quote)")
    ap.add_argument("--rounds", type=int, default=7, help="rounds of the Python tables (x3 for the layer's)")
    ap.add_argument("--forward-rounds", type=int, default=25, help="rounds of the model forward table")
    ap.add_argument("--model-dir", type=Path, default=None, help="default: the embedded SmolLM2-135M-Instruct")
    ap.add_argument("--out", type=Path, default=None, help="default: BENCHMARKS.md (--quick: target/bench-quick.md)")
    ap.add_argument("--no-rust", action="store_true", help="skip `cargo bench --bench lora_linear`")
    ap.add_argument("--train-rounds", type=int, default=3, help="fixed-length training runs per side")
    ap.add_argument("--real-rounds", type=int, default=2, help="real-data training runs per side (minutes each)")
    ap.add_argument("--loop-rounds", type=int, default=7,
                    help="rounds of the Python-loop table (each round: every contender's steps in turn)")
    ap.add_argument("--gemma3-rounds", type=int, default=3,
                    help="Gemma-3-270M fixed-length runs per side (0: skip; alone: train_bench.py --only gemma3)")
    ap.add_argument("--memory-sizes", default="135m,1b,3b,8b",
                    help="the memory table's model sizes (benches/memory_table.py; ~1 h for all); '' to keep the "
                         "previous run's table, marked as not re-measured")
    ap.add_argument("--memory-only", default=None, help="a regex: only the memory-table rows whose id it matches")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.forward_rounds, args.train_rounds, args.real_rounds = 1, 3, 1, 0
        args.loop_rounds, args.gemma3_rounds, args.memory_sizes, args.no_rust = 2, 0, "", True
    out = args.out or (Path(__file__).resolve().parent.parent / "target" / "bench-quick.md" if args.quick
                       else Path("BENCHMARKS.md"))
    peak = matmul_peak_gflops()
    head = [
        "# Benchmarks",
        "",
        f"Measured by `make bench` on {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"torch threads {torch.get_num_threads()}; fp32 matmul peak {peak:.0f} GFLOP/s (1024^3, best of 10). "
        "Each table alternates the contenders in one process (A B C, C B A, ...) after a warm-up; numbers are medians.",
        "",
    ]
    here = Path(__file__).resolve().parent
    sys.path.insert(0, str(here))
    body = bench_lora_linear(args.rounds * 3)
    model_dir = args.model_dir
    if model_dir is None:
        from loratch.default_model import default_model_dir

        model_dir = default_model_dir()
    body += bench_model(model_dir, args.forward_rounds)
    if not args.no_rust:
        body += bench_rust_lora_linear()
    if args.train_rounds > 0:
        from train_bench import bench_training

        with tempfile.TemporaryDirectory() as work:
            body += bench_training(model_dir, Path(work), peak, args.train_rounds, args.real_rounds)
    if args.loop_rounds > 0:
        from loop_bench import bench_python_loop

        with tempfile.TemporaryDirectory() as work:
            body += bench_python_loop(model_dir, Path(work), args.loop_rounds)
    if args.gemma3_rounds > 0:
        from train_bench import bench_gemma3

        with tempfile.TemporaryDirectory() as work:
            body += bench_gemma3(Path(work), args.gemma3_rounds)
    if (here / "gen_bench.py").exists():
        import gen_bench

        body += gen_bench.bench_generation(model_dir, args.quick)
        summary.extend(gen_bench.rows())
    if args.memory_sizes:
        from memory_table import bench_memory_table

        # Its random models stay in target/memory-table between runs (GBs, written once).
        memory_work = here.parent / "target" / "memory-table"
        body += bench_memory_table(memory_work, args.memory_sizes.split(","), args.memory_only)
    elif not args.quick:
        body += previous_section(out, MEMORY_TABLE)
    text = "\n".join(head + summary.table() + body + hand_written(out)) + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
