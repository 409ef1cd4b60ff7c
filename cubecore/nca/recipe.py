"""The training recipe of the published 3D NCAs (Sudhakaran et al. 2021, real-itu/3d-artefacts-nca, MIT): each
piece a function of tensors, so that each is tested against a hand-computed case.

- ``seed_states``: the upstream's seed (``VoxelDataset.get_seed``): one cell in the middle of the lattice (or
  on its floor) whose living and hidden channels are 1; or a given seed state.
- ``SamplePool``: the upstream's sample pool: a batch drawn from the pool, ordered by its loss (worst first),
  the worst replaced by the seed, the trained states written back.
- ``damage``: the upstream's ``apply_damage``: the batch's best samples (its last) lose a ball of cells of radius
  ``max(lattice) // radius_denominator`` at a random centre (zeros, and air where the state holds block types).
  The upstream draws the centre once for all damaged samples (its loop reuses the first centre); each sample
  gets its own here.
- ``nca_loss``: the upstream's ``get_loss``: ``(0.5 * blocks + 0.5 * alive + iou) / 3``: cross-entropy over
  the block types on the structure's cells (air ignored); for alive, cross-entropy on the air cells (their
  default: dead cells are air) or, with ``alive_loss="mse"`` (their ``use_bce_loss``), the mean squared error of
  the living channel (clipped to [0, 1]) against the structure's occupancy; ``iou`` is 1 - IoU of the non-air
  cells, which takes no gradient (their argmax), with ``iou_loss``.  For RGBA targets the loss is the mean
  squared error of the RGBA channels, as Mordvintsev et al.'s growing NCA has it.
- ``normalize_gradients``: each parameter's gradient divided by its norm (Mordvintsev et al.); the upstream
  does not, so it is off by default.
- ``upstream_init``: every weight from N(0, std), biases zero (their ``use_normal_init``, ``zero_bias``).
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..errors import InvalidValueError
from .targets import VISIBLE_ALPHA, VoxelTarget

ALIVE_LOSSES = ("air", "mse")


def seed_states(batch: int, lattice: Sequence[int], channels: int, alive_channel: int, spawn_at_bottom: bool = False,
                given: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[batch, X, Y, Z, channels]: the ``given`` seed state [X, Y, Z, channels] repeated, or zeros but for one
    cell at (X // 2, Y // 2, Z // 2) (Y = 0 with ``spawn_at_bottom``) whose channels from ``alive_channel`` on
    (the living and hidden channels) are 1."""
    X, Y, Z = lattice
    if given is not None:
        return given.to(torch.float32).expand(batch, X, Y, Z, channels).clone()
    seed = torch.zeros(batch, X, Y, Z, channels)
    seed[:, X // 2, 0 if spawn_at_bottom else Y // 2, Z // 2, alive_channel:] = 1.0
    return seed


def sample_losses(states: torch.Tensor, target: VoxelTarget) -> torch.Tensor:
    """Per sample, how far it is from the target (the upstream's ``rank_loss_function``): the mean cross-entropy
    of the block types over every cell, or the mean squared error of RGBA."""
    if target.kind == "rgba":
        return (states[..., :4] - target.voxels).square().flatten(1).mean(1)
    logits = states[..., :target.types].permute(0, 4, 1, 2, 3).float()
    labels = target.voxels.expand(states.shape[0], *target.voxels.shape)
    return F.cross_entropy(logits, labels, reduction="none").flatten(1).mean(1)


class SamplePool:
    """``size`` states, all seeds at first.  ``batch(n, target, seed)`` draws n distinct samples, orders them by
    ``sample_losses`` (worst first) and replaces the worst by ``seed``; ``update(indices, states)`` writes the
    trained states back."""

    def __init__(self, seeds: torch.Tensor) -> None:
        self.states = seeds.clone()

    def __len__(self) -> int:
        return self.states.shape[0]

    def batch(self, count: int, target: VoxelTarget, seed: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(indices, states): ``count`` samples drawn with torch's generator, worst first, the first of them
        (the worst) replaced by ``seed`` [X, Y, Z, C]."""
        indices = torch.randperm(len(self))[:count]
        states = self.states[indices]
        order = sample_losses(states, target).argsort(descending=True, stable=True)
        indices, states = indices[order], states[order].clone()
        states[0] = seed
        return indices, states

    def update(self, indices: torch.Tensor, states: torch.Tensor) -> None:
        self.states[indices] = states.detach().to(self.states.dtype)


def damage(states: torch.Tensor, count: int, radius: int, air: bool, centres: Optional[torch.Tensor] = None
           ) -> torch.Tensor:
    """The last ``count`` samples of ``states`` [B, X, Y, Z, C] (the best of a batch ordered worst first) with a
    ball of cells of ``radius`` around a centre zeroed, and channel 0 (air) set to 1 there if ``air``; the
    centres [count, 3] are drawn with torch's generator unless given.  In place; returns ``states``."""
    B, X, Y, Z = states.shape[:4]
    count = min(count, B)
    if centres is None:
        centres = torch.stack([torch.randint(0, n, (count,)) for n in (X, Y, Z)], 1)
    axes = torch.meshgrid(torch.arange(X), torch.arange(Y), torch.arange(Z), indexing="ij")
    for i in range(count):
        inside = sum((a - int(c)) ** 2 for a, c in zip(axes, centres[i])).float().sqrt() <= radius
        sample = states[B - 1 - i]
        sample[inside] = 0.0
        if air:
            sample[..., 0][inside] = 1.0
    return states


def nca_loss(out: torch.Tensor, target: VoxelTarget, alive_loss: str = "air", iou_loss: bool = True
             ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(loss, 1 - IoU) of the final states ``out`` [B, X, Y, Z, C] against the target (module docstring)."""
    if target.kind == "rgba":
        loss = (out[..., :4].float() - target.voxels).square().mean()
        return loss, 1.0 - occupancy_iou(out[..., 3] > VISIBLE_ALPHA, target.occupied).mean()
    if alive_loss not in ALIVE_LOSSES:
        raise InvalidValueError(f"alive_loss must be one of {ALIVE_LOSSES}, got {alive_loss!r}")
    n = target.types
    logits = out[..., :n].permute(0, 4, 1, 2, 3).float()
    labels = target.voxels.expand(out.shape[0], *target.voxels.shape)
    blocks = F.cross_entropy(logits, labels, ignore_index=0)
    if alive_loss == "air":
        weight = torch.zeros(n, device=out.device)
        weight[0] = 1.0
        alive = (F.cross_entropy(logits, labels, weight=weight) if bool((labels == 0).any())
                 else logits.new_zeros(()))
    else:
        living = out[..., n].float().clamp(0.0, 1.0)
        alive = F.mse_loss(living, target.occupied.float().expand_as(living))
    miss = 1.0 - occupancy_iou(out[..., :n].argmax(-1) > 0, target.occupied).mean()
    loss = (0.5 * blocks + 0.5 * alive + (miss if iou_loss else 0.0)) / 3.0
    return loss, miss


def occupancy_iou(grown: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """Per sample, the intersection over union of the occupied cells [B, X, Y, Z] (bool) and ``want`` [X, Y, Z];
    1 where both are empty."""
    dims = tuple(range(1, grown.dim()))
    union = (grown | want).sum(dims)
    return torch.where(union > 0, (grown & want).sum(dims) / union.clamp_min(1), torch.ones_like(union,
                                                                                                 dtype=torch.float))


def normalize_gradients(parameters, eps: float = 1e-8) -> None:
    """Each parameter's gradient divided by its norm (plus ``eps``), in place."""
    for p in parameters:
        if p.grad is not None:
            p.grad.div_(p.grad.norm() + eps)


def upstream_init(core, std: float) -> None:
    """The upstream's initialisation of a ``CubicCore``: perception and update weights from N(0, std), biases
    zero."""
    with torch.no_grad():
        if core.perception is not None:
            core.perception.normal_(0.0, std)
        for wname, bname in core.layer_names:
            getattr(core, wname).normal_(0.0, std)
            if getattr(core, bname) is not None:
                getattr(core, bname).zero_()


def structure_metrics(out: torch.Tensor, target: VoxelTarget) -> dict:
    """How well the final states ``out`` [B, X, Y, Z, C] show the target, averaged over the samples:
    ``accuracy``, the share of the structure's voxels grown right (the right block type; for RGBA, alive with
    every colour channel within 0.1); ``iou``, the intersection over union of the occupied cells; and
    ``voxel_accuracy``, the share of all cells right (air included)."""
    occupied = target.occupied
    if target.kind == "rgba":
        grown = out[..., 3] > VISIBLE_ALPHA
        close = (out[..., :3] - target.voxels[..., :3]).abs().amax(-1) <= 0.1
        right_voxel = grown & close & occupied
        right_cell = right_voxel | (~grown & ~occupied)
    else:
        blocks = out[..., :target.types].argmax(-1)
        grown = blocks > 0
        right_cell = blocks == target.voxels
        right_voxel = right_cell & occupied
    dims = tuple(range(1, out.dim() - 1))
    return {"accuracy": (right_voxel.sum(dims) / occupied.sum()).mean().item(),
            "iou": occupancy_iou(grown, occupied).mean().item(),
            "voxel_accuracy": right_cell.float().mean(dims).mean().item()}
