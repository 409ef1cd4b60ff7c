"""Builds cubecore._C: the CPU kernels always, the CUDA kernels when torch is a CUDA build and a toolkit is found.

Environment switches:
  CUBECORE_FORCE_CPU=1      build the CPU kernels only, even with CUDA available
  CUBECORE_CPU_ARCH=native  value of -march for the CPU kernels (default native: the package is built from
                            source on the machine that runs it; set e.g. x86-64-v3 for a portable build)
  TORCH_CUDA_ARCH_LIST      the GPU architectures of the CUDA kernels (torch.utils.cpp_extension), e.g.
                            "9.0" for an H100; default: the visible GPUs', or where none is visible (a login
                            node, docker build, CI) DEFAULT_CUDA_ARCHS
  MAX_JOBS                  parallel compile jobs (torch.utils.cpp_extension)
"""

import json
import os
import sys

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:
    sys.exit(
        "cubecore builds its kernels against the torch that will run them, so torch must be installed first and "
        "the build must see it:\n"
        "    pip install torch            # or the CPU build: pip install torch==2.13.0 (see the README)\n"
        "    pip install setuptools wheel ninja\n"
        "    pip install --no-build-isolation -e .\n"
        "(a plain `pip install .` builds in an isolated environment without torch)")


def cuda_wanted() -> bool:
    if os.environ.get("CUBECORE_FORCE_CPU", "0") not in ("", "0"):
        return False
    return torch.version.cuda is not None and CUDA_HOME is not None


# Where no GPU is visible torch cannot pick the architectures, and its build stops with an IndexError: build for
# the data-centre GPUs of the last generations then, with PTX for newer ones.
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"


def cuda_arch_list(environ, visible_gpus: int) -> None:
    """Set TORCH_CUDA_ARCH_LIST to DEFAULT_CUDA_ARCHS where it is unset and no GPU is visible (saying so)."""
    if not environ.get("TORCH_CUDA_ARCH_LIST") and visible_gpus == 0:
        environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
        print(f"cubecore: no GPU is visible and TORCH_CUDA_ARCH_LIST is unset: building the CUDA kernels for "
              f"{DEFAULT_CUDA_ARCHS} (set TORCH_CUDA_ARCH_LIST to choose)", file=sys.stderr)


def extension():
    arch = os.environ.get("CUBECORE_CPU_ARCH", "native")
    # -Wno-psabi: the kernels pass 32-byte vectors between their own inlined functions; GCC's note that the
    # ABI of such calls differs without AVX concerns no interface of the library.
    cxx = ["-O3", "-std=c++20", "-fopenmp", "-Wno-psabi"] + ([f"-march={arch}"] if arch else [])
    sources = ["csrc/cubecore.cpp"]
    if cuda_wanted():
        cuda_arch_list(os.environ, torch.cuda.device_count())
        sources.append("csrc/cubecore_cuda.cu")
        nvcc = ["-O3", "-std=c++20", "-lineinfo"]
        return CUDAExtension("cubecore._C", sources, extra_compile_args={"cxx": cxx, "nvcc": nvcc},
                             extra_link_args=["-fopenmp"])
    return CppExtension("cubecore._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])


class BuildWithInfo(BuildExtension):
    """Builds the extension and writes cubecore/_build_info.json beside it: the torch it was built against, so
    that cubecore.info() can say so in words when another torch is installed later."""

    def run(self):
        super().run()
        info = {"torch": torch.__version__, "cuda": torch.version.cuda, "cuda_kernels": cuda_wanted()}
        folder = os.path.dirname(self.get_ext_fullpath("cubecore._C"))
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "_build_info.json"), "w") as f:
            json.dump(info, f)


setup(
    packages=find_packages(include=["cubecore", "cubecore.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildWithInfo},
)
