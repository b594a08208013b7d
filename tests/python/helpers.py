"""Helpers shared by the Python tests (fixtures are in ``conftest.py``, model builders in
``tiny_models.py``): differences and the float32 rounding bounds they are held to, fresh
interpreters and the ``loratch`` binary as subprocesses, PEFT twins of loratch's adapters, a
training run's outputs (``metrics.jsonl``, checkpoints), and the GIL probe."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

import loratch

TESTS_DIR = Path(__file__).resolve().parent

# --- differences and float32 rounding ------------------------------------------------------------

#: float32's unit roundoff: a correctly rounded float32 operation has a relative error <= U32.
U32 = 2.0**-24


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| over all elements, in float64 (0.0 for empty tensors)."""
    if a.numel() == 0 and b.numel() == 0:
        return 0.0
    return (a.double() - b.double()).abs().max().item()


def sum_rounding_bound(magnitude: torch.Tensor, roundings: int) -> torch.Tensor:
    """Elementwise bound on |a - b| for two float32 evaluations, in any order, of one sum of
    products whose terms' absolute values add up to ``magnitude`` (the same formula evaluated
    on the operands' absolute values, in float64).

    Derivation (Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed., sections
    3.1 and 3.5): a sum of products evaluated in floating point, in any order and nesting,
    equals the exact sum with each term multiplied by a factor within [1 - g, 1 + g], where
    g = gamma_n = n*u / (1 - n*u) and n is the most roundings (multiplications, additions,
    scalings) on any one term's path. So each evaluation is within gamma_n * magnitude of the
    exact value, and two of them within 2 * gamma_n * magnitude of each other. The bound is
    rigorous (no statistics), yet orders of magnitude below a wrong formula's error."""
    n = roundings
    gamma = n * U32 / (1.0 - n * U32)
    return 2.0 * gamma * magnitude


def assert_within_sum_rounding(got: torch.Tensor, want: torch.Tensor, magnitude: torch.Tensor,
                               roundings: int, what: str = "") -> None:
    """``|got - want| <= sum_rounding_bound(magnitude, roundings)`` elementwise."""
    assert got.shape == want.shape, (what, got.shape, want.shape)
    if got.numel() == 0:
        return
    diff = (got.double() - want.double()).abs()
    bound = sum_rounding_bound(magnitude.double(), roundings)
    worst = (diff - bound).argmax()
    assert bool((diff <= bound).all()), (
        f"{what}: |diff| {diff.flatten()[worst].item():.3e} over the rounding bound "
        f"{bound.flatten()[worst].item():.3e} (max |diff| {diff.max().item():.3e})"
    )


#: How many times the reference's own float32 error loratch's difference from it may be: the
#: reference's error (1) plus loratch's, which rounds as often and as much, so its largest
#: error is the same size up to the spread of a maximum over many elements (3).
ROUNDING_SLACK = 4.0


def float32_errors(module: torch.nn.Module,
                   compute: Callable[[torch.nn.Module], Mapping[str, torch.Tensor]]) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """``compute(module)`` on the float32 module, and for each output the float32 rounding error
    it carries: max |f32 - f64|, where f64 is ``compute`` on a float64 copy of the module (whose
    own error is 2^29 times smaller: the exact value, for this purpose).

    A whole model's rounding has no closed form worth deriving (errors of 20+ sums per layer pass
    through norms, softmax and residuals), so the model-level tests measure it: loratch and the
    reference are two float32 evaluations of the same function, |ours - ref| <= |ours - exact| +
    |ref - exact|, the second term is measured here and the first is of the same size (see
    ``ROUNDING_SLACK``). ``compute`` must not cast to float32 itself."""
    ref = {k: v.detach() for k, v in compute(module).items()}
    twin = copy.deepcopy(module).double()
    exact = {k: v.detach() for k, v in compute(twin).items()}
    return ref, {k: max_diff(ref[k], exact[k]) for k in ref}


def rounding_tolerance(want: torch.Tensor, error: float) -> float:
    """The allowed |ours - want| given the reference's own float32 error (``float32_errors``):
    ROUNDING_SLACK times that error, and never below one rounding of the largest value (a
    reference that happens to round exactly has error 0)."""
    scale = want.detach().abs().max().item() if want.numel() else 0.0
    return ROUNDING_SLACK * max(error, U32 * scale)


def assert_within_rounding(got: torch.Tensor, want: torch.Tensor, error: float, what: str = "") -> None:
    """|got - want| within ``rounding_tolerance(want, error)``."""
    assert got.shape == want.shape, (what, got.shape, want.shape)
    diff, tol = max_diff(got, want), rounding_tolerance(want, error)
    assert diff <= tol, f"{what}: max |diff| {diff:.3e} > {tol:.3e} ({ROUNDING_SLACK} x the reference's float32 error {error:.3e})"


def logits_of(model: torch.nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """A ``compute`` for ``float32_errors``: a model's logits without gradients."""
    with torch.no_grad():
        return {"logits": model(ids).logits}


def peft_logits(pm: Any, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """A ``compute`` for ``float32_errors`` over a PEFT model: its logits ("logits") and those of
    its merged copy ("merged": ``merge_and_unload``, so the rounding of W + scaling * B @ A to the
    model's dtype is part of that error; a large delta makes it the larger one)."""
    with torch.no_grad():
        return {"logits": pm.eval()(ids).logits, "merged": copy.deepcopy(pm).merge_and_unload()(ids).logits}


# --- subprocesses --------------------------------------------------------------------------------


def child_env(**extra: str) -> dict[str, str]:
    """This environment with the tests' directory on PYTHONPATH (a child imports ``helpers`` and
    ``tiny_models`` as the tests do), plus ``extra``."""
    path = os.pathsep.join(p for p in [str(TESTS_DIR), os.environ.get("PYTHONPATH", "")] if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


def run_py(code: str, *args: Any, env: Mapping[str, str] | None = None, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Runs ``code`` in a fresh interpreter (``python -c``) with ``args`` as ``sys.argv[1:]``:
    output captured as text, ``env`` as ``child_env()`` (default), ``kwargs`` to subprocess.run."""
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          env=dict(env) if env is not None else child_env(), **kwargs)


#: The CLI's environment: one libtorch thread per run (the test machine's cores are shared).
CLI_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run_cli(binary: Path, *args: Any, env: Mapping[str, str] | None = None, timeout: float = 600,
            **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Runs ``loratch ARGS`` (output captured as text; ``CLI_ENV`` unless ``env``)."""
    return subprocess.run([str(binary), *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env=dict(env) if env is not None else CLI_ENV, **kwargs)


# --- transformers and PEFT twins -----------------------------------------------------------------


def hf_model(d: Path, dtype: torch.dtype = torch.float32, device: str = "cpu") -> Any:
    """transformers' model of ``d`` in eval mode."""
    import transformers as tf

    return tf.AutoModelForCausalLM.from_pretrained(d, dtype=dtype).to(device).eval()


def peft_model(d: Path, dtype: torch.dtype = torch.float32, device: str = "cpu", **lora: Any) -> Any:
    """PEFT's LoRA model over ``hf_model(d)`` (no dropout, eval mode); ``lora`` goes to LoraConfig."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(**{"lora_dropout": 0.0, "task_type": "CAUSAL_LM", **lora})
    return get_peft_model(hf_model(d, dtype, device), cfg).eval()


def peft_lora(pm: Any) -> dict[str, torch.Tensor]:
    """PEFT's live adapter tensors under loratch's names (PEFT's file keys, without ".default")."""
    return {k.replace(".default", ""): v for k, v in pm.named_parameters() if "lora_" in k}


def copy_into_peft(pm: Any, values: Mapping[str, torch.Tensor]) -> None:
    """Sets PEFT's adapter tensors to ``values`` (keyed as ``torch_hf_lora_named_parameters``)."""
    theirs = peft_lora(pm)
    assert set(theirs) == set(values), set(theirs) ^ set(values)
    with torch.no_grad():
        for k, v in theirs.items():
            v.copy_(values[k])


def randomize_adapters(name: str, std: float = 0.05, seed: int = 0) -> None:
    """Seeded N(0, std) values for every adapter tensor (A and B) of loratch model ``name``, so
    the adapters change the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in loratch.torch_hf_lora_get_parameters(name):
            t.normal_(0.0, std, generator=g)


class AdapterCheck:
    """An adapter directory's logits in loratch (one registered model; each adapter loaded into
    it in turn) and in PEFT (over a copy of one transformers base model), without gradients.
    The forward of loratch's LoRA node equals PEFT's formula bit for bit (README), so does the
    model around it: ``check`` asserts ``torch.equal``."""

    def __init__(self, model_dir: Path, name: str = "adapter-check") -> None:
        self.name = name
        loratch.torch_hf_load_model_lora(name, model_dir, {"device": "cpu"})
        self.base = hf_model(model_dir)

    def logits(self, adapter: Path, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(loratch's, PEFT's) logits of ``ids`` with ``adapter``."""
        from peft import PeftModel

        loratch.torch_hf_lora_load(self.name, adapter)
        with torch.no_grad():
            ours = loratch.torch_hf_forward(self.name, ids)
            theirs = PeftModel.from_pretrained(copy.deepcopy(self.base), adapter).eval()(ids).logits
        return ours, theirs

    def check(self, adapter: Path, ids: torch.Tensor) -> torch.Tensor:
        """Asserts equal logits; returns loratch's."""
        ours, theirs = self.logits(adapter, ids)
        assert torch.equal(ours, theirs), f"{adapter}: max |loratch - PEFT| {max_diff(ours, theirs):.3e}"
        return ours

    def close(self) -> None:
        loratch.torch_hf_unload(self.name)

    def __enter__(self) -> AdapterCheck:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- a training run's outputs --------------------------------------------------------------------

#: Metrics fields that measure the machine, not the training.
VOLATILE = {"tokens_per_s", "rss_bytes", "peak_rss_bytes", "train_time_s"}


def metrics(out: Path, *, drop: set[str] | frozenset[str] = frozenset()) -> list[dict[str, Any]]:
    """The records of ``out/metrics.jsonl`` (none when it is missing) without the fields in
    ``drop``; a torn last line (from a kill) is skipped, as the trainer does."""
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        records.append({k: v for k, v in r.items() if k not in drop})
    return records


def step_of(p: Path) -> int:
    """The step of a ``checkpoint-{step}`` path."""
    return int(p.name.split("-")[1])


def checkpoints(out: Path) -> list[Path]:
    """The visible ``checkpoint-*`` directories of ``out``, by step."""
    return sorted((p for p in out.glob("checkpoint-*") if p.is_dir()), key=step_of)


# --- the GIL -------------------------------------------------------------------------------------


def ticks_during(call: Callable[[], object]) -> dict[str, float]:
    """Runs ``call`` in a thread while this thread runs pure Python and stamps the time every 200
    iterations; returns the call's duration, the stamps inside it and the longest gap between
    them (the call's start and end included). A call that held the GIL would stop this thread for
    its whole length: one gap as long as the call."""
    span: list[float] = []

    def target() -> None:
        t0 = time.perf_counter()
        call()
        span.extend([t0, time.perf_counter()])

    th = threading.Thread(target=target)
    stamps = []
    th.start()
    n = 0
    while th.is_alive():
        n += 1
        if n % 200 == 0:
            stamps.append(time.perf_counter())
    th.join()
    assert len(span) == 2, "the call raised (see the thread's traceback above)"
    t0, t1 = span
    points = [t0] + [s for s in stamps if t0 < s < t1] + [t1]
    return {"duration": t1 - t0, "ticks": len(points) - 2,
            "max_gap": max(b - a for a, b in zip(points, points[1:]))}


def assert_gil_released(m: Mapping[str, float], what: str, min_duration: float = 0.2) -> None:
    """The call ran long enough to tell, and the other thread never stalled for a quarter of it:
    had the call held the GIL, the longest gap would be the whole call (the ratio 1.0); released,
    gaps are the OS scheduler's and the interpreter's switch interval (milliseconds)."""
    assert m["duration"] > min_duration, f"{what} too short to tell: {m}"
    assert m["ticks"] >= 20, f"{what}: the other thread barely ran: {m}"
    assert m["max_gap"] < 0.25 * m["duration"], f"{what}: the other thread stalled: {m}"

