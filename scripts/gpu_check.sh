#!/usr/bin/env bash
# One command for a machine with an NVIDIA GPU: build cubecore's CUDA kernels in place against the CUDA torch
# already installed (nothing is installed or replaced), run the CUDA tests (kernel against the float64
# reference, the rule family, opcheck, torch.compile fullgraph) and the emulated ones beside them, then the
# benchmarks on the GPU: every size of the lattice rule and the `nca` size (the 3D artefacts NCA: C = 20, F = 3,
# [64, 64], Moore, 32^3, B = 5, T = 48), then the `nca` size's kernel on tensor cores (#37: precision ieee, tf32,
# bfloat16).  Results: benchmarks/results/cuda.{md,json,png}, benchmarks/results/cuda_tensor_cores.json; the log
# on stdout.
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
echo "== the nca size's kernel by precision (tensor cores: tf32 where the matmul switch allows, bf16 under autocast)"
"$py" - <<'PY'
import json, torch
from benchmarks.nca import kernel
from benchmarks.run import nca_size
size, rows = nca_size(), []
for name in ("ieee", "tf32", "bfloat16"):
    torch.backends.cuda.matmul.fp32_precision = "tf32" if name == "tf32" else "ieee"
    inputs = size.make_inputs("cuda", torch.float32)
    def run():
        for t in inputs:
            if isinstance(t, torch.Tensor) and t.grad is not None:
                t.grad = None
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=name == "bfloat16"):
            out = kernel(*inputs, **size.rule())
        size.loss(out).backward()
    run()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        run()
    end.record()
    torch.cuda.synchronize()
    rows.append({"precision": name, "ms": start.elapsed_time(end) / 5, "peak_bytes": torch.cuda.max_memory_allocated(),
                 "gpu": torch.cuda.get_device_name()})
    print(rows[-1])
torch.backends.cuda.matmul.fp32_precision = "ieee"
json.dump(rows, open("benchmarks/results/cuda_tensor_cores.json", "w"), indent=1)
PY
