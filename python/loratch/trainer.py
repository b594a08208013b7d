"""``loratch.train``: the trainer of ``loratch train``, driven by a dict with the TOML file's
structure. The training loop runs in Rust with the GIL released; Python is only called between
steps (Ctrl-C, and the all-reduces of data-parallel runs).

Data parallelism: launch the script with ``torchrun --nproc-per-node N`` and call
``torch.distributed.init_process_group`` (gloo on CPU, nccl on CUDA) before ``train``. Every rank
builds the same batch plan, runs its share of each accumulation window, and the LoRA gradients
(plus loss and token sums) are summed over ranks with ``all_reduce`` before each update, so the
ranks keep identical adapters. Rank 0 writes the checkpoints, metrics, plot and final adapter.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Any, TypedDict

import torch

from loratch._loratch import _train
from loratch.errors import ConfigError

__all__ = ["TrainResult", "train"]


class TrainResult(TypedDict):
    """What ``train`` returns."""

    global_step: int
    total_steps: int
    interrupted: bool
    initial_eval_loss: float | None
    final_eval_loss: float | None
    last_train_loss: float | None
    adapter_dir: str | None
    """The final adapter (PEFT layout): ``output_dir`` itself, once the run completed."""
    last_checkpoint: str | None
    best_checkpoint: str | None
    """The checkpoint with the lowest validation loss evaluated at its step."""
    tensorboard_dir: str | None
    """``output_dir/runs`` with ``report_to = ["tensorboard"]``."""
    metrics_file: str
    plot_file: str | None
    adapter_fingerprint: float


class _Distributed:
    """The all-reduces the Rust trainer calls back, over the default process group."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self._dist = dist
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        backend = dist.get_backend()
        self._device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else None

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self._device)
        self._dist.all_reduce(t)
        return [float(v) for v in t.tolist()]

    def all_reduce_grads(self, grads: list[torch.Tensor]) -> None:
        if not grads:
            return
        # One flat buffer: one collective per step instead of one per tensor.
        flat = torch.cat([g.reshape(-1) for g in grads])
        self._dist.all_reduce(flat)
        offset = 0
        for g in grads:
            n = g.numel()
            g.copy_(flat[offset : offset + n].view_as(g))
            offset += n


def _jsonable(value: Any) -> Any:
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"training config value of type {type(value).__name__} is not JSON: {value!r}")


def _check_finite(value: Any, path: str) -> None:
    """Raises ``ConfigError`` naming the key of a NaN or infinite number (JSON has neither)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"training config: {path}: {value} is not a finite number")
    if isinstance(value, Mapping):
        for k, v in value.items():
            _check_finite(v, f"{path}.{k}" if path else str(k))
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_finite(v, f"{path}[{i}]")


def train(config: dict[str, Any], *, resume: str | os.PathLike[str] | None = None) -> TrainResult:
    """Fine-tunes LoRA adapters as ``config`` says and returns where everything was written.

    ``config`` has the structure of ``loratch train``'s TOML file: top-level ``model``, ``data``,
    ``output_dir`` (required), ``validation_data``, ``validation_split``, ``seed``; a ``lora`` dict
    (``rank, alpha, target_modules, dropout, use_rslora``); a ``training`` dict (the spec's keys
    ``learning_rate, weight_decay, num_epochs, batch_size, gradient_accumulation_steps,
    max_seq_length, logging_steps, save_steps, eval_steps, warmup_steps, max_grad_norm,
    scheduler_type, min_lr, device`` plus ``max_steps, packing, train_on_inputs, dtype,
    max_nonfinite_steps, overwrite_output_dir, gradient_checkpointing, warmup_ratio,
    save_total_limit, load_best_at_end, report_to``). Key names
    of PEFT, TRL, axolotl, torchtune and mlx-lm configs (``r``, ``lora_alpha``,
    ``num_train_epochs``, ``per_device_train_batch_size``, a ``learning_rate`` at the top level,
    ...) are read as loratch's, each with a ``UserWarning`` naming loratch's key (the README's
    aliases table); ``model`` may be a Hub id in the local Hugging Face cache. Unknown keys raise
    ``ConfigError`` (with the closest known name). The final adapter is
    written at the root of ``output_dir`` (PEFT layout: ``PeftModel.from_pretrained(base,
    output_dir)`` loads it); ``report_to=["tensorboard"]`` also writes TensorBoard event files
    into ``output_dir/runs``. A fresh run (no ``resume``) into an ``output_dir`` that holds checkpoints
    raises ``ConfigError`` unless ``overwrite_output_dir`` is true (then they are deleted). A run
    holds a lock on ``output_dir`` (``.loratch.lock``) until it ends: a second run into it
    meanwhile raises ``StateError`` naming the first's pid.

    ``resume``: a checkpoint directory, or an output directory (its newest checkpoint).
    Ctrl-C saves a checkpoint, then raises ``KeyboardInterrupt``.
    """
    import torch.distributed as dist

    if not isinstance(config, Mapping):
        raise TypeError(f"loratch.train: config must be a dict, got {type(config).__name__}")
    _check_finite(config, "")
    hooks = _Distributed() if dist.is_available() and dist.is_initialized() else None
    text = json.dumps(config, default=_jsonable, allow_nan=False)
    result = _train(text, resume, hooks)
    return result  # type: ignore[return-value]
