"""Hub ids from the local Hugging Face cache (built here as huggingface_hub lays it out, and read
back by huggingface_hub itself), other tools' config key names in ``loratch.train``, and advice
and data errors in the caller's words."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

import loratch


def add_to_cache(cache: Path, repo_id: str, model_dir: Path, commit: str, refs: list[str]) -> Path:
    """``model_dir``'s files as huggingface_hub caches a download: blobs named by their sha256,
    symlinked from ``snapshots/<commit>/``, and ``refs/<name>`` holding the commit."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    for d in (repo / "blobs", snapshot, repo / "refs"):
        d.mkdir(parents=True, exist_ok=True)
    for f in sorted(model_dir.iterdir()):
        if f.is_file() and f.suffix in {".json", ".safetensors", ".jinja"}:
            digest = hashlib.sha256(f.read_bytes()).hexdigest()
            if not (repo / "blobs" / digest).exists():
                shutil.copy(f, repo / "blobs" / digest)
            (snapshot / f.name).symlink_to(Path("../../blobs") / digest)
    for r in refs:
        (repo / "refs" / r).write_text(commit)
    return snapshot


def test_hub_ids_load_from_the_local_cache_at_a_revision(
    tiny_model: Callable[..., Path], trainable_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import scan_cache_dir, snapshot_download

    a, b = tiny_model("llama", seed=1), tiny_model("llama", seed=2)
    cache = tmp_path / "hub"
    ca, cb = "a" * 40, "b" * 40
    snap_a = add_to_cache(cache, "org/tiny", a, ca, ["main"])
    snap_b = add_to_cache(cache, "org/tiny", b, cb, ["v2"])
    add_to_cache(cache, "org/trainable", trainable_dir, "c" * 40, ["main"])
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    # huggingface_hub reads this cache as its own, offline.
    repos = {r.repo_id: r for r in scan_cache_dir(cache).repos}
    assert {r.commit_hash for r in repos["org/tiny"].revisions} == {ca, cb}
    assert snapshot_download("org/tiny", cache_dir=cache, local_files_only=True) == str(snap_a)
    assert snapshot_download("org/tiny", revision="v2", cache_dir=cache, local_files_only=True) == str(snap_b)

    ids = torch.tensor([[1, 5, 9, 2, 7]])

    def logits(path: str | Path, **kw: Any) -> torch.Tensor:
        loratch.torch_hf_load_model_lora("hub", path, **kw)
        try:
            return loratch.torch_hf_forward("hub", ids)
        finally:
            loratch.torch_hf_unload("hub")

    assert torch.equal(logits("org/tiny"), logits(a))
    assert torch.equal(logits("org/tiny", revision="v2"), logits(b))
    assert torch.equal(logits("org/tiny@v2"), logits(b))
    assert torch.equal(logits("org/tiny", revision=cb), logits(b))
    assert not torch.equal(logits("org/tiny"), logits(b))
    text = "Who handles building permits?"
    by_id = loratch.torch_hf_tokenizer_load("org/trainable", revision="main")
    assert by_id.encode(text) == loratch.torch_hf_tokenizer_load(trainable_dir).encode(text)

    with pytest.raises(FileNotFoundError) as missing:
        loratch.torch_hf_load_model_lora("x", "org/missing")
    for part in [str(cache), "HF_HUB_CACHE", "`hf download org/missing`", "huggingface-cli download org/missing"]:
        assert part in str(missing.value)
    with pytest.raises(FileNotFoundError, match="refs there: main, v2"):
        loratch.torch_hf_load_model_lora("x", "org/tiny", revision="nope")
    with pytest.raises(loratch.ConfigError, match="Hub ids"):
        loratch.torch_hf_load_model_lora("x", a, revision="main")
    assert "x" not in loratch.torch_hf_list_models()


def test_train_takes_other_tools_key_names_and_speaks_python(
    trainable_dir: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    config: dict[str, Any] = {
        "model_name_or_path": str(trainable_dir),
        "data": str(trainable_dir / "data.jsonl"),
        "output_dir": str(out),
        "r": 4,
        "lora_alpha": 8,
        "target_modules": "all-linear",
        "max_steps": 2,
        "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 1,
        "learning_rate": 1e-3,
        "warmup_steps": 100,
        "max_length": 64,
        "eval_steps": 0,
    }
    with pytest.warns(UserWarning) as caught:
        result = loratch.train(config)
    notes = {str(w.message) for w in caught}
    for note in [
        'note: "model_name_or_path" is loratch\'s model',
        'note: "r" is loratch\'s [lora] rank',
        'note: "lora_alpha" is loratch\'s [lora] alpha',
        'note: "per_device_train_batch_size" is loratch\'s [training] batch_size',
        'note: "learning_rate" at the top level is loratch\'s [training] learning_rate',
    ]:
        assert note in notes, notes
    assert result["global_step"] == 2
    assert "warning: the warm-up (warmup_steps = 100) is as long as the run (2 optimizer steps)" in capfd.readouterr().err
    adapter = json.loads((Path(result["adapter_dir"]) / "adapter_config.json").read_text())
    assert (adapter["r"], adapter["lora_alpha"]) == (4, 8)

    # Advice names loratch.train's arguments and dict keys, not the CLI's flags.
    with pytest.warns(UserWarning), pytest.raises(loratch.CheckpointError) as other_rank:
        loratch.train({**config, "r": 2}, resume=out)
    msg = str(other_rank.value)
    assert "rank: 4 in the checkpoint, 2 in the config" in msg and 'config["lora"]["rank"] = 4' in msg, msg
    assert "--" not in msg.replace(str(out), "")
    with pytest.warns(UserWarning), pytest.raises(loratch.ConfigError) as used:
        loratch.train(config)
    assert "loratch.train(config, resume=" in str(used.value)
    assert 'config["training"]["overwrite_output_dir"] = True' in str(used.value)

    with pytest.raises(loratch.ConfigError, match="did you mean `training`"):
        loratch.train({"model": str(trainable_dir), "data": "d", "output_dir": "o", "trainig": {}})
    with pytest.raises(loratch.ConfigError, match="count of held-out examples"):
        loratch.train({"model": str(trainable_dir), "data": "d", "output_dir": "o", "val_set_size": 100})


def test_invalid_utf8_in_data_names_the_line(trainable_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "bad.jsonl"
    data.write_bytes(b'{"text": "a"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(loratch.InputError, match=r"bad\.jsonl:2: invalid UTF-8 \(byte 0xe9 at byte column 14\)"):
        loratch.train({"model": str(trainable_dir), "data": str(data), "output_dir": str(tmp_path / "o")})
