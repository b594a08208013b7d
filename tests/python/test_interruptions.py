"""Interruptions lose nothing (issue #6), on a tiny random Llama with SmolLM2's tokenizer:

- ``kill -9`` of ``loratch train`` at random moments (seeded), during setup and while a checkpoint
  is being saved, several times in a row on the same output directory: every visible
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

import copy
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import make_trainable_model, trainer_toml, write_records

import loratch

MAX_STEPS = 6
SAVE_STEPS = 2
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
# Metrics fields that measure the machine, not the training.
VOLATILE = {"tokens_per_s", "rss_bytes", "peak_rss_bytes", "train_time_s"}
# One libtorch thread per run: the test machine's cores are shared.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("tiny-trainable")
    make_trainable_model(d)
    write_records(d / "data.jsonl", 30)
    return d


LORA = {"rank": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"], "dropout": 0.1}


def training_settings(**training: Any) -> dict[str, Any]:
    return {"max_steps": MAX_STEPS, "batch_size": 2, "gradient_accumulation_steps": 1, "learning_rate": 1e-2,
            "logging_steps": 1, "save_steps": SAVE_STEPS, "eval_steps": 3, "warmup_steps": 1,
            "max_seq_length": 48, **training}


def config_text(model_dir: Path, out: Path, **training: Any) -> str:
    return trainer_toml(model_dir, out, seed=7, lora=LORA, training=training_settings(**training))


def train_dict(model_dir: Path, out: Path, **training: Any) -> dict[str, Any]:
    """The same configuration as ``config_text`` for ``loratch.train``."""
    return {"model": model_dir, "data": model_dir / "data.jsonl", "output_dir": out, "seed": 7,
            "validation_split": 0.2, "lora": dict(LORA), "training": training_settings(**training)}


def step_of(p: Path) -> int:
    return int(p.name.split("-")[1])


def checkpoints(out: Path) -> list[Path]:
    return sorted((p for p in out.glob("checkpoint-*") if p.is_dir()), key=step_of)


def hidden_leftovers(out: Path) -> list[str]:
    if not out.is_dir():
        return []
    return sorted(p.name for p in out.iterdir() if p.name.startswith("."))


def metrics(out: Path) -> list[dict[str, Any]]:
    """The records of metrics.jsonl without the machine-dependent fields (a torn last line from a
    kill is skipped, as the trainer does)."""
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        records.append({k: v for k, v in r.items() if k not in VOLATILE})
    return records


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


class Loader:
    """Loads adapters with loratch (one registered model) and with PEFT (a copy of one base)."""

    def __init__(self, model_dir: Path) -> None:
        import transformers as tf

        self.name = "interruptions-check"
        loratch.torch_hf_load_model_lora(self.name, model_dir, {"device": "cpu"})
        self.base = tf.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.ids = torch.tensor([[1, 500, 1000, 42, 7, 9000, 3]])

    def check(self, adapter: Path, peft: bool) -> None:
        loratch.torch_hf_lora_load(self.name, adapter)
        if not peft:
            return
        from peft import PeftModel

        with torch.no_grad():
            ours = loratch.torch_hf_forward(self.name, self.ids)
            theirs = PeftModel.from_pretrained(copy.deepcopy(self.base), adapter).eval()(self.ids).logits
        torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)

    def close(self) -> None:
        loratch.torch_hf_unload(self.name)


@pytest.fixture(scope="module")
def loader(model_dir: Path) -> Any:
    ld = Loader(model_dir)
    yield ld
    ld.close()


@pytest.fixture(scope="module")
def reference(binary: Path, model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The uninterrupted run, with the times (from its start) of its stderr lines."""
    base = tmp_path_factory.mktemp("reference")
    out = base / "out"
    cfg = base / "train.toml"
    cfg.write_text(config_text(model_dir, out))
    start = time.monotonic()
    with subprocess.Popen([binary, "train", "--config", cfg], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True, env=ENV) as proc:
        assert proc.stderr is not None
        events = [(time.monotonic() - start, line.rstrip()) for line in proc.stderr]
    assert proc.wait(timeout=600) == 0, "\n".join(e[1] for e in events)
    duration = time.monotonic() - start
    saves = [t for t, line in events if line.startswith("checkpoint saved")]
    assert [step_of(p) for p in checkpoints(out)] == list(range(SAVE_STEPS, MAX_STEPS + 1, SAVE_STEPS))
    assert len(saves) == MAX_STEPS // SAVE_STEPS
    assert hidden_leftovers(out) == []
    print(f"\nreference run: {duration:.1f} s, first log line at {events[0][0]:.1f} s, saves at {saves}")
    return {"out": out, "duration": duration, "setup": events[0][0], "saves": saves}


def check_after_kill(out: Path, ref: Path, loader: Loader) -> None:
    """What a kill may leave: visible checkpoints are whole, equal the reference's and load; the
    metrics hold every step up to the newest one; the hidden leftovers are only unfinished saves."""
    found = checkpoints(out)
    for c in found:
        assert {p.name for p in c.iterdir()} == CHECKPOINT_FILES, f"{c} is incomplete"
        state = json.loads((c / "trainer_state.json").read_text())
        assert state["global_step"] == step_of(c)
        assert state == json.loads((ref / c.name / "trainer_state.json").read_text())
        assert json.loads((c / "training_info.json").read_text()) == json.loads((ref / c.name / "training_info.json").read_text())
        for f in ["adapter_model.safetensors", "optimizer.safetensors"]:
            assert_same_tensors(c / f, ref / c.name / f)
        loader.check(c, peft=c == found[-1])
    for name in hidden_leftovers(out):
        assert name.startswith((".checkpoint-", ".loratch-tmp-")) or name == LOCK_FILE, name
    if found:
        newest = step_of(found[-1])
        logged = {r["step"] for r in metrics(out) if "loss" in r}
        assert set(range(1, newest + 1)) <= logged, f"committed steps missing from the metrics: {sorted(logged)}"


def run_and_kill(binary: Path, args: list[Any], out: Path, kill_at: float, on_save: float | None) -> tuple[int, str]:
    """Runs the CLI and SIGKILLs it `kill_at` seconds after its start or, with `on_save`, that
    many seconds after a save is seen in progress (a new hidden `.checkpoint-*.partial`).
    Returns the exit status (-9 when killed) and stderr."""
    def partials() -> set[tuple[str, int, int]]:
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

    stale = partials()
    err_path = out.parent / f"stderr-{time.monotonic_ns()}.txt"
    with err_path.open("w") as err:
        start = time.monotonic()
        proc = subprocess.Popen([binary, "train", *args], stdout=subprocess.DEVNULL, stderr=err, env=ENV)
        deadline = start + kill_at
        while proc.poll() is None:
            now = time.monotonic()
            if on_save is not None and partials() - stale:
                deadline = min(deadline, now + on_save)
                on_save = None
            if now >= deadline:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                break
            time.sleep(0.0005)
    return proc.wait(), err_path.read_text()


def test_kill_9_at_random_moments_loses_nothing(binary: Path, model_dir: Path, reference: dict[str, Any],
                                                loader: Loader, tmp_path: Path) -> None:
    ref: Path = reference["out"]
    for c in checkpoints(ref):
        loader.check(c, peft=True)
    rng = random.Random(20240606)
    duration, setup = reference["duration"], reference["setup"]
    # Each chain kills runs on one output directory, then lets the last run finish. A kill is
    # ("setup", ...): at a random moment before the reference's first log line; ("save", ...):
    # a random 0-20 ms after a save starts; ("any", ...): anywhere in the reference's duration.
    chains = [["setup", "save", "any"], ["save", "any", "save"]]
    kinds_hit: list[str] = []
    for n, chain in enumerate(chains):
        out = tmp_path / f"chain-{n}"
        cfg = tmp_path / f"chain-{n}.toml"
        cfg.write_text(config_text(model_dir, out))
        for kind in chain:
            kill_at = {"setup": rng.uniform(0.0, setup), "any": rng.uniform(0.0, duration)}.get(kind, 1e9)
            on_save = rng.uniform(0.0, 0.02) if kind == "save" else None
            resume = ["--resume", str(out)] if checkpoints(out) else []
            rc, err = run_and_kill(binary, ["--config", cfg, *resume], out, kill_at, on_save)
            assert "panicked" not in err, err
            if rc == 0:  # finished before the kill: nothing more to do in this chain
                break
            assert rc == -signal.SIGKILL, f"exit {rc}: {err}"
            mid_save = any(name.endswith(".partial") for name in hidden_leftovers(out))
            kinds_hit.append(kind + ("+partial" if mid_save else ""))
            check_after_kill(out, ref, loader)
        resume = ["--resume", str(out)] if checkpoints(out) else []
        done = subprocess.run([binary, "train", "--config", cfg, *resume], capture_output=True, text=True,
                              timeout=600, env=ENV)
        assert done.returncode == 0, done.stderr
        # The end state is the uninterrupted run's, bit for bit, and nothing half-written is left.
        assert hidden_leftovers(out) == [] and hidden_leftovers(out / "adapter") == []
        assert [c.name for c in checkpoints(out)] == [c.name for c in checkpoints(ref)]
        check_after_kill(out, ref, loader)
        assert_same_tensors(out / "adapter" / "adapter_model.safetensors", ref / "adapter" / "adapter_model.safetensors")
        assert_same_metrics(out, ref)
        final = json.loads((checkpoints(out)[-1] / "trainer_state.json").read_text())
        assert final["global_step"] == MAX_STEPS
        loader.check(out / "adapter", peft=True)
    print(f"\nkills: {kinds_hit}")
    assert len(kinds_hit) >= 3, f"too few runs were killed before they finished: {kinds_hit}"
    assert any(k.startswith("setup") for k in kinds_hit) and any(k.startswith("save") for k in kinds_hit), kinds_hit


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


def test_full_disk_during_a_save(binary: Path, model_dir: Path, reference: dict[str, Any], loader: Loader,
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
        cfg.write_text(config_text(model_dir, out))
        proc = subprocess.run([binary, "train", "--config", cfg], capture_output=True, text=True, timeout=600, env=ENV)
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
    cfg.write_text(config_text(model_dir, moved))
    done = subprocess.run([binary, "train", "--config", cfg, "--resume", moved], capture_output=True, text=True,
                          timeout=600, env=ENV)
    assert done.returncode == 0, done.stderr
    assert_same_tensors(moved / "adapter" / "adapter_model.safetensors", ref / "adapter" / "adapter_model.safetensors")
    assert_same_metrics(moved, ref)


def test_full_disk_through_the_python_api(model_dir: Path, reference: dict[str, Any], tmp_path: Path) -> None:
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
            loratch.train(train_dict(model_dir, out), resume=out)
        message = str(info.value)
        assert "cannot save this checkpoint" in message and f"{out / first.name}, is intact" in message, message
        assert [c.name for c in checkpoints(out)] == [first.name] and hidden_leftovers(out) == []
        for f in ["adapter_model.safetensors", "optimizer.safetensors"]:
            assert_same_tensors(out / first.name / f, first / f)
    finally:
        umount(disk)


def test_file_size_limit_during_a_save(binary: Path, model_dir: Path, reference: dict[str, Any],
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
    cfg.write_text(config_text(model_dir, out))

    def limit_file_size() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = subprocess.run([binary, "train", "--config", cfg, "--resume", out], capture_output=True, text=True,
                          timeout=600, env=ENV, preexec_fn=limit_file_size)
    assert_clean_failure(proc.returncode, proc.stderr, "File too large", out / first.name)
    assert [c.name for c in checkpoints(out)] == [first.name] and hidden_leftovers(out) == []
    for f in CHECKPOINT_FILES:
        assert (out / first.name / f).read_bytes() == (first / f).read_bytes(), f
    done = subprocess.run([binary, "train", "--config", cfg, "--resume", out], capture_output=True, text=True,
                          timeout=600, env=ENV)
    assert done.returncode == 0, done.stderr
    assert_same_tensors(out / "adapter" / "adapter_model.safetensors", ref / "adapter" / "adapter_model.safetensors")
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


def test_malicious_pickles_are_rejected_and_never_run(binary: Path, model_dir: Path, reference: dict[str, Any],
                                                      tmp_path: Path) -> None:
    evil, marker = tmp_path / "evil", tmp_path / "pwned"
    evil.mkdir()
    subprocess.run([sys.executable, "-c", EVIL, str(evil), str(marker)], check=True, timeout=120)
    shutil.copy(reference["out"] / "adapter" / "adapter_config.json", evil / "peft-dir" / "adapter_config.json")
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
        subprocess.run([sys.executable, "-c", live], timeout=120, capture_output=True)
        assert marker.exists(), live
        marker.unlink()

    name = "evil-target"
    loratch.torch_hf_load_model_lora(name, model_dir, {"device": "cpu"})
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
    for args in (["merge", "--model", model_dir, "--adapter", evil / "exec.bin", "--out", tmp_path / "merged"],
                 ["generate", "--model", model_dir, "--adapter", evil / "system.pt", "--prompt", "hi",
                  "--max-new-tokens", "1"]):
        proc = subprocess.run([binary, *args], capture_output=True, text=True, timeout=600, env=ENV)
        assert proc.returncode == 1 and "is not allowed" in proc.stderr and "panicked" not in proc.stderr, proc.stderr
        assert not marker.exists()
    out = tmp_path / "out"
    ckpt = out / f"checkpoint-{SAVE_STEPS}"
    shutil.copytree(reference["out"] / ckpt.name, ckpt)
    (ckpt / "adapter_model.safetensors").unlink()
    shutil.copy(evil / "peft-dir" / "adapter_model.bin", ckpt / "adapter_model.bin")
    cfg = tmp_path / "resume.toml"
    cfg.write_text(config_text(model_dir, out))
    proc = subprocess.run([binary, "train", "--config", cfg, "--resume", out], capture_output=True, text=True,
                          timeout=600, env=ENV)
    assert proc.returncode == 1 and "exec is not allowed" in proc.stderr, proc.stderr
    assert not marker.exists()


# --- a fresh run into a used output_dir --------------------------------------------------------


def test_a_fresh_run_never_mixes_with_an_earlier_runs_checkpoints(binary: Path, model_dir: Path,
                                                                 reference: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "used"
    shutil.copytree(reference["out"], out)
    (out / "notes.txt").write_text("mine")
    before = {p.name for p in out.iterdir()}
    cfg = tmp_path / "fresh.toml"
    cfg.write_text(config_text(model_dir, out))
    proc = subprocess.run([binary, "train", "--config", cfg], capture_output=True, text=True, timeout=600, env=ENV)
    assert proc.returncode == 1, proc.stderr
    assert "config error" in proc.stderr and "--resume" in proc.stderr and "overwrite_output_dir" in proc.stderr
    assert f"checkpoint-{MAX_STEPS}" in proc.stderr
    with pytest.raises(loratch.ConfigError, match="overwrite_output_dir"):
        loratch.train(train_dict(model_dir, out))
    assert {p.name for p in out.iterdir()} == before  # refused before touching anything
    # With overwrite_output_dir the old checkpoints and adapter go; the user's file stays.
    result = loratch.train(train_dict(model_dir, out, max_steps=SAVE_STEPS, overwrite_output_dir=True))
    assert result["global_step"] == SAVE_STEPS
    assert [c.name for c in checkpoints(out)] == [f"checkpoint-{SAVE_STEPS}"]
    assert (out / "notes.txt").read_text() == "mine"
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())
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
    assert_same_tensors(out / "adapter" / "adapter_model.safetensors", ref / "adapter" / "adapter_model.safetensors")
    assert_same_metrics(out, ref)
    assert hidden_leftovers(out) == []


def test_two_runs_started_together_never_mix(binary: Path, model_dir: Path, reference: dict[str, Any],
                                            tmp_path: Path) -> None:
    ref: Path = reference["out"]
    out = tmp_path / "shared"
    cfg = tmp_path / "shared.toml"
    cfg.write_text(config_text(model_dir, out))
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


def test_the_python_api_takes_the_same_lock(binary: Path, model_dir: Path, reference: dict[str, Any],
                                            tmp_path: Path) -> None:
    ref: Path = reference["out"]
    out = tmp_path / "out"
    cfg = tmp_path / "cli.toml"
    cfg.write_text(config_text(model_dir, out))
    proc = start_run(binary, cfg, tmp_path / "stderr.txt")
    wait_for_lock(out, proc)
    for resume in (None, out):
        with pytest.raises(loratch.StateError, match=f"in use by another loratch run \\(pid {proc.pid}") as info:
            loratch.train(train_dict(model_dir, out, overwrite_output_dir=True), resume=resume)
        assert isinstance(info.value, RuntimeError)
    assert proc.poll() is None, "loratch.train did not fail at once"
    assert proc.wait(timeout=600) == 0, (tmp_path / "stderr.txt").read_text()
    assert_same_run(out, ref)


def test_a_lock_left_by_a_killed_run_blocks_nobody(binary: Path, model_dir: Path, reference: dict[str, Any],
                                                   tmp_path: Path) -> None:
    ref: Path = reference["out"]
    out = tmp_path / "out"
    cfg = tmp_path / "killed.toml"
    cfg.write_text(config_text(model_dir, out))
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
    result = loratch.train(train_dict(model_dir, copy), resume=copy)
    assert result["global_step"] == MAX_STEPS and hidden_leftovers(copy) == []
    # In this process (its own thread count) the sums may round differently from the binary's.
    assert [c.name for c in checkpoints(copy)] == [c.name for c in checkpoints(ref)]
    got, want = metrics(copy), metrics(ref)
    assert [(r["step"], sorted(r)) for r in got] == [(r["step"], sorted(r)) for r in want]
    for g, w in zip(got, want):
        assert g == pytest.approx(w, rel=1e-5), (g, w)
