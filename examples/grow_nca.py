"""Grow a 3D shape with the cubic core used as a neural cellular automaton (NCA).

    python examples/grow_nca.py [--iterations 500] [--size 12] [--seed 0] [--lr 1e-2]

With ``input_size=0`` and residual updates, ``CubicCore`` is a 3D NCA: every cell applies the same small network
to its six face-neighbours and itself, ``steps`` times.  Starting from a single live cell, it learns to grow a
ball, with a sample pool (Mordvintsev et al., "Growing Neural Cellular Automata", 2020): each batch draws states
from the pool, runs the steps, and writes the results back, so the rule also learns to keep the shape, not
only to reach it once.  Channel 0 is the cell's "alpha", the visible part.

Prints the loss, how much of the target it reached (intersection over union of alpha > 0.5), and the time of
one training step with the fused kernel against the plain-PyTorch reference.
"""

from __future__ import annotations

import argparse
import time

import torch

import cubecore


def ball(size: int) -> torch.Tensor:
    """[size, size, size] with 1 inside a ball of radius size / 3 about the centre, else 0."""
    r = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    x, y, z = torch.meshgrid(r, r, r, indexing="ij")
    return ((x * x + y * y + z * z).sqrt() <= size / 3).float()


def seed_state(batch: int, size: int, channels: int) -> torch.Tensor:
    state = torch.zeros(batch, size, size, size, channels)
    state[:, size // 2, size // 2, size // 2, :] = 1.0  # one live cell in the middle
    return state


def iou(alpha: torch.Tensor, target: torch.Tensor) -> float:
    grown, want = alpha > 0.5, target > 0.5
    return ((grown & want).sum() / (grown | want).sum().clamp_min(1)).item()


def step_time(core: cubecore.CubicCore, state: torch.Tensor, repeats: int = 3) -> float:
    """Seconds of one forward and backward of the core (the median of ``repeats``)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        core(state=state).square().mean().backward()
        times.append(time.perf_counter() - start)
    core.zero_grad(set_to_none=True)
    return sorted(times)[len(times) // 2]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iterations", type=int, default=500)
    p.add_argument("--size", type=int, default=12, help="the lattice is size^3 cells")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=1e-2)
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    size, channels, batch, pool_size = args.size, 8, 4, 32
    core = cubecore.CubicCore(lattice_size=(size,) * 3, state_size=channels, hidden_size=32, input_size=0, steps=12,
                              boundary="wall", update="residual", step_size=0.5)
    with torch.no_grad():
        core.w2.mul_(0.1)  # start close to "do nothing", as NCAs do
    target = ball(size)
    pool = seed_state(pool_size, size, channels)
    optimizer = torch.optim.Adam(core.parameters(), lr=args.lr)
    first = None
    for it in range(args.iterations):
        pick = torch.randperm(pool_size)[:batch]
        start = pool[pick].clone()
        start[0] = seed_state(1, size, channels)[0]  # one fresh seed per batch: growing is always practised
        out = core(state=start)
        loss = (out[..., 0] - target).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        pool[pick] = out.detach().clamp(-2, 2)
        first = loss.item() if first is None else first
        if it % 50 == 0 or it == args.iterations - 1:
            print(f"iteration {it + 1:4d}: loss {loss.item():.4f}")
    with torch.no_grad():
        grown = core(state=seed_state(1, size, channels))[0, ..., 0]
    reached = iou(grown, target)
    print(f"from one seed cell after {core.steps} steps: IoU with the ball {reached:.3f} "
          f"(loss {first:.4f} -> {loss.item():.4f})")
    state = pool[:batch].clone()
    kernel = step_time(core, state)
    core.backend = "reference"
    reference = step_time(core, state)
    print(f"one training step ({batch} x {size}^3 cells, {core.steps} steps): fused kernel {kernel * 1e3:.1f} ms, "
          f"reference {reference * 1e3:.1f} ms ({reference / kernel:.1f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
