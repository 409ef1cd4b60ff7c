"""The `nca` size: the published 3D artefacts NCA (Sudhakaran et al. 2021, "Growing 3D Artefacts and Functional
Machines with Neural Cellular Automata"; real-itu/3d-artefacts-nca, ``artefact_nca/model/voxel_ca_model.py``),
against cubecore's kernel running the same rule.

The rule of ``VoxelCAModel``: C = 20 channels; a depthwise ``Conv3d(C, 3C, 3, padding=1, groups=C, bias=False)``
perception (F = 3 filters per channel, Moore neighbourhood, zeros boundary); an update net of 1x1x1 Conv3ds
3C -> 64 -> 64 (ReLU, with bias) -> C (identity, no bias); the change added where a Bernoulli(0.5) fire mask is
set (residual, step 1); an alive mask (the 3x3x3 max-pool of the alive channel > 0.1 before and after the step)
that resets the other cells to the one-hot state of channel 0.  32^3 lattice, B = 5, T = 48 steps (the
upstream trains 48 to 64), float32, forward + backward of a loss on the final state, with gradients for the
state and every weight.

Every contestant maps ``(state, perception, w1, b1, w2, b2, w3, fire_mask, dead_state)`` and
``steps=, alive_channel=, alive_threshold=`` to the final state [B, X, Y, Z, C].  The weights are the upstream's
own Conv3d weights (perception [3C, 1, 3, 3, 3], w1 [64, 3C, 1, 1, 1], b1 [64], w2 [64, 64, 1, 1, 1], b2 [64],
w3 [C, 64, 1, 1, 1]); ``fire_mask`` [T, B, X, Y, Z] (bool) holds every step's fire mask, drawn once, so that every
contestant fires the same cells:

- ``eager``: ``VoxelCAModel.update``/``forward`` as the upstream writes them (channels-first [B, C, D, H, W] via
  the same rearrange-as-a-view, F.max_pool3d alive masks, the boolean-indexed reset of dead cells), with
  ``torch.rand_like(...) < fire_rate`` replaced by the step's slice of ``fire_mask``;
- ``compiled``: the same step under ``torch.compile(fullgraph=True)`` (with dynamo's
  ``capture_dynamic_output_shape_ops``, which the boolean-indexed reset needs to stay in one graph), the
  Python loop over steps left outside: compiling the whole unrolled rollout takes minutes on 2 cores (91 s
  for 12 steps at 8^3), the step compiles once and is reused.  If the full graph fails to compile, it falls
  back to ``torch.compile`` with graph breaks and says why in the row's ``note``;
  ``compiled-ro`` (CUDA only): ``mode="reduce-overhead"``;
- ``checkpointed``: the same step under ``torch.utils.checkpoint(use_reentrant=False)``, one step at a time;
- ``kernel``: ``cubecore.propagate(..., backend="kernel")`` with the same weights viewed into cubecore's layout
  (``perception.view(C, 3, 27)``, ``w.flatten(1)``) and the same ``fire_mask``; ``dead_state`` one-hot on
  channel 0.

Correctness (``NcaSize.check``, before timing, and ``tests/test_benchmarks.py``): at a reduced lattice, every
contestant against the upstream formulation (eager) in float64 on the CPU, within 1e-9 relative, and in
float32 against that float64 oracle within 1e-3, final state and every gradient.  The float32 rows at the full
size are not compared (the alive threshold makes a long float32 rollout's cells flip against float64's).

The largest lattice (``largest_lattice``; ``python -m benchmarks --largest-lattice``): the largest cubic
lattice on which one contestant trains one step (forward + backward, B = 5, T = 64) within an address-space
limit (16 GiB: ``RLIMIT_AS`` set by a child process, ``python -m benchmarks.nca``, one per try), growing the
side by doubling from ``start`` until a try fails, then bisecting.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from cubecore import propagate
from cubecore.ops.front import product_precision

from .harness import Size, _forward_backward, relative_error

Contestant = Callable[..., torch.Tensor]
UPSTREAM = "real-itu/3d-artefacts-nca, artefact_nca/model/voxel_ca_model.py"
SLOTS = 27  # the Moore neighbourhood: a 3x3x3 kernel


@dataclass(frozen=True)
class NcaSize(Size):
    """The 3D artefacts NCA's rule at one lattice, batch and number of steps (S is the channels C, H and H2 the
    update net's hidden sizes, F the depthwise filters per channel; no external input)."""

    S: int = 20
    H: int = 64
    E: int = 0
    T: int = 48
    boundary: str = "zeros"
    family: str = "nca"
    F: int = 3
    H2: int = 64
    fire_rate: float = 0.5
    alive_channel: int = 1
    alive_threshold: float = 0.1

    def forward_macs(self) -> int:
        """Multiply-adds of one cell update: the depthwise perception, then the three 1x1x1 layers."""
        return self.S * self.F * SLOTS + self.H * self.S * self.F + self.H2 * self.H + self.S * self.H2

    def forward_flops(self) -> int:
        return 2 * self.forward_macs() * self.cell_updates

    def executed_train_flops(self, device_type: str) -> int:
        """What the CPU kernel executes for one forward + backward: the forward; then, per step, the step
        again (with masks, the change is not the next state, so all of it is recomputed), and for each of the
        four products (perception, w1, w2, w3) its transpose and its weight's gradient: 4x the forward.  (The
        CUDA kernels also recompute each step and take the same products: the same count is given there.)"""
        return 4 * self.forward_flops()

    def check_size(self) -> "NcaSize":
        """The reduced size the float64 check runs at: at most B = 2, sides of 10 and 12 steps."""
        return replace(self, name=self.name + "-check", B=min(self.B, 2), X=min(self.X, 10), Y=min(self.Y, 10),
                       Z=min(self.Z, 10), T=min(self.T, 12))

    def make_inputs(self, device, dtype, seed: int = 0) -> List[torch.Tensor]:
        """(state, perception, w1, b1, w2, b2, w3, fire_mask, dead_state) in the upstream's layout; the state
        and the weights require grad.  The state is a grown structure: the alive channel 1 in the central block
        of half the side (0 outside), the other channels N(0, 0.5^2); the weights are at a scale where 48 steps
        neither vanish nor blow up, so that both the fire and the alive masks matter to the result."""
        gen = torch.Generator().manual_seed(seed)
        C, Fn, H, H2, B, X, Y, Z = self.S, self.F, self.H, self.H2, self.B, self.X, self.Y, self.Z

        def rnd(*shape, scale=1.0):
            t = torch.randn(*shape, generator=gen, dtype=torch.float64) * scale
            return t.to(device=device, dtype=dtype).requires_grad_(True)

        state = torch.randn(B, X, Y, Z, C, generator=gen, dtype=torch.float64).mul_(0.5)
        alive = torch.zeros(X, Y, Z, dtype=torch.float64)
        alive[X // 4:X - X // 4, Y // 4:Y - Y // 4, Z // 4:Z - Z // 4] = 1.0
        state[..., self.alive_channel] = alive
        state = state.to(device=device, dtype=dtype).requires_grad_(True)
        weights = [
            rnd(C * Fn, 1, 3, 3, 3, scale=0.2),
            rnd(H, C * Fn, 1, 1, 1, scale=(2.0 / (C * Fn)) ** 0.5),
            rnd(H, scale=0.05),
            rnd(H2, H, 1, 1, 1, scale=(2.0 / H) ** 0.5),
            rnd(H2, scale=0.05),
            rnd(C, H2, 1, 1, 1, scale=0.1 / H2 ** 0.5),
        ]
        fire = torch.empty(self.T, B, X, Y, Z, dtype=torch.bool)
        for t in range(self.T):  # a step at a time: no [T, B, X, Y, Z] float draw on the largest lattices
            fire[t] = torch.rand(B, X, Y, Z, generator=gen) < self.fire_rate
        dead = torch.zeros(C, dtype=dtype, device=device)
        dead[0] = 1.0
        return [state, *weights, fire.to(device), dead]

    def rule(self) -> Dict[str, object]:
        return dict(steps=self.T, alive_channel=self.alive_channel, alive_threshold=self.alive_threshold)

    def loss(self, out: torch.Tensor) -> torch.Tensor:
        """A mean squared error against zeros: its gradient, the final state itself, differs cell by cell."""
        return out.square().mean()

    def check(self, fn: Contestant, device, tolerance: Optional[float] = None) -> Tuple[bool, float]:
        """At ``check_size``: the contestant on ``device`` in float64 against the upstream formulation (eager)
        in float64 on the CPU, within 1e-9 (``tolerance`` overrides), then in float32 against the same within
        1e-3; final state and every gradient.  Returns the float32 error (the float64 one where that fails)."""
        size = self.check_size()
        want = _forward_backward(eager, size.make_inputs("cpu", torch.float64), size)
        err64 = relative_error(_forward_backward(fn, size.make_inputs(device, torch.float64), size), want)
        if err64 > (1e-9 if tolerance is None else tolerance):
            return False, err64
        err32 = relative_error(_forward_backward(fn, size.make_inputs(device, torch.float32), size), want)
        return err32 <= 1e-3, err32


# --- the upstream's formulation --------------------------------------------------------------------------


def _alive(x: torch.Tensor, channel: int) -> torch.Tensor:
    """VoxelCAModel.alive: the 3x3x3 max-pool of the living channel."""
    return F.max_pool3d(x[:, channel:channel + 1, :, :, :], kernel_size=3, stride=1, padding=1)


def upstream_step(x, fire, perception, w1, b1, w2, b2, w3, alive_channel: int, alive_threshold: float):
    """VoxelCAModel.update on x [B, C, D, H, W], line for line, with ``rand_mask`` the given ``fire``
    [B, 1, D, H, W] (bool) instead of a fresh ``torch.rand_like(x[:, :1]) < cell_fire_rate``."""
    pre_life_mask = _alive(x, alive_channel) > alive_threshold

    out = F.conv3d(x, perception, padding=1, groups=x.shape[1])  # VoxelPerceptionNet
    out = F.relu(F.conv3d(out, w1, b1))  # SmallerVoxelUpdateNet: 1x1x1 convs
    out = F.relu(F.conv3d(out, w2, b2))
    out = F.conv3d(out, w3)

    out = out * fire.to(x.dtype)
    x = x + out

    post_life_mask = _alive(x, alive_channel) > alive_threshold
    life_mask = (pre_life_mask & post_life_mask).to(x.dtype)
    x = x * life_mask
    x[:, :1, :, :, :][life_mask == 0.0] += 1.0  # use_bce_loss=False: dead cells are one-hot on channel 0
    return x


def _rollout(step: Callable, state, perception, w1, b1, w2, b2, w3, fire_mask, *, steps: int, alive_channel: int,
             alive_threshold: float) -> torch.Tensor:
    """VoxelCAModel.forward: rearrange "b d h w c -> b c d h w" (a view, as einops gives), ``steps`` updates,
    and back."""
    x = state.permute(0, 4, 1, 2, 3)
    for t in range(steps):
        x = step(x, fire_mask[t].unsqueeze(1), perception, w1, b1, w2, b2, w3, alive_channel, alive_threshold)
    return x.permute(0, 2, 3, 4, 1)


def eager(state, perception, w1, b1, w2, b2, w3, fire_mask, dead_state, **rule) -> torch.Tensor:
    """The upstream's formulation in plain eager PyTorch (its dead state is fixed: one-hot on channel 0)."""
    return _rollout(upstream_step, state, perception, w1, b1, w2, b2, w3, fire_mask, **rule)


def _checkpointed_step(*args):
    return checkpoint(upstream_step, *args, use_reentrant=False)


def checkpointed(state, perception, w1, b1, w2, b2, w3, fire_mask, dead_state, **rule) -> torch.Tensor:
    """The upstream's step under torch.utils.checkpoint (non-reentrant), one step at a time: the forward
    keeps each step's input, the backward recomputes the step."""
    return _rollout(_checkpointed_step, state, perception, w1, b1, w2, b2, w3, fire_mask, **rule)


# Dynamo's settings for the compiled step: the boolean-indexed reset of dead cells (a nonzero) stays in the graph,
# and a step may compile for float64 and float32, with and without grad, at two sizes and two input layouts.
_COMPILE_CONFIG = dict(capture_dynamic_output_shape_ops=True, recompile_limit=64)


def compiled(mode: str = "default") -> Contestant:
    """torch.compile of the upstream's step (fullgraph), the loop over steps in Python; falls back to
    torch.compile with graph breaks if the full graph fails, and says why in ``run.note``."""
    chosen = {"step": torch.compile(upstream_step, mode=mode, dynamic=False, fullgraph=True), "full": True}

    def run(state, perception, w1, b1, w2, b2, w3, fire_mask, dead_state, **rule):
        with torch._dynamo.config.patch(**_COMPILE_CONFIG):
            try:
                return _rollout(chosen["step"], state, perception, w1, b1, w2, b2, w3, fire_mask, **rule)
            except Exception as exc:  # noqa: BLE001 - any failure of the full graph: fall back, say why
                if not chosen["full"]:
                    raise
                chosen.update(step=torch.compile(upstream_step, mode=mode, dynamic=False), full=False)
                run.note = (f"fullgraph compile failed ({type(exc).__name__}: {str(exc).splitlines()[0][:120]}); "
                            f"timed torch.compile with graph breaks")
                return _rollout(chosen["step"], state, perception, w1, b1, w2, b2, w3, fire_mask, **rule)

    run.note = None
    run.__doc__ = f"torch.compile(upstream step, mode={mode!r}, fullgraph=True)"
    return run


def kernel(state, perception, w1, b1, w2, b2, w3, fire_mask, dead_state, *, steps: int, alive_channel: int,
           alive_threshold: float) -> torch.Tensor:
    """cubecore's fused op on the same weights, viewed into its layout (differentiably: the gradients arrive
    at the upstream's weights)."""
    C = state.shape[-1]
    return propagate(state, None, w1.flatten(1), b1, w2.flatten(1), b2, w3.flatten(1), None, steps=steps,
                     perception=perception.view(C, -1, SLOTS), neighbourhood="moore", boundary="zeros",
                     activation="relu", output_activation="identity", update="residual", step_size=1.0,
                     fire_mask=fire_mask, alive_channel=alive_channel, alive_threshold=alive_threshold,
                     dead_state=dead_state, backend="kernel")


class AtPrecision:
    """A contestant timed at a reduced float32 precision (``harness.float32_precision``: "tf32" or "bfloat16");
    its rule is checked at full precision first."""

    def __init__(self, fn: Contestant, precision: str) -> None:
        self.fn, self.precision = fn, precision
        self.__doc__ = f"{fn.__doc__} At precision {precision}."

    def __call__(self, *args, **kwargs) -> torch.Tensor:
        return self.fn(*args, **kwargs)

    @property
    def note(self) -> Optional[str]:  # a compiled contestant's fallback
        return getattr(self.fn, "note", None)

    @property
    def product_precision(self):  # the kernel's own choice of precision, where the contestant is the kernel
        return getattr(self.fn, "product_precision", None)


# On a GPU, each precision's contestants beside the full-precision ones (TF32 off): the kernel's tensor-core
# paths (docs/kernels.md) against eager (cuDNN and cuBLAS at the same switches) and torch.compile.
GPU_PRECISIONS = {"tf32": "-tf32", "bfloat16": "-bf16"}


def _kernel_precision(size: "NcaSize", device: torch.device) -> str:
    """The precision the kernel's products take at ``size`` on ``device`` under the switches and autocast now
    set (cubecore's own choice, ``product_precision``): what a timed kernel row ran at."""
    device = torch.device(device)
    autocast = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
    return product_precision(device.type, torch.float32, autocast, (size.H, size.H2))


kernel.product_precision = _kernel_precision


def contestants(device: torch.device) -> Dict[str, Contestant]:
    """The `nca` size's contestants (fresh torch.compile objects each call); on a GPU also each of
    ``GPU_PRECISIONS``' (``kernel-tf32``, ``eager-tf32``, ``compiled-tf32``, ``kernel-bf16``, ...)."""
    found = {"kernel": kernel, "eager": eager, "compiled": compiled(), "checkpointed": checkpointed}
    if torch.device(device).type == "cuda":
        found["compiled-ro"] = compiled("reduce-overhead")
        for precision, suffix in GPU_PRECISIONS.items():
            for name, fn in (("kernel", kernel), ("eager", eager), ("compiled", compiled())):
                found[name + suffix] = AtPrecision(fn, precision)
    return found


# --- the largest lattice ----------------------------------------------------------------------------------

GIB = 2**30
# What an allocation that the address-space limit refuses says, from Python, torch, oneDNN or the C++ runtime.
_OUT_OF_MEMORY = re.compile(r"MemoryError|can't allocate memory|Cannot allocate memory|bad_alloc|out of memory|"
                            r"Resource temporarily unavailable|failed to allocate", re.IGNORECASE)


def try_side(name: str, side: int, *, batch: int = 5, steps: int = 64, limit_bytes: int = 16 * GIB,
             timeout: Optional[float] = None) -> Dict[str, object]:
    """Train one step of contestant ``name`` on a side^3 lattice in a child process whose address space is
    limited to ``limit_bytes``: ``{"status": "fits" | "too large" | "error", ...}``."""
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, "-m", "benchmarks.nca", "--contestant", name, "--side", str(side), "--batch", str(batch),
           "--steps", str(steps), "--limit-bytes", str(limit_bytes)]
    start = time.perf_counter()
    try:
        done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "error", "reason": f"timed out after {timeout} s", "seconds": time.perf_counter() - start}
    seconds = time.perf_counter() - start
    last = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    try:
        report = json.loads(last)
    except ValueError:
        report = {}
    if done.returncode == 0 and report.get("status") == "fits":
        return {**report, "seconds": seconds}
    tail = (done.stderr.strip().splitlines() or [""])[-1][:300]
    if report.get("status") == "too large":
        return {**report, "seconds": seconds}
    if done.returncode == -9:
        return {"status": "error", "seconds": seconds,
                "reason": "killed (SIGKILL): the machine itself ran out of memory before the limit, or was stopped"}
    if _OUT_OF_MEMORY.search(done.stderr):
        return {"status": "too large", "reason": f"exit {done.returncode}: {tail}", "seconds": seconds}
    return {"status": "error", "reason": f"exit {done.returncode}: {tail}", "seconds": seconds}


def largest_lattice(name: str, *, batch: int = 5, steps: int = 64, limit_bytes: int = 16 * GIB, start: int = 16,
                    max_side: int = 1024, attempt: Optional[Callable[[int], Dict[str, object]]] = None,
                    log: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True)
                    ) -> Dict[str, object]:
    """The largest side s for which contestant ``name`` trains one step on an s^3 lattice within the limit:
    doubling from ``start`` until a try does not fit, then bisecting between the last side that fit and the
    first that did not.  ``attempt(side)`` (default: ``try_side`` in a child process) says whether a side fits.
    A try that fails for another reason than memory ends the search, with its reason."""
    attempt = attempt or (lambda side: try_side(name, side, batch=batch, steps=steps, limit_bytes=limit_bytes))
    began = time.perf_counter()
    tries: List[Dict[str, object]] = []
    result: Dict[str, object] = {"contestant": name, "batch": batch, "steps": steps, "limit_bytes": limit_bytes,
                                 "side": None, "cells": None, "tries": tries}

    def fits(side: int) -> Optional[bool]:
        outcome = attempt(side)
        tries.append({"side": side, **outcome})
        log(f"largest lattice {name:>12}: {side}^3 {outcome['status']} ({outcome.get('seconds', 0):.1f} s)")
        if outcome["status"] == "error":
            result["error"] = f"{side}^3: {outcome.get('reason')}"
            return None
        return outcome["status"] == "fits"

    fit, unfit, side = 0, None, start
    while unfit is None:
        ok = fits(side)
        if ok is None:
            break
        if ok:
            fit = side
            if side >= max_side:
                result["error"] = f"still fits at the largest side tried ({max_side})"
                break
            side = min(2 * side, max_side)
        else:
            unfit = side
    while "error" not in result and unfit is not None and unfit - fit > 1:
        side = (fit + unfit) // 2
        ok = fits(side)
        if ok is None:
            break
        fit, unfit = (side, unfit) if ok else (fit, side)
    if fit:
        result.update(side=fit, cells=fit**3)
    result["seconds"] = time.perf_counter() - began
    return result


def _peak_bytes(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def main(argv=None) -> int:
    """One try of the largest-lattice search (run by ``try_side`` in a child process): limit this process's
    address space, train one step, print one JSON line."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.nca", description=main.__doc__)
    parser.add_argument("--contestant", required=True)
    parser.add_argument("--side", type=int, required=True)
    parser.add_argument("--batch", type=int, default=5)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--limit-bytes", type=int, default=16 * GIB)
    args = parser.parse_args(argv)
    resource.setrlimit(resource.RLIMIT_AS, (args.limit_bytes, args.limit_bytes))
    size = NcaSize("largest", args.batch, args.side, args.side, args.side, T=args.steps)
    fn = contestants(torch.device("cpu"))[args.contestant]
    try:
        inputs = size.make_inputs("cpu", torch.float32)
        start = time.perf_counter()
        out, grads = _forward_backward(fn, inputs, size)
        seconds = time.perf_counter() - start
        del out, grads
    except (MemoryError, RuntimeError) as exc:
        if isinstance(exc, MemoryError) or _OUT_OF_MEMORY.search(str(exc)):
            print(json.dumps({"status": "too large", "reason": f"{type(exc).__name__}: {str(exc)[:200]}"}))
            return 3
        raise
    print(json.dumps({"status": "fits", "train_step_s": seconds, "vm_peak_bytes": _peak_bytes("VmPeak"),
                      "rss_peak_bytes": _peak_bytes("VmHWM")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
