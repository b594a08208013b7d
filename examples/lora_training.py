"""LoRA fine-tuning of a causal language model with loratch's function-style API.

This is the "Complete Training Pipeline" of the LoRA guide (sections "Complete Training
Pipeline", "Optimizer and Scheduler" and "Memory Management") written in Python, with the same
function names: ``train_step``, ``should_update_weights``, ``validate``, ``save_checkpoint`` and
``calculate_loss``. It runs as it is on the default model (SmolLM2-135M-Instruct) and the
default dataset, on CPU, in a few minutes::

    python examples/lora_training.py                  # 20 optimizer steps, default model and data
    python examples/lora_training.py --max-steps 100 --model /path/to/hf/model --data my.jsonl

Where it deliberately differs from the guide's original implementation:

- The loss is computed on the answer tokens only: prompt tokens (the chat template rendered up
  to and including the assistant header) and padding are labelled -100 and ignored.
- Gradient accumulation normalises by the number of target tokens in the whole accumulation
  window (sum of token losses / total target tokens), so every token weighs the same whatever
  the length of its sequence, instead of dividing each micro-batch's mean loss by the
  accumulation count.
- Cross-entropy is taken on float32 logits, batches are padded on the right with an
  attention mask, and the training/validation split is a seeded shuffle (not file order).
- The scheduler sets the learning rate of step 0 (warmup starts above zero) and holds its final
  value after ``total_steps``.
- Checkpoints are PEFT adapter directories (``adapter_config.json`` +
  ``adapter_model.safetensors``) that ``peft.PeftModel.from_pretrained`` loads, plus the
  guide's metadata JSON (epoch, global_step, best_loss, current_lr, lora_config,
  training_config).

Data: a JSONL file of Alpaca records (``instruction``, optional ``input``, ``output``). The
default is the English FAQ of the PyPI package ``zaragoza-construction-faq``
(CC-BY-4.0, Zaragoza AB).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import random
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from loratch import (
    Optimizer,
    Scheduler,
    Tokenizer,
    tensor_in_memory,
    torch_backward,
    torch_clip_grad_norm,
    torch_hf_forward,
    torch_hf_load_model_lora,
    torch_hf_lora_get_parameters,
    torch_hf_lora_init,
    torch_hf_lora_save,
    torch_hf_memory_report,
    torch_hf_set_training,
    torch_hf_tokenizer_load,
    torch_hf_unload,
    torch_lr_scheduler,
    torch_mps_synchronize,
    torch_optimizer_add_params,
    torch_optimizer_step,
    torch_optimizer_zero_grad,
    torch_scheduler_get_lr,
    torch_scheduler_step,
    torch_set_grad_enabled,
)

#: The name the model is registered under in loratch (the guide's "llama31_lora").
MODEL_NAME = "lora_training_example"
#: Label of the positions that are not trained on (PyTorch's cross-entropy default).
IGNORE_INDEX = -100
DATASET_PACKAGE = "zaragoza_construction_faq"
DATASET_ATTRIBUTION = (
    "Swedish Construction FAQ by Zaragoza AB (https://zaragoza.se), licensed CC-BY-4.0 "
    "(https://creativecommons.org/licenses/by/4.0/)"
)


# --- Data ----------------------------------------------------------------------------------------


@dataclass
class Example:
    """One tokenized record: ``labels`` equals ``input_ids`` on the answer, -100 elsewhere."""

    input_ids: list[int]
    labels: list[int]


@dataclass
class Batch:
    """Right-padded examples: ``input_ids``, ``attention_mask`` and ``labels``, all ``[B, T]``."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    @property
    def n_targets(self) -> int:
        """Tokens the shifted loss is computed on (position 0 never is a target)."""
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())


def default_data_file() -> Path:
    """The English Alpaca JSONL of ``zaragoza-construction-faq``, located without importing it."""
    spec = importlib.util.find_spec(DATASET_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            "the default dataset needs the package zaragoza-construction-faq "
            "(pip install zaragoza-construction-faq), or pass --data FILE"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "faq-en-alpaca.jsonl"


def read_alpaca(path: Path) -> list[dict[str, str]]:
    """Alpaca records (``instruction``, ``input``, ``output``) from a JSONL file."""
    records = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            record = json.loads(line)
            if not record.get("instruction") or not record.get("output"):
                raise SystemExit(f"{path}:{line_no}: a record needs 'instruction' and 'output'")
            records.append(record)
    return records


def tokenize_record(
    record: dict[str, str], tokenizer: Tokenizer, max_seq_length: int
) -> Example | None:
    """Render a record with the model's chat template and mask everything but the answer.

    The prompt is the template rendered up to the assistant turn (``add_generation_prompt=True``);
    the answer is what the full conversation adds after it, up to and including the end-of-turn
    token (the template's trailing newline is not trained). The two parts are encoded
    separately, so no token straddles the boundary. Returns None when truncation to
    ``max_seq_length`` leaves no answer token.
    """
    user = record["instruction"]
    if record.get("input"):
        user += "\n\n" + record["input"]
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]
    prompt_text = tokenizer.apply_chat_template(messages[:1], add_generation_prompt=True)
    full_text = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    if not full_text.startswith(prompt_text):
        raise SystemExit("this chat template does not render the prompt as a prefix of the chat")
    answer_text = full_text[len(prompt_text) :]
    eos = tokenizer.eos_token
    if eos and eos in answer_text:
        answer_text = answer_text[: answer_text.index(eos) + len(eos)]

    # The template writes the special tokens itself: encode without adding any.
    prompt_ids = tokenizer.encode(prompt_text, add_special_tokens=False)
    answer_ids = tokenizer.encode(answer_text, add_special_tokens=False)
    input_ids = (prompt_ids + answer_ids)[:max_seq_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + answer_ids)[:max_seq_length]
    if all(label == IGNORE_INDEX for label in labels[1:]):
        return None
    return Example(input_ids, labels)


def collate(examples: Sequence[Example], pad_id: int, device: str) -> Batch:
    """Pad on the right to the longest example of the batch (dynamic padding)."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.int64)
    mask = torch.zeros((len(examples), width), dtype=torch.int64)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.int64)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        mask[row, :n] = 1
        labels[row, :n] = torch.tensor(e.labels)
    return Batch(ids.to(device), mask.to(device), labels.to(device))


def make_batches(
    examples: Sequence[Example], batch_size: int, pad_id: int, device: str
) -> list[Batch]:
    return [
        collate(examples[i : i + batch_size], pad_id, device)
        for i in range(0, len(examples), batch_size)
    ]


def training_batches(
    examples: list[Example], batch_size: int, pad_id: int, device: str, seed: int
) -> Iterator[tuple[int, Batch]]:
    """Endless ``(epoch, batch)`` pairs, reshuffled (seeded) at the start of every epoch."""
    rng = random.Random(seed)
    epoch = 0
    while True:
        order = examples[:]
        rng.shuffle(order)
        for i in range(0, len(order), batch_size):
            yield epoch, collate(order[i : i + batch_size], pad_id, device)
        epoch += 1


# --- Loss, training step, weight update ------------------------------------------------------------


def calculate_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Shifted cross-entropy: ``logits[:, t]`` predicts ``labels[:, t + 1]``.

    Computed in float32 whatever the model's dtype, ignoring positions labelled -100. Returns
    the SUM of the token losses (a scalar tensor with autograd) and the number of tokens, so
    that the caller can normalise by the target tokens of a whole accumulation window.
    """
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    loss_sum = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return loss_sum, int((shift_labels != IGNORE_INDEX).sum())


def train_step(
    batch: Batch,
    window_tokens: int,
    is_accumulating: bool,
    optimizer: Optimizer,
) -> tuple[float, int]:
    """Forward and backward of one micro-batch; gradients add up over the accumulation window.

    ``window_tokens`` is the number of target tokens in the whole window: dividing each
    micro-batch's loss sum by it makes the accumulated gradient that of the token-mean loss of
    the window. Returns the micro-batch's loss sum and token count (for logging).
    """
    if not is_accumulating:  # a new accumulation window starts from zero gradients
        torch_optimizer_zero_grad(optimizer)

    # Forward pass: the LoRA adapters are applied inside the model.
    logits = torch_hf_forward(MODEL_NAME, batch.input_ids, attention_mask=batch.attention_mask)
    loss_sum, n_tokens = calculate_loss(logits, batch.labels)

    torch_backward(loss_sum / window_tokens)
    torch_mps_synchronize()  # waits for queued accelerator work; a no-op on CPU
    return loss_sum.item(), n_tokens


def gradient_norm(optimizer: Optimizer) -> float:
    """The total 2-norm of the gradients (for logging when clipping is off)."""
    norms = [torch.linalg.vector_norm(p.grad) for p in optimizer.params if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


def should_update_weights(
    accumulation_step: int,
    optimizer: Optimizer,
    scheduler: Scheduler,
    config: dict[str, Any],
) -> float | None:
    """At the end of an accumulation window: clip, step the optimizer and the scheduler, zero
    the gradients. Returns the gradient norm before clipping when the weights were updated,
    None while still accumulating."""
    if (accumulation_step + 1) % config["gradient_accumulation_steps"] != 0:
        return None

    max_norm = config["max_grad_norm"]
    norm = torch_clip_grad_norm(optimizer, max_norm) if max_norm > 0 else gradient_norm(optimizer)
    torch_optimizer_step(optimizer)
    torch_scheduler_step(scheduler)
    torch_optimizer_zero_grad(optimizer)
    return norm


# --- Validation and checkpoints -----------------------------------------------------------------


def validate(model_name: str, batches: Sequence[Batch]) -> float:
    """The mean loss per answer token over the held-out batches (no autograd, no dropout)."""
    torch_hf_set_training(model_name, False)
    was_enabled = torch_set_grad_enabled(False)
    total_loss, total_tokens = 0.0, 0
    try:
        for batch in batches:
            logits = torch_hf_forward(model_name, batch.input_ids, attention_mask=batch.attention_mask)
            loss_sum, n_tokens = calculate_loss(logits, batch.labels)
            total_loss += loss_sum.item()
            total_tokens += n_tokens
            torch_mps_synchronize()
    finally:
        torch_set_grad_enabled(was_enabled)
        torch_hf_set_training(model_name, True)
    return total_loss / max(total_tokens, 1)


def save_checkpoint(
    model_name: str,
    checkpoint_dir: Path,
    state: dict[str, Any],
    lora_config: dict[str, Any],
    training_config: dict[str, Any],
) -> tuple[Path, Path]:
    """Save the adapters (a PEFT directory, lightweight) and the training metadata as JSON.

    ``state`` holds ``epoch``, ``global_step``, ``best_loss`` and ``current_lr``. Returns the
    adapter directory and the metadata file.
    """
    step = state["global_step"]
    adapter_dir = checkpoint_dir / f"lora_adapters_step_{step}"
    torch_hf_lora_save(model_name, adapter_dir)

    checkpoint_info = {**state, "lora_config": lora_config, "training_config": training_config}
    info_file = checkpoint_dir / f"training_info_step_{step}.json"
    info_file.write_text(json.dumps(checkpoint_info, indent=2) + "\n", encoding="utf-8")
    return adapter_dir, info_file


def print_memory(model_name: str) -> None:
    report = torch_hf_memory_report(model_name)
    parts = ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in report.items())
    print(f"memory: {parts}; tensors in memory: {tensor_in_memory()}")


# --- The pipeline --------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--model", type=Path, help="Hugging Face model directory (default: SmolLM2-135M-Instruct)")
    p.add_argument("--data", type=Path, help="Alpaca JSONL file (default: the Zaragoza construction FAQ)")
    p.add_argument("--output-dir", type=Path, help="where checkpoints go (default: a new temporary directory)")
    p.add_argument("--max-steps", type=int, default=20, help="optimizer updates (default: 20)")
    p.add_argument("--num-epochs", type=float, default=3.0, help="upper bound in epochs (default: 3)")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--grad-accum", type=int, default=2, help="micro-batches per optimizer update")
    p.add_argument("--lr", type=float, default=5e-4, help="peak learning rate (default: 5e-4; the guide's 2e-4 suits longer runs)")
    p.add_argument("--min-lr", type=float, default=1e-6)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--warmup-steps", type=int, default=None, help="default: 10%% of the steps")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="0 disables clipping")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout")
    p.add_argument(
        "--target-modules", nargs="+", default=["q_proj", "k_proj", "v_proj", "o_proj"]
    )
    p.add_argument("--max-seq-length", type=int, default=256)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--eval-examples", type=int, default=24, help="held-out records")
    p.add_argument("--eval-steps", type=int, default=10, help="validate every N updates (0: only at the end)")
    p.add_argument("--save-steps", type=int, default=0, help="save every N updates (0: only at the end)")
    p.add_argument("--logging-steps", type=int, default=1)
    p.add_argument("--device", default="cpu", help='"cpu", "cuda", "cuda:N" or "mps"')
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = p.parse_args(argv)
    if args.max_steps < 1 or args.batch_size < 1 or args.grad_accum < 1:
        p.error("--max-steps, --batch-size and --grad-accum must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    torch.manual_seed(args.seed)  # LoRA A initialisation and dropout draw from torch's generator

    if args.model is None:
        from loratch.default_model import default_model_dir

        args.model = default_model_dir()
    if args.data is None:
        args.data = default_data_file()
        print(f"data: {args.data}\n  {DATASET_ATTRIBUTION}")
    else:
        print(f"data: {args.data}")
    output_dir = args.output_dir or Path(tempfile.mkdtemp(prefix="loratch-example-"))
    output_dir.mkdir(parents=True, exist_ok=True)

    # Configuration (the guide's lora-config and training-config dictionaries).
    lora_config: dict[str, Any] = {
        "rank": args.rank,
        "alpha": args.alpha,
        "dropout": args.dropout,
        "target_modules": args.target_modules,
    }
    training_config: dict[str, Any] = {
        "learning_rate": args.lr,
        "weight_decay": args.weight_decay,
        "num_epochs": args.num_epochs,
        "max_steps": args.max_steps,
        "batch_size": args.batch_size,
        "gradient_accumulation_steps": args.grad_accum,
        "max_seq_length": args.max_seq_length,
        "logging_steps": args.logging_steps,
        "save_steps": args.save_steps,
        "eval_steps": args.eval_steps,
        "warmup_steps": args.warmup_steps,  # filled in below once the step count is known
        "max_grad_norm": args.max_grad_norm,
        "scheduler_type": "linear_warmup_cosine",
        "min_lr": args.min_lr,
        "device": args.device,
        "dtype": args.dtype,
        "seed": args.seed,
        "model": str(args.model),
        "data": str(args.data),
    }

    # Data: tokenize, seeded shuffle, split off the held-out records.
    tokenizer = torch_hf_tokenizer_load(args.model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise SystemExit("the tokenizer has neither a pad nor an EOS token")
    records = read_alpaca(args.data)
    random.Random(args.seed).shuffle(records)
    examples = [e for r in records if (e := tokenize_record(r, tokenizer, args.max_seq_length))]
    n_eval = min(args.eval_examples, len(examples) // 5) if args.eval_examples > 0 else 0
    if n_eval == 0 or len(examples) - n_eval < args.batch_size:
        raise SystemExit(f"not enough usable records in {args.data} ({len(examples)})")
    eval_examples, train_examples = examples[:n_eval], examples[n_eval:]
    print(
        f"records: {len(records)}, usable: {len(examples)} "
        f"({len(train_examples)} train, {len(eval_examples)} held out)"
    )

    # How many optimizer updates: --max-steps, capped at --num-epochs over the training set.
    batches_per_epoch = math.ceil(len(train_examples) / args.batch_size)
    epoch_cap = max(1, int(args.num_epochs * batches_per_epoch) // args.grad_accum)
    total_steps = min(args.max_steps, epoch_cap)
    warmup_steps = args.warmup_steps if args.warmup_steps is not None else total_steps // 10
    training_config["warmup_steps"] = warmup_steps

    # Model loading and LoRA setup.
    torch_hf_load_model_lora(MODEL_NAME, args.model, {"device": args.device, "dtype": args.dtype})
    try:
        torch_hf_lora_init(
            MODEL_NAME,
            args.rank,
            args.alpha,
            args.target_modules,
            args.dtype,
            dropout=args.dropout,
        )
        lora_params = torch_hf_lora_get_parameters(MODEL_NAME)
        n_trainable = sum(p.numel() for p in lora_params)
        print(f"model: {args.model}")
        print(f"LoRA parameters: {len(lora_params)} tensors, {n_trainable:,} values")

        # Optimizer (AdamW) and scheduler (linear warmup, then cosine decay to min_lr).
        optimizer = torch_optimizer_add_params(lora_params, args.lr, args.weight_decay)
        scheduler = torch_lr_scheduler(
            optimizer,
            "linear_warmup_cosine",
            {
                "initial_lr": args.lr,
                "min_lr": args.min_lr,
                "total_steps": total_steps,
                "warmup_steps": warmup_steps,
            },
        )
        print_memory(MODEL_NAME)

        eval_batches = make_batches(eval_examples, args.batch_size, pad_id, args.device)
        loss_before = validate(MODEL_NAME, eval_batches)
        print(f"held-out loss before: {loss_before:.4f}")

        state: dict[str, Any] = {
            "epoch": 0,
            "global_step": 0,
            "best_loss": loss_before,
            "current_lr": torch_scheduler_get_lr(scheduler),
        }
        loss_after = loss_before
        batches = training_batches(train_examples, args.batch_size, pad_id, args.device, args.seed)
        torch_hf_set_training(MODEL_NAME, True)  # adapter dropout on
        print(
            f"training: {total_steps} steps of {args.grad_accum} x {args.batch_size} sequences, "
            f"warmup {warmup_steps}, peak lr {args.lr:g}"
        )
        start = time.perf_counter()
        accumulation_step = 0
        for step in range(1, total_steps + 1):
            # One accumulation window: count its target tokens first, to normalise by them.
            window = [next(batches) for _ in range(args.grad_accum)]
            window_tokens = sum(batch.n_targets for _, batch in window)
            lr = torch_scheduler_get_lr(scheduler)  # the LR this update uses
            window_loss, grad_norm = 0.0, None
            for i, (epoch, batch) in enumerate(window):
                loss_sum, _ = train_step(batch, window_tokens, i > 0, optimizer)
                window_loss += loss_sum
                grad_norm = should_update_weights(accumulation_step, optimizer, scheduler, training_config)
                accumulation_step += 1
                state["epoch"] = epoch
            assert grad_norm is not None  # the window ends with an update
            state["global_step"] = step
            state["current_lr"] = lr

            if step % args.logging_steps == 0 or step == total_steps:
                print(
                    f"step {step}/{total_steps}  epoch {state['epoch']}  "
                    f"loss {window_loss / window_tokens:.4f}  lr {lr:.3e}  "
                    f"grad_norm {grad_norm:.4f}  tokens {window_tokens}  "
                    f"{time.perf_counter() - start:.1f}s"
                )
            if (args.eval_steps > 0 and step % args.eval_steps == 0) or step == total_steps:
                loss_after = validate(MODEL_NAME, eval_batches)
                state["best_loss"] = min(state["best_loss"], loss_after)
                print(f"step {step}: held-out loss {loss_after:.4f}")
            if args.save_steps > 0 and step % args.save_steps == 0 and step != total_steps:
                adapter_dir, _ = save_checkpoint(MODEL_NAME, output_dir, state, lora_config, training_config)
                print(f"checkpoint saved: {adapter_dir}")

        elapsed = time.perf_counter() - start
        print(f"training time: {elapsed:.1f}s ({elapsed / total_steps:.2f}s per step)")
        print(f"held-out loss after: {loss_after:.4f} (before: {loss_before:.4f})")

        adapter_dir, info_file = save_checkpoint(MODEL_NAME, output_dir, state, lora_config, training_config)
        print(f"adapter saved: {adapter_dir}")
        print(f"metadata saved: {info_file}")
        print_memory(MODEL_NAME)
    finally:
        torch_hf_unload(MODEL_NAME)


if __name__ == "__main__":
    main()
