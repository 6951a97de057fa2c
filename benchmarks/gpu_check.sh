#!/usr/bin/env bash
# Device check for the cuda backend on a machine with an NVIDIA GPU. Installs nothing.
#
#   benchmarks/gpu_check.sh            # from anywhere; uses $PYTHON, else .venv/bin/python, else python3
#
# Needs an environment where llmkit, llmkit-backend-cuda and llmkit-triton-kernels are installed
# on top of a CUDA build of torch (e.g. `pip install -e . -e backends/triton -e backends/cuda` after
# installing torch from the CUDA index). Steps, a few minutes in all:
#   1. nvidia-smi and torch.cuda: the GPU, driver, compute capability, torch/CUDA versions;
#   2. tests/test_cuda_backend.py on the device (its device tests skip without CUDA, so a run with
#      skips here means the environment is wrong, and this script fails);
#   3. llmkit certify --backend cuda --quick, written to benchmarks/results/cert-cuda-quick-<gpu>.json,
#      then verify-cert and the matrix of that certificate.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-}
if [[ -z "$PY" ]]; then
    if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi

echo "== GPU"
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv
else
    echo "nvidia-smi not found (continuing: torch.cuda decides)"
fi

echo "== torch"
GPU=$("$PY" - <<'PY'
import re, sys
import torch
print(f"torch {torch.__version__} cuda {torch.version.cuda} hip {getattr(torch.version, 'hip', None)}", file=sys.stderr)
if torch.version.cuda is None or not torch.cuda.is_available():
    sys.exit("torch has no usable CUDA device here: install a CUDA build of torch, check the driver")
for mod in ("llmkit", "llmkit_backend_cuda", "llmkit_triton"):
    __import__(mod)
name = torch.cuda.get_device_name(0)
major, minor = torch.cuda.get_device_capability(0)
print(f"device 0: {name}, sm_{major}{minor}", file=sys.stderr)
print(re.sub(r"[^a-z0-9]+", "-", name.lower().removeprefix("nvidia ")).strip("-"))
PY
)
OUT=benchmarks/results/cert-cuda-quick-${GPU}.json
mkdir -p benchmarks/results

# A failing test does not stop the certification: on a borrowed GPU both results are wanted from
# one run. The script's status is still a failure if either step failed.
echo "== tests/test_cuda_backend.py (device tests must run, not skip)"
tests=0
"$PY" -m pytest -q -p no:cacheprovider tests/test_cuda_backend.py -rs | tee /tmp/llmkit-gpu-check-pytest.txt || tests=$?
if grep -q "needs an NVIDIA GPU" /tmp/llmkit-gpu-check-pytest.txt; then
    echo "device tests were skipped: this environment does not see the GPU" >&2
    exit 1
fi

echo "== llmkit certify --backend cuda --quick -> $OUT"
"$PY" -m llmkit info
"$PY" -m llmkit certify --backend cuda --quick --out "$OUT"
"$PY" -m llmkit verify-cert "$OUT"
"$PY" -m llmkit matrix "$OUT"
echo "certificate: $OUT"
if [[ $tests != 0 ]]; then
    echo "tests/test_cuda_backend.py failed (exit $tests); the certificate above was still written" >&2
    exit "$tests"
fi
