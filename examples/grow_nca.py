"""Grow a 3D shape from a single cell with a neural cellular automaton (NCA) trained on the fused kernel.

    python examples/grow_nca.py [--size 24] [--iterations 1500] [--seed 0] [--lr 1e-2] [--stop-at 0.9]

``CubicCore`` with ``input_size=0`` is a 3D NCA: every cell of a [size, size, size] lattice runs the same small
network, ``steps`` times.  This example uses the rule of "Growing Neural Cellular Automata" (Mordvintsev et al.,
2020) in 3D: each cell perceives its 3x3x3 (``moore``) neighbourhood through learned depthwise filters
(``perception="depthwise"``), a ReLU network computes a change (identity output without bias, the output layer
zero at the start, so that the rule starts as "do nothing"), the change is added to the state
(``update="residual"``) where the cell fires (``fire_rate``: a random 3/4 of the cells each step), and cells with
no neighbour whose alpha (channel 0) exceeds 0.1 die (``alive_channel=0``, reset to zeros: ``dead_state``).

The target is a ball in the whole size^3 lattice (diameter 0.75 x size: 18 cells, 3112 of the 13824 at 24^3),
grown from one live cell in the middle, with the paper's sample pool: each batch draws states from the pool,
replaces the one furthest from the target by a fresh seed, runs a random number of steps, and writes the results
back, so the rule learns both to grow the ball from a seed and to keep it once grown.  The loss is the mean
squared error of alpha against the ball, plus a penalty on states beyond [-1, 1]; the gradients are normalised
per tensor, as in the paper.  Training stops once a check reaches ``--stop-at``.

Prints the settings, a progress line every ``--log-every`` iterations (mean loss; the IoU of the latest check:
4 seeds grown ``--steps-max`` steps, the cells with alpha > 0.5 against the ball; the time so far), the final IoU
(8 fresh seeds grown ``--steps-max`` steps, and as many steps again: the ball must persist), and the time of one
training iteration with the fused kernel (the mean over training) and, on the same batch and steps, with the
fused kernel and with the plain-PyTorch reference (on ``--reference-iterations`` iterations only).  On a
2-core CPU the defaults reach IoU 0.9 at 24^3 in 700 to 1200 iterations (seeds 0 to 2), 4.5 to 8 minutes at
about 0.38 s an iteration; the reference takes some 2 s an iteration.  Saves nothing unless ``--save`` names
a path.

Options (defaults in brackets):

  --size N               the lattice is N^3 cells [24]
  --iterations N         training iterations at most [1500]
  --stop-at IOU          stop once a check reaches this IoU; 0 trains all --iterations [0.9]
  --seed N               torch.manual_seed: weights, pool draws, step counts, fire masks [0]
  --lr LR                Adam's learning rate; it warms up over the first 50 iterations and drops to 0.3x
                         at 60% of --iterations [1e-2]
  --batch N              samples per iteration, one of them a fresh seed [2]
  --pool N               samples in the pool [64]
  --steps-min N, --steps-max N
                         each iteration runs a random number of steps in [min, max] [0.7 x size, size]
  --state N              channels per cell, alpha first [12]
  --hidden N [N]         the sizes of one or two hidden layers [32]
  --filters N            depthwise perception filters per channel [3]
  --fire-rate P          the probability that a cell applies its change at a step [0.75]
  --check-every N        iterations between checks; 0: only the final one [50]
  --log-every N          iterations between progress lines [50]
  --reference-iterations N
                         iterations timed on the reference backend; 0: skip the comparison [2]
  --save PATH            write the trained model's state_dict and these settings to PATH
"""

from __future__ import annotations

import argparse
import math
import time

import torch

import cubecore

ALIVE = 0  # the alpha channel: what is seen, and what keeps a cell's neighbours alive
RUNAWAY = 100.0  # a pool sample with a state beyond this is replaced by a fresh seed


def ball(size: int) -> torch.Tensor:
    """[size, size, size]: 1 inside a ball about the centre whose diameter is 0.75 x size, else 0."""
    r = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    x, y, z = torch.meshgrid(r, r, r, indexing="ij")
    return ((x * x + y * y + z * z).sqrt() <= 0.375 * size).float()


def seeds(batch: int, size: int, channels: int) -> torch.Tensor:
    """[batch, size, size, size, channels]: all zeros but one cell in the middle, whose channels are all 1."""
    state = torch.zeros(batch, size, size, size, channels)
    state[:, size // 2, size // 2, size // 2, :] = 1.0
    return state


def iou(alpha: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per sample: intersection over union of the cells with alpha > 0.5 and the target's cells."""
    grown, want = alpha > 0.5, target > 0.5
    dims = tuple(range(1, alpha.dim()))
    return (grown & want).sum(dims) / (grown | want).sum(dims).clamp_min(1)


@torch.no_grad()
def check(core: cubecore.CubicCore, target: torch.Tensor, steps: int, samples: int = 4):
    """The mean IoU of ``samples`` seeds grown ``steps`` steps, and of the same grown ``steps`` more."""
    kept = core.steps
    core.steps = steps
    state = core(state=seeds(samples, target.shape[0], core.state_size))
    first = iou(state[..., ALIVE], target).mean().item()
    state = core(state=state)
    core.steps = kept
    return first, iou(state[..., ALIVE], target).mean().item()


def iteration(core: cubecore.CubicCore, state: torch.Tensor, target: torch.Tensor, steps: int):
    """One training iteration's forward and backward: run ``steps`` steps, return (final state, loss)."""
    core.steps = steps
    out = core(state=state)
    loss = (out[..., ALIVE] - target).square().mean()
    overflow = (out - out.clamp(-1.0, 1.0)).abs().mean()  # keeps the states in [-1, 1]: no runaway growth
    (loss + overflow).backward()
    return out, loss


def time_backend(core: cubecore.CubicCore, backend: str, state: torch.Tensor, target: torch.Tensor, steps: int,
                 repeats: int) -> float:
    """Seconds of one iteration's forward and backward on ``backend`` (the mean of ``repeats``)."""
    kept = core.backend
    core.backend = backend
    start = time.perf_counter()
    for _ in range(repeats):
        iteration(core, state, target, steps)
    seconds = (time.perf_counter() - start) / repeats
    core.backend = kept
    core.zero_grad(set_to_none=True)
    return seconds


def build_core(args) -> cubecore.CubicCore:
    core = cubecore.CubicCore(
        lattice_size=(args.size,) * 3, state_size=args.state, hidden_size=args.hidden, input_size=0,
        steps=args.steps_max, boundary="zeros", activation="relu", update="residual", backend="kernel",
        neighbourhood="moore", perception="depthwise", perception_filters=args.filters,
        output_activation="identity", output_bias=False, fire_rate=args.fire_rate,
        alive_channel=ALIVE, alive_threshold=0.1, dead_state=[0.0] * args.state,
    )
    with torch.no_grad():
        getattr(core, core.layer_names[-1][0]).zero_()  # the output layer: the rule starts as "do nothing"
    return core


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--size", type=int, default=24, help="the lattice is size^3 cells")
    p.add_argument("--iterations", type=int, default=1500, help="training iterations at most")
    p.add_argument("--stop-at", type=float, default=0.9, help="stop once a check reaches this IoU (0: never)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--pool", type=int, default=64)
    p.add_argument("--steps-min", type=int, default=None, help="default: 0.7 x size")
    p.add_argument("--steps-max", type=int, default=None, help="default: size")
    p.add_argument("--state", type=int, default=12, help="channels per cell, alpha first")
    p.add_argument("--hidden", type=int, nargs="+", default=[32], help="one or two hidden layer sizes")
    p.add_argument("--filters", type=int, default=3, help="depthwise perception filters per channel")
    p.add_argument("--fire-rate", type=float, default=0.75)
    p.add_argument("--check-every", type=int, default=50)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--reference-iterations", type=int, default=2)
    p.add_argument("--save", default=None, help="write the model's state_dict and settings to this path")
    args = p.parse_args(argv)
    if args.steps_min is None:
        args.steps_min = max(1, round(0.7 * args.size))
    if args.steps_max is None:
        args.steps_max = max(args.steps_min, args.size)
    if not 1 <= args.steps_min <= args.steps_max:
        p.error("need 1 <= --steps-min <= --steps-max")
    if args.batch < 2 or args.pool < args.batch:
        p.error("need --batch >= 2 (one seed and pool samples) and --pool >= --batch")

    torch.manual_seed(args.seed)
    size = args.size
    core = build_core(args)
    target = ball(size)
    print(f"growing a ball of {int(target.sum())} cells in a {size}^3 lattice from one cell: state {args.state}, "
          f"hidden {args.hidden}, {args.filters} depthwise filters, moore, fire rate {args.fire_rate}, "
          f"{sum(p.numel() for p in core.parameters())} parameters, batch {args.batch}, pool {args.pool}, "
          f"{args.steps_min}-{args.steps_max} steps, lr {args.lr}, seed {args.seed}, "
          f"{torch.get_num_threads()} threads, backend {core.active_backend()}", flush=True)

    pool = seeds(args.pool, size, args.state)
    optimizer = torch.optim.Adam(core.parameters(), lr=args.lr)
    warmup, decay = 50, int(0.6 * args.iterations)  # warm up (the first changes overshoot), then settle
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: min(1.0, (i + 1) / warmup) * (0.3 if i >= decay else 1.0))
    started = time.perf_counter()
    train_seconds, losses, reached, skipped, it = 0.0, [], 0.0, 0, 0
    for it in range(1, args.iterations + 1):
        tick = time.perf_counter()
        pick = torch.randperm(args.pool)[:args.batch]
        with torch.no_grad():  # the sample furthest from the target makes way for a fresh seed
            worst = (pool[pick][..., ALIVE] - target).square().mean((1, 2, 3)).argmax()
        batch = pool[pick].clone()
        batch[worst] = seeds(1, size, args.state)[0]
        steps = int(torch.randint(args.steps_min, args.steps_max + 1, ()))
        optimizer.zero_grad(set_to_none=True)
        out, loss = iteration(core, batch, target, steps)
        out = out.detach()
        if math.isfinite(loss.item()):
            for param in core.parameters():  # normalised gradients keep long rollouts stable
                param.grad /= param.grad.norm() + 1e-8
            optimizer.step()
            losses.append(loss.item())
        else:  # a rollout that overflowed: no step from it
            skipped += 1
        schedule.step()
        # a sample whose states ran away would only run away further: a fresh seed takes its place
        runaway = ~(out.abs().amax((1, 2, 3, 4)) <= RUNAWAY)
        out[runaway] = seeds(int(runaway.sum()), size, args.state)
        pool[pick] = out
        train_seconds += time.perf_counter() - tick
        checked = args.check_every and (it % args.check_every == 0 or it == args.iterations)
        if checked:
            reached, _ = check(core, target, args.steps_max)
        if it % args.log_every == 0 or checked or it == 1:
            recent = sum(losses[-args.log_every:]) / max(1, len(losses[-args.log_every:]))
            print(f"iteration {it:4d}: loss {recent:.4f}"
                  + (f", IoU {reached:.3f} grown from a seed" if checked else "")
                  + f" ({time.perf_counter() - started:.0f} s)", flush=True)
        if checked and args.stop_at and reached >= args.stop_at:
            print(f"IoU {reached:.3f} >= {args.stop_at} after {it} iterations")
            break
    wall = time.perf_counter() - started
    if not losses:
        print("every rollout overflowed: try a smaller --lr")
        return 1
    print(f"trained {it} iterations in {wall:.0f} s: loss {losses[0]:.4f} (first) -> "
          f"{sum(losses[-10:]) / len(losses[-10:]):.4f} (mean of the last 10)"
          + (f"; {skipped} overflowed rollouts skipped" if skipped else ""))

    final, kept = check(core, target, args.steps_max, samples=8)
    print(f"final IoU with the ball, 8 seeds grown {args.steps_max} steps: {final:.3f} "
          f"({2 * args.steps_max} steps: {kept:.3f})")

    mean_steps = (args.steps_min + args.steps_max) // 2
    state = pool[:args.batch].clone()
    kernel = train_seconds / it
    text = (f"time per training iteration ({args.batch} x {size}^3 cells, {args.steps_min}-{args.steps_max} "
            f"steps): fused kernel {kernel * 1e3:.0f} ms (mean of {it})")
    if args.reference_iterations > 0:
        kernel_same = time_backend(core, "kernel", state, target, mean_steps, args.reference_iterations)
        reference = time_backend(core, "reference", state, target, mean_steps, args.reference_iterations)
        text += (f"; forward and backward of {mean_steps} steps: fused kernel {kernel_same * 1e3:.0f} ms, "
                 f"reference {reference * 1e3:.0f} ms ({reference / kernel_same:.1f}x, "
                 f"mean of {args.reference_iterations})")
    print(text)
    if args.save:
        torch.save({"state_dict": core.state_dict(), "args": vars(args)}, args.save)
        print(f"saved the model to {args.save}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
