"""The trainer end to end on a tiny random Llama with SmolLM2's tokenizer: `loratch train` (the
Rust binary, TOML config), `loratch.train` (Python), Ctrl-C, non-finite losses, and 2-rank
data parallelism under torchrun (gloo on loopback)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import AdapterCheck, checkpoints, max_diff, metrics, run_cli, step_of
from tiny_models import trainer_toml

import loratch

ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IDS = torch.tensor([[1, 500, 1000, 42, 7, 9000, 3]])


def toml_config(trainable_dir: Path, out: Path, **training: Any) -> str:
    settings = {
        "max_steps": 12,
        "batch_size": 2,
        "gradient_accumulation_steps": 2,
        "learning_rate": 1e-2,
        "logging_steps": 1,
        "save_steps": 4,
        "eval_steps": 6,
        "warmup_steps": 2,
        "max_seq_length": 64,
        **training,
    }
    lora = {"rank": 8, "alpha": 16, "target_modules": ALL7, "dropout": 0.0}
    return trainer_toml(trainable_dir, out, seed=3, lora=lora, training=settings)


def test_cli_trains_writes_everything_and_peft_loads_the_adapter(binary: Path, trainable_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = tmp_path / "train.toml"
    cfg.write_text(toml_config(trainable_dir, out))
    proc = run_cli(binary, "train", "--config", cfg, "--set", "training.logging_steps=2", env=os.environ)
    assert proc.returncode == 0, proc.stderr
    assert "held-out loss:" in proc.stdout
    records = metrics(out)
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    losses = [r["loss"] for r in records if r.get("loss") is not None]
    assert len(evals) == 3  # before, at step 6, at the end
    assert evals[-1] < evals[0] - 0.5, evals
    assert losses[-1] < losses[0], losses
    assert [r["step"] for r in records if "loss" in r] == [2, 4, 6, 8, 10, 12]  # --set applied
    for r in records:
        if "loss" in r:
            assert {"learning_rate", "grad_norm", "epoch", "mean_token_accuracy", "tokens_per_s", "rss_bytes",
                    "peak_rss_bytes"} <= r.keys()
            assert "lr" not in r
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-12", "checkpoint-4", "checkpoint-8"]
    info = json.loads((out / "checkpoint-8" / "training_info.json").read_text())
    assert {"epoch", "global_step", "best_loss", "current_lr", "lora_config", "training_config"} <= info.keys()
    assert info["global_step"] == 8
    svg = (out / "loss.svg").read_text()
    assert svg.startswith("<svg") and "validation" in svg
    # The final adapter is a PEFT adapter at the root of the output directory:
    # PeftModel.from_pretrained(base, output_dir) computes the same logits as loratch with it
    # (bit for bit: alpha / rank = 2).
    assert not (out / "adapter").exists()
    with AdapterCheck(trainable_dir) as check:
        final = check.check(out, IDS)
        earlier = check.check(out / "checkpoint-4", IDS)
    assert max_diff(final, earlier) > 1e-3  # training changed the adapter


def test_python_train_matches_the_cli_run_and_rejects_unknown_keys(binary: Path, trainable_dir: Path, tmp_path: Path) -> None:
    config: dict[str, Any] = {
        "model": trainable_dir,
        "data": trainable_dir / "data.jsonl",
        "output_dir": tmp_path / "py",
        "seed": 3,
        "validation_split": 0.2,
        "lora": {"rank": 8, "alpha": 16, "target_modules": "all-linear", "dropout": 0.0},
        "training": {"max_steps": 4, "batch_size": 2, "learning_rate": 1e-2, "logging_steps": 1, "max_seq_length": 64},
    }
    result = loratch.train(config)
    assert result["global_step"] == 4 and not result["interrupted"]
    assert result["final_eval_loss"] is not None and result["initial_eval_loss"] is not None
    assert result["final_eval_loss"] < result["initial_eval_loss"]
    assert result["adapter_dir"] == str(tmp_path / "py") and (tmp_path / "py" / "adapter_model.safetensors").is_file()
    # The same config through the binary gives the same losses (one core, two front ends).
    cfg = tmp_path / "same.toml"
    out_cli = tmp_path / "cli"
    cfg.write_text(
        toml_config(trainable_dir, out_cli, max_steps=4, batch_size=2, gradient_accumulation_steps=4, learning_rate=1e-2,
                    logging_steps=1, max_seq_length=64, save_steps=100, eval_steps=50, warmup_steps=0)
        .replace('["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]', '"all-linear"')
    )
    run_cli(binary, "train", "--config", cfg, env=os.environ, check=True)
    py_losses = [r["loss"] for r in metrics(tmp_path / "py") if "loss" in r]
    cli_losses = [r["loss"] for r in metrics(out_cli) if "loss" in r]
    assert py_losses == pytest.approx(cli_losses, rel=1e-6)
    for bad, word in [
        ({**config, "learning_rate": 1.0}, "learning_rate"),
        ({**config, "training": {"lerning_rate": 1.0}}, "lerning_rate"),
        ({**config, "lora": {"rnak": 4}}, "rnak"),
    ]:
        with pytest.raises(loratch.ConfigError, match=word):
            loratch.train(bad)
    with pytest.raises(FileNotFoundError):
        loratch.train({**config, "data": tmp_path / "missing.jsonl", "output_dir": tmp_path / "unused"})
    with pytest.raises(TypeError):
        loratch.train({**config, "seed": object()})


def test_outputs_load_in_peft_and_tensorboard(trainable_dir: Path, tmp_path: Path) -> None:
    """The final adapter at the root of output_dir loads with PeftModel.from_pretrained(base,
    output_dir); report_to = ["tensorboard"] writes event files that TensorBoard's own reader
    loads, holding the metrics of metrics.jsonl under Hugging Face's tags."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "hf"
    result = loratch.train({
        "model": trainable_dir, "data": trainable_dir / "data.jsonl", "output_dir": out, "seed": 3,
        "validation_split": 0.2,
        "lora": {"rank": 8, "alpha": 16, "target_modules": "all-linear", "dropout": 0.0},
        "training": {"max_steps": 4, "batch_size": 2, "learning_rate": 1e-2, "logging_steps": 1, "eval_steps": 2,
                     "save_steps": 2, "max_seq_length": 64, "report_to": ["tensorboard"]},
    })
    assert result["adapter_dir"] == str(out) and result["tensorboard_dir"] == str(out / "runs")
    assert result["best_checkpoint"] is not None and Path(result["best_checkpoint"]).parent == out
    with AdapterCheck(trainable_dir) as check:
        final = check.check(out, IDS)
        last = check.check(out / "checkpoint-4", IDS)
    assert torch.equal(final, last)
    records = metrics(out)
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    (run,) = (out / "runs").iterdir()
    acc = EventAccumulator(str(run))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/learning_rate", "train/grad_norm", "train/epoch", "train/mean_token_accuracy",
            "eval/loss", "eval/mean_token_accuracy"} <= tags, tags
    for tag, key, rows in [("train/loss", "loss", train), ("train/learning_rate", "learning_rate", train),
                           ("train/mean_token_accuracy", "mean_token_accuracy", train),
                           ("eval/loss", "eval_loss", evals)]:
        events = acc.Scalars(tag)
        assert [e.step for e in events] == [r["step"] for r in rows], tag
        # TensorBoard keeps float32.
        assert [e.value for e in events] == [float(torch.tensor(r[key], dtype=torch.float32)) for r in rows], tag
    assert len(evals) == 3 and 0.0 <= evals[-1]["eval_mean_token_accuracy"] <= 1.0
    with pytest.raises(loratch.ConfigError, match="tensorboard"):
        loratch.train({"model": trainable_dir, "data": trainable_dir / "data.jsonl", "output_dir": tmp_path / "x",
                       "training": {"report_to": ["wandb"]}})


def test_ctrl_c_saves_a_checkpoint_and_resume_finishes_the_run(binary: Path, trainable_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "int"
    cfg = tmp_path / "int.toml"
    cfg.write_text(toml_config(trainable_dir, out, max_steps=400, save_steps=1000, eval_steps=0))
    proc = subprocess.Popen([binary, "train", "--config", cfg], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not any("loss" in r for r in metrics(out)):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupt" in err and "--resume" in err
    ckpts = checkpoints(out)
    assert len(ckpts) == 1
    stopped_at = step_of(ckpts[0])
    assert 0 < stopped_at < 400
    assert not (out / "adapter_model.safetensors").exists()  # an interrupted run has no final adapter yet
    done = run_cli(binary, "train", "--config", cfg, "--set", f"training.max_steps={stopped_at + 3}", "--resume", out,
                   env=os.environ)
    assert done.returncode == 0, done.stderr
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    assert [r["step"] for r in metrics(out) if "loss" in r][-1] == stopped_at + 3


def test_a_diverging_run_stops_with_a_clear_error_and_keeps_its_last_good_checkpoint(trainable_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "nan"
    config: dict[str, Any] = {
        "model": trainable_dir,
        "data": trainable_dir / "data.jsonl",
        "output_dir": out,
        "validation_split": 0.0,
        "lora": {"rank": 8, "alpha": 16, "target_modules": "all-linear", "dropout": 0.0},
        # An absurd learning rate: the adapters blow up after the first updates.
        "training": {"max_steps": 30, "batch_size": 2, "gradient_accumulation_steps": 1, "learning_rate": 1e30,
                     "max_grad_norm": 0.0, "logging_steps": 1, "save_steps": 1, "max_seq_length": 64,
                     "scheduler_type": "constant"},
    }
    with pytest.raises(loratch.NonFiniteError, match="non-finite") as info:
        loratch.train(config)
    message = str(info.value)
    assert "last good checkpoint" in message
    skipped = [r for r in metrics(out) if r.get("skipped")]
    assert len(skipped) == 3
    kept = checkpoints(out)[-1]
    assert kept.name in message
    assert step_of(kept) < skipped[0]["step"]
    name = "nan-check"
    loratch.torch_hf_load_model_lora(name, trainable_dir, {"device": "cpu"})
    try:
        loratch.torch_hf_lora_load(name, kept)
    finally:
        loratch.torch_hf_unload(name)


DDP_SCRIPT = """
import json, sys
import torch.distributed as dist
import loratch
dist.init_process_group("gloo")
config = json.loads(sys.argv[1])
result = loratch.train(config)
rank = dist.get_rank()
dist.destroy_process_group()
# Each rank writes its own file: the two workers share torchrun's stdout, where their lines can
# interleave ("RESULTRESULT {...}" was seen in CI).
with open(f"{sys.argv[2]}/result-{rank}.json", "w") as f:
    json.dump(result, f)
"""


def test_two_ranks_under_torchrun_equal_one_process_on_the_combined_batch(trainable_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    def config(out: Path, accum: int) -> dict[str, Any]:
        return {
            "model": str(trainable_dir), "data": str(trainable_dir / "data.jsonl"), "output_dir": str(out),
            # 30 training records: 15 batches of 2, so each epoch ends with a window of one batch,
            # where rank 1 has nothing to do (step 8) but must still join the all-reduce.
            "seed": 11, "validation_split": 0.25,
            "lora": {"rank": 4, "alpha": 8, "target_modules": "all-linear", "dropout": 0.0},
            "training": {"max_steps": 9, "batch_size": 2, "gradient_accumulation_steps": accum,
                         "learning_rate": 5e-3, "logging_steps": 1, "save_steps": 0, "max_seq_length": 64},
        }

    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ddp_out = tmp_path / "ddp"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
         "--master-port", str(29500 + os.getpid() % 1000), str(script), json.dumps(config(ddp_out, 1)), str(tmp_path)],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result_files = sorted(tmp_path.glob("result-*.json"))
    results = [json.loads(p.read_text()) for p in result_files]
    assert [p.name for p in result_files] == ["result-0.json", "result-1.json"], proc.stdout + proc.stderr[-4000:]
    assert len(results) == 2 and all(r["global_step"] == 9 for r in results), proc.stdout + proc.stderr[-4000:]
    # One process, accumulating the two ranks' micro-batches: the same window per step.
    single_out = tmp_path / "single"
    loratch.train(config(single_out, 2))
    ddp = load_file(ddp_out / "adapter_model.safetensors")
    single = load_file(single_out / "adapter_model.safetensors")
    assert ddp.keys() == single.keys()
    for k in ddp:
        torch.testing.assert_close(ddp[k], single[k], atol=1e-5, rtol=1e-4, msg=k)
    # Both ranks ended with the same adapters (each reports a checksum of its own live copy).
    assert results[0]["adapter_fingerprint"] == results[1]["adapter_fingerprint"]
    ddp_losses = [r["loss"] for r in metrics(ddp_out) if "loss" in r]
    single_losses = [r["loss"] for r in metrics(single_out) if "loss" in r]
    assert ddp_losses == pytest.approx(single_losses, rel=1e-5)
