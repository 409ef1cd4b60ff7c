"""`python -m cubecore.nca` at a tiny size: a run's files, resume bit-exactness after an interruption, overwrite,
--seeds, and one `error:` line with exit status 2 for each user mistake."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from cubecore.nca.__main__ import main
from cubecore.nca.config import SMALL_RUN, NcaTrainingConfig
from cubecore.nca.trainer import NcaTrainer
from cubecore.training.checkpoint import load_checkpoint_file

ROOT = Path(__file__).resolve().parents[2]
# the street light (3x4x3 voxels) in a 5^3 lattice, a few steps: a run of about a second
TINY = ["--target", "villages_light", "--lattice", "5x5x5", "iterations=6", "checkpoint_every=3",
        "nca.batch_size=2", "nca.pool_size=4", "nca.min_steps=2", "nca.max_steps=3", "nca.hidden_channels=2",
        "eval_samples=2", "--quiet"]


def run(tmp_path, *extra, out="run"):
    return main([*TINY, "--output-dir", str(tmp_path / out), *extra])


def weights(path):
    return load_checkpoint_file(path)["model"]


def test_a_tiny_run_writes_its_files_and_report(tmp_path, capsys):
    assert run(tmp_path) == 0
    out = tmp_path / "run"
    for name in ("config.yaml", "metrics.csv", "metrics.jsonl", "last.pt", "report.md", "results.json",
                 "curves.png", "grown.png", "rollout.gif", "train.log", "cubecore_run.json"):
        assert (out / name).is_file(), name
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"grown", "grown_2x", "grown_4x", "damaged", "regenerated"}
    assert results["grown_4x"]["steps"] == 12 and 0 <= results["grown"]["accuracy"] <= 1
    assert [json.loads(line)["iteration"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [3, 6]
    saved = yaml.safe_load((out / "config.yaml").read_text())["nca_training"]
    assert saved["model"]["lattice_size"] == [5, 5, 5] and saved["model"]["state_size"] == 4 + 1 + 2
    assert "| grown_4x | 12 |" in (out / "report.md").read_text()
    assert "steps 2-3," in (out / "report.md").read_text()  # the range drawn from, not the last draw
    # a rerun into the folder is refused; --overwrite replaces it
    assert run(tmp_path) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert run(tmp_path, "--overwrite", "seed=1") == 0


def test_resume_after_an_interruption_ends_with_the_same_weights(tmp_path):
    assert run(tmp_path, out="whole") == 0
    # an interrupted run: stopped after its first checkpoint (iteration 3)
    config = NcaTrainingConfig.from_yaml(tmp_path / "whole" / "config.yaml")
    trainer = NcaTrainer(config.override(output_dir=str(tmp_path / "part")))

    def stop(t, record):
        t.save_checkpoint(tmp_path / "part" / "last.pt")
        raise KeyboardInterrupt

    (tmp_path / "part").mkdir()
    with pytest.raises(KeyboardInterrupt):
        trainer.fit(stop)
    assert load_checkpoint_file(tmp_path / "part" / "last.pt")["iteration"] == 3
    assert main(["--resume", str(tmp_path / "part" / "last.pt"), "--quiet"]) == 0
    whole, resumed = weights(tmp_path / "whole" / "last.pt"), weights(tmp_path / "part" / "last.pt")
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    assert load_checkpoint_file(tmp_path / "part" / "last.pt")["pool"].equal(
        load_checkpoint_file(tmp_path / "whole" / "last.pt")["pool"])
    # resumed again with its own settings: nothing to do
    assert main(["--resume", "--output-dir", str(tmp_path / "part"), "--quiet"]) == 0


def test_a_killed_run_resumes_to_the_same_weights(tmp_path):
    """kill -9 after the first checkpoint: --resume ends where an uninterrupted run ends."""
    assert run(tmp_path, out="whole") == 0
    code = ("import os, cubecore.nca.trainer as T\n"
            "fit = T.NcaTrainer.fit\n"
            "def killing(self, on_record=None, progress=False):\n"
            "    def record(t, r):\n"
            "        on_record(t, r)\n"
            "        os.kill(os.getpid(), 9)\n"
            "    return fit(self, record, progress)\n"
            "T.NcaTrainer.fit = killing\n"
            "from cubecore.nca.__main__ import main\n"
            f"main({[*TINY, '--output-dir', str(tmp_path / 'killed')]!r})\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, timeout=120)
    assert done.returncode == -9, done.stderr[-2000:]
    assert main(["--resume", "--output-dir", str(tmp_path / "killed"), "--quiet"]) == 0
    whole, resumed = weights(tmp_path / "whole" / "last.pt"), weights(tmp_path / "killed" / "last.pt")
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_seeds_study_and_its_summary(tmp_path):
    assert main([*TINY, "iterations=3", "--output-dir", str(tmp_path / "study"), "--seeds", "0,1"]) == 0
    summary = json.loads((tmp_path / "study" / "seeds.json").read_text())["summary"]
    assert len(summary["grown"]["accuracy"]) == 2  # mean and spread
    assert (tmp_path / "study" / "seed-1" / "results.json").is_file()
    assert "± " in (tmp_path / "study" / "seeds.md").read_text()
    assert main([*TINY, "iterations=3", "--output-dir", str(tmp_path / "study"), "--seeds", "0,1", "--resume"]) == 0


@pytest.mark.parametrize("args, message", [
    (["--target", "nowhere.npy"], "target not found: nowhere.npy"),
    (["nca.bogus=1"], "unknown config key 'nca.bogus'"),
    (["nca.max_steps=1"], r"'nca.max_steps' \(1\) must be >= config key 'nca.min_steps'"),
    (["model.state_size=3"], "'model.state_size' is set by the target and nca.hidden_channels"),
    (["--lattice", "2x2x2"], "larger than the lattice 2x2x2"),
    (["--lattice", "2x2"], "lattice must be XxYxZ"),
    (["--resume", "--overwrite"], "--overwrite and --resume exclude each other"),
    (["--iterations", "4", "iterations=5"], "iterations is given twice"),
    (["--backend", "gpu"], "invalid choice: 'gpu'"),
    (["nca.seed_state=nowhere.npy"], "nca.seed_state not found: nowhere.npy"),
    (["--lattice", "600x8x8"], r"config key 'nca.lattice' \[600, 8, 8\]: cubecore.nca takes at most 512 cells a side"),
    (["--lattice", "400x400x400"], r"the sample pool \(nca.pool_size 4 states of 64,000,000 cells x 7 channels\) "
                                   r"needs 8.3 GiB, more than the"),
])
def test_a_users_mistake_is_one_error_line_and_status_2(tmp_path, capsys, monkeypatch, args, message):
    from cubecore.nca import trainer as trainer_module

    monkeypatch.setattr(trainer_module, "available_bytes", lambda device: 2 * 1024 ** 3)  # any machine: 2 GiB free
    try:
        status = run(tmp_path, *args)
    except SystemExit as exit:  # argparse's usage errors
        status = exit.code
    assert status == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and re.search(message, err[0]), err
    assert not (tmp_path / "run").exists()  # nothing written


def test_resume_refuses_a_key_that_changes_the_run(tmp_path, capsys):
    assert run(tmp_path) == 0
    capsys.readouterr()
    assert main(["--resume", "--output-dir", str(tmp_path / "run"), "nca.batch_size=3", "--quiet"]) == 2
    assert "cannot change ['nca.batch_size'] when resuming" in capsys.readouterr().err
    assert main(["--resume", "--output-dir", str(tmp_path / "run"), "iterations=9", "--quiet"]) == 0
    assert load_checkpoint_file(tmp_path / "run" / "last.pt")["iteration"] == 9


def test_resume_with_another_backend_runs_it(tmp_path, capsys, monkeypatch):
    """model.backend may change on resume: the resumed run computes with the new backend (a run's record and its
    computation agree), in a resumed run and in a resumed --seeds study."""
    from cubecore.nca import trainer as trainer_module

    built = []
    made = trainer_module.NcaTrainer.from_checkpoint.__func__

    def spy(cls, *args, **kwargs):
        trainer = made(cls, *args, **kwargs)
        built.append(trainer.core.backend)
        return trainer
    monkeypatch.setattr(trainer_module.NcaTrainer, "from_checkpoint", classmethod(spy))
    assert run(tmp_path, "iterations=3") == 0
    assert main(["--resume", "--output-dir", str(tmp_path / "run"), "iterations=6", "--backend", "reference",
                 "--quiet"]) == 0
    assert built == ["reference"] and "(reference backend)" in capsys.readouterr().out
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["nca_training"]
    assert saved["model"]["backend"] == "reference"
    study = [*TINY, "iterations=3", "--output-dir", str(tmp_path / "study"), "--seeds", "0"]
    assert main(study) == 0
    (tmp_path / "study" / "seed-0" / "results.json").unlink()  # a seed stopped before its report
    assert main([*study, "--resume", "--backend", "reference"]) == 0
    assert built[-1] == "reference"


def test_another_target_takes_its_own_lattice_unless_one_is_given(tmp_path):
    """The command's own 8^3 belongs to its tree: --target X without --lattice places X in the upstream's cube."""
    from cubecore.nca.__main__ import COMMAND, build_parser

    def lattice(*argv):
        return COMMAND.config_from_args(build_parser().parse_args(list(argv))).nca.lattice

    assert lattice() == (8, 8, 8) and lattice("--target", "tree") == (8, 8, 8)
    assert lattice("--target", "plain_village_house") is None
    assert lattice("nca.target=plain_village_house") is None
    assert lattice("--target", "plain_village_house", "--lattice", "12x12x12") == (12, 12, 12)
    assert lattice("--target", "villages_light", "nca.lattice=[6,6,6]") == (6, 6, 6)


def test_resume_errors_that_are_the_callers_are_not_blamed_on_the_checkpoint(tmp_path, capsys, monkeypatch):
    from cubecore.nca import trainer as trainer_module

    assert run(tmp_path, "iterations=3") == 0
    capsys.readouterr()
    monkeypatch.setattr(trainer_module, "available_bytes", lambda device: 1000)  # a device without room for the pool
    assert main(["--resume", "--output-dir", str(tmp_path / "run"), "iterations=6", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "the sample pool" in err and "consistent" not in err


def test_the_shipped_config_file_is_the_commands_defaults():
    shipped = NcaTrainingConfig.from_yaml(ROOT / "config" / "nca_training.yaml")
    assert shipped.to_dict() == NcaTrainingConfig(**SMALL_RUN).to_dict()


def test_the_command_runs_as_a_module(tmp_path):
    done = subprocess.run([sys.executable, "-m", "cubecore.nca", *TINY, "iterations=3", "--output-dir",
                           str(tmp_path / "m")], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| grown | 3 |" in done.stdout
    assert subprocess.run([sys.executable, "-m", "cubecore.nca", "--help"], capture_output=True, text=True,
                          timeout=60).stdout.startswith("usage: python -m cubecore.nca")


def test_torchrun_two_cpu_processes_train_the_one_process_run(tmp_path):
    """DistributedDataParallel over gloo, each process a share of the batch: both end with the same weights, only
    rank 0 writes, and the run is the one-process run (the same pool, batches, fire masks and gradient)."""
    args = [*TINY, "nca.batch_size=4", "--device", "cpu", "--backend", "reference"]
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "cubecore.nca",
         *args, "--output-dir", str(tmp_path / "ddp")],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "weights identical across 2 processes: True" in result.stdout
    assert (tmp_path / "ddp" / "report.md").is_file() and (tmp_path / "ddp" / "model").is_dir()
    assert len((tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()) == 2, "only rank 0 writes metrics"
    assert main([*args, "--output-dir", str(tmp_path / "one")]) == 0
    two, one = weights(tmp_path / "ddp" / "last.pt"), weights(tmp_path / "one" / "last.pt")
    for name in one:
        assert torch.allclose(two[name], one[name], rtol=1e-4, atol=1e-6), name


def test_a_run_too_large_for_the_memory_is_said_with_its_estimate(tmp_path, capsys, monkeypatch):
    import cubecore.nca.__main__ as command
    from cubecore.nca.trainer import training_bytes

    kernel = training_bytes(NcaTrainer(NcaTrainingConfig(device="cpu", **{"nca.lattice": [32, 32, 32]})))[0]
    reference = training_bytes(NcaTrainer(NcaTrainingConfig(device="cpu", **{"nca.lattice": [32, 32, 32],
                                                                            "model.backend": "reference"})))[0]
    # the upstream's default batch (32) and steps (64) in a 32^3 lattice, the tree's 3 + 1 + 12 channels: the
    # kernel keeps the states, 32 x 32^3 x 65 x 16 floats = 4.1 GiB; the reference its activations too
    assert 4.0 * 2 ** 30 < kernel < 5.0 * 2 ** 30 and reference > 4 * kernel
    monkeypatch.setattr(command, "available_bytes", lambda device: 1024)  # 1 KiB free
    assert run(tmp_path) == 0
    err = capsys.readouterr().err
    assert "GiB of memory to train (2 samples a process, 125 cells of 7 channels, 3 steps, the" in err
    assert "its size is set by nca.batch_size" in err
    monkeypatch.setattr(command, "available_bytes", lambda device: None)
    assert run(tmp_path, "--overwrite") == 0
    assert "GiB of memory" not in capsys.readouterr().err
