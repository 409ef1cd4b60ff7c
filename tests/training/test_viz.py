"""cubecore.training.viz: the PNG of a state's slices, the GIF of a trajectory, and errors naming the argument."""

import numpy as np
import pytest
import torch
from PIL import Image

from cubecore import CubicCore, EmbeddingProcessor
from cubecore.training.viz import plot_state, rollout_gif


def _state(X=3, Y=4, Z=5, S=2, seed=0):
    return torch.randn(X, Y, Z, S, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("channel", [None, 1])
@pytest.mark.parametrize("axis", ["x", "y", "z"])
def test_plot_state_writes_a_png(tmp_path, channel, axis):
    path = plot_state(_state(), tmp_path / "sub" / "state.png", channel=channel, axis=axis, dpi=50)
    assert path == tmp_path / "sub" / "state.png"
    with Image.open(path) as im:
        assert im.format == "PNG" and min(im.size) > 50
        pixels = np.asarray(im.convert("RGB"))
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20  # drawn panels, not a blank page


def test_png_size_follows_dpi_and_layout(tmp_path):
    """The figure is sized from the lattice and the dpi, not cropped to whatever was drawn."""
    with Image.open(plot_state(_state(), tmp_path / "a.png", dpi=50)) as a, \
            Image.open(plot_state(_state(seed=1), tmp_path / "b.png", dpi=100)) as b:
        assert abs(b.size[0] - 2 * a.size[0]) <= 2 and abs(b.size[1] - 2 * a.size[1]) <= 2
    with Image.open(plot_state(_state(3, 4, 9), tmp_path / "c.png", dpi=50)) as c:
        assert c.size[1] > a.size[1]  # nine z-slices take more rows than five


def test_rollout_gif_has_one_frame_per_step_on_one_colour_scale(tmp_path):
    """Frame t holds (t + 1) everywhere: on one scale the panels brighten frame by frame (viridis: to yellow);
    a scale per frame would draw every frame alike."""
    steps = 4
    traj = torch.stack([torch.full((2, 3, 2, 3), float(t + 1)) for t in range(steps + 1)])
    path = rollout_gif(traj, tmp_path / "roll.gif", fps=5, dpi=50)
    with Image.open(path) as im:
        assert im.format == "GIF" and im.n_frames == steps + 1
        assert im.info.get("duration") == 200 and im.info.get("loop") == 0
        size = im.size
        brightness = []
        for t in range(im.n_frames):
            im.seek(t)
            assert im.size == size
            brightness.append(float(np.asarray(im.convert("L"), dtype=float).mean()))
    assert all(b - a > 2.0 for a, b in zip(brightness, brightness[1:])), brightness


def test_rollout_of_a_core_and_of_a_processor(tmp_path):
    core = CubicCore(lattice_size=(3, 2, 4), state_size=3, hidden_size=4, steps=3)
    traj = core(torch.randn(2, 3, 2, 4, 1), return_trajectory=True)
    with Image.open(rollout_gif(traj[:, 1], tmp_path / "core.gif", channel=0, axis="y")) as im:
        assert im.n_frames == 4
    processor = EmbeddingProcessor(24, lattice_size=(2, 3, 4), state_size=3, hidden_size=4, steps=2)
    embedding = torch.randn(2, 24)
    traj = processor.trajectory(embedding)
    assert traj.shape == (3, 2, 2, 3, 4, 3)
    torch.testing.assert_close(traj[-1], processor.core(processor.external(embedding)))
    with Image.open(rollout_gif(traj[:, 0], tmp_path / "processor.gif")) as im:
        assert im.n_frames == 3


def test_pyplot_is_left_alone(tmp_path):
    plt = pytest.importorskip("matplotlib.pyplot")
    before = plt.get_fignums()
    plot_state(_state(), tmp_path / "s.png")
    rollout_gif(torch.randn(2, 2, 2, 2, 1), tmp_path / "r.gif")
    assert plt.get_fignums() == before


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(state=torch.randn(3, 4, 5)), ValueError, "state"),
        (dict(state=torch.randn(1, 3, 4, 5, 2)), ValueError, "state.*one sample"),
        (dict(state=np.zeros((3, 4, 5, 2))), TypeError, "state"),
        (dict(state=torch.randn(3, 0, 5, 2)), ValueError, "state"),
        (dict(axis="w"), ValueError, "axis"),
        (dict(axis=2), ValueError, "axis"),
        (dict(channel=2), ValueError, "channel"),
        (dict(channel=-1), ValueError, "channel"),
        (dict(channel=1.0), TypeError, "channel"),
        (dict(path="state.jpg"), ValueError, "path"),
        (dict(path="state"), ValueError, "path"),
        (dict(path=3), TypeError, "path"),
        (dict(cmap="no-such-map"), ValueError, "cmap"),
        (dict(vmin=1.0, vmax=0.5), ValueError, "vmin"),
        (dict(vmin="0"), TypeError, "vmin"),
        (dict(dpi=0), ValueError, "dpi"),
    ],
)
def test_plot_state_bad_arguments_raise_naming_them(tmp_path, kwargs, error, match):
    args = dict(state=_state(), path=tmp_path / "s.png")
    args.update(kwargs)
    if isinstance(args["path"], str):
        args["path"] = str(tmp_path / args["path"])
    with pytest.raises(error, match=match):
        plot_state(**args)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(trajectory=torch.randn(3, 2, 2, 2, 2, 1)), ValueError, "trajectory.*one sample"),
        (dict(trajectory=torch.randn(2, 2, 2, 1)), ValueError, "trajectory"),
        (dict(trajectory=[[0.0]]), TypeError, "trajectory"),
        (dict(path="roll.png"), ValueError, "path"),
        (dict(fps=0), ValueError, "fps"),
        (dict(fps="4"), TypeError, "fps"),
        (dict(channel=1), ValueError, "channel"),
        (dict(axis="t"), ValueError, "axis"),
    ],
)
def test_rollout_gif_bad_arguments_raise_naming_them(tmp_path, kwargs, error, match):
    args = dict(trajectory=torch.randn(3, 2, 2, 2, 1), path=tmp_path / "r.gif")
    args.update(kwargs)
    if isinstance(args["path"], str):
        args["path"] = str(tmp_path / args["path"])
    with pytest.raises(error, match=match):
        rollout_gif(**args)
    assert not any(tmp_path.iterdir())


def test_a_rollout_can_start_where_something_is_visible(tmp_path):
    """The report's rollout began with the core's zero state: a blank first frame."""
    from PIL import Image

    from cubecore.training.viz import rollout_gif

    trajectory = torch.rand(5, 2, 2, 3, 4)
    trajectory[:2] = 0  # two blank frames
    with Image.open(rollout_gif(trajectory, tmp_path / "all.gif")) as gif:
        assert gif.n_frames == 5
    with Image.open(rollout_gif(trajectory, tmp_path / "seen.gif", start="visible", title="example 1")) as gif:
        assert gif.n_frames == 3
    with Image.open(rollout_gif(trajectory, tmp_path / "from.gif", start=4)) as gif:
        assert gif.n_frames == 1
    with pytest.raises(ValueError, match="start"):
        rollout_gif(trajectory, tmp_path / "bad.gif", start=5)
