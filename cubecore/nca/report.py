"""What a ``cubecore.nca`` run leaves besides its checkpoints: the curves, the target beside the grown structure
as 3D voxels, and the report's table.  (The metrics files, the run folder and TensorBoard are
``cubecore.training``'s, shared with ``cubecore.train``.)"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Dict, List, Optional

import torch

from ..atomic import atomic_write
from .targets import VoxelTarget

METRIC_FIELDS = ("iteration", "loss", "lr", "accuracy", "iou", "seconds")
COLUMNS = ("accuracy", "iou", "voxel_accuracy")
ROWS = {"grown": "grown from the seed, the training steps", "grown_2x": "grown on to 2x the steps",
        "grown_4x": "grown on to 4x the steps", "damaged": "the grown structure, damaged",
        "regenerated": "the damaged structure, grown the training steps again"}


def _save(fig, path: Path) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return atomic_write(path, lambda f: f.write(buffer.getvalue()))


def plot_curves(history: List[Dict[str, float]], path: Path) -> Optional[Path]:
    """The mean loss, and the accuracy and IoU of seeds grown the training steps, against iteration."""
    if not history:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.8), layout="constrained")
    FigureCanvasAgg(fig)
    ax_l, ax_a = fig.subplots(1, 2)
    steps = [h["iteration"] for h in history]
    ax_l.plot(steps, [h["loss"] for h in history], label="training loss")
    ax_l.set_yscale("log")
    ax_a.plot(steps, [h["accuracy"] for h in history], label="block accuracy")
    ax_a.plot(steps, [h["iou"] for h in history], label="IoU")
    ax_a.set_ylim(0, 1.02)
    for ax, label in ((ax_l, "loss"), (ax_a, "grown from a seed")):
        ax.set_xlabel("iteration")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    return _save(fig, path)


def _colours(target: VoxelTarget, voxels: torch.Tensor):
    """[X, Y, Z] -> (filled [X, Z, Y] bool, facecolours [X, Z, Y, 4]) with height up for matplotlib."""
    if target.kind == "rgba":
        filled = voxels[..., 3] > 0.1
        colours = voxels.clamp(0, 1).clone()
        colours[..., 3] = 1.0
    else:
        filled = voxels > 0
        table = torch.cat([target.colours, torch.ones(len(target.colours), 1)], 1)
        colours = table[voxels.clamp(0, len(table) - 1)]
    return filled.permute(0, 2, 1).numpy(), colours.permute(0, 2, 1, 3).numpy()


def plot_voxels(target: VoxelTarget, grown: Dict[str, torch.Tensor], path: Path) -> Path:
    """The target beside each grown structure (``grown``: title -> [X, Y, Z] block types or RGBA), as voxels."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = {"target": target.voxels, **grown}
    fig = Figure(figsize=(3.2 * len(panels), 3.4), layout="constrained")
    FigureCanvasAgg(fig)
    for i, (title, voxels) in enumerate(panels.items()):
        ax = fig.add_subplot(1, len(panels), i + 1, projection="3d")
        filled, colours = _colours(target, voxels)
        ax.voxels(filled, facecolors=colours, edgecolor="k", linewidth=0.2)
        ax.set_title(title, fontsize=9)
        ax.set_axis_off()
    return _save(fig, path)


def shown(states: torch.Tensor, target: VoxelTarget) -> torch.Tensor:
    """What a state [X, Y, Z, C] shows: its block types (argmax) or its RGBA channels."""
    return states[..., :4] if target.kind == "rgba" else states[..., :target.types].argmax(-1)


def results_table(results: Dict[str, Dict[str, float]]) -> str:
    lines = ["| structure | steps | " + " | ".join(COLUMNS) + " |", "|---|---:|" + "---:|" * len(COLUMNS)]
    for name, metrics in results.items():
        lines.append(f"| {name} | {int(metrics['steps'])} | " + " | ".join(f"{metrics[c]:.4f}" for c in COLUMNS)
                     + " |")
    return "\n".join(lines)


def markdown_report(results: Dict[str, Dict[str, float]], info: Dict[str, object], note: str = "") -> str:
    settings = ", ".join(f"{key} {value}" for key, value in info.items())
    lines = [f"# cubecore.nca run: {info.get('target')}", "", f"Settings: {settings}.", "",
             "Seeds grown by the trained rule, averaged over the evaluation samples: accuracy = the share of the "
             "structure's voxels grown with the right block type (RGBA: alive with every colour channel within "
             "0.1); iou = intersection over union of the occupied cells; voxel_accuracy = the share of all cells "
             "right, air included. " + "; ".join(f"{k}: {v}" for k, v in ROWS.items()) + ".", "",
             results_table(results), ""]
    if note:
        lines += [note, ""]
    lines += ["![The target and the structure grown from a seed](grown.png)", "",
              "![Training curves](curves.png)", "",
              "![The living channel of one seed, step by step](rollout.gif)"]
    return "\n".join(lines) + "\n"
