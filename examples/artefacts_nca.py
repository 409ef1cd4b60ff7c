"""Grow a Minecraft house with a published 3D NCA, converted to ``CubicCore``.

    python examples/artefacts_nca.py [--steps 80] [--seed 0] [--backend auto] [--plot house.png]
    python examples/artefacts_nca.py --model M.pt --config m.yaml --lattice 10 10 10   # another upstream model

Sudhakaran et al., "Growing 3D Artefacts and Functional Machines with Neural Cellular Automata" (2021), published
their code and pretrained models in https://github.com/real-itu/3d-artefacts-nca (MIT).  Their rule is a member of
CubicCore's rule family, so a model of theirs runs on cubecore's fused kernel unchanged: the converter is
``cubecore.nca.artefacts`` (its docstring maps their rule onto CubicCore's options), which this script uses; the
same models start a training run with ``python -m cubecore.nca nca.init_from=MODEL.pt`` (docs/nca.md).

The pretrained model shipped with the tests (``tests/fixtures/artefacts_nca``, see its README) is their
PlainVillageHouse: 10 block categories, 10 hidden channels, update net [32, 32], trained to grow a plains village
house of 84 blocks in a 10x10x10 lattice.  The script grows it from the seed and prints, every few steps, the
living cells, the blocks placed (cells whose argmax is not air), their intersection over union with the house
they were trained on, and how many of the house's blocks are of the right kind.  Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Sequence

import torch

import cubecore
from cubecore.nca import artefacts
from cubecore.nca.artefacts import artefact_seed, blocks, categories, grow, iou  # noqa: F401 (the script's API)

FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "artefacts_nca"
HOUSE_MODEL = FIXTURES / "PlainVillageHouse.pt"
HOUSE_CONFIG = FIXTURES / "plain_village_house.yaml"
HOUSE_BLOCKS = FIXTURES / "plain_village_house.json"
# The house's lattice [depth, height, width] as the upstream's dataset builds it from the structure (4 x 5 x 6
# blocks, padded into a cube whose side is the longest one rounded up to a multiple of 10).
HOUSE_LATTICE = (10, 10, 10)


def load_artefact_nca(model_path: Path = HOUSE_MODEL, config_path: Path = HOUSE_CONFIG,
                      lattice_size: Sequence[int] = HOUSE_LATTICE, steps: int = 1,
                      backend: str = "auto") -> cubecore.CubicCore:
    """Their ``.pt`` and yaml as a ``CubicCore`` (``cubecore.nca.artefacts.load_artefact_nca``), the house's by
    default."""
    return artefacts.load_artefact_nca(model_path, config_path, lattice_size, steps, backend)


def house_target(path: Path = HOUSE_BLOCKS, lattice_size: Sequence[int] = HOUSE_LATTICE) -> torch.Tensor:
    """The house the model was trained on, [X, Y, Z] of block categories (``artefacts.json_target``)."""
    return artefacts.json_target(path, lattice_size)


def plot(trajectory: torch.Tensor, num_categories: int, steps: Sequence[int], path: str) -> None:
    """The blocks at a few steps, as voxels (height up), into an image file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = plt.get_cmap("tab10")
    fig = plt.figure(figsize=(3 * len(steps), 3.2))
    for i, t in enumerate(steps):
        shown = blocks(trajectory[t, 0], num_categories).permute(2, 0, 1).numpy()  # [width, depth, height]
        ax = fig.add_subplot(1, len(steps), i + 1, projection="3d")
        ax.voxels(shown > 0, facecolors=colours(shown % 10), edgecolor="k", linewidth=0.2)
        ax.set_title(f"step {t}")
        ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--seed", type=int, default=0, help="torch seed of the fire masks")
    p.add_argument("--backend", default="auto", choices=cubecore.BACKENDS)
    p.add_argument("--model", type=Path, default=HOUSE_MODEL, help="one of their pretrained_models/*/*.pt")
    p.add_argument("--config", type=Path, default=HOUSE_CONFIG, help="its yaml")
    p.add_argument("--lattice", type=int, nargs=3, default=HOUSE_LATTICE, metavar=("X", "Y", "Z"),
                   help="[depth, height, width] of its target's lattice")
    p.add_argument("--target", type=Path, default=None,
                   help="the structure's blocks (their structs_dataset/jsons/*.json); the house's by default")
    p.add_argument("--plot", default=None, help="also draw the blocks at a few steps into this image file")
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    core = load_artefact_nca(args.model, args.config, args.lattice, args.steps, args.backend)
    n = categories(core)
    target_path = args.target or (HOUSE_BLOCKS if args.model == HOUSE_MODEL else None)
    target = house_target(target_path, core.lattice_size) if target_path else None
    print(f"{args.model.name}: {core.state_size} channels ({n} block categories, living channel {n}), update net "
          f"{list(core.hidden_sizes)}, lattice {core.lattice_size}, fire rate {core.fire_rate}, "
          f"backend {core.active_backend()}")
    start = time.perf_counter()
    trajectory = grow(core, artefact_seed(core))
    seconds = time.perf_counter() - start
    living = trajectory[..., n] > core.rule.alive_threshold  # the cells that keep their neighbours alive
    placed = blocks(trajectory, n)
    print(" step  living cells  blocks" + ("  IoU with the house  right blocks" if target is not None else ""))
    for t in range(args.steps + 1):
        if t % 5 and t != args.steps:
            continue
        line = f"{t:5d}  {int(living[t].sum()):12d}  {int((placed[t] > 0).sum()):6d}"
        if target is not None:
            right = int(((placed[t, 0] == target) & (target > 0)).sum())
            line += f"  {iou(placed[t, 0], target):18.3f}  {right:5d}/{int((target > 0).sum())}"
        print(line)
    if target is not None:
        print(f"after {args.steps} steps: IoU with the house {iou(placed[-1, 0], target):.3f}")
    print(f"{args.steps} steps in {seconds * 1e3:.1f} ms")
    if args.plot:
        shown = sorted({args.steps // 4, 3 * args.steps // 8, args.steps // 2, 3 * args.steps // 4, args.steps})
        plot(trajectory, n, shown, args.plot)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
