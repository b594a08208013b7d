"""Generation speed (issue 25 item 3): loratch's greedy decoding against transformers' on
SmolLM2-135M-Instruct in float32, as a fraction of the memory-bandwidth bound measured here; a
quantized GGUF base against llama.cpp (llama-cpp-python, same file, same threads) for prompt
processing and generation; and batched generation of a list of prompts.

Run alone (`python benches/gen_bench.py [--quick]`) or from `make bench` (benches/bench.py calls
`bench_generation(model_dir, quick)` and adds `rows()` to the summary table). Every comparison runs
in this one process, alternated (A B, B A, ...), with the same torch threads on both sides."""

from __future__ import annotations

import argparse
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


def _loratch_split(name: str, prompt: list[int], n: int, rounds: int) -> tuple[float, float]:
    """(prompt tokens/s, generation tokens/s): the prompt's time is a 1-token generation's; the
    generation's, the rest of an n-token one."""
    t = _alternate({"pp": lambda: loratch.torch_hf_generate(name, prompt, 1, greedy=True),
                    "all": lambda: loratch.torch_hf_generate(name, prompt, n, greedy=True)}, rounds)
    return len(prompt) / t["pp"], (n - 1) / max(t["all"] - t["pp"], 1e-9)


def _llama_split(llm: Any, prompt: list[int], n: int, rounds: int) -> tuple[float, float]:
    """As `_loratch_split`, for llama.cpp: `eval` of the prompt, then greedy steps."""

    def pp() -> None:
        llm.reset()
        llm.eval(prompt)

    def gen() -> None:
        pp()
        for _ in range(n - 1):
            llm.eval([int(llm.sample(top_k=1, temp=0.0))])

    t = _alternate({"pp": pp, "all": gen}, rounds)
    return len(prompt) / t["pp"], (n - 1) / max(t["all"] - t["pp"], 1e-9)


def bench_quantized(quick: bool) -> list[str]:
    try:
        from llama_cpp import Llama
    except ImportError as e:
        _record("Quantized GGUF generation vs llama.cpp >= 0.5x", f"not measured ({e})", None)
        return [f"llama-cpp-python is not importable ({e}): not measured."]
    gguf = Path(subprocess.check_output([sys.executable, "-m", "loratch.default_model", "gemma3"], text=True).strip())
    threads = torch.get_num_threads()
    loratch.torch_hf_load_model_lora("gen-q", str(gguf))
    tok = loratch.torch_hf_tokenizer_load(str(gguf))
    prompt = tok.encode(" ".join([PROMPT] * 8))
    n = 6 if quick else 64
    rounds = 1 if quick else 3
    llm = Llama(model_path=str(gguf), n_threads=threads, n_threads_batch=threads, n_ctx=1024, n_batch=512,
                verbose=False)
    ours_pp, ours_tg = _loratch_split("gen-q", prompt, n, rounds)
    theirs_pp, theirs_tg = _llama_split(llm, prompt, n, rounds)
    del llm
    loratch.torch_hf_unload("gen-q")
    tg, pp = ours_tg / theirs_tg, ours_pp / theirs_pp
    _record("Gemma-3-270M Q4_K_M GGUF generation: tok/s vs llama.cpp >= 0.5x", f"{tg:.2f}x", tg >= 0.5)
    _record("Gemma-3-270M Q4_K_M GGUF prompt processing: tok/s vs llama.cpp >= 1x", f"{pp:.2f}x", pp >= 1.0)
    return [
        "| Gemma-3-270M Q4_K_M | loratch | llama.cpp | ratio |",
        "|---|---|---|---|",
        f"| prompt processing ({len(prompt)} tokens), tok/s | {ours_pp:.0f} | {theirs_pp:.0f} | {pp:.2f}x |",
        f"| generation ({n} tokens, greedy), tok/s | {ours_tg:.1f} | {theirs_tg:.1f} | {tg:.2f}x |",
        "",
        f"Both read the GGUF's blocks as stored (loratch decodes each few-row product's weight rows in "
        f"small per-thread blocks), {threads} threads each.",
    ]


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
    args = ap.parse_args()
    model = args.model or Path(subprocess.check_output([sys.executable, "-m", "loratch.default_model"], text=True).strip())
    print("\n".join(bench_generation(model, args.quick)))
    for r in rows():
        print(r)


if __name__ == "__main__":
    main()
