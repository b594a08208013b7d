"""Threads and memory (issue #6): concurrent calls from Python threads give exactly the results of
sequential calls and never deadlock; long Rust calls release the GIL; repeated training steps keep
the resident set flat; unloading a model gives its memory back; ``tensor_in_memory()`` returns to
its baseline.

The leak test runs the trainer itself (``loratch.train``: data loader, metrics, logging,
evaluation, checkpoints) for 1,000 steps.

Every test runs its body in a fresh interpreter (``run_child``): a deadlock then fails the test
(a watchdog in the child dumps every thread's stack and exits; the parent's timeout is the
backstop) instead of hanging the run, and the memory measurements see only their own
allocations, not those of the tests before them.

RSS is ``VmRSS`` from ``/proc/self/status``, read after ``gc.collect()`` and glibc's
``malloc_trim(0)``: freed heap memory that glibc keeps in its arenas (libtorch frees many small
blocks) would otherwise show as resident and make the numbers depend on fragmentation.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from helpers import assert_gil_released, child_env, run_py

# Prepended to every child: the watchdog, the spec, and helpers shared by the bodies.
PRELUDE = r'''
import ctypes, faulthandler, gc, json, os, random, sys, threading, time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
import torch
import torch.nn.functional as F
import loratch

SPEC = json.loads(sys.argv[1])
# A hang (deadlock) prints every thread's Python stack and ends the child with an error.
faulthandler.dump_traceback_later(SPEC["watchdog_s"], exit=True)
RESULT_TIMEOUT_S = SPEC["watchdog_s"] / 2
_libc = ctypes.CDLL("libc.so.6")

def emit(**values):
    print("RESULT " + json.dumps(values), flush=True)

def rss_bytes():
    """VmRSS after a collection and handing glibc's free heap memory back to the system."""
    gc.collect()
    _libc.malloc_trim(0)
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")

def randomize(name, seed, std=0.05):
    """Seeded values for every adapter tensor (A and B), so the adapters change the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in loratch.torch_hf_lora_get_parameters(name):
            p.normal_(0.0, std, generator=g)

def logits(name, ids, mask=None):
    with torch.no_grad():
        return loratch.torch_hf_forward(name, ids, mask)

def lm_loss(out, ids):
    vocab = out.shape[-1]
    return F.cross_entropy(out[:, :-1].reshape(-1, vocab), ids[:, 1:].reshape(-1))

def gather(futures):
    """Results in order; a worker that does not finish in time fails the child (no hang)."""
    return [f.result(timeout=RESULT_TIMEOUT_S) for f in futures]
'''


def run_child(
    body: str, spec: dict[str, Any], tmp_path: Path, *, intra_op_threads: int | None = None, timeout: float = 240
) -> dict[str, Any]:
    """Runs PRELUDE + body in a fresh interpreter; returns what it emitted (``RESULT {json}``).
    ``intra_op_threads`` sets ``OMP_NUM_THREADS`` (None: libtorch's default)."""
    spec = {**spec, "watchdog_s": timeout - 20}
    env = child_env(PYTHONFAULTHANDLER="1")
    if intra_op_threads is not None:
        env["OMP_NUM_THREADS"] = str(intra_op_threads)
    try:
        proc = run_py(PRELUDE + body, json.dumps(spec), timeout=timeout, env=env)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"the child hung past {timeout} s (deadlock?); stderr:\n{e.stderr!r}")
    assert proc.returncode == 0, f"child failed (rc {proc.returncode}):\n{proc.stderr[-8000:]}"
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(lines) == 1, proc.stdout[-4000:]
    result: dict[str, Any] = json.loads(lines[0][len("RESULT "):])
    return result


@pytest.fixture(scope="module")
def dirs(tiny_model: Any, trainable_dir: Path) -> dict[str, str]:
    """Two tiny random Llamas (vocab 97), a trainable one with SmolLM2's tokenizer and records,
    and a "big" one whose ~120 MB of fp32 weights are clearly visible in RSS."""
    big = tiny_model(
        "llama", 3, vocab_size=32000, hidden_size=512, intermediate_size=1376,
        num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8,
    )  # fmt: skip
    return {"a": str(tiny_model("llama", 1)), "b": str(tiny_model("llama", 2)), "trainable": str(trainable_dir),
            "big": str(big)}


THREADS = r'''
A, B = SPEC["a"], SPEC["b"]
gen = torch.Generator().manual_seed(0)
shapes = [(1, 5), (2, 17), (3, 9), (1, 40), (4, 12), (2, 3)]
inputs = [torch.randint(0, 97, s, generator=gen) for s in shapes]
mask = torch.ones(2, 17, dtype=torch.int64)
mask[1, :6] = 0  # left padding in one case
masks = [None, mask, None, None, None, None]
for name, d, seed in (("a", A, 1), ("b", B, 2)):
    loratch.torch_hf_load_model_lora(name, d)
    loratch.torch_hf_lora_init(name, 4, 8.0, "all-linear")
    randomize(name, seed)
ref = {(n, i): logits(n, inputs[i], masks[i]) for n in "ab" for i in range(len(inputs))}
assert not torch.equal(ref[("a", 0)], ref[("b", 0)])

lock = threading.Lock()
active = [0, 0]  # calls in flight, most seen at once

def forward_task(name, i):
    with lock:
        active[0] += 1
        active[1] = max(active[1], active[0])
    try:
        # Grad mode is per thread: no_grad here, in the worker.
        return torch.equal(logits(name, inputs[i], masks[i]), ref[(name, i)])
    finally:
        with lock:
            active[0] -= 1

out = {}
rng = random.Random(0)
for phase, names in (("same_model", "a"), ("two_models", "ab")):
    tasks = [(n, i) for _ in range(15) for i in range(len(inputs)) for n in names]
    rng.shuffle(tasks)
    active[1] = 0
    with ThreadPoolExecutor(8) as pool:
        equal = gather([pool.submit(forward_task, n, i) for n, i in tasks])
    out[phase] = {"calls": len(tasks), "unequal": equal.count(False), "max_in_flight": active[1]}

# Loads and unloads of other names (with LoRA init and forwards on them) while threads run
# forwards on "a"; the reference for B's base model is a sequential load.
loratch.torch_hf_load_model_lora("b-base", B)
ref_b_base = [logits("b-base", x) for x in inputs]
loratch.torch_hf_unload("b-base")

def churn(worker):
    ok = True
    for k in range(4):
        name = f"tmp{worker}"
        loratch.torch_hf_load_model_lora(name, B)
        ok &= torch.equal(logits(name, inputs[k]), ref_b_base[k])
        loratch.torch_hf_lora_init(name, 2, 4.0, ["q_proj", "v_proj"])
        ok &= torch.equal(logits(name, inputs[k]), ref_b_base[k])  # a fresh adapter is a no-op
        loratch.torch_hf_unload(name)
    return ok

def forwards_on_a(worker):
    return all(forward_task("a", (worker + j) % len(inputs)) for j in range(24))

with ThreadPoolExecutor(8) as pool:
    futures = [pool.submit(churn, w) for w in range(4)] + [pool.submit(forwards_on_a, w) for w in range(4)]
    ok = gather(futures)
out["load_unload"] = {"ok": ok, "models_after": loratch.torch_hf_list_models()}

# Re-initialising the adapters of one model (which drops the old adapter tensors, whose Python
# objects torch keeps alive from C++ once handed out) while other threads read that model's
# parameters, memory report and mode, and run forwards on it.
loratch.torch_hf_load_model_lora("c", A)
loratch.torch_hf_lora_init("c", 4, 8.0, "all-linear")
stop = threading.Event()

def reinit():
    for _ in range(60):
        loratch.torch_hf_lora_init("c", 4, 8.0, "all-linear")
        loratch.torch_hf_lora_get_parameters("c")  # Python objects, dropped at once
    return 60

def reader(kind):
    n = 0
    while not stop.is_set():
        if kind == 0:
            loratch.torch_hf_lora_get_parameters("c")
        elif kind == 1:
            loratch.torch_hf_lora_named_parameters("c")
            loratch.torch_hf_memory_report("c")
            loratch.torch_hf_memory_usage("c")
            loratch.torch_hf_set_training("c", False)
        else:
            logits("c", inputs[n % len(inputs)])
        n += 1
    return n

with ThreadPoolExecutor(4) as pool:
    readers = [pool.submit(reader, k) for k in range(3)]
    inits = gather([pool.submit(reinit)])
    stop.set()
    reads = gather(readers)
out["reinit"] = {"inits": inits[0], "reads": reads}

# LoRA training steps (forward, backward, AdamW step) in threads, one model per thread, against
# the same steps run one model after the other.
def make_trainee(name, seed):
    loratch.torch_hf_load_model_lora(name, A)
    loratch.torch_hf_lora_init(name, 4, 8.0, ["q_proj", "v_proj", "down_proj"])
    randomize(name, seed)
    params = loratch.torch_hf_lora_get_parameters(name)
    return params, loratch.torch_optimizer_add_params(params, 1e-2, 0.01)

def train_steps(name, seed, params, opt):
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(100 + seed))
    losses = []
    for _ in range(12):
        loss = lm_loss(loratch.torch_hf_forward(name, ids), ids)
        loratch.torch_backward(loss)
        loratch.torch_optimizer_step(opt)
        loratch.torch_optimizer_zero_grad(opt)
        losses.append(loss.item())
    return losses, [p.detach().clone() for p in params]

seeds = range(4)
sequential = []
for s in seeds:
    params, opt = make_trainee(f"seq{s}", s)
    sequential.append(train_steps(f"seq{s}", s, params, opt))
trainees = {s: make_trainee(f"thr{s}", s) for s in seeds}
with ThreadPoolExecutor(4) as pool:
    threaded = gather([pool.submit(train_steps, f"thr{s}", s, *trainees[s]) for s in seeds])
out["training"] = {
    "losses_equal": [sl == tl for (sl, _), (tl, _) in zip(sequential, threaded)],
    "params_equal": [all(torch.equal(x, y) for x, y in zip(sp, tp)) for (_, sp), (_, tp) in zip(sequential, threaded)],
    "loss_drop": [sl[0] - sl[-1] for sl, _ in sequential],
}
emit(**out)
'''


def test_threads_give_sequential_results_without_deadlock(dirs: dict[str, str], tmp_path: Path) -> None:
    r = run_child(THREADS, dirs, tmp_path)
    for phase in ["same_model", "two_models"]:
        assert r[phase]["unequal"] == 0, r[phase]
        assert r[phase]["max_in_flight"] >= 2, f"the calls never overlapped: {r[phase]}"
    assert all(r["load_unload"]["ok"]), r["load_unload"]
    assert r["load_unload"]["models_after"] == ["a", "b"]
    assert r["reinit"]["inits"] == 60 and all(n > 0 for n in r["reinit"]["reads"]), r["reinit"]
    assert all(r["training"]["losses_equal"]), r["training"]
    assert all(r["training"]["params_equal"]), r["training"]
    assert all(d > 0 for d in r["training"]["loss_drop"]), "the steps do train"


GIL = r'''
from helpers import ticks_during

d = Path(SPEC["trainable"])
config = {
    "model": str(d), "data": str(d / "data.jsonl"), "output_dir": str(Path(SPEC["out"]) / "run"),
    "seed": 3, "validation_split": 0.2,
    "lora": {"rank": 8, "alpha": 16, "target_modules": "all-linear", "dropout": 0.0},
    "training": {"max_steps": 8, "batch_size": 2, "learning_rate": 1e-2, "logging_steps": 4,
                 "save_steps": 1000, "eval_steps": 0, "max_seq_length": 64},
}
out = {}
result = {}
out["train"] = ticks_during(lambda: result.update(loratch.train(config)))
out["train_steps"] = result["global_step"]

loratch.torch_hf_load_model_lora("big", SPEC["big"])
ids = torch.randint(0, 32000, (4, 192), generator=torch.Generator().manual_seed(0))
def forward():
    with torch.no_grad():
        loratch.torch_hf_forward("big", ids)
forward()  # warm-up
out["forward"] = ticks_during(forward)
out["generate"] = ticks_during(lambda: loratch.torch_hf_generate("big", ids[0, :16], 48, greedy=True))
emit(**out)
'''


def test_long_rust_calls_release_the_gil(dirs: dict[str, str], tmp_path: Path) -> None:
    r = run_child(GIL, {**dirs, "out": str(tmp_path)}, tmp_path, intra_op_threads=1)
    assert r["train_steps"] == 8
    for call in ["train", "forward", "generate"]:
        assert_gil_released(r[call], call)


RSS_FLAT = r"""
d = Path(SPEC["trainable"])
out = Path(SPEC["out"]) / "run"
config = {
    "model": str(d), "data": str(d / "data.jsonl"), "output_dir": str(out), "seed": 3,
    "validation_split": 0.2,
    "lora": {"rank": 8, "alpha": 16, "target_modules": "all-linear", "dropout": 0.1},
    "training": {"max_steps": 1000, "batch_size": 2, "learning_rate": 1e-3, "warmup_steps": 10,
                 "logging_steps": 10, "eval_steps": 100, "save_steps": 250, "max_seq_length": 48},
}

def newest_step():
    # The step of the newest metrics record (the trainer logs every 10 steps).
    try:
        lines = (out / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    for line in reversed(lines):
        try:
            return json.loads(line)["step"]
        except (ValueError, KeyError):
            continue
    return 0

# The trainer releases the GIL: this thread samples (step, RSS) while it runs.
samples, done = [], threading.Event()
def sample():
    while not done.wait(0.5):
        samples.append((newest_step(), rss_bytes()))
sampler = threading.Thread(target=sample)
tensors_before = loratch.tensor_in_memory()
sampler.start()
try:
    result = loratch.train(config)
finally:
    done.set()
    sampler.join()
tensors_after = loratch.tensor_in_memory()
end = rss_bytes()
# The probe: the leak this test is about must show in the same measurement. Keep the autograd
# graphs of 10 forwards of the same model and batch shape (no backward, which would free them):
# one step's activations leaking every 100 steps.
loratch.torch_hf_load_model_lora("probe", d)
loratch.torch_hf_lora_init("probe", 8, 16.0, "all-linear")
ids = torch.randint(0, 49152, (2, 48), generator=torch.Generator().manual_seed(0))
kept = [lm_loss(loratch.torch_hf_forward("probe", ids), ids) for _ in range(10)]
leaky = rss_bytes()
emit(samples=samples, end=end, leaky=leaky, tensors=[tensors_before, tensors_after],
     steps=result["global_step"], evals=[result["initial_eval_loss"], result["final_eval_loss"]],
     checkpoints=sorted(p.name for p in out.glob("checkpoint-*")))
"""


def test_rss_stays_flat_over_1000_training_steps(dirs: dict[str, str], tmp_path: Path) -> None:
    """``loratch.train`` for 1,000 steps (62 epochs of the data loader, 100 metrics records, 10
    evaluations, 4 checkpoints) while a thread samples RSS. A sample can land inside a step,
    whose activations and gradients come and go, so each quarter of the run is judged by its
    lowest sample, the resident floor between steps: a leak raises the floor from one quarter to
    the next, a step's working set does not."""
    r = run_child(RSS_FLAT, {**dirs, "out": str(tmp_path)}, tmp_path, intra_op_threads=1, timeout=600)
    assert r["steps"] == 1000 and r["checkpoints"] == ["checkpoint-1000", "checkpoint-250", "checkpoint-500",
                                                      "checkpoint-750"], r["checkpoints"]
    first, last = r["evals"]
    assert last < first, "the steps do train"
    # After warm-up (step 100: the first evaluation has run, every code path has run once).
    samples = [(step, rss) for step, rss in r["samples"] if step >= 100]
    quarters = [[rss for step, rss in samples if lo <= step < hi] for lo, hi in
                [(100, 325), (325, 550), (550, 775), (775, 1001)]]
    assert all(len(q) >= 3 for q in quarters), f"too few samples per quarter: {[len(q) for q in quarters]}"
    floors = [min(q) for q in quarters]
    mb = [round(x / 2**20, 1) for x in floors]
    warm = floors[0]
    assert max(floors) <= 1.05 * warm, f"RSS floor per quarter of the run (MiB): {mb}"
    assert r["end"] <= 1.05 * warm, (mb, r["end"] / 2**20)
    assert r["tensors"][0] == r["tensors"][1], f"Python tensors before and after: {r['tensors']}"
    # The measurement sees a leak: 10 kept graphs of a step's forward are well over 5%.
    assert r["leaky"] - r["end"] > 0.05 * warm, (mb, r["leaky"] / 2**20)


UNLOAD = r"""
x = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(0))

def cycle(d, name, dtype, steps):
    # Load, forward, LoRA and `steps` training steps, unload. Returns RSS with the model loaded
    # (after a forward: float32 weights are views of the file's memory map, resident once read),
    # the weights' bytes, and tensor_in_memory() before and while logits and adapters are held.
    before = loratch.tensor_in_memory()
    loratch.torch_hf_load_model_lora(name, d, {"dtype": dtype})
    weights = loratch.torch_hf_memory_report(name)["weights"]
    y = logits(name, x)
    loaded = rss_bytes()
    with_logits = loratch.tensor_in_memory()
    del y
    loratch.torch_hf_lora_init(name, 4, 8.0, "all-linear", dtype)
    params = loratch.torch_hf_lora_get_parameters(name)
    opt = loratch.torch_optimizer_add_params(params, 1e-3, 0.0)
    loss = None
    for _ in range(steps):
        loss = lm_loss(loratch.torch_hf_forward(name, x), x)
        loratch.torch_backward(loss)
        loratch.torch_optimizer_step(opt)
    with_adapters = loratch.tensor_in_memory()
    # The last loss's graph would keep the adapters (and their Python objects) alive.
    del params, opt, loss
    loratch.torch_hf_unload(name)
    return {"dtype": dtype, "loaded": loaded, "weights": weights, "tensors_before": before,
            "with_logits": with_logits, "with_adapters": with_adapters,
            "after": rss_bytes(), "tensors_after": loratch.tensor_in_memory()}

# Warm-up: the same cycles on the tiny model first, so the baseline already holds what the first
# use of each code path keeps for good (libtorch's code pages, thread pools, kernel caches).
for dtype in ["float32", "bfloat16"]:
    cycle(SPEC["a"], "warm-up", dtype, 3)
base_rss, base_tensors = rss_bytes(), loratch.tensor_in_memory()
# Training on the tiny model (tensor_in_memory), then the big model (RSS), twice in each dtype.
trained = [cycle(SPEC["a"], "tiny", dtype, 10) for dtype in ["float32", "bfloat16"]]
big = [cycle(SPEC["big"], "big", dtype, 0) for dtype in ["float32", "bfloat16", "float32", "bfloat16"]]
emit(base_rss=base_rss, base_tensors=base_tensors, trained=trained, big=big,
     models=loratch.torch_hf_list_models())
"""


def test_unload_returns_memory_and_tensor_count(dirs: dict[str, str], tmp_path: Path) -> None:
    r = run_child(UNLOAD, dirs, tmp_path, intra_op_threads=1)
    base, n0 = r["base_rss"], r["base_tensors"]
    assert r["models"] == []
    for c in r["trained"] + r["big"]:
        assert c["tensors_before"] == n0 and c["tensors_after"] == n0, (c, n0)
        # tensor_in_memory() does see the tensors handed to Python while they are held.
        assert c["with_logits"] == n0 + 1 and c["with_adapters"] > n0, (c, n0)

    def mib(b: int) -> float:
        return round(b / 2**20, 1)

    summary = [(c["dtype"], mib(c["weights"]), mib(c["loaded"] - base), mib(c["after"] - base)) for c in r["big"]]
    fp32_weights = r["big"][0]["weights"]
    assert fp32_weights > 90 * 2**20, summary
    for c in r["big"]:
        # The weights are visible while loaded ...
        assert c["loaded"] - base >= 0.9 * c["weights"], summary
        # ... and given back on unload. Tolerance: 10% of the float32 weights (~10 MiB): the
        # first use of the big model's shapes keeps a few MiB for good (about 5 MiB measured, in
        # glibc's arenas and libtorch's caches; malloc_trim cannot return all of it) ...
        assert c["after"] - base <= 0.10 * fp32_weights, summary
    # ... but nothing accumulates from one load to the next (1 MiB: about 1% of the weights): the
    # second round of loads (float32, bfloat16) ends where the first did, and flat. Within the
    # first round, the first bfloat16 load of the big shapes may keep a few MiB more for good
    # (2.7 MiB on this session's machine; under 1 MiB where earlier CI runs passed the old
    # all-four check), which the 10% bound above covers.
    afters = [c["after"] for c in r["big"]]
    first, second = afters[:2], afters[2:]
    assert max(second) - max(first) <= 2**20, summary
    assert max(second) - min(second) <= 2**20, summary
