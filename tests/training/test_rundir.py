"""The run directory: one owner at a time, the names of every file a run writes, fresh/overwrite/resume rules."""

import pytest

from cubecore.training.rundir import BACKUP_NAME, FILE_NAMES, MARKER, RunDirectory, RunDirectoryError, RunFiles


def test_run_files_name_every_file_once():
    files = RunFiles("runs/x")
    assert files.last.name == "last.pt" and files.model.name == "model" and files.log.name == "train.log"
    assert len(set(FILE_NAMES.values())) == len(FILE_NAMES)
    assert files.seed(3).root.name == "seed-3"


def test_a_second_owner_is_refused_and_a_fresh_run_refuses_an_old_one(tmp_path):
    with RunDirectory(tmp_path / "run", "fresh") as rundir:
        with pytest.raises(RunDirectoryError, match="in use"):
            RunDirectory(tmp_path / "run", "fresh").__enter__()
        RunFiles(tmp_path / "run").last.write_text("x")
        rundir.commit()
    with pytest.raises(RunDirectoryError, match="already holds a run"):
        RunDirectory(tmp_path / "run", "fresh").__enter__()
    with RunDirectory(tmp_path / "run", "resume"):
        pass
    with RunDirectory(tmp_path / "run", "overwrite") as rundir:
        RunFiles(tmp_path / "run").best.write_text("new")
        rundir.commit()
    assert not RunFiles(tmp_path / "run").last.exists() and RunFiles(tmp_path / "run").best.read_text() == "new"


def test_a_folder_made_for_a_run_that_failed_is_removed(tmp_path):
    with pytest.raises(ValueError):
        with RunDirectory(tmp_path / "new", "fresh") as rundir:
            rundir.files.log.write_text("plan\n")
            raise ValueError("the data did not load")
    assert not (tmp_path / "new").exists()


def test_overwrite_puts_the_old_run_back_unless_the_new_one_saved_a_checkpoint(tmp_path):
    files = RunFiles(tmp_path / "run")
    with RunDirectory(files.root, "fresh") as rundir:
        files.last.write_text("old")
        files.config.write_text("old config")
        rundir.commit()
    assert files.marker.is_file(), "a run marks its folder"
    with pytest.raises(ValueError):
        with RunDirectory(files.root, "overwrite"):
            assert not files.last.exists(), "the new run starts in a clean folder"
            files.config.write_text("new config")
            raise ValueError("the model did not fit in memory")
    assert files.last.read_text() == "old" and files.config.read_text() == "old config"
    assert not (files.root / BACKUP_NAME).exists()
    with RunDirectory(files.root, "overwrite"):  # ended without error, but without a checkpoint (Ctrl-C)
        files.metrics_csv.write_text("new")
    assert files.last.read_text() == "old" and not files.metrics_csv.exists()


def test_a_killed_overwrite_is_undone_by_the_next_run_into_the_folder(tmp_path):
    files = RunFiles(tmp_path / "run")
    with RunDirectory(files.root, "fresh") as rundir:
        files.last.write_text("old")
        rundir.commit()
    killed = RunDirectory(files.root, "overwrite").__enter__()  # a run killed -9 before its first checkpoint
    files.config.write_text("new config")
    killed.release()
    with pytest.raises(RunDirectoryError, match="already holds a run.*--resume"):
        RunDirectory(files.root, "fresh").__enter__()
    assert files.last.read_text() == "old" and not files.config.exists()
    killed = RunDirectory(files.root, "overwrite").__enter__()  # killed after its first checkpoint: it stays
    files.last.write_text("new")
    killed.release()
    with RunDirectory(files.root, "resume"):
        pass
    assert files.last.read_text() == "new" and not (files.root / BACKUP_NAME).exists()


def test_a_folder_that_is_not_a_cubecore_run_is_never_written_into_or_replaced(tmp_path):
    other = tmp_path / "other_project"
    (other / "model").mkdir(parents=True)
    (other / "model" / "weights.bin").write_text("theirs")
    (other / "config.yaml").write_text("theirs: true\n")
    for mode in ("fresh", "overwrite"):
        with pytest.raises(RunDirectoryError, match=f"{other}.*not a cubecore run.*{MARKER}"):
            RunDirectory(other, mode).__enter__()
    assert (other / "model" / "weights.bin").read_text() == "theirs"
    assert (other / "config.yaml").read_text() == "theirs: true\n" and not (other / BACKUP_NAME).exists()


def test_a_failed_fresh_start_leaves_the_folder_as_it_was(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError):
        with RunDirectory(tmp_path / "run", "fresh") as rundir:
            rundir.files.config.write_text("x")
            raise ValueError("InfoNCE needs at least two different targets")
    assert RunFiles(tmp_path / "run").present() == [] and (tmp_path / "run" / "notes.txt").read_text() == "mine"
    with RunDirectory(tmp_path / "run", "fresh"):  # and the next run is not told that a run is there
        pass


def test_runs_and_studies_from_before_the_marker_are_cubecore_runs(tmp_path):
    from cubecore.training.checkpoint import save_checkpoint_file

    legacy = RunFiles(tmp_path / "study").seed(1)
    legacy.root.mkdir(parents=True)
    save_checkpoint_file({"epoch": 1}, legacy.last)
    (tmp_path / "study" / "seeds.md").write_text("old table")
    assert legacy.is_cubecore_run() and RunFiles(tmp_path / "study").is_cubecore_run()
    legacy.last.write_bytes(b"PK\x03\x04 another library's file")
    assert not legacy.is_cubecore_run() and not RunFiles(tmp_path / "study").is_cubecore_run()
