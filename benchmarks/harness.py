"""Measuring one contestant at one size: correctness first, then time, then peak memory."""

from __future__ import annotations

import ctypes
import gc
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

from cubecore import propagate_reference


@dataclass(frozen=True)
class Size:
    """One problem: batch, lattice, state, hidden and external sizes, and steps."""

    name: str
    B: int
    X: int
    Y: int
    Z: int
    S: int = 8
    H: int = 16
    E: int = 1
    T: int = 10
    boundary: str = "wall"

    @property
    def cells(self) -> int:
        return self.X * self.Y * self.Z

    @property
    def cell_updates(self) -> int:
        return self.B * self.cells * self.T

    def forward_flops(self) -> int:
        """Multiply-adds x 2 of the two layers over all cell updates (activations not counted)."""
        K = 7 * self.S + self.E
        return 2 * (self.H * K + self.S * self.H) * self.cell_updates

    def executed_train_flops(self, device_type: str) -> int:
        """Multiply-adds x 2 that our kernel executes for one forward + backward, the backward's recomputation
        included (the suite's rule has update="replace").  CPU: the backward recomputes the first layer (the
        change is the next saved state), then W2^T, both weight gradients and W1^T.  CUDA (fast kernels): it
        recomputes both layers, then W2^T, both weight gradients, and the gather through W1^T."""
        S, H, K = self.S, self.H, 7 * self.S + self.E
        forward = H * K + S * H
        if device_type == "cpu":
            backward = H * K + S * H + (H * K + S * H) + H * K
        else:
            backward = (H * K + S * H) + S * H + (H * K + S * H) + H * K
        return 2 * (forward + backward) * self.cell_updates


def make_inputs(size: Size, device, dtype, seed: int = 0) -> List[torch.Tensor]:
    """(state, external, w1, b1, w2, b2); external and the weights require grad, as in training."""
    gen = torch.Generator().manual_seed(seed)
    K = 7 * size.S + size.E

    def rnd(*shape, scale=1.0, grad=True):
        t = (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(device=device, dtype=dtype)
        return t.requires_grad_(grad)

    return [
        rnd(size.B, size.X, size.Y, size.Z, size.S, scale=0.5, grad=False),
        rnd(size.B, size.X, size.Y, size.Z, size.E),
        rnd(size.H, K, scale=(2.0 / (size.H + K)) ** 0.5),
        rnd(size.H, scale=0.1),
        rnd(size.S, size.H, scale=(2.0 / (size.S + size.H)) ** 0.5),
        rnd(size.S, scale=0.1),
    ]


def rule(size: Size) -> Dict[str, object]:
    return dict(steps=size.T, boundary=size.boundary)


def _forward_backward(fn: Callable, inputs: List[torch.Tensor], size: Size):
    out = fn(*inputs, **rule(size))
    grads = torch.autograd.grad(out.sum(), [t for t in inputs if t.requires_grad])
    return out, grads


def check(fn: Callable, size: Size, device, tolerance: float = 1e-3) -> Tuple[bool, float]:
    """Run the contestant in float32 on `device` and the reference in float64 on the CPU, same inputs: the
    largest error of the output and of every gradient, relative to that tensor's largest magnitude."""
    want_out, want_grads = _forward_backward(propagate_reference, make_inputs(size, "cpu", torch.float64), size)
    got_out, got_grads = _forward_backward(fn, make_inputs(size, device, torch.float32), size)
    worst = 0.0
    for got, want in zip([got_out, *got_grads], [want_out, *want_grads]):
        scale = max(want.abs().max().item(), 1e-12)
        worst = max(worst, (got.detach().double().cpu() - want.detach()).abs().max().item() / scale)
    return worst <= tolerance, worst


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_it(step: Callable[[], object], device, repeats: int, warmup: int = 2,
            min_time: float = 0.0) -> Dict[str, float]:
    """Median and spread (min, max, interquartile range) of timed runs after `warmup` runs: at least
    `repeats` runs, and more (up to 20x `repeats`) until `min_time` seconds of them have been timed.

    As in `timeit`, Python's garbage collector is off while timing, so that a collection set off by
    whichever contestant allocated last is not charged to the run it happens to fall in.
    """
    for _ in range(warmup):
        step()
    _sync(device)
    times: List[float] = []
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        while len(times) < repeats or (sum(times) < min_time and len(times) < 20 * repeats):
            start = time.perf_counter()
            step()
            _sync(device)
            times.append(time.perf_counter() - start)
    finally:
        if gc_was_enabled:
            gc.enable()
    times.sort()
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
    return {"median_s": statistics.median(times), "min_s": times[0], "max_s": times[-1], "iqr_s": q[2] - q[0],
            "repeats": len(times)}


def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_memory(step: Callable[[], object], device) -> Tuple[Optional[int], str]:
    """Peak extra memory of one call of `step`, and how it was measured.

    CUDA: the caching allocator's peak above what was allocated before.  CPU (Linux): the process's peak
    resident set (VmHWM, reset through /proc/self/clear_refs) above its resident set before, after handing
    freed heap memory back to the system (malloc_trim), so that earlier runs do not hide this one's use.
    """
    device = torch.device(device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated(device) - before, "CUDA allocator peak (max_memory_allocated)"
    if platform.system() != "Linux":
        return None, "not measured (needs Linux /proc)"
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    before = _rss_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident set
    step()
    return max(0, _rss_bytes("VmHWM") - before), "peak RSS increase (Linux VmHWM after clear_refs)"


def measure(name: str, fn: Callable, size: Size, device, repeats: int, min_time: float = 0.0) -> Dict[str, object]:
    """One row of the results: correctness, forward and forward+backward times (at least `repeats` runs
    each, more until `min_time` seconds), peak memory."""
    device = torch.device(device)
    row: Dict[str, object] = {"contestant": name, "size": size.name, **asdict(size), "device": str(device)}
    start = time.perf_counter()
    try:
        ok, err = check(fn, size, device)
    except Exception as exc:  # a contestant that cannot run this size is reported, not fatal
        row.update(status=f"error: {type(exc).__name__}: {exc}"[:200])
        return row
    row["first_call_s"] = time.perf_counter() - start  # includes torch.compile's compile time
    row["max_rel_error"] = err
    if not ok:
        row["status"] = "wrong"
        return row
    inputs = make_inputs(size, device, torch.float32)

    def forward():
        with torch.no_grad():
            return fn(*inputs, **rule(size))

    def forward_backward():
        return _forward_backward(fn, inputs, size)

    row["forward"] = time_it(forward, device, repeats, min_time=min_time)
    row["forward_backward"] = time_it(forward_backward, device, repeats, min_time=min_time)
    row["peak_bytes"], row["memory_method"] = peak_memory(forward_backward, device)
    fb = row["forward_backward"]["median_s"]
    row["cell_updates_per_s"] = size.cell_updates / row["forward"]["median_s"]
    row["train_flops_per_s"] = 3 * size.forward_flops() / fb  # forward + backward ~ 3x forward FLOPs
    row["executed_flops_per_s"] = size.executed_train_flops(device.type) / fb  # what our kernel executes
    row["status"] = "ok"
    return row


def machine_limits(device, quick: bool = False) -> Dict[str, float]:
    """The machine's measured limits in this run: float32 matmul FLOP/s (on a GPU with TF32 off, so that it
    is the FP32 FMA rate) and copy bandwidth (bytes/s)."""
    device = torch.device(device)
    n = (1024 if quick else 2048) * (4 if device.type == "cuda" else 1)
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        mm = time_it(lambda: torch.mm(a, b), device, repeats=5)["median_s"]
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    elems = (16 if quick else 64) * 2**20
    src = torch.empty(elems, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    cp = time_it(lambda: dst.copy_(src), device, repeats=5)["median_s"]
    return {"matmul_flops_per_s": 2 * n**3 / mm, "copy_bytes_per_s": 2 * 4 * elems / cp}


def describe_machine(device) -> Dict[str, object]:
    device = torch.device(device)
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info
