"""Measuring one contestant at one size: correctness first, then time, then peak memory."""

from __future__ import annotations

import ctypes
import gc
import os
import platform
import statistics
import time
from contextlib import contextmanager
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
    family: str = "lattice"  # "lattice": the suite's rule (one tanh layer, von Neumann); "nca": see benchmarks.nca

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


    def make_inputs(self, device, dtype, seed: int = 0) -> List[torch.Tensor]:
        """(state, external, w1, b1, w2, b2); external and the weights require grad, as in training."""
        gen = torch.Generator().manual_seed(seed)
        K = 7 * self.S + self.E

        def rnd(*shape, scale=1.0, grad=True):
            t = (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(device=device, dtype=dtype)
            return t.requires_grad_(grad)

        return [
            rnd(self.B, self.X, self.Y, self.Z, self.S, scale=0.5, grad=False),
            rnd(self.B, self.X, self.Y, self.Z, self.E),
            rnd(self.H, K, scale=(2.0 / (self.H + K)) ** 0.5),
            rnd(self.H, scale=0.1),
            rnd(self.S, self.H, scale=(2.0 / (self.S + self.H)) ** 0.5),
            rnd(self.S, scale=0.1),
        ]

    def rule(self) -> Dict[str, object]:
        """The keyword arguments every contestant takes besides the inputs."""
        return dict(steps=self.T, boundary=self.boundary)

    def loss(self, out: torch.Tensor) -> torch.Tensor:
        """The training loss on the final state that forward+backward differentiates."""
        return out.sum()

    def check(self, fn: Callable, device, tolerance: Optional[float] = None) -> Tuple[bool, float]:
        """Run the contestant in float32 on `device` and the reference in float64 on the CPU, same inputs: the
        largest error of the output and of every gradient, relative to that tensor's largest magnitude."""
        tolerance = 1e-3 if tolerance is None else tolerance
        want = _forward_backward(propagate_reference, self.make_inputs("cpu", torch.float64), self)
        got = _forward_backward(fn, self.make_inputs(device, torch.float32), self)
        worst = relative_error(got, want)
        return worst <= tolerance, worst


def make_inputs(size: Size, device, dtype, seed: int = 0) -> List[torch.Tensor]:
    """The contestants' inputs at this size (see each size's ``make_inputs``); those that train require grad."""
    return size.make_inputs(device, dtype, seed)


def rule(size: Size) -> Dict[str, object]:
    return size.rule()


def _forward_backward(fn: Callable, inputs: List[torch.Tensor], size: Size):
    out = fn(*inputs, **size.rule())
    grads = torch.autograd.grad(size.loss(out), [t for t in inputs if t.requires_grad])
    return out, grads


def relative_error(got, want) -> float:
    """The largest error of the output and of every gradient, each relative to its wanted largest magnitude;
    ``got`` and ``want`` are ``(out, grads)`` as ``_forward_backward`` returns them."""
    (got_out, got_grads), (want_out, want_grads) = got, want
    worst = 0.0
    for g, w in zip([got_out, *got_grads], [want_out, *want_grads]):
        scale = max(w.abs().max().item(), 1e-12)
        worst = max(worst, (g.detach().double().cpu() - w.detach().double().cpu()).abs().max().item() / scale)
    return worst


def check(fn: Callable, size: Size, device, tolerance: Optional[float] = None) -> Tuple[bool, float]:
    """Whether the contestant computes the size's rule (see each size's ``check``), and its largest relative
    error."""
    return size.check(fn, device, tolerance)


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


PRECISIONS = ("ieee", "tf32", "bfloat16")


@contextmanager
def float32_precision(name: str, device):
    """On a GPU, PyTorch's switches for float32 work set to ``name`` for the block, then put back: "ieee" (TF32
    off for cuBLAS matmuls and cuDNN convolutions; cuDNN's convolutions default to TF32), "tf32" (on for both),
    "bfloat16" (TF32 off, autocast to bfloat16).  The new ``fp32_precision`` switches, which the kernel reads
    (PyTorch refuses a mix of them and the legacy ``allow_tf32``).  On the CPU, nothing (only "ieee")."""
    if name not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {name!r}")
    if torch.device(device).type != "cuda":
        if name != "ieee":
            raise ValueError(f"precision {name!r} is timed on a GPU only")
        yield
        return
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    kept = matmul.fp32_precision, conv.fp32_precision
    matmul.fp32_precision = conv.fp32_precision = "tf32" if name == "tf32" else "ieee"
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=name == "bfloat16"):
            yield
    finally:
        matmul.fp32_precision, conv.fp32_precision = kept


def measure(name: str, fn: Callable, size: Size, device, repeats: int, min_time: float = 0.0) -> Dict[str, object]:
    """One row of the results: correctness, forward and forward+backward times (at least `repeats` runs
    each, more until `min_time` seconds), peak memory.  The correctness check runs at full float32 precision
    (TF32 off); the timed runs at the contestant's ``precision`` attribute (default "ieee": see
    ``float32_precision``), so a reduced-precision row times the contestant whose rule was checked."""
    device = torch.device(device)
    precision = getattr(fn, "precision", "ieee")
    row: Dict[str, object] = {"contestant": name, "size": size.name, **asdict(size), "device": str(device),
                              "precision": precision}
    start = time.perf_counter()
    try:
        with float32_precision("ieee", device):
            ok, err = check(fn, size, device)
    except Exception as exc:  # a contestant that cannot run this size is reported, not fatal
        row.update(status=f"error: {type(exc).__name__}: {exc}"[:200])
        return row
    row["first_call_s"] = time.perf_counter() - start  # includes torch.compile's compile time
    row["max_rel_error"] = err
    if not ok:
        row["status"] = "wrong"
        return _noted(row, fn)
    inputs = make_inputs(size, device, torch.float32)

    def forward():
        with torch.no_grad():
            return fn(*inputs, **rule(size))

    def forward_backward():
        return _forward_backward(fn, inputs, size)

    try:
        with float32_precision(precision, device):
            chosen = getattr(fn, "product_precision", None)
            if chosen is not None:  # cubecore's kernel: the precision it takes here must be the row's
                row["kernel_precision"] = chosen(size, device)
                if row["kernel_precision"] != precision:
                    row.update(status=f"wrong precision: the kernel runs {row['kernel_precision']}, the row is "
                                      f"{precision}")
                    return _noted(row, fn)
            row["forward"] = time_it(forward, device, repeats, min_time=min_time)
            row["forward_backward"] = time_it(forward_backward, device, repeats, min_time=min_time)
            row["peak_bytes"], row["memory_method"] = peak_memory(forward_backward, device)
    except Exception as exc:  # a row that fails at its precision is reported; the run's other rows are kept
        row.update(status=f"error at {precision}: {type(exc).__name__}: {exc}"[:200])
        return _noted(row, fn)
    fb = row["forward_backward"]["median_s"]
    row["cell_updates_per_s"] = size.cell_updates / row["forward"]["median_s"]
    row["train_flops_per_s"] = 3 * size.forward_flops() / fb  # forward + backward ~ 3x forward FLOPs
    row["executed_flops_per_s"] = size.executed_train_flops(device.type) / fb  # what our kernel executes
    row["status"] = "ok"
    return _noted(row, fn)


def _noted(row: Dict[str, object], fn: Callable) -> Dict[str, object]:
    """The row with the contestant's note, if it has one: how it had to fall back (a torch.compile that
    failed), so that the table says what was timed."""
    if getattr(fn, "note", None):
        row["note"] = fn.note
    return row


def machine_limits(device, quick: bool = False) -> Dict[str, float]:
    """The machine's measured limits in this run: float32 matmul FLOP/s (on a GPU with TF32 off, so that it
    is the FP32 FMA rate) and copy bandwidth (bytes/s)."""
    device = torch.device(device)
    n = (1024 if quick else 2048) * (4 if device.type == "cuda" else 1)
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    with float32_precision("ieee", device):
        mm = time_it(lambda: torch.mm(a, b), device, repeats=5)["median_s"]
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
