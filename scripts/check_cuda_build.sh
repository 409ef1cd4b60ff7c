#!/usr/bin/env bash
# Compiles cubecore's CUDA kernels with nvcc against a CUDA build of torch, in a virtual environment of its
# own, and fails if the build fails.  Needs no GPU.  The CPU install in this checkout is left untouched.
#   CUDA_HOME (default /usr/local/cuda), TORCH_CUDA_ARCH_LIST (default 9.0: H100/H200),
#   CUBECORE_CUDA_VENV (default ~/.cache/cubecore/cuda-build-venv; reused between runs)
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export MAX_JOBS="${MAX_JOBS:-2}"
venv="${CUBECORE_CUDA_VENV:-$HOME/.cache/cubecore/cuda-build-venv}"
[ -x "$CUDA_HOME/bin/nvcc" ] || { echo "nvcc not found under CUDA_HOME=$CUDA_HOME" >&2; exit 1; }
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
# torch 2.14.1 is the CUDA 13 build that lies on this machine's disk.
"$venv/bin/pip" install --quiet torch==2.14.1 setuptools wheel ninja numpy
"$venv/bin/python" -c "import torch; assert torch.version.cuda, 'torch in $venv is not a CUDA build'; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"

build="$(mktemp -d)"
trap 'rm -rf "$build"' EXIT
cp -r "$here/setup.py" "$here/pyproject.toml" "$here/README.md" "$here/cubecore" "$here/csrc" "$build/"
rm -f "$build"/cubecore/_C*.so
cd "$build"
"$CUDA_HOME/bin/nvcc" --version | tail -n 2
PATH="$CUDA_HOME/bin:$PATH" "$venv/bin/python" setup.py build_ext --inplace
so=$(ls cubecore/_C*.so)
# The library must carry device code for the requested architecture.
readelf -S "$so" | grep "\.nv_fatbin" > /dev/null || { echo "no device code (.nv_fatbin) in $so" >&2; exit 1; }
# The fatbin's entry headers name each image's kind and architecture (the images themselves may be
# compressed, so the architecture is read from the headers, not searched for as text).
"$venv/bin/python" - "$so" "$TORCH_CUDA_ARCH_LIST" <<'PY'
import re, struct, sys
data = open(sys.argv[1], "rb").read()
# TORCH_CUDA_ARCH_LIST as torch reads it: "8.0;9.0", "8.0 9.0", "9.0+PTX"
wants = [int(a.split("+")[0].replace(".", "")) for a in re.split(r"[;\s]+", sys.argv[2].strip()) if a]
magic, found, pos = struct.pack("<I", 0xBA55ED50), set(), 0
while (pos := data.find(magic, pos)) >= 0:
    header_size, fat_size = struct.unpack_from("<HQ", data, pos + 6)
    entry, end = pos + header_size, pos + header_size + fat_size
    while entry + 32 <= end:
        kind, _, entry_header, size = struct.unpack_from("<HHIQ", data, entry)
        if entry_header == 0 or kind not in (1, 2):
            break
        found.add(("ptx" if kind == 1 else "cubin", struct.unpack_from("<I", data, entry + 28)[0]))
        entry += entry_header + size
    pos += 4
for want in wants:
    assert ("cubin", want) in found, f"no sm_{want} cubin in {sys.argv[1]} (found {sorted(found)})"
print(f"device code for {', '.join(f'sm_{w}' for w in wants)} found: {sorted(found)}")
PY
# And register CUDA kernels for both ops when loaded (no GPU needed to load it).  The library alone is loaded:
# this venv has torch but not cubecore's other dependencies.
"$venv/bin/python" - "$so" <<'PY'
import sys
import torch
torch.ops.load_library(sys.argv[1])
has = torch._C._dispatch_has_kernel_for_dispatch_key
for op in ("cubecore::propagate_forward", "cubecore::propagate_backward"):
    assert has(op, "CUDA") and has(op, "CPU"), op
print("CUDA build OK: torch", torch.__version__, "CUDA", torch.version.cuda, "- CPU and CUDA kernels registered")
PY
