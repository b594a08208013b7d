#!/usr/bin/env bash
# The CUDA checks and benchmark (issue #5's GPU table, issue 21's memory rows), as one command for a machine with a GPU,
# torch==2.11.0, transformers and peft, but no Rust and no network (this project's GPU machine).
#
# Here, first: `make gpu-pack` (builds the extension; copies SmolLM2's tokenizer and the FAQ data
# into .gpu/). There, from the repository root, with python/loratch/_loratch.abi3.so and .gpu/
# carried along:
#     bash benches/gpu.sh
# Writes tests.log, bench.log and BENCHMARKS-cuda.md into $OUT (default /tmp/loratch-gpu-out).
# With this project's device tool: run(command="bash benches/gpu.sh", timeout_s=580,
# carry=["python/loratch/_loratch.abi3.so", ".gpu"]). Not yet run on a GPU: the whole script has
# run on a CPU only (below), so expect to read its first CUDA run's log.
# `GPU_BENCH_ARGS="--device cpu --size tiny" bash benches/gpu.sh` runs the same on a CPU.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/loratch-gpu-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
for f in python/loratch/_loratch.abi3.so .gpu/tokenizer/tokenizer.json .gpu/faq.jsonl; do
    [[ -f $f ]] || { echo "gpu.sh: $f missing: run \`make gpu-pack\` here and carry it" >&2; exit 2; }
done
export PYTHONPATH=$PWD/python${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export LORATCH_TOKENIZER_DIR=$PWD/.gpu/tokenizer HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
$PY -c 'import torch, transformers, peft, loratch; print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
"transformers", transformers.__version__, "peft", peft.__version__, "loratch", loratch.__version__)' || exit 1

# The device tests (CPU and CUDA); -W default: another machine's library versions may warn.
$PY -m pytest -q -p no:cacheprovider -W default tests/python/test_devices.py 2>&1 | tee "$OUT/tests.log"
tests=${PIPESTATUS[0]}
# shellcheck disable=SC2086
$PY benches/gpu_bench.py --out "$OUT/BENCHMARKS-cuda.md" ${GPU_BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log"
bench=${PIPESTATUS[0]}
echo "gpu.sh: tests rc=$tests, bench rc=$bench"
exit $((tests != 0 || bench != 0))
