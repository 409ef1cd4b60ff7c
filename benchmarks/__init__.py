"""The benchmark suite: cubecore's kernels against every pure-PyTorch way to compute the same lattice.

`python -m benchmarks [--quick]` runs the matrix on the current device; `pytest benchmarks/ --benchmark-only`
runs the developer subset with pytest-benchmark.
"""
