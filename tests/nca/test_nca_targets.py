"""The NCA's targets: each format read (good files) and refused with one error naming the file (bad ones)."""

import gzip
import struct

import numpy as np
import pytest
import torch

from cubecore.errors import CubecoreError, InvalidValueError, NotFoundError
from cubecore.nca import targets as T


def vox_bytes(size, voxels, palette=True, models=1):
    """A MagicaVoxel file: SIZE and XYZI per model, then an RGBA palette (colour i+1 = (i, 2i, 3i, 255))."""
    def chunk(name, content=b"", children=b""):
        return name + struct.pack("<ii", len(content), len(children)) + content + children

    body = b""
    for _ in range(models):
        body += chunk(b"SIZE", struct.pack("<iii", *size))
        body += chunk(b"XYZI", struct.pack("<i", len(voxels)) + b"".join(bytes(v) for v in voxels))
    body += chunk(b"nTRN", b"\x00" * 8)  # a chunk of the newer format: skipped
    if palette:
        body += chunk(b"RGBA", bytes(x for i in range(256) for x in (i % 256, (2 * i) % 256, (3 * i) % 256, 255)))
    return b"VOX " + struct.pack("<i", 150) + chunk(b"MAIN", b"", body)


def nbt_file(path, size, palette, blocks, gzipped=True):
    import nbtlib
    from nbtlib.tag import Compound, Int, List, String

    root = Compound({"size": List[Int]([Int(v) for v in size]),
                     "palette": List[Compound]([Compound({"Name": String(n)}) for n in palette]),
                     "blocks": List[Compound]([Compound({"state": Int(s), "pos": List[Int]([Int(v) for v in p])})
                                               for s, p in blocks])})
    nbtlib.File(root).save(path, gzipped=gzipped)
    return path


# --- good files -----------------------------------------------------------------------------------------------

def test_npy_block_types_become_one_to_n_in_order(tmp_path):
    grid = np.zeros((3, 4, 5), dtype=np.int32)
    grid[1, 0, 2], grid[1, 1, 2], grid[0, 0, 0] = 7, 3, 7
    np.save(tmp_path / "s.npy", grid)
    t = T.load_target(tmp_path / "s.npy")
    assert t.kind == "blocks" and t.shape == (3, 4, 5) and t.names == ("air", "block 3", "block 7")
    assert t.voxels[1, 0, 2] == 2 and t.voxels[1, 1, 2] == 1 and t.voxels[0, 0, 0] == 2
    assert t.types == 3 and t.alive_channel == 3 and int(t.occupied.sum()) == 3


def test_npy_rgba_uint8_and_float(tmp_path):
    rgba = np.zeros((2, 2, 2, 4), dtype=np.uint8)
    rgba[0, 0, 0] = (255, 0, 51, 255)
    rgba[1, 1, 1] = (9, 9, 9, 0)  # no alpha: empty, its colour dropped
    np.save(tmp_path / "c.npy", rgba)
    t = T.load_target(tmp_path / "c.npy")
    assert t.kind == "rgba" and t.types == 4 and t.alive_channel == 3
    assert torch.allclose(t.voxels[0, 0, 0], torch.tensor([1.0, 0.0, 0.2, 1.0]))
    assert torch.equal(t.voxels[1, 1, 1], torch.zeros(4)) and int(t.occupied.sum()) == 1
    np.save(tmp_path / "f.npy", rgba.astype(np.float32) / 255)
    assert torch.allclose(T.load_target(tmp_path / "f.npy").voxels, t.voxels)


def test_an_rgba_voxel_too_faint_to_live_is_air_so_the_target_itself_scores_right(tmp_path):
    """One threshold (alpha > 0.1, the living one) for the target, the loss's IoU and the metrics."""
    from cubecore.nca import recipe as R

    rgba = np.zeros((3, 3, 3, 4), dtype=np.float32)
    rgba[0, 0, 0] = (0.5, 0.5, 0.5, 1.0)
    rgba[1, 1, 1] = (0.2, 0.4, 0.6, 0.05)  # fainter than the living threshold: air
    rgba[2, 2, 2] = (0.3, 0.3, 0.3, 0.1)  # at it: air too (living means above it)
    np.save(tmp_path / "faint.npy", rgba)
    t = T.load_target(tmp_path / "faint.npy")
    assert int(t.occupied.sum()) == 1 and torch.equal(t.voxels[1, 1, 1], torch.zeros(4))
    grown = t.voxels.unsqueeze(0).clone()
    m = R.structure_metrics(grown, t)
    assert (m["accuracy"], m["iou"], m["voxel_accuracy"]) == (1.0, 1.0, 1.0)
    assert float(R.nca_loss(grown, t)[1]) == 0.0  # 1 - IoU


def test_vox_voxels_palette_and_axes(tmp_path):
    # voxel (x=1, y=2, z=0) of colour 5, (0, 0, 3) of colour 9; MagicaVoxel's z is the lattice's Y
    (tmp_path / "m.vox").write_bytes(vox_bytes((2, 3, 4), [(1, 2, 0, 5), (0, 0, 3, 9)]))
    t = T.load_target(tmp_path / "m.vox")
    assert t.shape == (2, 4, 3) and t.names == ("air", "colour 5", "colour 9")
    assert t.voxels[1, 0, 2] == 1 and t.voxels[0, 3, 0] == 2 and int(t.occupied.sum()) == 2
    assert torch.allclose(t.colours[1], torch.tensor([4, 8, 12]) / 255.0)  # palette entry 4 is colour 5


def test_nbt_structure_axes_air_and_names(tmp_path):
    path = nbt_file(tmp_path / "s.nbt", (2, 3, 4), ["minecraft:air", "minecraft:stone", "minecraft:dirt"],
                    [(1, (1, 0, 3)), (2, (0, 2, 0)), (0, (0, 0, 0))])
    t = T.load_target(path)
    assert t.shape == (4, 3, 2) and t.names == ("air", "minecraft:dirt", "minecraft:stone")
    assert t.voxels[3, 0, 1] == 2 and t.voxels[0, 2, 0] == 1 and int(t.occupied.sum()) == 2


def test_the_shipped_house_is_the_upstream_house_placed_as_the_upstream_places_it():
    house = T.load_target("plain_village_house")
    assert house.shape == (6, 5, 4) and len(house.names) == 10 and int(house.occupied.sum()) == 84
    placed = house.placed()
    assert placed.shape == (10, 10, 10)
    # the upstream's own list of the house's blocks (tests/fixtures/artefacts_nca), placed by its rule
    import json
    from pathlib import Path

    listed = json.loads((Path(__file__).parents[1] / "fixtures/artefacts_nca/plain_village_house.json").read_text())
    want = torch.zeros(10, 10, 10, dtype=torch.bool)
    for b in listed:
        want[b["position"]["z"] + 2, b["position"]["y"], b["position"]["x"] + 3] = True
    assert torch.equal(placed.occupied, want)


def test_every_shipped_structure_loads_and_the_generated_ones_are_generated_shapes():
    names = T.structure_names()
    assert {"plain_village_house", "villages_light", "ball", "tree", "tree_rgba"} <= set(names)
    for name in names:
        assert T.load_target(name).occupied.any()
    for name, array in T.generated_shapes().items():
        assert np.array_equal(np.load(T.STRUCTURES / f"{name}.npy"), array)
    assert (T.STRUCTURES / "LICENSE").read_text().startswith("The MIT License")


def test_placed_in_a_given_lattice_and_too_small_a_lattice():
    tree = T.load_target("tree")
    grid = tree.placed((9, 8, 7))
    assert grid.shape == (9, 8, 7) and torch.equal(grid.voxels[2:7, :7, 1:6], tree.voxels)
    with pytest.raises(InvalidValueError, match=r"tree.npy is 5x7x5 voxels .* larger than the lattice 4x8x8"):
        tree.placed((4, 8, 8))


# --- bad files: one error naming the file and what is wrong ---------------------------------------------------

def put(path, data):
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def bad_npy(path, array):
    np.save(path, array)
    return path


BAD = {
    "missing": (lambda p: p / "gone.npy", NotFoundError, "target not found: .*gone.npy is neither"),
    "suffix": (lambda p: put(p / "s.txt", "x"), InvalidValueError, "unsupported format '.txt'"),
    "empty": (lambda p: put(p / "e.npy", b""), InvalidValueError, "e.npy is empty"),
    "npy garbage": (lambda p: put(p / "g.npy", b"not numpy"), InvalidValueError,
                    "g.npy: not a readable .npy file"),
    "npy objects": (lambda p: bad_npy(p / "o.npy", np.array([{"a": 1}], dtype=object)), InvalidValueError,
                    "o.npy was refused: an array of Python objects"),
    "npy float grid": (lambda p: bad_npy(p / "f.npy", np.ones((2, 2, 2))), InvalidValueError,
                       r"f.npy: a float array \[X, Y, Z\]"),
    "npy 2d": (lambda p: bad_npy(p / "d.npy", np.ones((2, 2), dtype=int)), InvalidValueError,
               r"d.npy: an array of shape \(2, 2\)"),
    "npy negative": (lambda p: bad_npy(p / "n.npy", -np.ones((2, 2, 2), dtype=int)), InvalidValueError,
                     "n.npy: negative block types"),
    "npy rgba range": (lambda p: bad_npy(p / "r.npy", np.full((2, 2, 2, 4), 2.0)), InvalidValueError,
                       r"r.npy: RGBA values outside \[0, 1\]"),
    "all air": (lambda p: bad_npy(p / "a.npy", np.zeros((2, 2, 2), dtype=int)), InvalidValueError,
                "a.npy holds no voxel"),
    "vox magic": (lambda p: put(p / "m.vox", b"PNG stuff"), InvalidValueError,
                  "m.vox: not a readable MagicaVoxel .vox file .it does not begin with 'VOX '"),
    "vox truncated": (lambda p: put(p / "t.vox", vox_bytes((2, 2, 2), [(0, 0, 0, 1)])[:-600]), InvalidValueError,
                      "t.vox: .* runs past the end of the file"),
    "vox outside": (lambda p: put(p / "o.vox", vox_bytes((2, 2, 2), [(0, 5, 0, 1)])),
                    InvalidValueError, r"o.vox: .*voxel \(0, 5, 0\) lies outside the model's size 2x2x2"),
    "vox two models": (lambda p: put(p / "two.vox", vox_bytes((2, 2, 2), [(0, 0, 0, 1)], models=2)),
                       InvalidValueError, "two.vox: .*it holds 2 models"),
    "vox huge": (lambda p: put(p / "h.vox", vox_bytes((100000, 100000, 100000), [(0, 0, 0, 1)])),
                 InvalidValueError, "h.vox is 100000x100000x100000 voxels; cubecore takes at most 512 a side"),
    "nbt huge": (lambda p: nbt_file(p / "h.nbt", (1, 100000, 100000), ["minecraft:stone"], [(0, (0, 0, 0))]),
                 InvalidValueError, "h.nbt is 100000x100000x1 voxels; cubecore takes at most 512 a side"),
    "nbt garbage": (lambda p: put(p / "g.nbt", gzip.compress(b"\x63garbage")),
                    InvalidValueError, "g.nbt: not a readable NBT file"),
    "nbt truncated": (lambda p: put(p / "t.nbt", (T.STRUCTURES / "villages_light.nbt").read_bytes()[:100]),
                      InvalidValueError, "t.nbt: not a readable NBT file"),
    "nbt no palette": (lambda p: _nbt_without_palette(p / "n.nbt"), InvalidValueError,
                       "n.nbt: not a Minecraft structure file .no .*it needs 'size', 'palette' and 'blocks'"),
    "nbt outside": (lambda p: nbt_file(p / "o.nbt", (1, 1, 1), ["minecraft:stone"], [(0, (0, 2, 0))]),
                    InvalidValueError, r"o.nbt: not a Minecraft structure file \(a block at \[0, 2, 0\], outside"),
    "nbt state": (lambda p: nbt_file(p / "s.nbt", (1, 1, 1), ["minecraft:stone"], [(4, (0, 0, 0))]),
                  InvalidValueError, "s.nbt: .*a block of palette state 4, but the palette has 1"),
}


def _nbt_without_palette(path):
    import nbtlib
    from nbtlib.tag import Compound, Int, List

    nbtlib.File(Compound({"size": List[Int]([Int(1)] * 3)})).save(path, gzipped=True)
    return path


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_file_is_one_error_naming_it(tmp_path, case):
    make, kind, match = BAD[case]
    with pytest.raises(kind, match=match) as caught:
        T.load_target(make(tmp_path))
    assert isinstance(caught.value, CubecoreError) and "\n" not in str(caught.value)
