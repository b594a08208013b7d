"""Checks at the moment of use: the data inspector (``loratch data``, ``loratch.inspect_data`` and
the trainer's warnings), the one-line LoRA target summary with its partial-match warning, and
``loratch merge --verify``."""

from __future__ import annotations

import importlib.util
import json
import os
import tomllib
import warnings
from pathlib import Path
from typing import Any

import pytest
from helpers import randomize_adapters, run_cli
from tiny_models import trainer_toml

import loratch
from loratch.default_model import default_model_dir

REPO = Path(__file__).resolve().parents[2]


def faq_jsonl() -> Path:
    """The FAQ demo's data (the Makefile's LORATCH_FAQ_JSONL)."""
    env = os.environ.get("LORATCH_FAQ_JSONL")
    if env:
        return Path(env)
    spec = importlib.util.find_spec("zaragoza_construction_faq")
    assert spec is not None and spec.submodule_search_locations, "pip install zaragoza-construction-faq"
    return Path(spec.submodule_search_locations[0]) / "data" / "faq-en-alpaca.jsonl"


def faq_config(tmp_path: Path) -> dict[str, Any]:
    """examples/faq_demo.toml with SmolLM2's directory and the FAQ data filled in."""
    config = tomllib.loads((REPO / "examples" / "faq_demo.toml").read_text())
    config.update(model=str(default_model_dir()), data=str(faq_jsonl()), output_dir=str(tmp_path / "out"))
    return config


def test_faq_demo_data_counts_match_transformers(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    config = faq_config(tmp_path)
    report = loratch.inspect_data(config)
    assert report["warnings"] == [], report["text"]
    # Independent counts: transformers renders and encodes each conversation; the trained span
    # of a turn runs from the end of the generation prompt to <|im_end|> (the "\n" after it is
    # not trained), cut at max_seq_length.
    tok = AutoTokenizer.from_pretrained(default_model_dir())
    max_len = config["training"]["max_seq_length"]
    tokens = targets = truncated = examples = 0
    for line in faq_jsonl().read_text().splitlines():
        r = json.loads(line)
        user = r["instruction"] + (f"\n\n{r['input']}" if r["input"] else "")
        msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": r["output"]}]
        ids = tok(tok.apply_chat_template(msgs, tokenize=False), add_special_tokens=False).input_ids
        start = len(tok(tok.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True),
                        add_special_tokens=False).input_ids)
        assert tok.decode(ids[-2:]) == "<|im_end|>\n"
        n = min(len(ids), max_len)
        t = max(0, min(len(ids) - 1, n) - start)
        truncated += len(ids) > max_len
        if t > 0:
            tokens, targets, examples = tokens + n, targets + t, examples + 1
    assert (report["records"], report["examples"]) == (503, examples)
    assert (report["tokens"], report["target_tokens"], report["truncated"]) == (tokens, targets, truncated)
    assert report["eos_targets"] == examples
    assert report["train_examples"] + report["validation_examples"] == examples
    assert report["packing"] == "rows" and report["rows"] >= report["batches"] > 0
    assert 0.0 <= report["padding_fraction"] < 0.5
    first = report["samples"][0]
    assert first["record"] == 1 and len(report["samples"]) == 3
    answer = json.loads(faq_jsonl().read_text().splitlines()[0])["output"]
    assert f"\u27e6{answer}<|im_end|>\u27e7" in first["marked"]
    assert "".join(text for text, trained in first["spans"] if trained) == answer + "<|im_end|>"


def test_cli_data_prints_the_same_report(tmp_path: Path, binary: Path) -> None:
    config = faq_config(tmp_path)
    sets = [f"--set={k}={json.dumps(config[k])}" for k in ("model", "data", "output_dir")]
    out = run_cli(binary, "data", "--config", REPO / "examples" / "faq_demo.toml", *sets, "--show", "2")
    assert out.returncode == 0, out.stderr
    report = loratch.inspect_data(config, show=2)
    assert out.stdout == report["text"]
    assert "503 records" in out.stdout and "warning" not in out.stdout
    assert out.stdout.count("--- record ") == 2


def test_warnings_reach_the_report_the_cli_and_the_trainer(
    trainable_dir: Path, tmp_path: Path, binary: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # One record whose question fills max_seq_length: nothing of its answer is left.
    data = tmp_path / "data.jsonl"
    lines = (trainable_dir / "data.jsonl").read_text().splitlines()[:8]
    lines.append(json.dumps({"instruction": "why " * 80, "input": "", "output": "Because."}))
    data.write_text("\n".join(lines) + "\n")
    config = {"model": str(trainable_dir), "data": str(data), "output_dir": str(tmp_path / "out"),
              "training": {"max_seq_length": 96, "batch_size": 2, "max_steps": 1}}
    report = loratch.inspect_data(config)
    assert capsys.readouterr() == ("", ""), "inspect_data prints nothing unless asked"
    assert [w["kind"] for w in report["warnings"]] == ["no_target_after_truncation"]
    assert "record 9" in report["warnings"][0]["message"]
    assert (report["records"], report["examples"], report["no_target_after_truncation"]) == (9, 8, 1)
    loratch.inspect_data(config, verbose=True)
    assert "warning: 1 record(s) (first: record 9)" in capsys.readouterr().err
    toml = trainer_toml(trainable_dir, tmp_path / "run", seed=0, lora={"rank": 2, "alpha": 4.0},
                        training={"max_seq_length": 96, "batch_size": 2, "max_steps": 1})
    toml = toml.replace(json.dumps(str(trainable_dir / "data.jsonl")), json.dumps(str(data)))
    (tmp_path / "run.toml").write_text(toml.replace("validation_split = 0.2", "validation_split = 0.0"))
    run = run_cli(binary, "train", "--config", tmp_path / "run.toml")
    assert run.returncode == 0, run.stderr
    assert f"warning: {report['warnings'][0]['message']}" in run.stderr
    # The trainer's LoRA summary: the tiny Llama's layers, every default target.
    assert "LoRA on 2 layers x [" in run.stderr and "warning: target_modules" not in run.stderr


def test_partial_target_match_warns_naming_the_layers(
    tiny_model: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    d = tiny_model("llama", 0, num_hidden_layers=4)
    loratch.torch_hf_load_model_lora("cov", d)
    capsys.readouterr()  # the tiny model's own output while it was written
    try:
        with pytest.warns(loratch.LoraWarning, match=r"q_proj in 2 of 4 layers \(not in layers 2-3\)"):
            loratch.torch_hf_lora_init("cov", 2, 4.0, r"model\.layers\.[01]\.self_attn\.q_proj")
        assert capsys.readouterr().err == "LoRA on 2 of 4 layers x [q_proj] (2 modules)\n"
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            loratch.torch_hf_lora_init("cov", 2, 4.0, ["q_proj", "v_proj"])
        assert capsys.readouterr().err == "LoRA on 4 layers x [q_proj v_proj] (8 modules)\n"
        # Layers chosen on purpose (layers_to_transform) are not a mistake.
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            loratch.torch_hf_lora_init("cov", 2, 4.0, ["q_proj"], layers=[0, 1])
        assert capsys.readouterr().err == "LoRA on 2 of 4 layers x [q_proj] (2 modules)\n"
    finally:
        loratch.torch_hf_unload("cov")


@pytest.fixture()
def base(tiny_model: Any) -> Any:
    d = tiny_model("qwen2", 31)
    loratch.torch_hf_load_model_lora("ver", d)
    yield d
    loratch.torch_hf_unload("ver")


def test_merge_verify(base: Path, binary: Path, tmp_path: Path) -> None:
    loratch.torch_hf_lora_init("ver", 4, 8.0, "all-linear")
    loratch.torch_hf_lora_save("ver", tmp_path / "zero")
    randomize_adapters("ver", 0.05, seed=0)
    loratch.torch_hf_lora_save("ver", tmp_path / "good")
    good = run_cli(binary, "merge", "--model", base, "--adapter", tmp_path / "good", "--out", tmp_path / "m1",
                   "--verify")
    assert good.returncode == 0, good.stderr
    assert "verify: merged vs base + adapter" in good.stderr and (tmp_path / "m1" / "model.safetensors").is_file()
    # A fresh adapter (B = 0) changes nothing: refused, nothing written.
    zero = run_cli(binary, "merge", "--model", base, "--adapter", tmp_path / "zero", "--out", tmp_path / "m2",
                   "--verify", "--verify-prompt", "hello there")
    assert zero.returncode == 1 and "merge verification failed" in zero.stderr
    assert "changes nothing" in zero.stderr and not (tmp_path / "m2").exists()
    # Without --verify the same merge is written (the check is opt-in).
    plain = run_cli(binary, "merge", "--model", base, "--adapter", tmp_path / "zero", "--out", tmp_path / "m3")
    assert plain.returncode == 0 and (tmp_path / "m3").is_dir()
