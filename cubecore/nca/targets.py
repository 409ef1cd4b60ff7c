"""The structures a 3D NCA learns to grow: voxel grids read from files, placed in a lattice.

A target is either block types (``[X, Y, Z]`` integers, 0 = air, 1..N the structure's block types; the NCA's
state holds one logit per type) or colours (``[X, Y, Z, 4]`` RGBA in [0, 1], a voxel is there where its alpha
exceeds ``VISIBLE_ALPHA``, 0.1, the living threshold of Mordvintsev et al.'s growing NCA: the same threshold for
the target, the loss's IoU and the metrics).  Y is height: a structure stands on the lattice's floor (Y = 0), as
the upstream's (real-itu/3d-artefacts-nca) dataset places it.  Formats:

- ``.npy``: ``[X, Y, Z]`` integers (block types; the distinct non-zero values become types 1..N in order) or
  bools, or ``[X, Y, Z, 4]`` RGBA (floats in [0, 1], or uint8 0..255).  Read without pickle.
- ``.vox``: MagicaVoxel's format (one model; its colour indices are the block types, its palette their
  colours; MagicaVoxel's z is up, so a voxel (x, y, z) is the lattice's cell (x, z, y)).  Read by a reader of
  the documented chunk format (``VOX `` header, ``MAIN`` with ``SIZE``, ``XYZI`` and ``RGBA`` chunks; any other
  chunk skipped) here rather than a package: the two on PyPI are single-author 0.1 releases (py-vox-io, last
  released 2017; midvoxio, whose reader comes with plotting), and the part read here is some sixty lines.
- ``.nbt``: Minecraft structure files (gzipped NBT with ``size``, ``palette`` and ``blocks``), the format of the
  upstream's ``structs_dataset``, read with ``nbtlib`` (the library the upstream uses).  Block types are the
  palette's names (air, cave air, void air and structure voids are air), sorted; a block (x, y, z) is the cell
  (z, y, x), the upstream's [depth, height, width].

Shipped structures (``structure_names()``; ``load_target(name)``): four of the upstream's (MIT, see
``structures/README.md``) and three generated shapes (``generated_shapes``).  A file that cannot be read is one
``InvalidValueError`` naming the file and what is wrong with it.
"""

from __future__ import annotations

import hashlib
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..checks import check_ints
from ..errors import InvalidValueError, NotFoundError

STRUCTURES = Path(__file__).resolve().parent / "structures"
SUFFIXES = (".npy", ".vox", ".nbt")
KINDS = ("blocks", "rgba")
VISIBLE_ALPHA = 0.1  # an RGBA voxel is there where its alpha exceeds this (target, IoU and metrics alike)
MAX_SIDE = 512  # a structure larger than this on a side is refused (a lattice of 512^3 cells is 134 M cells)
AIR_NAMES = ("minecraft:air", "minecraft:cave_air", "minecraft:void_air", "minecraft:structure_void")
PathLike = Union[str, Path]


@dataclass(frozen=True)
class VoxelTarget:
    """A structure: ``voxels`` [X, Y, Z] long (``kind="blocks"``) or [X, Y, Z, 4] float RGBA (``"rgba"``);
    ``names``: the block types' names, index 0 air (blocks only); ``colours`` [types, 3] in [0, 1] to draw them;
    ``source``: where it came from, for messages and reports."""

    voxels: torch.Tensor
    kind: str
    names: Tuple[str, ...] = ()
    colours: Optional[torch.Tensor] = None
    source: str = ""

    @property
    def shape(self) -> Tuple[int, int, int]:
        return tuple(self.voxels.shape[:3])

    @property
    def occupied(self) -> torch.Tensor:
        """[X, Y, Z] bool: where the structure has a voxel."""
        return self.voxels > 0 if self.kind == "blocks" else self.voxels[..., 3] > VISIBLE_ALPHA

    @property
    def types(self) -> int:
        """How many state channels describe a voxel: the block types with air (blocks) or 4 (RGBA)."""
        return len(self.names) if self.kind == "blocks" else 4

    @property
    def alive_channel(self) -> int:
        """The state channel whose 3x3x3 maximum keeps a cell alive: the upstream's living channel right after the
        block types, or alpha for RGBA (as in Mordvintsev et al.'s growing NCA)."""
        return self.types if self.kind == "blocks" else 3

    def fingerprint(self) -> str:
        digest = hashlib.sha256(self.kind.encode())
        digest.update(np.ascontiguousarray(self.voxels.numpy()).tobytes())
        digest.update(repr(self.shape).encode())
        return digest.hexdigest()

    def cropped(self) -> "VoxelTarget":
        """The structure cut to the bounding box of its voxels."""
        index = self.occupied.nonzero()
        low, high = index.min(0).values, index.max(0).values + 1
        voxels = self.voxels[low[0]:high[0], low[1]:high[1], low[2]:high[2]]
        return VoxelTarget(voxels.clone(), self.kind, self.names, self.colours, self.source)

    def placed(self, lattice: Optional[Sequence[int]] = None) -> "VoxelTarget":
        """The structure (cut to its voxels) in a lattice: centred in X and Z, standing on the floor (Y = 0).
        ``lattice`` None: the upstream's cube, whose side is the structure's longest rounded up to a multiple of
        10.  A structure larger than ``lattice`` is an error naming both."""
        structure = self.cropped()
        extent = structure.shape
        if lattice is None:
            side = int(math.ceil(max(extent) / 10.0)) * 10
            lattice = (side, side, side)
        lattice = check_ints("lattice", lattice, 3, minimum=1)
        if any(e > n for e, n in zip(extent, lattice)):
            raise InvalidValueError(f"the structure of {self.source} is {_size(extent)} voxels (X x Y x Z, cut to "
                                    f"its blocks), larger than the lattice {_size(lattice)}")
        x0, z0 = (lattice[0] - extent[0]) // 2, (lattice[2] - extent[2]) // 2
        grid = structure.voxels.new_zeros((*lattice, *structure.voxels.shape[3:]))
        grid[x0:x0 + extent[0], :extent[1], z0:z0 + extent[2]] = structure.voxels
        return VoxelTarget(grid, self.kind, self.names, self.colours, self.source)


def _size(shape: Sequence[int]) -> str:
    return "x".join(str(int(n)) for n in shape)


# -- where a target comes from ---------------------------------------------------------------------------------


def structure_names() -> Tuple[str, ...]:
    """The shipped structures, by the name ``load_target`` takes."""
    return tuple(sorted(p.stem for p in STRUCTURES.iterdir() if p.suffix in SUFFIXES))


def resolve_target(spec: PathLike) -> Path:
    """The file a target setting names: a shipped structure's name, or a path."""
    if isinstance(spec, str) and spec in structure_names():
        return next(STRUCTURES / f"{spec}{suffix}" for suffix in SUFFIXES if (STRUCTURES / f"{spec}{suffix}").is_file())
    path = Path(spec).expanduser()
    if not path.is_file():
        raise NotFoundError(f"target not found: {spec} is neither a file nor a shipped structure "
                            f"({', '.join(structure_names())})")
    if path.suffix.lower() not in SUFFIXES:
        raise InvalidValueError(f"target {path}: unsupported format {path.suffix or '(no suffix)'!r}; use one of "
                                f"{', '.join(SUFFIXES)}")
    return path


def load_target(spec: PathLike) -> VoxelTarget:
    """The structure in a file (or a shipped one, by name), as it is in the file (``placed`` puts it in a
    lattice)."""
    path = resolve_target(spec)
    if path.stat().st_size == 0:
        raise InvalidValueError(f"target {path} is empty")
    reader = {".npy": read_npy, ".vox": read_vox, ".nbt": read_nbt}[path.suffix.lower()]
    target = reader(path)
    if not bool(target.occupied.any()):
        raise InvalidValueError(f"target {path} holds no voxel: every cell is air")
    check_sides(path, target.shape)
    return target


def check_sides(path: Path, shape: Sequence[int]) -> None:
    """Refuse a structure larger than ``MAX_SIDE`` on a side: where a file declares its size (.vox, .nbt), before
    its grid is allocated."""
    if max(shape) > MAX_SIDE:
        raise InvalidValueError(f"target {path} is {_size(shape)} voxels; cubecore takes at most {MAX_SIDE} a side")


def _colours(count: int) -> torch.Tensor:
    """``count`` distinct colours for block types, air first (white, never drawn)."""
    import matplotlib

    table = matplotlib.colormaps["tab10"]
    rows = [(1.0, 1.0, 1.0)] + [table(i % 10)[:3] for i in range(count - 1)]
    return torch.tensor(rows, dtype=torch.float32)


def _blocks(values: np.ndarray, names: Optional[Sequence[str]], source: str,
            colours: Optional[torch.Tensor] = None) -> VoxelTarget:
    """Block types from integer ``values`` [X, Y, Z] (0 air): the distinct others become 1..N in order."""
    kept = np.unique(values[values != 0])
    index = np.zeros(values.shape, dtype=np.int64)
    for i, value in enumerate(kept):
        index[values == value] = i + 1
    names = tuple(names) if names is not None else ("air",) + tuple(f"block {int(v)}" for v in kept)
    return VoxelTarget(torch.from_numpy(index), "blocks", names,
                       colours if colours is not None else _colours(len(names)), source)


# -- .npy ------------------------------------------------------------------------------------------------------


def read_npy(path: Path) -> VoxelTarget:
    from ..data.readers import load_npy

    array = load_npy(path, f"target {path}", "save the structure as numbers")
    what = ("[X, Y, Z] block types (integers, 0 = air) or [X, Y, Z, 4] RGBA (floats in [0, 1] or uint8)")
    if array.ndim == 3 and array.dtype.kind in "biu":
        if array.dtype.kind == "i" and (array < 0).any():
            raise InvalidValueError(f"target {path}: negative block types ({int(array.min())}); expected {what}")
        return _blocks(array.astype(np.int64), None, str(path))
    if array.ndim == 4 and array.shape[-1] == 4 and array.dtype.kind in "uf":
        rgba = array.astype(np.float32) / (255.0 if array.dtype == np.uint8 else 1.0)
        if not np.isfinite(rgba).all() or rgba.min() < 0 or rgba.max() > 1:
            raise InvalidValueError(f"target {path}: RGBA values outside [0, 1] (or not finite); expected {what}")
        rgba[rgba[..., 3] <= VISIBLE_ALPHA] = 0.0  # a voxel too faint to be there is empty, whatever its colour
        return VoxelTarget(torch.from_numpy(rgba), "rgba", source=str(path))
    if array.ndim == 3 and array.dtype.kind == "f":
        raise InvalidValueError(f"target {path}: a float array [X, Y, Z] ({array.dtype}); block types are "
                                f"integers: expected {what}")
    raise InvalidValueError(f"target {path}: an array of shape {array.shape} and dtype {array.dtype}; expected "
                            f"{what}")


# -- .vox (MagicaVoxel) ----------------------------------------------------------------------------------------


def read_vox(path: Path) -> VoxelTarget:
    data = path.read_bytes()

    def bad(reason: str) -> InvalidValueError:
        return InvalidValueError(f"target {path}: not a readable MagicaVoxel .vox file ({reason})")

    if data[:4] != b"VOX " or len(data) < 8:
        raise bad("it does not begin with 'VOX '")
    chunks, at = [], 8
    while at < len(data):  # MAIN's children follow its 12-byte header: a flat walk reads them in order
        if at + 12 > len(data):
            raise bad(f"a chunk header cut off at byte {at}")
        name = data[at:at + 4]
        content, children = struct.unpack_from("<ii", data, at + 4)
        if content < 0 or children < 0 or at + 12 + content > len(data):
            raise bad(f"chunk {name.decode('latin-1')!r} at byte {at} runs past the end of the file")
        chunks.append((name, data[at + 12:at + 12 + content]))
        at += 12 + content  # (a MAIN's children are the chunks that follow)
    sizes = [c for n, c in chunks if n == b"SIZE"]
    voxels = [c for n, c in chunks if n == b"XYZI"]
    if not sizes or not voxels:
        raise bad("no SIZE and XYZI chunks: no model")
    if len(sizes) > 1 or len(voxels) > 1:
        raise bad(f"it holds {max(len(sizes), len(voxels))} models; cubecore reads a file of one model")
    if len(sizes[0]) < 12 or len(voxels[0]) < 4:
        raise bad("a SIZE or XYZI chunk too short")
    sx, sy, sz = struct.unpack_from("<iii", sizes[0])
    if min(sx, sy, sz) < 1:
        raise bad(f"model size {sx}x{sy}x{sz}")
    check_sides(path, (sx, sz, sy))
    count = struct.unpack_from("<i", voxels[0])[0]
    if count < 0 or 4 + 4 * count > len(voxels[0]):
        raise bad(f"XYZI says {count} voxels but holds {(len(voxels[0]) - 4) // 4}")
    xyzi = np.frombuffer(voxels[0], dtype=np.uint8, count=4 * count, offset=4).reshape(count, 4).astype(np.int64)
    outside = (xyzi[:, 0] >= sx) | (xyzi[:, 1] >= sy) | (xyzi[:, 2] >= sz)
    if outside.any():
        x, y, z, _ = xyzi[outside.argmax()]
        raise bad(f"voxel ({x}, {y}, {z}) lies outside the model's size {sx}x{sy}x{sz}")
    grid = np.zeros((sx, sz, sy), dtype=np.int64)  # MagicaVoxel's z is up: the lattice's Y
    grid[xyzi[:, 0], xyzi[:, 2], xyzi[:, 1]] = xyzi[:, 3]
    palette = [c for n, c in chunks if n == b"RGBA"]
    kept = np.unique(xyzi[:, 3][xyzi[:, 3] != 0])
    colours = None
    if palette and len(palette[0]) >= 1024:
        table = np.frombuffer(palette[0], dtype=np.uint8, count=1024).reshape(256, 4)[:, :3] / 255.0
        colours = torch.tensor(np.vstack([[1.0, 1.0, 1.0], table[kept - 1]]), dtype=torch.float32)
    names = ("air",) + tuple(f"colour {int(i)}" for i in kept)
    return _blocks(grid, names, str(path), colours)


# -- .nbt (Minecraft structure files) --------------------------------------------------------------------------


def read_nbt(path: Path) -> VoxelTarget:
    from ..data.readers import _reason

    try:
        import nbtlib
    except ImportError as exc:  # a dependency; a broken environment says so
        from ..errors import UnavailableError

        raise UnavailableError(f"reading {path} needs the nbtlib package ({exc}): pip install nbtlib") from None
    try:
        root = nbtlib.load(path)
    except OSError as exc:
        if isinstance(exc, (FileNotFoundError, PermissionError)):
            raise
        raise InvalidValueError(f"target {path}: not a readable NBT file ({_reason(exc)})") from None
    except Exception as exc:  # nbtlib's errors for bytes that are no NBT have no common type
        raise InvalidValueError(f"target {path}: not a readable NBT file ({_reason(exc)})") from None

    def bad(reason: str) -> InvalidValueError:
        return InvalidValueError(f"target {path}: not a Minecraft structure file ({reason})")

    try:
        size = [int(v) for v in root["size"]]
        palette = root["palette"] if "palette" in root else root["palettes"][0]
        names = [str(entry["Name"]) for entry in palette]
        blocks = [(int(b["state"]), [int(v) for v in b["pos"]]) for b in root["blocks"]]
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise bad(f"no {_reason(exc)}: it needs 'size', 'palette' and 'blocks'") from None
    if len(size) != 3 or min(size) < 1:
        raise bad(f"size {size}")
    check_sides(path, (size[2], size[1], size[0]))
    kept = sorted({n for n in names if n not in AIR_NAMES})
    grid = np.zeros((size[2], size[1], size[0]), dtype=np.int64)  # (z, y, x): the upstream's depth, height, width
    for state, pos in blocks:
        if not 0 <= state < len(names):
            raise bad(f"a block of palette state {state}, but the palette has {len(names)}")
        if len(pos) != 3 or not all(0 <= p < s for p, s in zip(pos, size)):
            raise bad(f"a block at {pos}, outside its size {size}")
        if names[state] not in AIR_NAMES:
            grid[pos[2], pos[1], pos[0]] = kept.index(names[state]) + 1
    return VoxelTarget(torch.from_numpy(grid), "blocks", ("air", *kept), _colours(len(kept) + 1), str(path))


# -- generated shapes ------------------------------------------------------------------------------------------


def generated_shapes() -> Dict[str, np.ndarray]:
    """The generated structures shipped in ``structures/`` as ``NAME.npy`` (``np.save``; a test checks that the
    files are these):
    ``ball`` (one block type, radius 3), ``tree`` (a trunk and a crown: two types), ``tree_rgba`` (the tree as
    RGBA colours)."""
    r = np.arange(7) - 3
    x, y, z = np.meshgrid(r, r, r, indexing="ij")
    ball = (x * x + y * y + z * z <= 9).astype(np.int64)
    tree = np.zeros((5, 7, 5), dtype=np.int64)
    tree[2, :4, 2] = 1  # the trunk
    cx, cy, cz = np.meshgrid(np.arange(5) - 2, np.arange(7) - 5, np.arange(5) - 2, indexing="ij")
    crown = (cx * cx + cy * cy + cz * cz <= 5) & (tree == 0)
    tree[crown] = 2
    rgba = np.zeros((*tree.shape, 4), dtype=np.float32)
    rgba[tree == 1] = (0.45, 0.3, 0.15, 1.0)
    rgba[tree == 2] = (0.2, 0.6, 0.2, 1.0)
    return {"ball": ball, "tree": tree, "tree_rgba": rgba}

