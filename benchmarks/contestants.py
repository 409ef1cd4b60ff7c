"""Every way we time the lattice rule.  Each contestant maps (state, external, w1, b1, w2, b2) and the rule's
options to the final state, and must agree with the float64 reference before it is timed.  The `nca` size has
contestants of its own (benchmarks.nca); ``contestants_for`` gives each size's."""

from __future__ import annotations

import functools
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from cubecore import propagate, propagate_reference, step_reference
from cubecore.ops.rule import canonical_boundary
from cubecore.ops.reference import activate

from . import nca
from .harness import Size

Contestant = Callable[..., torch.Tensor]


def kernel(state, external, w1, b1, w2, b2, **rule):
    """Our fused op."""
    return propagate(state, external, w1, b1, w2, b2, backend="kernel", **rule)


def eager(state, external, w1, b1, w2, b2, **rule):
    """The package's plain-PyTorch reference: pad/roll, six slices, concat, two linear layers."""
    return propagate_reference(state, external, w1, b1, w2, b2, **rule)


def _face_kernel(w1: torch.Tensor, S: int) -> torch.Tensor:
    """W1's neighbour and self blocks as a [H, S, 3, 3, 3] conv3d weight, zero off the six faces and the centre."""
    H = w1.shape[0]
    taps = [(0, 1, 1), (2, 1, 1), (1, 0, 1), (1, 2, 1), (1, 1, 0), (1, 1, 2), (1, 1, 1)]  # slot order, then self
    weight = w1.new_zeros(H, S, 3, 3, 3)
    for slot, (i, j, k) in enumerate(taps):
        weight[:, :, i, j, k] = w1[:, slot * S:(slot + 1) * S]
    return weight


def conv3d(state, external, w1, b1, w2, b2, *, steps, boundary="wall", activation="tanh", update="replace",
           step_size=1.0):
    """The rule as a masked 3x3x3 conv3d plus 1x1x1 convolutions, channels-first (oneDNN / cuDNN)."""
    S = state.shape[-1]
    weight = _face_kernel(w1, S)
    s = state.permute(0, 4, 1, 2, 3).contiguous()                       # [B, S, X, Y, Z]
    u = external.permute(0, 4, 1, 2, 3).contiguous()                    # [B, E, X, Y, Z]
    w_ext = w1[:, 7 * S:, None, None, None]
    drive = F.conv3d(u, w_ext, b1) if u.shape[1] else b1[None, :, None, None, None]
    w_out = w2[:, :, None, None, None]
    for _ in range(steps):
        mode = canonical_boundary(boundary)  # PyTorch's padding mode
        if mode == "zeros":
            pre = F.conv3d(s, weight, padding=1)
        else:
            pre = F.conv3d(F.pad(s, (1, 1, 1, 1, 1, 1), mode=mode), weight)
        change = torch.tanh(F.conv3d(activate(pre + drive, activation), w_out, b2))
        s = change if update == "replace" else s + step_size * change
    return s.permute(0, 2, 3, 4, 1)


def checkpointed(state, external, w1, b1, w2, b2, *, steps, boundary="wall", activation="tanh",
                 update="replace", step_size=1.0):
    """The reference with each step under torch.utils.checkpoint: the pure-PyTorch way to save memory."""
    for _ in range(steps):
        state = checkpoint(functools.partial(step_reference, boundary=boundary, activation=activation,
                                             update=update, step_size=step_size),
                           state, external, w1, b1, w2, b2, use_reentrant=False)
    return state


def compiled(mode: str = "default") -> Contestant:
    """torch.compile of the reference (``mode="reduce-overhead"`` adds CUDA graphs on a GPU)."""
    fn = torch.compile(propagate_reference, mode=mode, dynamic=False)

    def run(state, external, w1, b1, w2, b2, **rule):
        return fn(state, external, w1, b1, w2, b2, **rule)

    run.__doc__ = f"torch.compile(reference, mode={mode!r})"
    return run


def all_contestants(device: torch.device) -> Dict[str, Contestant]:
    found = {"kernel": kernel, "eager": eager, "conv3d": conv3d, "compiled": compiled(), "checkpointed": checkpointed}
    if device.type == "cuda":
        found["compiled-ro"] = compiled("reduce-overhead")
    return found


def contestants_for(size: Size, device: torch.device) -> Dict[str, Contestant]:
    """The contestants of one size, made afresh (torch.compile starts clean): the `nca` family's own
    (benchmarks.nca), or the lattice rule's."""
    return nca.contestants(device) if size.family == "nca" else all_contestants(device)


def contestant_names(device: torch.device) -> List[str]:
    """Every contestant name of any size on this device, in table order."""
    names = list(all_contestants(device))
    return names + [n for n in nca.contestants(device) if n not in names]
