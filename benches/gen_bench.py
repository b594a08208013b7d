"""Generation speed (issue 25 item 3): loratch's greedy decoding against transformers' on
SmolLM2-135M-Instruct in float32, as a fraction of the memory-bandwidth bound measured here; a
quantized GGUF base against llama.cpp (llama-cpp-python, same file, same threads) for prompt
processing and generation; and batched generation of a list of prompts.

Run alone (`python benches/gen_bench.py [--quick]`) or from `make bench` (benches/bench.py calls
`bench_generation(model_dir, quick)` and adds `rows()` to the summary table). Every comparison runs
in this one process, alternated (A B, B A, ...), with the same torch threads on both sides."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import loratch

_ROWS: list[dict[str, Any]] = []
PROMPT = "Write a short story about a robot who learns to paint, in three paragraphs."


def _chat_ids(tok: Any, question: str) -> list[int]:
    """The chat-template prompt of one user question, as token ids."""
    text = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False)
    return tok.encode(text, add_special_tokens=False)  # type: ignore[no-any-return]


def rows() -> list[dict[str, Any]]:
    """The summary rows of the last `bench_generation` run: `{"target", "value", "met"}`."""
    return [dict(r) for r in _ROWS]


def _record(target: str, value: str, met: bool | None) -> None:
    _ROWS.append({"target": target, "value": value, "met": met})


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _alternate(cases: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median seconds of each case over `rounds` rounds after one warm-up, the order reversed
    every other round."""
    times: dict[str, list[float]] = {k: [] for k in cases}
    names = list(cases)
    for r in range(1 + rounds):
        for k in names if r % 2 == 0 else names[::-1]:
            t = _timed(cases[k])
            if r > 0:
                times[k].append(t)
    return {k: statistics.median(v) for k, v in times.items()}


def copy_bandwidth_gbs(mib: int = 512, reps: int = 5) -> float:
    """Memory bandwidth as a large torch copy moves it: (bytes read + bytes written) / the best
    time of `reps` copies of `mib` MiB of float32 (far larger than any cache), in GB/s."""
    n = mib * (1 << 20) // 4
    src, dst = torch.ones(n), torch.empty(n)
    dst.copy_(src)
    best = min(_timed(lambda: dst.copy_(src)) for _ in range(reps))
    return 2 * n * 4 / best / 1e9


def decode_bytes_per_token(hf: Any, context: int) -> int:
    """Bytes one decoding step reads: every weight but the embedding (whose one row is read; a
    tied head reads the whole table as the head), plus the KV cache of `context` positions."""
    cfg = hf.config
    params = sum(p.numel() * p.element_size() for n, p in hf.named_parameters() if "embed_tokens" not in n)
    head = hf.get_output_embeddings().weight
    if cfg.tie_word_embeddings:
        params += head.numel() * head.element_size()
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * 4 * context
    return int(params + kv)


def bench_float32(model_dir: Path, quick: bool, bandwidth: float) -> list[str]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    loratch.torch_hf_load_model_lora("gen-bench", str(model_dir))
    prompt = _chat_ids(tok, PROMPT)
    lines = [
        "| new tokens | loratch tok/s | transformers tok/s | ratio | same tokens | loratch / bandwidth bound |",
        "|---|---|---|---|---|---|",
    ]
    # --quick: a check that the section runs, not figures to quote (its rows say so).
    for n in (8, 16) if quick else (64, 256):
        def ours(n: int = n) -> list[int]:
            return loratch.torch_hf_generate("gen-bench", prompt, n, greedy=True)

        def theirs(n: int = n) -> list[int]:
            with torch.no_grad():
                out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                  pad_token_id=tok.eos_token_id)
            return out[0, len(prompt):].tolist()  # type: ignore[no-any-return]

        same = ours() == theirs()
        t = _alternate({"loratch": ours, "transformers": theirs}, 1 if quick else 3)
        ours_tps, theirs_tps = n / t["loratch"], n / t["transformers"]
        bound_tps = bandwidth * 1e9 / decode_bytes_per_token(hf, len(prompt) + n // 2)
        ratio = ours_tps / theirs_tps
        lines.append(f"| {n} | {ours_tps:.1f} | {theirs_tps:.1f} | {ratio:.2f}x | {same} | "
                     f"{100 * ours_tps / bound_tps:.0f}% of {bound_tps:.1f} |")
        _record(f"Greedy generation, SmolLM2-135M fp32, batch 1, {n} new tokens: tok/s vs transformers >= 2x",
                f"{ratio:.2f}x ({100 * ours_tps / bound_tps:.0f}% of the bandwidth bound)", ratio >= 2.0 and same)
    lines += ["", f"Prompt: {len(prompt)} tokens (chat template). Time: the whole `generate` call (prompt + "
              f"new tokens). Bound: {decode_bytes_per_token(hf, len(prompt)) / 1e6:.0f} MB read per token (every "
              f"weight but the embedding, the tied head once, the KV cache at the mean context) / the copy "
              f"bandwidth."]
    loratch.torch_hf_unload("gen-bench")
    return lines


def bench_batched(model_dir: Path, quick: bool) -> list[str]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    loratch.torch_hf_load_model_lora("gen-batch", str(model_dir))
    questions = ["What is the capital of France?", "Name three primary colours.", "What is 12 times 7?",
                 "Who wrote Hamlet?", "Why is the sky blue?", "Give a synonym of happy.",
                 "What does a CPU do?", "How many legs has a spider?"]
    prompts = [_chat_ids(tok, q) for q in questions]
    if quick:
        prompts = prompts[:4]
    n = 8 if quick else 48
    eos = tok.eos_token_id
    batched: list[list[int]] = []
    alone: list[list[int]] = []

    def one_batch() -> None:
        batched[:] = loratch.torch_hf_generate("gen-batch", prompts, n, greedy=True, eos_token_id=eos)

    def one_by_one() -> None:
        alone[:] = [loratch.torch_hf_generate("gen-batch", p, n, greedy=True, eos_token_id=eos) for p in prompts]

    t = _alternate({"batch": one_batch, "alone": one_by_one}, 1 if quick else 3)
    new = sum(map(len, batched))
    same = sum(a == b for a, b in zip(batched, alone, strict=True))
    loratch.torch_hf_unload("gen-batch")
    tps, alone_tps = new / t["batch"], new / t["alone"]
    _record(f"Batched greedy generation, {len(prompts)} prompts (left-padded, per-row stop): tok/s",
            f"{tps:.1f} tok/s ({tps / alone_tps:.2f}x one by one)", None)
    return [
        "| prompts | new tokens (all rows) | batch tok/s | one by one tok/s | rows equal to alone |",
        "|---|---|---|---|---|",
        f"| {len(prompts)} | {new} | {tps:.1f} | {alone_tps:.1f} | {same}/{len(prompts)} |",
    ]


def _split(pp: Callable[[], object], run: Callable[[], object], n_prompt: int, n: int,
           rounds: int) -> tuple[float, float]:
    """(prompt tokens/s, generation tokens/s): `pp` processes the prompt and picks one token; `run`
    does that and n - 1 more greedy steps. The prompt's time is pp's; the generation's, the rest
    of run's."""
    t = _alternate({"pp": pp, "all": run}, rounds)
    return n_prompt / t["pp"], (n - 1) / max(t["all"] - t["pp"], 1e-9)


def _gemma3_gguf() -> Path:
    return Path(subprocess.check_output([sys.executable, "-m", "loratch.default_model", "gemma3"],
                                        text=True).strip())


def _quant_prompt() -> list[int]:
    tok = loratch.torch_hf_tokenizer_load(str(_gemma3_gguf()))
    return tok.encode(" ".join([PROMPT] * 8))  # type: ignore[no-any-return]


def quant_worker(side: str, n: int, rounds: int) -> dict[str, float]:
    """One side of the quantized table in this process (a worker of `bench_quantized`)."""
    gguf, prompt = _gemma3_gguf(), _quant_prompt()
    threads = torch.get_num_threads()
    if side == "loratch":
        loratch.torch_hf_load_model_lora("gen-q", str(gguf))
        pp, tg = _split(lambda: loratch.torch_hf_generate("gen-q", prompt, 1, greedy=True),
                        lambda: loratch.torch_hf_generate("gen-q", prompt, n, greedy=True), len(prompt), n, rounds)
    else:
        from llama_cpp import Llama

        llm = Llama(model_path=str(gguf), n_threads=threads, n_threads_batch=threads, n_ctx=1024, n_batch=512,
                    verbose=False)

        def prompt_only() -> None:
            llm.reset()
            llm.eval(prompt)

        def run() -> None:
            prompt_only()
            for _ in range(n - 1):
                llm.eval([int(llm.sample(top_k=1, temp=0.0))])

        pp, tg = _split(prompt_only, run, len(prompt), n, rounds)
    return {"pp": pp, "tg": tg, "threads": threads, "prompt": len(prompt)}


def bench_quantized(quick: bool) -> list[str]:
    try:
        import llama_cpp  # noqa: F401
    except ImportError as e:
        _record("Quantized GGUF generation vs llama.cpp >= 0.5x", f"not measured ({e})", None)
        return [f"llama-cpp-python is not importable ({e}): not measured."]
    n = 6 if quick else 64
    rounds = 1 if quick else 3
    # Each side in its own process, the processes alternated (A B, B A): in one process, the
    # threads of one side's OpenMP runtime (llama.cpp's and libtorch's are two) keep spinning after
    # its work and slow the other side down (loratch's prompt 0.25 s -> 0.43 s once llama.cpp ran).
    runs: dict[str, list[dict[str, float]]] = {"loratch": [], "llama.cpp": []}
    for order in [["loratch", "llama.cpp"], ["llama.cpp", "loratch"]][: 1 if quick else 2]:
        for side in order:
            runs[side].append(_worker(["--quant-worker", side, "--tokens", str(n), "--rounds", str(rounds)]))
    med = {side: {k: statistics.median(r[k] for r in rs) for k in ("pp", "tg")} for side, rs in runs.items()}
    ours, theirs = med["loratch"], med["llama.cpp"]
    threads, n_prompt = runs["loratch"][0]["threads"], runs["loratch"][0]["prompt"]
    tg, pp = ours["tg"] / theirs["tg"], ours["pp"] / theirs["pp"]
    _record("Gemma-3-270M Q4_K_M GGUF generation: tok/s vs llama.cpp >= 0.5x", f"{tg:.2f}x", tg >= 0.5)
    _record("Gemma-3-270M Q4_K_M GGUF prompt processing: tok/s vs llama.cpp >= 1x", f"{pp:.2f}x", pp >= 1.0)
    return [
        "| Gemma-3-270M Q4_K_M | loratch | llama.cpp | ratio |",
        "|---|---|---|---|",
        f"| prompt processing ({n_prompt:.0f} tokens), tok/s | {ours['pp']:.0f} | {theirs['pp']:.0f} | {pp:.2f}x |",
        f"| generation ({n} tokens, greedy), tok/s | {ours['tg']:.1f} | {theirs['tg']:.1f} | {tg:.2f}x |",
        "",
        f"Both read the GGUF's blocks as stored, {threads:.0f} threads each, each side in its own process "
        f"({len(runs['loratch'])} alternated processes per side, {rounds} rounds each after a warm-up; medians). "
        "loratch decodes the common formats with its AVX2 kernels (csrc/quant_simd.cpp) and multiplies in "
        "float32 (a decoding step decodes each block in registers; a prompt has each thread decode cache-sized "
        "tiles of rows and multiply each with sgemm); "
        "llama.cpp quantizes the activations to 8 bits and multiplies in integers.",
    ]


def _worker(args: list[str]) -> dict[str, float]:
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"gen_bench worker {args[:2]} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def bench_generation(model_dir: Path, quick: bool) -> list[str]:
    """The generation section of BENCHMARKS.md; fills `rows()`."""
    _ROWS.clear()
    bandwidth = copy_bandwidth_gbs(256 if quick else 512)
    load = os.getloadavg()[0]
    lines = [
        "## Generation (greedy, CPU)",
        "",
        f"torch threads {torch.get_num_threads()}; copy bandwidth {bandwidth:.1f} GB/s (a {256 if quick else 512} MiB "
        f"float32 `copy_`, read + write bytes, best of 5); load average {load:.1f} at the start.",
        "",
    ]
    lines += bench_float32(model_dir, quick, bandwidth) + [""]
    lines += bench_batched(model_dir, quick) + [""]
    lines += bench_quantized(quick) + [""]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="one round each, fewer tokens: a check that it runs")
    ap.add_argument("--model", type=Path, default=None, help="model directory (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--quant-worker", choices=["loratch", "llama.cpp"], help=argparse.SUPPRESS)
    ap.add_argument("--tokens", type=int, default=64, help=argparse.SUPPRESS)
    ap.add_argument("--rounds", type=int, default=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quant_worker:
        print(json.dumps(quant_worker(args.quant_worker, args.tokens, args.rounds)))
        return
    model = args.model or Path(subprocess.check_output([sys.executable, "-m", "loratch.default_model"], text=True).strip())
    print("\n".join(bench_generation(model, args.quick)))
    for r in rows():
        print(r)


if __name__ == "__main__":
    main()
