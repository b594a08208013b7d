"""Interruptions lose nothing (issue #6), on a tiny random Llama with SmolLM2's tokenizer:

- ``kill -9`` of ``loratch train`` at random moments (two seeds), aimed at setup, a step's
  computation, a checkpoint save and anywhere, several times in a row on the same output
  directory, with evidence from the files that kills did land mid-setup, mid-step and mid-save;
  every visible
  ``checkpoint-*`` is complete, equals the uninterrupted run's checkpoint of that step and loads
  (loratch and PEFT), hidden leftovers are ignored and cleaned up, and resuming ends with the
  uninterrupted run's adapters, checkpoints and metrics, bit for bit;
- a full disk during a save (a small tmpfs, and RLIMIT_FSIZE, which needs no mount): a clean
  error naming the cause, the previous checkpoint intact, and a resume from it that finishes;
- malicious pickles (``os.system`` / ``builtins.exec`` through GLOBAL, STACK_GLOBAL and REDUCE, in
  ``torch.save`` zips, legacy and raw pickles) given to every public reader of torch pickles:
  a typed error, and the code never runs;
- a fresh run into an ``output_dir`` that holds another run's checkpoints: refused unless
  ``overwrite_output_dir``;
- two runs into one ``output_dir`` at the same time: the second fails at once naming the first's
  pid (the output directory's lock), and the lock file a killed run leaves blocks nobody.
"""

from __future__ import annotations

import json
import os
import random
import resource
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import CLI_ENV, VOLATILE, AdapterCheck, checkpoints, run_cli, run_py, step_of
from helpers import metrics as all_metrics
from safetensors.torch import load_file
from tiny_models import trainer_toml

import loratch

MAX_STEPS = 6
SAVE_STEPS = 2
EVAL_STEPS = 3
# Steps after whose log record the run only computes the next step: no evaluation, no save.
PLAIN_STEPS = [k for k in range(1, MAX_STEPS) if k % SAVE_STEPS and k % EVAL_STEPS]
CHECKPOINT_FILES = {
    "adapter_config.json",
    "adapter_model.safetensors",
    "optimizer.safetensors",
    "trainer_state.json",
    "training_info.json",
    "train_config.json",
}
# The output directory's lock (held by a run, deleted when it ends; a killed run leaves it).
LOCK_FILE = ".loratch.lock"
ENV = CLI_ENV
IDS = torch.tensor([[1, 500, 1000, 42, 7, 9000, 3]])
LORA = {"rank": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"], "dropout": 0.1}


def training_settings(**training: Any) -> dict[str, Any]:
    return {"max_steps": MAX_STEPS, "batch_size": 2, "gradient_accumulation_steps": 1, "learning_rate": 1e-2,
            "logging_steps": 1, "save_steps": SAVE_STEPS, "eval_steps": EVAL_STEPS, "warmup_steps": 1,
            "max_seq_length": 48, **training}


def config_text(trainable_dir: Path, out: Path, **training: Any) -> str:
    return trainer_toml(trainable_dir, out, seed=7, lora=LORA, training=training_settings(**training))


def train_dict(trainable_dir: Path, out: Path, **training: Any) -> dict[str, Any]:
    """The same configuration as ``config_text`` for ``loratch.train``."""
    return {"model": trainable_dir, "data": trainable_dir / "data.jsonl", "output_dir": out, "seed": 7,
            "validation_split": 0.2, "lora": dict(LORA), "training": training_settings(**training)}


def hidden_leftovers(out: Path) -> list[str]:
    if not out.is_dir():
        return []
    return sorted(p.name for p in out.iterdir() if p.name.startswith("."))


def metrics(out: Path) -> list[dict[str, Any]]:
    """The records of metrics.jsonl without the machine-dependent fields."""
    return all_metrics(out, drop=VOLATILE)


def assert_same_metrics(out: Path, ref: Path) -> None:
    """The same records (steps, kinds, order); the logged losses agree to 1e-12 (the float64 sums of
    a loss can differ in the last bit between two processes, while the adapters are identical)."""
    got, want = metrics(out), metrics(ref)
    assert [(r["step"], sorted(r)) for r in got] == [(r["step"], sorted(r)) for r in want]
    for g, w in zip(got, want):
        assert g == pytest.approx(w, rel=1e-12, abs=0.0), (g, w)


def assert_same_tensors(a: Path, b: Path) -> None:
    ta, tb = load_file(a), load_file(b)
    assert ta.keys() == tb.keys(), f"{a} vs {b}"
    for k in ta:
        assert torch.equal(ta[k], tb[k]), f"{k} differs: {a} vs {b}"


@pytest.fixture(scope="module")
def loader(trainable_dir: Path) -> Any:
    """Loads adapters into one registered loratch model, and checks them against PEFT."""
    with AdapterCheck(trainable_dir, "interruptions-check") as check:
        yield check


def load_adapter(loader: AdapterCheck, adapter: Path, peft: bool) -> None:
    """Loads ``adapter`` with loratch and, with ``peft``, asserts PEFT's logits equal loratch's
    (bit for bit: alpha / rank = 2)."""
    if peft:
        loader.check(adapter, IDS)
    else:
        loratch.torch_hf_lora_load(loader.name, adapter)


def partials(out: Path) -> set[tuple[str, int, int]]:
    """The hidden ``.partial`` saves in ``out``, each as (name, inode, ctime) so a new one is told
    from an old leftover of the same name."""
    try:
        entries = list(os.scandir(out))
    except FileNotFoundError:
        return set()
    seen = set()
    for e in entries:
        if e.name.endswith(".partial"):
            try:
                st = e.stat()
            except FileNotFoundError:
                continue
            seen.add((e.name, st.st_ino, st.st_ctime_ns))
    return seen


def metrics_stamp(out: Path) -> tuple[int, int] | None:
    try:
        st = (out / "metrics.jsonl").stat()
    except FileNotFoundError:
        return None
    return st.st_size, st.st_mtime_ns


@pytest.fixture(scope="module")
def reference(binary: Path, trainable_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The uninterrupted run, with the times (from its start) of its stderr lines and of its saves
    (how long each ``.partial`` was seen)."""
    base = tmp_path_factory.mktemp("reference")
    out = base / "out"
    cfg = base / "train.toml"
    cfg.write_text(config_text(trainable_dir, out))
    start = time.monotonic()
    events: list[tuple[float, str]] = []
    save_spans: dict[str, list[float]] = {}
    with subprocess.Popen([binary, "train", "--config", cfg], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True, env=ENV) as proc:
        def read() -> None:
            assert proc.stderr is not None
            events.extend((time.monotonic() - start, line.rstrip()) for line in proc.stderr)

        reader = threading.Thread(target=read)
        reader.start()
        while proc.poll() is None:
            for name, *_ in partials(out):
                now = time.monotonic() - start
                save_spans.setdefault(name, [now, now])[1] = now
            time.sleep(0.0005)
        reader.join()
    assert proc.wait(timeout=600) == 0, "\n".join(e[1] for e in events)
    duration = time.monotonic() - start
    saves = [t for t, line in events if line.startswith("checkpoint saved")]
    logged = {int(line.split()[1].split("/")[0]): t for t, line in events if line.startswith("step ") and "/" in line}
    # How long computing a step takes after a plain step's log line: the kill window for "step".
    step_time = min(logged[k + 1] - logged[k] for k in PLAIN_STEPS)
    save_time = min(b - a for a, b in save_spans.values()) if save_spans else 0.0
    assert [step_of(p) for p in checkpoints(out)] == list(range(SAVE_STEPS, MAX_STEPS + 1, SAVE_STEPS))
    assert len(saves) == MAX_STEPS // SAVE_STEPS
    assert hidden_leftovers(out) == []
    print(f"\nreference run: {duration:.2f} s, first log line at {events[0][0]:.2f} s, saves at {saves}, "
          f"a plain step {step_time * 1e3:.1f} ms, a save seen for >= {save_time * 1e3:.1f} ms")
    return {"out": out, "duration": duration, "setup": events[0][0], "saves": saves, "step_time": step_time,
            "save_time": save_time}


def comparable_state(state: dict[str, Any]) -> dict[str, Any]:
    """A ``trainer_state.json`` without what differs between two equal runs: the machine's
    measures in ``log_history`` and the output directory in ``best_model_checkpoint``."""
    best = state["best_model_checkpoint"]
    return {**state, "log_history": [{k: v for k, v in r.items() if k not in VOLATILE} for r in state["log_history"]],
            "best_model_checkpoint": best and Path(best).name}


def check_after_kill(out: Path, ref: Path, loader: AdapterCheck) -> None:
    """What a kill may leave: visible checkpoints are whole, equal the reference's and load; the
    metrics hold every step up to the newest one; the hidden leftovers are only unfinished saves."""
    found = checkpoints(out)
    for c in found:
        assert {p.name for p in c.iterdir()} == CHECKPOINT_FILES, f"{c} is incomplete"
        state = json.loads((c / "trainer_state.json").read_text())
        assert state["global_step"] == step_of(c)
        assert comparable_state(state) == comparable_state(json.loads((ref / c.name / "trainer_state.json").read_text()))
        assert json.loads((c / "training_info.json").read_text()) == json.loads((ref / c.name / "training_info.json").read_text())
        for f in ["adapter_model.safetensors", "optimizer.safetensors"]:
            assert_same_tensors(c / f, ref / c.name / f)
        load_adapter(loader, c, peft=c == found[-1])
    for name in hidden_leftovers(out):
        assert name.startswith((".checkpoint-", ".loratch-tmp-")) or name == LOCK_FILE, name
    if found:
        newest = step_of(found[-1])
        logged = {r["step"] for r in metrics(out) if "loss" in r}
        assert set(range(1, newest + 1)) <= logged, f"committed steps missing from the metrics: {sorted(logged)}"


def run_and_kill(binary: Path, args: list[Any], out: Path, kind: str, delay: float) -> tuple[int, str, str]:
    """Runs the CLI and SIGKILLs it: ``delay`` seconds after its start ("setup", "any"), after it
    logs a step of PLAIN_STEPS ("step") or after a new hidden ``.checkpoint-*.partial`` appears
    ("save"). Returns the exit status (-9 when killed), stderr and what the kill hit, read from
    the files after the process died:

    - "save": a new ``.partial`` is left: the process died inside a save (a finished save renames it);
    - "step": no new ``.partial``, and the newest loss record, written by this run, is of a step in
      PLAIN_STEPS: the process had logged step k, which neither evaluates nor saves, and not yet
      step k + 1: it died computing step k + 1;
    - "setup": no new ``.partial`` and no loss record beyond the checkpoint it resumed from: it
      died before finishing its first step;
    - "other": elsewhere (an evaluation, a log line, the end of the run)."""
    stale, stamp = partials(out), metrics_stamp(out)
    resumed_at = step_of(checkpoints(out)[-1]) if checkpoints(out) else 0

    def newest_plain_step_logged() -> bool:
        if metrics_stamp(out) == stamp:
            return False
        steps = [r["step"] for r in all_metrics(out) if "loss" in r]
        return bool(steps) and steps[-1] in PLAIN_STEPS

    err_path = out.parent / f"stderr-{time.monotonic_ns()}.txt"
    with err_path.open("w") as err:
        start = time.monotonic()
        proc = subprocess.Popen([binary, "train", *map(str, args)], stdout=subprocess.DEVNULL, stderr=err, env=ENV)
        deadline = start + delay if kind in ("setup", "any") else float("inf")
        while proc.poll() is None:
            now = time.monotonic()
            if deadline == float("inf") and (
                (kind == "save" and partials(out) - stale) or (kind == "step" and newest_plain_step_logged())
            ):
                deadline = now + delay
            if now >= deadline:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                break
            time.sleep(0.0002)
    rc = proc.wait()
    logged = [r["step"] for r in all_metrics(out) if "loss" in r]
    if partials(out) - stale:
        hit = "save"
    elif metrics_stamp(out) == stamp or max(logged, default=0) <= resumed_at:
        hit = "setup"
    elif newest_plain_step_logged():
        hit = "step"
    else:
        hit = "other"
    return rc, err_path.read_text(), hit


@pytest.mark.parametrize("seed", [20240606, 7])
def test_kill_9_at_random_moments_loses_nothing(binary: Path, trainable_dir: Path, reference: dict[str, Any],
                                                loader: AdapterCheck, tmp_path: Path, seed: int) -> None:
    """One chain of kills per seed on one output directory, then a run that finishes. Each kill
    aims at a phase: "setup" a random moment before the reference's first log line; "step" a
    random moment within the first half of a plain step's computation (after its predecessor's
    log record); "save" within the first half of a save; "any" anywhere in the reference's
    duration. What each kill hit is read from the files it left (``run_and_kill``); a kill aimed
    at a step or a save that landed elsewhere is tried again (up to 3 times), and the test asserts
    that kills did land mid-setup, mid-step and mid-save. (A step is a few milliseconds: on a busy
    machine this process may not look at the files in time, so the kill comes late.)"""
    ref: Path = reference["out"]
    for c in checkpoints(ref):
        load_adapter(loader, c, peft=True)
    rng = random.Random(seed)
    duration, setup = reference["duration"], reference["setup"]
    out = tmp_path / "chain"
    cfg = tmp_path / "chain.toml"
    cfg.write_text(config_text(trainable_dir, out))
    hits: list[tuple[str, str]] = []
    for kind in ["setup", "step", "save", "any"]:
        for _ in range(4):
            delay = {"setup": rng.uniform(0.0, setup), "any": rng.uniform(0.0, duration),
                     "step": rng.uniform(0.0, reference["step_time"] / 2),
                     "save": rng.uniform(0.0, reference["save_time"] / 2)}[kind]
            resume = ["--resume", out] if checkpoints(out) else []
            rc, err, hit = run_and_kill(binary, ["--config", cfg, *resume], out, kind, delay)
            assert "panicked" not in err, err
            if rc == 0:  # finished before the kill: start the chain's remaining kills afresh
                hits.append((kind, "finished"))
                shutil.rmtree(out)
                continue
            assert rc == -signal.SIGKILL, f"exit {rc}: {err}"
            hits.append((kind, hit))
            check_after_kill(out, ref, loader)
            if hit == kind or kind == "any":
                break
    resume = ["--resume", out] if checkpoints(out) else []
    done = run_cli(binary, "train", "--config", cfg, *resume)
    assert done.returncode == 0, done.stderr
    # The end state is the uninterrupted run's, bit for bit, and nothing half-written is left.
    assert hidden_leftovers(out) == []
    assert [c.name for c in checkpoints(out)] == [c.name for c in checkpoints(ref)]
    check_after_kill(out, ref, loader)
    assert_same_tensors(out / "adapter_model.safetensors", ref / "adapter_model.safetensors")
    assert_same_metrics(out, ref)
    final = json.loads((checkpoints(out)[-1] / "trainer_state.json").read_text())
    assert final["global_step"] == MAX_STEPS
    load_adapter(loader, out, peft=True)
    print(f"\nkills (aimed at, hit): {hits}")
    landed = {hit for kind, hit in hits if hit == kind}
    assert {"setup", "step", "save"} <= landed, f"kills did not land in every phase: {hits}"


# --- full disk ---------------------------------------------------------------------------------


def pages(path: Path) -> int:
    """Bytes a tree takes on tmpfs (4 KiB pages per file)."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(-(-p.stat().st_size // 4096) * 4096 for p in files)


def tmpfs(directory: Path, size: int) -> None:
    directory.mkdir(parents=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"mounting a size-limited tmpfs is not permitted here ({proc.stderr.strip()}); "
                    "test_file_size_limit_during_a_save covers a failing save without a mount")


def umount(directory: Path) -> None:
    subprocess.run(["umount", str(directory)], check=True)


def assert_clean_failure(rc: int, err: str, cause: str, kept: Path) -> None:
    assert rc == 1, f"exit {rc} (a signal or a panic?): {err}"
    assert "panicked" not in err and "RUST_BACKTRACE" not in err, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: ") and cause in line, line
    assert "cannot save this checkpoint" in line and f"{kept}, is intact" in line, line
    assert ".partial" not in line, line


def test_full_disk_during_a_save(binary: Path, trainable_dir: Path, reference: dict[str, Any], loader: AdapterCheck,
                                 tmp_path: Path) -> None:
    ref: Path = reference["out"]
    first = ref / f"checkpoint-{SAVE_STEPS}"
    # Room for the first checkpoint, the metrics and half of a second checkpoint.
    size = pages(first) * 3 // 2 + 2 * 4096
    disk = tmp_path / "disk"
    tmpfs(disk, size)
    try:
        out = disk / "out"
        cfg = tmp_path / "disk.toml"
        cfg.write_text(config_text(trainable_dir, out))
        proc = run_cli(binary, "train", "--config", cfg)
        kept = out / first.name
        assert_clean_failure(proc.returncode, proc.stderr, "No space left on device", kept)
        assert [c.name for c in checkpoints(out)] == [first.name]
        assert hidden_leftovers(out) == []
        check_after_kill(out, ref, loader)  # whole, equal to the reference's, loads
        # Resume from it where there is room: the run ends as the uninterrupted one.
        moved = tmp_path / "moved"
        shutil.copytree(out, moved)
    finally:
        umount(disk)
    cfg.write_text(config_text(trainable_dir, moved))
    done = run_cli(binary, "train", "--config", cfg, "--resume", moved)
    assert done.returncode == 0, done.stderr
    assert_same_tensors(moved / "adapter_model.safetensors", ref / "adapter_model.safetensors")
    assert_same_metrics(moved, ref)


def test_full_disk_through_the_python_api(trainable_dir: Path, reference: dict[str, Any], tmp_path: Path) -> None:
    ref: Path = reference["out"]
    first = ref / f"checkpoint-{SAVE_STEPS}"
    disk = tmp_path / "disk"
    tmpfs(disk, pages(first) * 3 // 2 + 2 * 4096)
    try:
        out = disk / "out"
        out.mkdir()
        shutil.copytree(first, out / first.name)
        shutil.copy(ref / "metrics.jsonl", out / "metrics.jsonl")
        with pytest.raises(OSError, match="No space left on device") as info:
            loratch.train(train_dict(trainable_dir, out), resume=out)
        message = str(info.value)
        assert "cannot save this checkpoint" in message and f"{out / first.name}, is intact" in message, message
        assert [c.name for c in checkpoints(out)] == [first.name] and hidden_leftovers(out) == []
        for f in ["adapter_model.safetensors", "optimizer.safetensors"]:
            assert_same_tensors(out / first.name / f, first / f)
    finally:
        umount(disk)


def test_file_size_limit_during_a_save(binary: Path, trainable_dir: Path, reference: dict[str, Any],
                                       tmp_path: Path) -> None:
    """No mount needed: RLIMIT_FSIZE (SIGXFSZ ignored) makes writes of big files fail with EFBIG.
    Every checkpoint has the same file sizes, so the run resumes from a copy of the reference's
    first checkpoint with a limit that the metrics fit under and a checkpoint's files do not."""
    ref: Path = reference["out"]
    first = ref / f"checkpoint-{SAVE_STEPS}"
    limit = (first / "optimizer.safetensors").stat().st_size // 2
    assert limit > (ref / "metrics.jsonl").stat().st_size
    out = tmp_path / "out"
    out.mkdir()
    shutil.copytree(first, out / first.name)
    shutil.copy(ref / "metrics.jsonl", out / "metrics.jsonl")
    cfg = tmp_path / "limit.toml"
    cfg.write_text(config_text(trainable_dir, out))

    def limit_file_size() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = run_cli(binary, "train", "--config", cfg, "--resume", out, preexec_fn=limit_file_size)
    assert_clean_failure(proc.returncode, proc.stderr, "File too large", out / first.name)
    assert [c.name for c in checkpoints(out)] == [first.name] and hidden_leftovers(out) == []
    for f in CHECKPOINT_FILES:
        assert (out / first.name / f).read_bytes() == (first / f).read_bytes(), f
    done = run_cli(binary, "train", "--config", cfg, "--resume", out)
    assert done.returncode == 0, done.stderr
    assert_same_tensors(out / "adapter_model.safetensors", ref / "adapter_model.safetensors")
    assert_same_metrics(out, ref)


# --- malicious pickles -------------------------------------------------------------------------

EVIL = r'''
import builtins, os, pickle, sys, torch
out, marker = sys.argv[1], sys.argv[2]

class Evil:
    def __init__(self, f, arg):
        self.f, self.arg = f, arg
    def __reduce__(self):
        return (self.f, (self.arg,))

system = Evil(os.system, "touch " + marker)
exec_ = Evil(builtins.exec, "open(%r, 'w').close()" % marker)
good = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, 48)}
torch.save({**good, "x": system}, out + "/system.pt")                      # GLOBAL + REDUCE
torch.save({"x": exec_, **good}, out + "/exec.bin", pickle_protocol=4)    # STACK_GLOBAL + REDUCE
torch.save({**good, "x": system}, out + "/legacy.pth", _use_new_zipfile_serialization=False)
with open(out + "/raw.pt", "wb") as f:                                    # a bare pickle
    pickle.dump(system, f, protocol=2)
os.makedirs(out + "/peft-dir")                                            # PEFT's legacy layout
torch.save({**good, "x": exec_}, out + "/peft-dir/adapter_model.bin")
'''


def test_malicious_pickles_are_rejected_and_never_run(binary: Path, trainable_dir: Path, reference: dict[str, Any],
                                                      tmp_path: Path) -> None:
    evil, marker = tmp_path / "evil", tmp_path / "pwned"
    evil.mkdir()
    run_py(EVIL, evil, marker, check=True, timeout=120)
    shutil.copy(reference["out"] / "adapter_config.json", evil / "peft-dir" / "adapter_config.json")
    assert not marker.exists()
    expected = {
        "system.pt": "system is not allowed",
        "exec.bin": "exec is not allowed",
        "legacy.pth": "legacy (pre-zip) torch.save format is not supported",
        "raw.pt": "not a torch.save zip archive",
        "peft-dir": "exec is not allowed",
    }
    # The files are live: an unrestricted unpickler runs them (the test can fail).
    for live in (f"import torch; torch.load({str(evil / 'system.pt')!r}, weights_only=False)",
                 f"import pickle; pickle.load(open({str(evil / 'raw.pt')!r}, 'rb'))"):
        run_py(live, timeout=120)
        assert marker.exists(), live
        marker.unlink()

    name = "evil-target"
    loratch.torch_hf_load_model_lora(name, trainable_dir, {"device": "cpu"})
    try:
        for file, needle in expected.items():
            with pytest.raises(loratch.AdapterFormatError) as info:
                loratch.torch_hf_lora_load(name, evil / file)
            message = str(info.value)
            assert needle in message and file in message, message
            assert not marker.exists(), f"{file} ran its code"
    finally:
        loratch.torch_hf_unload(name)
    layer = loratch.torch_lora_linear(48, 48, 2, 4.0)
    with pytest.raises(loratch.AdapterFormatError):
        loratch.torch_lora_load_adapters(layer, evil / "system.pt")
    # The binary's readers: merge, generate --adapter, and a resume from a checkpoint whose
    # adapter is a pickle.
    for args in (["merge", "--model", trainable_dir, "--adapter", evil / "exec.bin", "--out", tmp_path / "merged"],
                 ["generate", "--model", trainable_dir, "--adapter", evil / "system.pt", "--prompt", "hi",
                  "--max-new-tokens", "1"]):
        proc = run_cli(binary, *args)
        assert proc.returncode == 1 and "is not allowed" in proc.stderr and "panicked" not in proc.stderr, proc.stderr
        assert not marker.exists()
    out = tmp_path / "out"
    ckpt = out / f"checkpoint-{SAVE_STEPS}"
    shutil.copytree(reference["out"] / ckpt.name, ckpt)
    (ckpt / "adapter_model.safetensors").unlink()
    shutil.copy(evil / "peft-dir" / "adapter_model.bin", ckpt / "adapter_model.bin")
    cfg = tmp_path / "resume.toml"
    cfg.write_text(config_text(trainable_dir, out))
    proc = run_cli(binary, "train", "--config", cfg, "--resume", out)
    assert proc.returncode == 1 and "exec is not allowed" in proc.stderr, proc.stderr
    assert not marker.exists()


# --- a fresh run into a used output_dir --------------------------------------------------------


def test_a_fresh_run_never_mixes_with_an_earlier_runs_checkpoints(binary: Path, trainable_dir: Path,
                                                                 reference: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "used"
    shutil.copytree(reference["out"], out)
    (out / "notes.txt").write_text("mine")
    before = {p.name for p in out.iterdir()}
    cfg = tmp_path / "fresh.toml"
    cfg.write_text(config_text(trainable_dir, out))
    proc = run_cli(binary, "train", "--config", cfg)
    assert proc.returncode == 1, proc.stderr
    assert "config error" in proc.stderr and "--resume" in proc.stderr and "overwrite_output_dir" in proc.stderr
    assert f"checkpoint-{MAX_STEPS}" in proc.stderr
    with pytest.raises(loratch.ConfigError, match="overwrite_output_dir"):
        loratch.train(train_dict(trainable_dir, out))
    assert {p.name for p in out.iterdir()} == before  # refused before touching anything
    # With overwrite_output_dir the old checkpoints and adapter go; the user's file stays.
    result = loratch.train(train_dict(trainable_dir, out, max_steps=SAVE_STEPS, overwrite_output_dir=True))
    assert result["global_step"] == SAVE_STEPS
    assert [c.name for c in checkpoints(out)] == [f"checkpoint-{SAVE_STEPS}"]
    assert (out / "notes.txt").read_text() == "mine"
    assert json.loads((out / "adapter_config.json").read_text())
    assert max(r["step"] for r in metrics(out)) == SAVE_STEPS


# --- two runs into one output_dir at the same time -----------------------------------------------


def start_run(binary: Path, cfg: Path, err: Path) -> subprocess.Popen[bytes]:
    with err.open("w") as f:
        return subprocess.Popen([binary, "train", "--config", cfg], stdout=subprocess.DEVNULL, stderr=f, env=ENV)


def wait_for_lock(out: Path, proc: subprocess.Popen[bytes]) -> None:
    """Waits until `proc` holds the lock of `out` (its pid in the lock file)."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if (out / LOCK_FILE).read_text() == str(proc.pid):
                return
        except FileNotFoundError:
            pass
        assert proc.poll() is None, "the run ended before it took the lock"
        time.sleep(0.002)
    raise AssertionError(f"{proc.pid} took no lock on {out}")


def assert_same_run(out: Path, ref: Path) -> None:
    """`out` holds exactly the uninterrupted reference run's output, and no lock file."""
    assert [c.name for c in checkpoints(out)] == [c.name for c in checkpoints(ref)]
    for c in checkpoints(out):
        assert_same_tensors(c / "adapter_model.safetensors", ref / c.name / "adapter_model.safetensors")
    assert_same_tensors(out / "adapter_model.safetensors", ref / "adapter_model.safetensors")
    assert_same_metrics(out, ref)
    assert hidden_leftovers(out) == []


def test_two_runs_started_together_never_mix(binary: Path, trainable_dir: Path, reference: dict[str, Any],
                                            tmp_path: Path) -> None:
    ref: Path = reference["out"]
    out = tmp_path / "shared"
    cfg = tmp_path / "shared.toml"
    cfg.write_text(config_text(trainable_dir, out))
    procs = [start_run(binary, cfg, tmp_path / f"stderr-{i}.txt") for i in range(2)]
    ended: dict[int, float] = {}
    while len(ended) < 2:
        for i, p in enumerate(procs):
            if i not in ended and p.poll() is not None:
                ended[i] = time.monotonic()
        time.sleep(0.002)
    errs = [(tmp_path / f"stderr-{i}.txt").read_text() for i in range(2)]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 1], errs
    won = 0 if procs[0].returncode == 0 else 1
    lost = 1 - won
    line = errs[lost].strip().splitlines()[-1]
    assert line.startswith("error: state error: ") and f"pid {procs[won].pid}" in line and "in use" in line, line
    assert "panicked" not in errs[lost]
    assert ended[lost] < ended[won], "the second run did not fail at once"
    assert_same_run(out, ref)


def test_the_python_api_takes_the_same_lock(binary: Path, trainable_dir: Path, reference: dict[str, Any],
                                            tmp_path: Path) -> None:
    ref: Path = reference["out"]
    out = tmp_path / "out"
    cfg = tmp_path / "cli.toml"
    cfg.write_text(config_text(trainable_dir, out))
    proc = start_run(binary, cfg, tmp_path / "stderr.txt")
    wait_for_lock(out, proc)
    for resume in (None, out):
        with pytest.raises(loratch.StateError, match=f"in use by another loratch run \\(pid {proc.pid}") as info:
            loratch.train(train_dict(trainable_dir, out, overwrite_output_dir=True), resume=resume)
        assert isinstance(info.value, RuntimeError)
    assert proc.poll() is None, "loratch.train did not fail at once"
    assert proc.wait(timeout=600) == 0, (tmp_path / "stderr.txt").read_text()
    assert_same_run(out, ref)


def test_a_lock_left_by_a_killed_run_blocks_nobody(binary: Path, trainable_dir: Path, reference: dict[str, Any],
                                                   tmp_path: Path) -> None:
    ref: Path = reference["out"]
    out = tmp_path / "out"
    cfg = tmp_path / "killed.toml"
    cfg.write_text(config_text(trainable_dir, out))
    proc = start_run(binary, cfg, tmp_path / "stderr.txt")
    wait_for_lock(out, proc)
    while not checkpoints(out) and proc.poll() is None:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run ended before the kill"
    assert (out / LOCK_FILE).read_text() == str(proc.pid)
    # The binary and the Python API (on a copy: the same file, no flock on it) both go through it.
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    done = subprocess.run([binary, "train", "--config", cfg, "--resume", out], capture_output=True, text=True,
                          timeout=600, env=ENV)
    assert done.returncode == 0, done.stderr
    assert_same_run(out, ref)
    result = loratch.train(train_dict(trainable_dir, copy), resume=copy)
    assert result["global_step"] == MAX_STEPS and hidden_leftovers(copy) == []
    # In this process (its own thread count) the sums may round differently from the binary's.
    assert [c.name for c in checkpoints(copy)] == [c.name for c in checkpoints(ref)]
    got, want = metrics(copy), metrics(ref)
    assert [(r["step"], sorted(r)) for r in got] == [(r["step"], sorted(r)) for r in want]
    for g, w in zip(got, want):
        assert g == pytest.approx(w, rel=1e-5), (g, w)
