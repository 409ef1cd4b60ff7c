#!/usr/bin/env bash
# One command for a machine with an NVIDIA GPU: build cubecore's CUDA kernels in place against the CUDA torch
# already installed (nothing is installed or replaced), run the CUDA tests (kernel against the float64
# reference, the rule family, opcheck, torch.compile fullgraph) and the emulated ones beside them, then the
# benchmarks on the GPU in one run: every size of the lattice rule and the `nca` sizes (the 3D artefacts NCA:
# C = 20, F = 3, [64, 64], Moore, 32^3, B = 5, T = 48), where the kernel (the FMA path, TF32 off), eager (cuDNN),
# torch.compile (default and reduce-overhead) and checkpointed run with TF32 off, and the kernel's tensor cores,
# eager and torch.compile again at tf32 and under bfloat16 autocast (`-tf32`, `-bf16` rows), each precision's
# target against the pure PyTorch rows at the same switches.  Results: benchmarks/results/cuda.{md,json,png}; the
# log on stdout.
#   PYTHON (default python3), TORCH_CUDA_ARCH_LIST (default: the GPU's own), BENCH_ARGS (e.g. --quick)
set -euo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-python3}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$py" - <<'PY'
import torch
assert torch.cuda.is_available(), "no CUDA device visible to torch: scripts/gpu_check.sh needs a GPU"
assert torch.version.cuda, f"torch {torch.__version__} is not a CUDA build"
print("torch", torch.__version__, "CUDA", torch.version.cuda, "GPU", torch.cuda.get_device_name(),
      torch.cuda.get_device_properties(0).multi_processor_count, "SMs")
PY
export MAX_JOBS="${MAX_JOBS:-8}"
"$py" setup.py build_ext --inplace > build.log 2>&1 || { tail -n 40 build.log; exit 1; }
"$py" -c "import cubecore, json; i = cubecore.info(); print(json.dumps(i)); assert i['cuda_kernel'], i"
echo "== CUDA tests"
"$py" -m pytest -q -p no:cacheprovider tests/ops/test_front.py tests/ops/test_rule_family.py \
  tests/ops/test_cuda_emulated.py -k "cuda or emulated"
echo "== benchmarks on the GPU (every size, nca included)"
# shellcheck disable=SC2086
"$py" -m benchmarks --device cuda --out benchmarks/results ${BENCH_ARGS:-}
grep -q "nca" benchmarks/results/cuda.md || { echo "the nca size did not run on the GPU" >&2; exit 1; }
