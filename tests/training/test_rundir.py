"""The run directory: one owner at a time, the names of every file a run writes, fresh/overwrite/resume rules."""

import pytest

from cubecore.training.rundir import FILE_NAMES, RunDirectory, RunDirectoryError, RunFiles


def test_run_files_name_every_file_once():
    files = RunFiles("runs/x")
    assert files.last.name == "last.pt" and files.model.name == "model" and files.log.name == "train.log"
    assert len(set(FILE_NAMES.values())) == len(FILE_NAMES)
    assert files.seed(3).root.name == "seed-3"


def test_a_second_owner_is_refused_and_a_fresh_run_refuses_an_old_one(tmp_path):
    with RunDirectory(tmp_path / "run", "fresh"):
        with pytest.raises(RunDirectoryError, match="in use"):
            RunDirectory(tmp_path / "run", "fresh").__enter__()
    RunFiles(tmp_path / "run").last.write_text("x")
    with pytest.raises(RunDirectoryError, match="already holds a run"):
        RunDirectory(tmp_path / "run", "fresh").__enter__()
    with RunDirectory(tmp_path / "run", "resume"):
        pass
    with RunDirectory(tmp_path / "run", "overwrite") as rundir:
        rundir.clear()
    assert not RunFiles(tmp_path / "run").last.exists()


def test_a_folder_made_for_a_run_that_failed_is_removed(tmp_path):
    with pytest.raises(ValueError):
        with RunDirectory(tmp_path / "new", "fresh") as rundir:
            rundir.files.log.write_text("plan\n")
            raise ValueError("the data did not load")
    assert not (tmp_path / "new").exists()
