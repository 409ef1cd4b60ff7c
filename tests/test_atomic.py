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


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
def test_a_folder_is_written_whole_or_not_at_all(tmp_path, umask):
    from cubecore.atomic import atomic_write_dir

    umask(0o027)

    def write(texts):
        def into(folder):
            for name, text in texts.items():
                if text is None:
                    raise OSError(28, "No space left on device")
                (folder / name).write_text(text)
        return into

    out = atomic_write_dir(tmp_path / "model", write({"a": "1", "b": "2"}))
    assert stat.S_IMODE(out.stat().st_mode) == 0o750 and stat.S_IMODE((out / "a").stat().st_mode) == 0o640
    with pytest.raises(OSError, match="No space left on device.*model"):  # the error names the folder
        atomic_write_dir(out, write({"a": "new", "b": None}))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"], "no staging folder left"
    assert (out / "a").read_text() == "1" and sorted(p.name for p in out.iterdir()) == ["a", "b"]
    atomic_write_dir(out, write({"c": "3"}))  # replaced whole
    assert sorted(p.name for p in out.iterdir()) == ["c"]
