"""Every bad input to the basic LoRA API raises its typed exception with a message naming the
problem. Each case runs in a subprocess, so an abort or segfault fails the test instead of
killing pytest."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from helpers import run_py

SETUP = """
import torch, loratch, sys
from pathlib import Path
tmp = Path(sys.argv[1])
layer = loratch.torch_lora_linear(8, 4, 2, 4.0)
def saved(rank=2, alpha=4.0, i=8, o=4, rslora=False):
    l = loratch.torch_lora_linear(i, o, rank, alpha, use_rslora=rslora)
    p = tmp / f"a_{rank}_{alpha}_{i}_{o}_{rslora}.safetensors"
    loratch.torch_lora_save_adapters(l, p)
    return p
"""

# (id, code that must raise, expected exception name, substring of the message)
CASES = [
    ("rank-zero", "loratch.torch_lora_linear(8, 4, 0, 4.0)", "ConfigError", "rank"),
    ("rank-negative", "loratch.torch_lora_linear(8, 4, -1, 4.0)", "ConfigError", "rank"),
    ("alpha-zero", "loratch.torch_lora_linear(8, 4, 2, 0.0)", "ConfigError", "alpha"),
    ("alpha-nan", "loratch.torch_lora_linear(8, 4, 2, float('nan'))", "ConfigError", "alpha"),
    ("dropout-one", "loratch.torch_lora_linear(8, 4, 2, 1.0, dropout=1.0)", "ConfigError", "dropout"),
    ("features-zero", "loratch.torch_lora_linear(0, 4, 2, 1.0)", "ConfigError", "in_features"),
    ("rank-float", "loratch.torch_lora_linear(8, 4, 2.5, 1.0)", "TypeError", "rank"),
    ("dtype-unknown", "loratch.torch_lora_linear(8, 4, 2, 1.0, dtype='int8')", "DTypeError", "int8"),
    ("device-unknown", "loratch.torch_lora_linear(8, 4, 2, 1.0, device='tpu')", "DeviceError", "tpu"),
    ("device-absent", "loratch.torch_lora_linear(8, 4, 2, 1.0, device='cuda:7')", "DeviceError", "cuda:7"),
    ("device-malformed", "loratch.torch_lora_linear(8, 4, 2, 1.0, device='cuda:x')", "DeviceError", "cuda:x"),
    ("input-last-dim", "loratch.torch_lora_forward(layer, torch.randn(3, 7))", "ShapeError", "in_features=8"),
    ("input-scalar", "loratch.torch_lora_forward(layer, torch.tensor(1.0))", "ShapeError", "in_features"),
    ("input-not-tensor", "loratch.torch_lora_forward(layer, [[1.0] * 8])", "TypeError", "torch.Tensor"),
    ("input-numpy", "import numpy; loratch.torch_lora_forward(layer, numpy.zeros((2, 8)))", "TypeError", "ndarray"),
    ("input-dtype", "loratch.torch_lora_forward(layer, torch.randn(3, 8, dtype=torch.float64))", "DTypeError", "float64"),
    ("input-int", "loratch.torch_lora_forward(layer, torch.ones(3, 8, dtype=torch.int64))", "DTypeError", "int64"),
    ("layer-not-layer", "loratch.torch_lora_forward(object(), torch.randn(3, 8))", "TypeError", "LoraLinear"),
    ("apply-not-linear", "loratch.torch_lora_apply_to_linear(torch.nn.Conv1d(2, 2, 1), 2, 4.0)", "TypeError", "Linear"),
    ("apply-int-linear", "l = torch.nn.Linear(4, 4); l.weight = torch.nn.Parameter(l.weight.data.long(), requires_grad=False); loratch.torch_lora_apply_to_linear(l, 2, 4.0)", "DTypeError", "int64"),
    ("merge-twice", "loratch.torch_lora_merge_weights(layer); loratch.torch_lora_merge_weights(layer)", "StateError", "already merged"),
    ("unmerge-unmerged", "loratch.torch_lora_unmerge_weights(layer)", "StateError", "not merged"),
    ("merge-nan", "layer.lora_B.data.fill_(float('nan')); loratch.torch_lora_merge_weights(layer)", "NonFiniteError", "NaN"),
    ("load-missing", "loratch.torch_lora_load_adapters(layer, tmp / 'nope.safetensors')", "FileNotFoundError", "nope.safetensors"),
    ("load-directory", "loratch.torch_lora_load_adapters(layer, tmp)", "OSError", str("")),
    ("load-rank-mismatch", "loratch.torch_lora_load_adapters(layer, saved(rank=3))", "AdapterFormatError", "rank"),
    ("load-alpha-mismatch", "loratch.torch_lora_load_adapters(layer, saved(alpha=8.0))", "AdapterFormatError", "alpha"),
    ("load-shape-mismatch", "loratch.torch_lora_load_adapters(layer, saved(i=9))", "AdapterFormatError", "in_features"),
    ("load-rslora-mismatch", "loratch.torch_lora_load_adapters(layer, saved(rslora=True))", "AdapterFormatError", "use_rslora"),
    ("load-truncated", "p = saved(); b = p.read_bytes(); p.write_bytes(b[: len(b) // 2]); loratch.torch_lora_load_adapters(layer, p)", "AdapterFormatError", "safetensors"),
    ("load-garbage", "p = tmp / 'g.safetensors'; p.write_bytes(b'\\xff' * 64); loratch.torch_lora_load_adapters(layer, p)", "AdapterFormatError", "safetensors"),
    ("load-empty", "p = tmp / 'e.safetensors'; p.write_bytes(b''); loratch.torch_lora_load_adapters(layer, p)", "AdapterFormatError", "safetensors"),
    ("load-foreign-safetensors", "import safetensors.torch as st; p = tmp / 'f.safetensors'; st.save_file({'x': torch.zeros(2)}, p); loratch.torch_lora_load_adapters(layer, p)", "AdapterFormatError", "loratch_format"),
    ("load-nan-values", "import safetensors.torch as st; p = saved(); t = st.load_file(p); t['lora_B.weight'].fill_(float('nan')); st.save_file(t, p, metadata=st.safe_open(p, 'pt').metadata()); loratch.torch_lora_load_adapters(layer, p)", "AdapterFormatError", "NaN"),
    ("load-into-merged", "p = saved(); loratch.torch_lora_merge_weights(layer); loratch.torch_lora_load_adapters(layer, p)", "StateError", "merged"),
    ("save-missing-dir", "loratch.torch_lora_save_adapters(layer, tmp / 'no' / 'dir' / 'a.safetensors')", "FileNotFoundError", "no/dir"),
    ("save-path-type", "loratch.torch_lora_save_adapters(layer, 42)", "TypeError", "path"),
]


@pytest.mark.parametrize(("code", "exc", "needle"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_raises_typed_error(tmp_path: Path, code: str, exc: str, needle: str) -> None:
    program = SETUP + textwrap.dedent(
        f"""
        try:
            {code}
        except BaseException as e:
            import builtins
            expected = getattr(loratch.errors, {exc!r}, None) or getattr(builtins, {exc!r})
            print("RAISED", type(e).__name__, isinstance(e, expected), repr(str(e)))
        else:
            print("NO-ERROR")
        """
    )
    proc = run_py(program, tmp_path)
    assert proc.returncode == 0, f"crashed (rc={proc.returncode}): {proc.stderr[-2000:]}"
    out = proc.stdout.strip().splitlines()[-1]
    assert out.startswith("RAISED"), out
    _, name, is_expected, message = out.split(" ", 3)
    assert is_expected == "True", f"expected {exc}, got {name}: {message}"
    assert needle in message, f"message {message} does not name {needle!r}"


def test_typed_errors_share_a_base_and_builtins() -> None:
    import loratch

    for name in ("ShapeError", "ConfigError", "AdapterFormatError", "NonFiniteError"):
        cls = getattr(loratch, name)
        assert issubclass(cls, loratch.LoraError) and issubclass(cls, ValueError)
    assert issubclass(loratch.DTypeError, TypeError)
    assert issubclass(loratch.DeviceError, RuntimeError) and issubclass(loratch.StateError, RuntimeError)
    assert len(CASES) >= 30
