"""See the lattice: one state as a PNG of its slices, a trajectory over the steps as an animated GIF.

``plot_state(state, path)`` draws one lattice state [X, Y, Z, S] as a grid of 2D slices along ``axis`` (one
panel per slice), showing one channel or, by default, the L2 norm of the state over its channels.
``rollout_gif(trajectory, path)`` draws the states of every step [T+1, X, Y, Z, S] the same way, one frame per
step, all frames on one colour scale, so that what changes between frames is the lattice, not the scale.

The trajectories come from ``CubicCore(...)(external, return_trajectory=True)`` (or
``EmbeddingProcessor.trajectory(embedding)``), [T+1, B, X, Y, Z, S]: pass one sample, ``trajectory[:, b]``.

matplotlib (a dependency of cubecore) is imported only when a function here is called, and draws through its
Agg canvas on a figure of its own: pyplot's global backend and figures are left alone.  Files are written
atomically (a killed process leaves the old file or none, never half of one).
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path
from typing import List, Optional, Tuple, Union

import numpy as np
import torch

from ..atomic import atomic_write
from ..checks import check_choice, check_int, check_number, check_str, check_tensor
from ..errors import InvalidTypeError, InvalidValueError

AXES = ("x", "y", "z")
PathLike = Union[str, os.PathLike]

__all__ = ["AXES", "plot_state", "rollout_gif"]


def plot_state(state: torch.Tensor, path: PathLike, channel: Optional[int] = None, axis: str = "z",
               cmap: Optional[str] = None, vmin: Optional[float] = None, vmax: Optional[float] = None,
               title: Optional[str] = None, dpi: int = 100) -> Path:
    """Draw one lattice state [X, Y, Z, S] as a PNG: one panel per slice along ``axis`` ("x", "y" or "z").

    ``channel``: the state channel to show (0 .. S-1); None shows the L2 norm over the channels.  The colour
    scale is shared by all panels: [0, max] for the norm, symmetric [-m, m] for a channel, unless ``vmin`` and
    ``vmax`` are given.  ``cmap``: a matplotlib colormap name (default "viridis" for the norm, "RdBu_r" for a
    channel).  Returns the path written.
    """
    check_tensor("state", state, "[X, Y, Z, S]")
    if state.dim() == 5:
        raise InvalidValueError(f"state must have shape [X, Y, Z, S] (4 dims, one sample), got {tuple(state.shape)}: "
                         f"pass one sample of a batch, e.g. state[0]")
    check_tensor("state", state, "[X, Y, Z, S]", ndim=4)
    field = _field("state", state, channel)[None]
    path = _check_path(path, ".png")
    frames = _render(field, axis, channel, cmap, vmin, vmax, dpi, [title or _default_title(channel, axis)], "png")
    return atomic_write(path, lambda f: f.write(frames[0]))


def rollout_gif(trajectory: torch.Tensor, path: PathLike, channel: Optional[int] = None, axis: str = "z",
                fps: float = 4.0, cmap: Optional[str] = None, vmin: Optional[float] = None,
                vmax: Optional[float] = None, title: Optional[str] = None, dpi: int = 80,
                start: Union[int, str] = 0) -> Path:
    """Draw one sample's trajectory [T+1, X, Y, Z, S] as an animated GIF, one frame per step (frame 0 the
    initial state), each frame laid out as :func:`plot_state` lays out one state, all on one colour scale (from
    every step's values unless ``vmin`` and ``vmax`` are given).  ``fps``: frames per second (GIF timing has
    10 ms steps; browsers slow frames shorter than 20 ms, so at most 50).  ``start``: the first step drawn, or
    ``"visible"`` for the first step where the shown field is not zero everywhere (a core starts from the zero
    state, a blank frame); frames keep their step numbers.  The GIF loops.  Returns the path.
    """
    check_tensor("trajectory", trajectory, "[T+1, X, Y, Z, S]")
    if trajectory.dim() == 6:
        raise InvalidValueError(f"trajectory must have shape [T+1, X, Y, Z, S] (5 dims, one sample), got "
                         f"{tuple(trajectory.shape)}: pass one sample of a batch, e.g. trajectory[:, 0]")
    check_tensor("trajectory", trajectory, "[T+1, X, Y, Z, S]", ndim=5)
    fps = check_number("fps", fps, minimum=0.0, strict_minimum=True, maximum=50.0)
    field = _field("trajectory", trajectory, channel)
    path = _check_path(path, ".gif")
    steps = field.shape[0] - 1
    if start == "visible":
        start = first_visible_step(field)
    else:
        start = check_int("start", start, minimum=0, maximum=steps)
    head = f"{title} - " if title else ""
    titles = [f"{head}{_default_title(channel, axis)}, step {t}/{steps}" for t in range(start, steps + 1)]
    frames = _render(field[start:], axis, channel, cmap, vmin, vmax, dpi, titles, "rgb")
    duration = max(20, int(round(1000.0 / fps / 10.0)) * 10)

    def write(f):
        frames[0].save(f, format="GIF", save_all=True, append_images=frames[1:], duration=duration, loop=0)

    return atomic_write(path, write)


def first_visible_step(field: np.ndarray) -> int:
    """The first frame of ``field`` [frames, ...] that is not zero everywhere (the last frame if all are)."""
    for t in range(field.shape[0]):
        if np.any(field[t] != 0):
            return t
    return field.shape[0] - 1


# --- helpers ------------------------------------------------------------------------------------------------


def _check_path(path: object, suffix: str) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise InvalidTypeError(f"path must be a str or os.PathLike ending in {suffix}, got {path!r}")
    p = Path(path)
    if p.suffix.lower() != suffix:
        raise InvalidValueError(f"path must end in {suffix}, got {str(path)!r}")
    return p


def _field(name: str, tensor: torch.Tensor, channel: Optional[int]) -> np.ndarray:
    """[..., X, Y, Z, S] -> [..., X, Y, Z]: the chosen channel, or the L2 norm over channels; float64 numpy."""
    if min(tensor.shape) < 1:
        raise InvalidValueError(f"{name} must have every dimension >= 1, got {tuple(tensor.shape)}")
    if not (tensor.is_floating_point() or tensor.dtype in (torch.int32, torch.int64)):
        raise InvalidTypeError(f"{name} must be a real tensor, got {tensor.dtype}")
    values = tensor.detach().to("cpu", torch.float64)
    if channel is None:
        return values.square().sum(-1).sqrt().numpy()
    channel = check_int("channel", channel, minimum=0, maximum=tensor.shape[-1] - 1)
    return values[..., channel].numpy()


def _default_title(channel: Optional[int], axis: str) -> str:
    what = "|state| (L2 over channels)" if channel is None else f"state channel {channel}"
    return f"{what}, slices along {axis}"


def _limits(field: np.ndarray, signed: bool, vmin: Optional[float], vmax: Optional[float]) -> Tuple[float, float]:
    """One colour scale for every panel and frame: from the finite values, unless given."""
    if vmin is not None:
        vmin = check_number("vmin", vmin)
    if vmax is not None:
        vmax = check_number("vmax", vmax)
    finite = field[np.isfinite(field)]
    top = float(np.abs(finite).max()) if finite.size else 0.0
    top = top if top > 0 else 1.0
    lo = vmin if vmin is not None else (-top if signed else 0.0)
    hi = vmax if vmax is not None else top
    if not lo < hi:
        raise InvalidValueError(f"vmin must be < vmax, got vmin={lo!r}, vmax={hi!r}")
    return lo, hi


def _render(field: np.ndarray, axis: str, channel: Optional[int], cmap: Optional[str], vmin, vmax, dpi,
            titles: List[str], kind: str) -> list:
    """Draw every frame of ``field`` [frames, X, Y, Z] on one figure; PNG bytes ("png") or PIL RGB images."""
    axis = check_choice("axis", axis, AXES)
    dpi = check_int("dpi", dpi, minimum=10, maximum=1000)
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if cmap is None:
        cmap = "viridis" if channel is None else "RdBu_r"
    cmap = check_str("cmap", cmap)
    if cmap not in matplotlib.colormaps:
        raise InvalidValueError(f"cmap must be a matplotlib colormap name, got {cmap!r}")
    lo, hi = _limits(field, channel is not None, vmin, vmax)

    a = AXES.index(axis)
    slices = np.moveaxis(field, 1 + a, 1)  # [frames, n, H, V]: n slices, each H (horizontal) by V (vertical)
    n, width, height = slices.shape[1:]
    horizontal, vertical = [name for name in AXES if name != axis]
    cols = max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / cols)
    panel = 1.8 / max(width, height)  # inches per cell: the longer side of a panel is 1.8 inches
    fig = Figure(figsize=(cols * width * panel + 1.2, rows * height * panel + 0.9), dpi=dpi, layout="constrained")
    canvas = FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    images = []
    for k, ax in enumerate(axes):
        if k >= n:
            ax.set_axis_off()
            continue
        images.append(ax.imshow(slices[0, k].T, origin="lower", cmap=cmap, vmin=lo, vmax=hi,
                                interpolation="nearest"))
        ax.set_title(f"{axis}={k}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.supxlabel(f"{horizontal} →", fontsize=9)
    fig.supylabel(f"{vertical} →", fontsize=9)
    fig.colorbar(images[0], ax=list(axes), shrink=0.9,
                 label="L2 norm over channels" if channel is None else f"channel {channel}")
    heading = fig.suptitle(titles[0], fontsize=9)
    out = []
    for t in range(slices.shape[0]):
        for k, image in enumerate(images):
            image.set_data(slices[t, k].T)
        heading.set_text(titles[t])
        if kind == "png":
            buffer = io.BytesIO()
            fig.savefig(buffer, format="png", dpi=dpi)
            out.append(buffer.getvalue())
        else:
            from PIL import Image

            canvas.draw()
            out.append(Image.fromarray(np.asarray(canvas.buffer_rgba())[..., :3].copy()))
    return out
