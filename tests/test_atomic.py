"""atomic_torch_save: whole files only, with the mode that the umask gives (not the temporary file's 0600)."""

import os
import stat

import pytest
import torch

from cubecore.atomic import atomic_torch_save


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077, 0o027])
def test_saved_file_respects_the_umask(tmp_path, umask, mask):
    umask(mask)
    path = atomic_torch_save({"x": torch.arange(3)}, tmp_path / "sub" / "ckpt.pt")
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask
    assert torch.equal(torch.load(path, weights_only=True)["x"], torch.arange(3))
    # Replacing an existing file gives the same mode, and leaves no temporary file behind.
    atomic_torch_save({"x": torch.arange(4)}, path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask
    assert [p.name for p in path.parent.iterdir()] == ["ckpt.pt"]


def test_a_failed_save_leaves_nothing(tmp_path):
    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")

    with pytest.raises(RuntimeError, match="cannot pickle"):
        atomic_torch_save({"bad": Unpicklable()}, tmp_path / "x.pt")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
def test_current_umask_reads_without_changing_it(umask):
    from cubecore.atomic import current_umask

    umask(0o027)
    assert current_umask() == 0o027
    assert current_umask() == 0o027
