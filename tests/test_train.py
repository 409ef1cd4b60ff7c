"""`python -m cubecore.train` and `python -m cubecore.evaluate`: the commands end to end (runs, resume, Ctrl-C,
seeds, the run directory, the files a run writes, user mistakes as one error line)."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import FakeEncoder, tiny_config  # noqa: F401
from cubecore import CubeTrainer, TrainingConfig  # noqa: F401
from cubecore import evaluate as evaluate_cli
from cubecore import train as train_cli
from cubecore.training.checkpoint import CheckpointError  # noqa: F401
from cubecore.training.rundir import RunDirectory  # noqa: F401

TINY = ["lattice_size=[2, 2, 3]", "state_size=4", "hidden_size=8", "steps=2", "batch_size=8", "device=cpu",
        "learning_rate=1e-2", "--quiet"]


def run_cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})


def cli(tmp_path, data, out, *extra, epochs=None):
    argv = ["--data", str(data), "--output-dir", str(out), f"cache_dir={tmp_path / 'cache'}", *TINY, *extra]
    if epochs is not None:
        argv += ["--epochs", str(epochs)]
    return train_cli.main(argv)


def weights(path):
    return CubeTrainer.from_checkpoint(path).model.state_dict()


def assert_same_weights(a, b):
    a, b = weights(a), weights(b)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def epochs_in(out):
    return [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def _interrupt_at_step(monkeypatch, step):
    original = CubeTrainer.loss

    def loss(self, pred, target):
        if torch.is_grad_enabled() and self.step == step:
            raise KeyboardInterrupt
        return original(self, pred, target)

    monkeypatch.setattr(CubeTrainer, "loss", loss)
    return original


def test_cli_help_lists_every_option():
    """--help of each command names every option its parser has (none hidden, none stale)."""
    for module, cli in (("cubecore.train", train_cli), ("cubecore.evaluate", evaluate_cli)):
        parser = cli.build_parser()
        result = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        options = [o for a in parser._actions for o in a.option_strings]
        assert "--help" in options and len(options) > 2, (module, options)
        for option in options:
            assert option in result.stdout, (module, option)


def test_cli_rejects_bad_keys(tmp_path):
    result = run_cli("cubecore.train", "learnig_rate=0.1", cwd=tmp_path)
    assert result.returncode == 2 and "learnig_rate" in result.stderr


def test_cli_one_epoch_smoke_run_resume_and_evaluate(tmp_path, dialogue_file):
    out = tmp_path / "run"
    args = ["cubecore.train", "--data", dialogue_file, "--epochs", "1", "--output-dir", str(out), "--quiet",
            f"cache_dir={tmp_path / 'cache'}"]
    result = run_cli(*args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    for name in ("last.pt", "curves.png", "report.md", "metrics.csv", "metrics.jsonl", "config.yaml"):
        assert (out / name).is_file(), name
    report = (out / "report.md").read_text()
    assert "| cube |" in report and "| ridge |" in report and "Example predictions" in report
    result = run_cli("cubecore.train", "--resume", "--epochs", "2", "--output-dir", str(out), "--quiet", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "resuming" in result.stdout
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["epoch"] for l in lines] == [1, 2]
    result = run_cli("cubecore.evaluate", str(out / "last.pt"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| identity |" in result.stdout


def test_torchrun_two_cpu_processes(tmp_path, dialogue_file):
    """DistributedDataParallel over gloo: the run finishes, rank 0 writes, and both ranks hold the same weights."""
    out = tmp_path / "ddp"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "cubecore.train",
         "--data", dialogue_file, "--epochs", "2", "--output-dir", str(out), "--quiet", "--device", "cpu",
         f"cache_dir={tmp_path / 'cache'}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
        env={**__import__("os").environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "weights identical across 2 processes: True" in result.stdout
    assert (out / "last.pt").is_file() and (out / "report.md").is_file()
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2, "only rank 0 writes metrics"


def test_torchrun_ranks_stop_with_rank_zeros_reason_when_it_cannot_start(tmp_path, dialogue_file):
    """Only rank 0 takes the run folder; when it refuses (here: the folder is a file), every rank says why in one
    line instead of the other ranks failing in gloo with a traceback once rank 0 is gone."""
    (tmp_path / "taken").write_text("not a folder")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "cubecore.train",
         "--data", dialogue_file, "--epochs", "1", "--output-dir", "taken", "--quiet", "--device", "cpu",
         f"cache_dir={tmp_path / 'cache'}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={**__import__("os").environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert result.returncode != 0
    assert "error: output directory taken is a file" in result.stderr, result.stderr[-3000:]
    assert "error: rank 0 stopped: output directory taken is a file" in result.stderr
    assert "[rank1]" not in result.stderr and "Connection closed by peer" not in result.stderr


# `python -m cubecore.train` as one rank of a two-process run started without torchrun (whose agent would stop
# the other ranks for a failed one), with the fake teacher.  FAIL=R:teacher fails rank R before the ranks first
# meet, FAIL=R:model after (bad data, as an error of its own); SLOW=R keeps rank R encoding data for two minutes.
RANK_DRIVER = """
import os, sys, time
sys.path.insert(0, {tests!r})
from conftest import FakeEncoder
from cubecore import CubeTrainer, train
from cubecore.errors import InvalidValueError
rank = int(os.environ["RANK"])
failing, where = os.environ["FAIL"].split(":")
failing = rank == int(failing)
teacher = FakeEncoder(dim=12)
def get_teacher(self):
    if failing and where == "teacher":
        raise InvalidValueError(f"bad data on rank {{rank}}")
    return teacher
CubeTrainer.teacher = property(get_teacher)
def initialize_components(self, dim=None, original=CubeTrainer.initialize_components):
    if failing and where == "model":
        raise InvalidValueError(f"bad data on rank {{rank}}")
    return original(self, dim)
CubeTrainer.initialize_components = initialize_components
def prepare_data(*args, original=train.prepare_data):
    if rank == int(os.environ["SLOW"]):
        for _ in range(1200):
            time.sleep(0.1)
    return original(*args)
train.prepare_data = prepare_data
sys.exit(train.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("fail,slow", [("0:model", -1), ("1:teacher", 0)])
def test_a_rank_that_stops_stops_every_rank_at_once_with_its_reason(tmp_path, dialogue_file, fail, slow):
    """A rank that failed to start left the others waiting at their next collective until gloo's timeout (30 min),
    or failing there with gloo's traceback: every rank stops at once with its reason now, also without torchrun
    (whose agent would stop the others for it), and rank 0 leaves its run folder as it found it."""
    import socket
    import time

    driver = tmp_path / "rank.py"
    driver.write_text(RANK_DRIVER.format(tests=os.path.dirname(__file__)))
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port), "WORLD_SIZE": "2", "FAIL": fail, "SLOW": str(slow)}
    out = tmp_path / "run"
    argv = [sys.executable, str(driver), "--data", dialogue_file, "--output-dir", str(out),
            f"cache_dir={tmp_path / 'cache'}", *TINY, "--epochs", "1"]
    start = time.monotonic()
    ranks = [subprocess.Popen(argv, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    try:
        said = [rank.communicate(timeout=60) for rank in ranks]
    finally:
        for rank in ranks:
            rank.kill()
    failed = int(fail[0])
    other = 1 - failed
    assert ranks[failed].returncode == 2 and f"error: bad data on rank {failed}" in said[failed][1], said[failed][1]
    assert ranks[other].returncode == 2, said[other][1][-3000:]
    assert said[other][1].strip() == f"error: rank {failed} stopped: bad data on rank {failed}", said[other][1]
    assert time.monotonic() - start < 40, "at once: the other rank was not let finish its two minutes"
    assert not out.exists(), "rank 0's run, which saved nothing, left nothing"


def test_ctrl_c_then_resume_ends_bit_identical_to_an_uninterrupted_run(tmp_path, fake_teacher, dialogue_file,
                                                                      monkeypatch, capsys):
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    assert cli(tmp_path, dialogue_file, straight, epochs=4) == 0
    steps_per_epoch = json.loads((straight / "metrics.jsonl").read_text().splitlines()[0])["step"]
    original = _interrupt_at_step(monkeypatch, 2 * steps_per_epoch + 2)  # inside epoch 3
    assert cli(tmp_path, dialogue_file, cut, epochs=4) == 130
    assert "holds epoch 2" in capsys.readouterr().err
    assert CubeTrainer.from_checkpoint(cut / "last.pt").epoch == 2
    monkeypatch.setattr(CubeTrainer, "loss", original)
    assert train_cli.main(["--resume", "--output-dir", str(cut), "--quiet"]) == 0
    assert_same_weights(straight / "last.pt", cut / "last.pt")
    assert epochs_in(cut) == [1, 2, 3, 4], "each epoch once in the metrics after a resume"
    assert CubeTrainer.from_checkpoint(cut / "last.pt").step == CubeTrainer.from_checkpoint(straight / "last.pt").step


# `python -m cubecore.train` with the fake teacher, that sends itself SIGTERM at optimizer step STEP.
SIGTERM_DRIVER = """
import os, signal, sys
import torch
sys.path.insert(0, {tests!r})
from conftest import FakeEncoder
from cubecore import CubeTrainer, train
teacher = FakeEncoder(dim=12)
CubeTrainer.teacher = property(lambda self: teacher)
original = CubeTrainer.loss
def loss(self, pred, target):
    if torch.is_grad_enabled() and self.model_factory is None and self.step == int(os.environ["STEP"]):
        os.kill(os.getpid(), signal.SIGTERM)
    return original(self, pred, target)
CubeTrainer.loss = loss
sys.exit(train.main(sys.argv[1:]))
"""


def test_sigterm_stops_a_run_as_ctrl_c_does(tmp_path, fake_teacher, dialogue_file):
    """SIGTERM (job schedulers, docker stop) killed a run outright: an --overwrite run before its first checkpoint
    left the old run hidden in .replaced/ ("checkpoint not found"); now it cleans up as for Ctrl-C."""
    out = tmp_path / "run"
    assert cli(tmp_path, dialogue_file, out, epochs=1) == 0
    before = {name: (out / name).read_bytes() for name in ("last.pt", "best.pt", "config.yaml", "results.json")}
    driver = tmp_path / "driver.py"
    driver.write_text(SIGTERM_DRIVER.format(tests=os.path.dirname(__file__)))
    argv = [sys.executable, str(driver), "--data", dialogue_file, "--output-dir", str(out),
            f"cache_dir={tmp_path / 'cache'}", *TINY, "hidden_size=6", "--epochs", "2"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(argv + ["--overwrite"], capture_output=True, text=True, timeout=300,
                            env={**env, "STEP": "1"})
    assert result.returncode == 130, result.stderr[-3000:]
    assert "the run it was to replace is kept there" in result.stderr, result.stderr[-3000:]
    assert {name: (out / name).read_bytes() for name in before} == before and not (out / ".replaced").exists()
    assert evaluate_cli.main([str(out / "last.pt")]) == 0
    # After a checkpoint: it says what to resume, and --resume goes on from there.
    steps_per_epoch = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["step"]
    result = subprocess.run(argv + ["--overwrite"], capture_output=True, text=True, timeout=300,
                            env={**env, "STEP": str(steps_per_epoch + 1)})
    assert result.returncode == 130 and "holds epoch 1" in result.stderr, result.stderr[-3000:]
    assert train_cli.main(["--resume", "--output-dir", str(out), "--quiet"]) == 0 and epochs_in(out) == [1, 2]


def test_ctrl_c_in_the_first_epoch_says_nothing_was_saved(tmp_path, fake_teacher, dialogue_file, monkeypatch,
                                                          capsys):
    _interrupt_at_step(monkeypatch, 1)
    assert cli(tmp_path, dialogue_file, tmp_path / "run", epochs=3) == 130
    assert "nothing to resume" in capsys.readouterr().err
    assert not (tmp_path / "run" / "last.pt").exists()


def test_resume_writes_where_the_user_points_and_refuses_what_it_cannot_change(tmp_path, fake_teacher,
                                                                            dialogue_file, capsys):
    original, copy = tmp_path / "original", tmp_path / "copy"
    assert cli(tmp_path, dialogue_file, original, epochs=2) == 0
    shutil.copytree(original, copy)
    before = (original / "last.pt").read_bytes()
    assert train_cli.main(["--resume", str(copy / "last.pt"), "--epochs", "3", "--quiet"]) == 0
    assert (original / "last.pt").read_bytes() == before, "the original run is untouched"
    assert CubeTrainer.from_checkpoint(copy / "last.pt").epoch == 3
    assert CubeTrainer.from_checkpoint(copy / "last.pt").config.output_dir == str(copy)
    capsys.readouterr()
    assert train_cli.main(["--resume", "--output-dir", str(copy), "--epochs", "4", "learning_rate=0.5",
                           "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "learning_rate" in err and "patience" in err, err
    assert train_cli.main(["--resume", "--output-dir", str(copy), "--epochs", "4", "patience=3", "--quiet"]) == 0
    assert CubeTrainer.from_checkpoint(copy / "last.pt").config.patience == 3


def test_a_finished_run_is_not_trained_on_by_accident(tmp_path, fake_teacher, dialogue_file, capsys):
    out = tmp_path / "run"
    assert cli(tmp_path, dialogue_file, out, "target_similarity=-1.0", epochs=5) == 0  # stops after epoch 1
    before = (out / "last.pt").read_bytes()
    assert train_cli.main(["--resume", "--output-dir", str(out), "--quiet"]) == 0
    said = capsys.readouterr().out
    assert "finished" in said and "--epochs" in said
    assert (out / "last.pt").read_bytes() == before
    assert train_cli.main(["--resume", "--output-dir", str(out), "--epochs", "3", "target_similarity=null",
                           "--quiet"]) == 0
    assert CubeTrainer.from_checkpoint(out / "last.pt").epoch == 3


def test_a_run_directory_has_one_owner(tmp_path, fake_teacher, dialogue_file, capsys):
    out = tmp_path / "run"
    with RunDirectory(out, "fresh"):  # another run holds it
        assert cli(tmp_path, dialogue_file, out, epochs=1) == 2
    assert "in use by another run" in capsys.readouterr().err
    assert cli(tmp_path, dialogue_file, out, epochs=1) == 0
    config_before = (out / "config.yaml").read_text()
    assert cli(tmp_path, dialogue_file, out, "hidden_size=6", epochs=1) == 2, "a fresh run into a used folder"
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "config.yaml").read_text() == config_before
    (out / "last.pt.x1y2.tmp").write_bytes(b"half")
    assert cli(tmp_path, dialogue_file, out, "hidden_size=6", "--overwrite", epochs=1) == 0
    assert epochs_in(out) == [1] and not list(out.glob("*.tmp"))
    assert CubeTrainer.from_checkpoint(out / "last.pt").config.model.hidden_size == 6


def test_best_weights_are_kept_beside_the_last(tmp_path, fake_teacher, dialogue_file):
    out = tmp_path / "run"
    assert cli(tmp_path, dialogue_file, out, "learning_rate=0.3", epochs=4) == 0
    history = CubeTrainer.from_checkpoint(out / "last.pt").history
    best_epoch = min(history, key=lambda h: h["val_loss"])["epoch"]
    assert CubeTrainer.from_checkpoint(out / "best.pt").epoch == best_epoch
    assert f"weights of epoch {best_epoch}, the best by val_loss (best.pt)" in (out / "report.md").read_text()


def test_everything_checkable_is_checked_before_work_or_writes(tmp_path, fake_teacher, dialogue_file, capsys):
    out = tmp_path / "run"
    assert cli(tmp_path, dialogue_file, out, "lattice_size=[2, 2, 2]", epochs=1) == 2
    assert "lattice_size" in capsys.readouterr().err
    assert fake_teacher.calls == 0 and not out.exists()


def test_an_empty_validation_side_is_said_before_training(tmp_path, fake_teacher, capsys):
    data = tmp_path / "one_question.txt"
    data.write_text("\n".join(f"the question\tanswer {i}" for i in range(30)) + "\n")
    assert cli(tmp_path, data, tmp_path / "run", epochs=1) == 2
    err = capsys.readouterr().err
    assert "validation split" in err and "empty" in err and "Traceback" not in err


@pytest.mark.parametrize("setup,args,match", [
    (lambda p: p.write_text(""), ["--config", "{}"], "is empty"),
    (lambda p: p.write_text("cube_training:\n  epochs: [1\n"), ["--config", "{}"], "not valid YAML"),
    (None, ["seed=123456789012345678901234567890"], "seed"),
    (None, ["epochs=many"], "epochs"),
])
def test_user_mistakes_are_one_error_line(tmp_path, fake_teacher, capsys, setup, args, match):
    path = tmp_path / "c.yaml"
    if setup:
        setup(path)
    assert train_cli.main([a.replace("{}", str(path)) for a in args] + ["--output-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and match in err and len(err.strip().splitlines()) == 1, err


def test_seeds_train_one_run_each_and_report_mean_and_spread(tmp_path, fake_teacher, dialogue_file):
    out = tmp_path / "study"
    assert cli(tmp_path, dialogue_file, out, "--seeds", "3,4", epochs=2) == 0
    runs = {s: json.loads((out / f"seed-{s}" / "results.json").read_text()) for s in (3, 4)}
    assert CubeTrainer.from_checkpoint(out / "seed-4" / "last.pt").config.seed == 4
    summary = json.loads((out / "seeds.json").read_text())["summary"]
    values = [runs[3]["cube"]["mrr"], runs[4]["cube"]["mrr"]]
    assert summary["cube"]["mrr"][0] == pytest.approx(sum(values) / 2)
    assert summary["cube"]["mrr"][1] == pytest.approx(torch.tensor(values, dtype=torch.float64).std().item())
    assert "± " in (out / "seeds.md").read_text() and "| mlp |" in (out / "seeds.md").read_text()
    assert "| linear |" in (out / "seeds.md").read_text()


def test_resume_into_another_folder_neither_replaces_a_run_nor_misreports_a_ctrl_c(
        tmp_path, fake_teacher, dialogue_file, monkeypatch, capsys):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    assert cli(tmp_path, dialogue_file, a, epochs=1) == 0
    assert cli(tmp_path, dialogue_file, b, "hidden_size=6", epochs=1) == 0
    before = (b / "last.pt").read_bytes()
    assert train_cli.main(["--resume", str(a / "last.pt"), "--output-dir", str(b), "--epochs", "2", "--quiet"]) == 2
    assert "already holds a run" in capsys.readouterr().err and (b / "last.pt").read_bytes() == before
    _interrupt_at_step(monkeypatch, CubeTrainer.from_checkpoint(a / "last.pt").step + 1)
    assert train_cli.main(["--resume", str(a / "last.pt"), "--output-dir", str(c), "--epochs", "3", "--quiet"]) == 130
    err = capsys.readouterr().err
    assert f"nothing was saved in {c}" in err and f"resume again from {a / 'last.pt'}" in err, err


def test_epochs_as_an_override_is_checked_on_resume_like_the_flag(tmp_path, fake_teacher, dialogue_file, capsys):
    out = tmp_path / "run"
    assert cli(tmp_path, dialogue_file, out, epochs=2) == 0
    assert train_cli.main(["--resume", "--output-dir", str(out), "epochs=1", "--quiet"]) == 2
    assert "is not more than the 2 epochs" in capsys.readouterr().err


def test_overwrite_keeps_the_old_run_when_the_new_one_cannot_start(tmp_path, fake_teacher, dialogue_file, capsys):
    out = tmp_path / "run"
    assert cli(tmp_path, dialogue_file, out, epochs=1) == 0
    (out / "my_notes.tmp").write_text("mine")
    before = (out / "last.pt").read_bytes()
    assert cli(tmp_path, tmp_path / "missing.txt", out, "--overwrite", epochs=1) == 2
    assert (out / "last.pt").read_bytes() == before and (out / "my_notes.tmp").read_text() == "mine"
    assert cli(tmp_path, tmp_path / "missing.txt", tmp_path / "new", epochs=1) == 2
    assert not (tmp_path / "new").exists(), "a folder made for a run that could not start is removed"


def test_a_resumed_copy_without_a_new_best_says_where_the_best_weights_are(tmp_path, fake_teacher, dialogue_file):
    a, b = tmp_path / "a", tmp_path / "b"
    assert cli(tmp_path, dialogue_file, a, "learning_rate=0.001", "warmup_epochs=0", epochs=1) == 0
    assert train_cli.main(["--resume", str(a / "last.pt"), "--output-dir", str(b), "--epochs", "2", "--quiet",
                           "patience=100"]) == 0
    report = (b / "report.md").read_text()
    assert ("(best.pt)" in report) == (b / "best.pt").is_file()


def test_results_json_is_valid_json_when_a_metric_is_undefined(tmp_path, fake_teacher):
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(f"sentence {i}" for i in range(10)) + "\n")  # 2 validation rows
    out = tmp_path / "run"
    assert cli(tmp_path, texts, out, "--mode", "autoencoder", epochs=1) == 0
    text = (out / "results.json").read_text()
    assert "NaN" not in text and json.loads(text)["cube"]["semantic_preservation"] is None


def test_more_mistakes_are_one_error_line(tmp_path, fake_teacher, dialogue_file, capsys):
    (tmp_path / "c.yaml").write_text("cube_training:\n  epochs: 0\n")
    for argv, match in ((["--config", str(tmp_path / "c.yaml")], "c.yaml"), (["device=meta"], "meta"),
                        (["device=foo"], "device"), (["--epochs", "abc"], "--epochs")):
        try:
            status = cli(tmp_path, dialogue_file, tmp_path / "r", *argv)
        except SystemExit as exc:  # argparse's own errors exit from the parser
            status = exc.code
        assert status == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and match in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "r").exists()


def test_a_relative_data_path_is_kept_absolute_so_the_run_resumes_from_anywhere(tmp_path, fake_teacher,
                                                                             dialogue_file, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    assert cli(tmp_path, os.path.relpath(dialogue_file, tmp_path), out, epochs=1) == 0
    monkeypatch.chdir(tmp_path / "run")
    assert train_cli.main(["--resume", str(out / "last.pt"), "--epochs", "2", "--quiet"]) == 0


def test_a_run_leaves_a_hub_style_model_of_its_best_weights(tmp_path, fake_teacher, dialogue_file):
    from cubecore import EmbeddingProcessor

    out = tmp_path / "run"
    assert cli(tmp_path, dialogue_file, out, epochs=3) == 0
    trainer = CubeTrainer.from_checkpoint(out / "last.pt")
    model = EmbeddingProcessor.from_pretrained(out / "model")
    x = torch.randn(5, 12)
    with trainer.weights_of("best"):
        assert torch.equal(model(x), trainer.model(x))
    card = (out / "model" / "README.md").read_text()
    assert "| ridge |" in card and "| mlp |" in card and f"epoch {trainer.best_epoch}" in card
    assert "| linear |" in card and set(trainer.trained_floors) == {"mlp", "linear"}
    report = (out / "report.md").read_text()
    assert "`linear` (the input plus a learned linear map of it, the standard query adapter" in report  # where the cube stands, in words
    from PIL import Image

    with Image.open(out / "rollout.gif") as gif:  # the report's rollout: one frame per step, from the first
        assert gif.n_frames == trainer.config.model.steps  # step that shows something (the start is all zero)
    assert "rollout.gif" in (out / "report.md").read_text()


def test_tensorboard_logger_writes_steps_epochs_and_hparams(tmp_path, fake_teacher, dialogue_file):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    assert cli(tmp_path, dialogue_file, out, "logger=tensorboard", epochs=2) == 0
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "epoch/val_loss", "epoch/val_r@1", "epoch/val_mrr"} <= scalars, scalars
    history = CubeTrainer.from_checkpoint(out / "last.pt").history
    steps = events.Scalars("train/loss")
    assert [s.step for s in steps] == list(range(1, history[-1]["step"] + 1))
    mrr = [e.value for e in events.Scalars("epoch/val_mrr")]
    assert mrr == pytest.approx([h["val_mrr"] for h in history], rel=1e-6)
    assert "final/cosine" in scalars and events.PluginTagToContent("hparams"), "the config as hyperparameters"
    assert epochs_in(out) == [1, 2], "the metrics files are written with any logger"


def test_resume_accepts_the_same_relative_data_path(tmp_path, fake_teacher, dialogue_file, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rel = os.path.relpath(dialogue_file, tmp_path)
    assert cli(tmp_path, rel, tmp_path / "run", epochs=1) == 0
    assert train_cli.main(["--resume", str(tmp_path / "run" / "last.pt"), "--data", rel, "--epochs", "2",
                           "--quiet"]) == 0


def test_tensorboard_after_ctrl_c_and_resume_shows_each_step_once(tmp_path, fake_teacher, dialogue_file, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    original = _interrupt_at_step(monkeypatch, 20)  # in epoch 3, after epoch 2 was saved
    assert cli(tmp_path, dialogue_file, out, "logger=tensorboard", epochs=4) == 130
    monkeypatch.setattr(CubeTrainer, "loss", original)
    assert train_cli.main(["--resume", "--output-dir", str(out), "--quiet"]) == 0
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    for tag in ("train/loss", "epoch/val_loss"):
        steps = [e.step for e in events.Scalars(tag)]
        assert len(steps) == len(set(steps)), (tag, steps)


def test_every_seed_is_checked_before_the_first_run(tmp_path, fake_teacher, dialogue_file, capsys):
    assert cli(tmp_path, dialogue_file, tmp_path / "s", "--seeds", "1,-1", epochs=1) == 2
    assert "seed" in capsys.readouterr().err and not (tmp_path / "s" / "seed-1").exists()
    assert cli(tmp_path, dialogue_file, tmp_path / "s", "--seeds", "1,2", "seed=7", epochs=1) == 2


def test_from_pretrained_names_the_mistake(tmp_path, fake_teacher, dialogue_file):
    from cubecore import EmbeddingProcessor

    out = tmp_path / "run"
    assert cli(tmp_path, dialogue_file, out, epochs=1) == 0
    with pytest.raises(FileNotFoundError, match="its model is"):
        EmbeddingProcessor.from_pretrained(out)
    with pytest.raises(ValueError, match="is a file"):
        EmbeddingProcessor.from_pretrained(out / "best.pt")
    (out / "model" / "config.json").write_text("{broken")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        EmbeddingProcessor.from_pretrained(out / "model")


def _same_answer_file(tmp_path):
    path = tmp_path / "same_answer.txt"
    path.write_text("\n".join(f"question {i}\tthe only answer" for i in range(40)) + "\n")
    return path


def test_overwrite_replaces_the_old_run_only_once_the_new_one_saves_a_checkpoint(tmp_path, fake_teacher,
                                                                                dialogue_file, monkeypatch,
                                                                                capsys):
    out = tmp_path / "run"
    assert cli(tmp_path, dialogue_file, out, epochs=1) == 0
    before = {name: (out / name).read_bytes() for name in ("last.pt", "best.pt", "config.yaml", "results.json")}
    # fails in the trainer, after the data loaded and the model was built: InfoNCE with one target
    assert cli(tmp_path, _same_answer_file(tmp_path), out, "loss_function=infonce", "--overwrite", epochs=1) == 2
    assert "two different targets" in capsys.readouterr().err
    assert {name: (out / name).read_bytes() for name in before} == before
    assert (out / "model").is_dir() and not (out / ".replaced").exists()
    _interrupt_at_step(monkeypatch, 1)  # Ctrl-C in the new run's first epoch
    assert cli(tmp_path, dialogue_file, out, "hidden_size=6", "--overwrite", epochs=2) == 130
    assert "the run it was to replace is kept" in capsys.readouterr().err
    assert {name: (out / name).read_bytes() for name in before} == before


def test_a_failed_fresh_start_leaves_nothing_that_asks_for_resume(tmp_path, fake_teacher, dialogue_file, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert cli(tmp_path, _same_answer_file(tmp_path), out, "loss_function=infonce", epochs=1) == 2
    capsys.readouterr()
    assert sorted(p.name for p in out.iterdir() if p.name != ".lock") == ["notes.txt"]
    assert cli(tmp_path, dialogue_file, out, epochs=1) == 0, "the next fresh run starts"
    assert (out / "notes.txt").read_text() == "mine"


def test_overwrite_never_removes_a_folder_that_is_not_a_cubecore_run(tmp_path, fake_teacher, dialogue_file,
                                                                      capsys):
    other = tmp_path / "other_project"
    for name in ("model", "tensorboard"):
        (other / name).mkdir(parents=True)
        (other / name / "data.bin").write_text(name)
    (other / "config.yaml").write_text("theirs: true\n")
    for extra in ((), ("--overwrite",)):
        assert cli(tmp_path, dialogue_file, other, *extra, epochs=1) == 2
        err = capsys.readouterr().err
        assert f"{other} holds config.yaml, model, tensorboard but is not a cubecore run" in err, err
    assert sorted(p.name for p in other.iterdir()) == ["config.yaml", "model", "tensorboard"]
    assert (other / "model" / "data.bin").read_text() == "model" and (other / "config.yaml").read_text() == \
        "theirs: true\n"


def test_where_a_run_writes_has_one_rule(tmp_path, fake_teacher, dialogue_file, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert train_cli.main(["--data", dialogue_file, "--output-dir", str(a), f"output_dir={b}", *TINY,
                           "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert "output_dir is given twice" in err and str(a) in err and str(b) in err, err
    assert not a.exists() and not b.exists()
    study = tmp_path / "study"  # the override names the study's folder; each seed still trains in its own
    for extra in ((), ("--overwrite",)):
        assert train_cli.main(["--data", dialogue_file, f"output_dir={study}", f"cache_dir={tmp_path / 'cache'}",
                               *TINY, "--epochs", "1", "--seeds", "1,2", *extra]) == 0
        assert sorted(p.name for p in study.iterdir()) == ["cubecore_run.json", "seed-1", "seed-2", "seeds.json",
                                                           "seeds.md"]
        assert CubeTrainer.from_checkpoint(study / "seed-2" / "last.pt").config.output_dir == str(study / "seed-2")


def test_seeds_continue_after_ctrl_c_with_resume(tmp_path, fake_teacher, dialogue_file, monkeypatch, capsys):
    study = tmp_path / "study"
    original = CubeTrainer.loss

    def loss(self, pred, target):  # Ctrl-C in the second epoch of seed 4's cube
        if (torch.is_grad_enabled() and self.config.seed == 4 and self.model_factory is None and self.epoch == 1):
            raise KeyboardInterrupt
        return original(self, pred, target)

    monkeypatch.setattr(CubeTrainer, "loss", loss)
    assert cli(tmp_path, dialogue_file, study, "--seeds", "3,4,5", epochs=2) == 130
    err = capsys.readouterr().err
    assert "--seeds command plus --resume" in err, err
    monkeypatch.setattr(CubeTrainer, "loss", original)
    finished = (study / "seed-3" / "last.pt").read_bytes()
    assert cli(tmp_path, dialogue_file, study, "--seeds", "3,4,5", epochs=2) == 2
    assert "--resume" in capsys.readouterr().err
    assert cli(tmp_path, dialogue_file, study, "--seeds", "3,4,5", "--resume", "learning_rate=0.5", epochs=2) == 2
    assert "learning_rate" in capsys.readouterr().err
    assert cli(tmp_path, dialogue_file, study, "--seeds", "3,4,5", "--resume", epochs=2) == 0
    said = capsys.readouterr().out
    assert "seed 3: finished" in said and "resuming" in said
    assert (study / "seed-3" / "last.pt").read_bytes() == finished, "a finished seed is kept"
    assert epochs_in(study / "seed-4") == [1, 2] and epochs_in(study / "seed-5") == [1, 2]
    assert json.loads((study / "seeds.json").read_text())["seeds"] == [3, 4, 5]
    assert cli(tmp_path, dialogue_file, study, "--seeds", "3,4,5", "--resume", epochs=2) == 0, "nothing left to do"


@pytest.mark.parametrize("stop", ["ctrl-c", "full disk"])
def test_a_run_stopped_while_reporting_is_finished_by_resume(tmp_path, fake_teacher, dialogue_file, monkeypatch,
                                                             capsys, stop):
    """Ctrl-C, kill -9 or a full disk after the last checkpoint left no report.md, results.json or model/, and
    --resume said "nothing to do"; model/ was written in place, so a full disk left a part of it."""
    from cubecore import EmbeddingProcessor

    straight, cut = tmp_path / "straight", tmp_path / "cut"
    assert cli(tmp_path, dialogue_file, straight, epochs=2) == 0
    original = EmbeddingProcessor.generate_model_card

    def broken(self, *args, **kwargs):  # after the weights and config.json are written into model/
        if stop == "ctrl-c":
            raise KeyboardInterrupt
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(EmbeddingProcessor, "generate_model_card", broken)
    assert cli(tmp_path, dialogue_file, cut, epochs=2) == (130 if stop == "ctrl-c" else 2)
    err = capsys.readouterr().err
    assert ("--resume" in err) if stop == "ctrl-c" else ("No space left on device" in err and "model" in err), err
    assert not (cut / "model").exists(), "model/ is written whole or not at all"
    assert not (cut / "results.json").exists() and not [p for p in cut.iterdir() if "staging" in p.name]
    monkeypatch.setattr(EmbeddingProcessor, "generate_model_card", original)
    assert train_cli.main(["--resume", "--output-dir", str(cut), "--quiet"]) == 0
    said = capsys.readouterr().out
    assert "finishing" in said and "results.json" in said, said
    assert json.loads((cut / "results.json").read_text()) == json.loads((straight / "results.json").read_text())
    assert EmbeddingProcessor.from_pretrained(cut / "model") is not None and (cut / "report.md").is_file()
    assert_same_weights(straight / "last.pt", cut / "last.pt")
    assert epochs_in(cut) == [1, 2]
    assert train_cli.main(["--resume", "--output-dir", str(cut), "--quiet"]) == 0
    assert "nothing to do" in capsys.readouterr().out, "a run with all its outputs is left alone"


def test_the_same_command_plus_resume_finishes_a_run_and_trains_nothing(tmp_path, fake_teacher, dialogue_file,
                                                                         monkeypatch, capsys):
    """The command that ran a run, plus --resume (as the --seeds docs put it), was refused on a finished run
    ("epochs 2 is not more than ..."): only a bare --resume finished one stopped while reporting."""
    from cubecore import EmbeddingProcessor

    out = tmp_path / "run"
    original = EmbeddingProcessor.generate_model_card
    monkeypatch.setattr(EmbeddingProcessor, "generate_model_card",
                        lambda self, *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    assert cli(tmp_path, dialogue_file, out, epochs=2) == 130  # Ctrl-C while writing the report
    monkeypatch.setattr(EmbeddingProcessor, "generate_model_card", original)
    step = CubeTrainer.from_checkpoint(out / "last.pt").step
    capsys.readouterr()
    assert cli(tmp_path, dialogue_file, out, "--resume", epochs=2) == 0
    assert "finishing" in capsys.readouterr().out
    assert (out / "results.json").is_file() and (out / "model").is_dir() and epochs_in(out) == [1, 2]
    assert CubeTrainer.from_checkpoint(out / "last.pt").step == step, "nothing trained"
    before = (out / "last.pt").read_bytes()
    assert cli(tmp_path, dialogue_file, out, "--resume", epochs=2) == 0
    assert "nothing to do" in capsys.readouterr().out and (out / "last.pt").read_bytes() == before
    # An early stop, its command again: the same; a new value of what stopped it trains on, on purpose.
    early = tmp_path / "early"
    assert cli(tmp_path, dialogue_file, early, "target_similarity=-1.0", epochs=4) == 0  # stops after epoch 1
    before = (early / "last.pt").read_bytes()
    assert cli(tmp_path, dialogue_file, early, "target_similarity=-1.0", "--resume", epochs=4) == 0
    assert "nothing to do" in capsys.readouterr().out and (early / "last.pt").read_bytes() == before
    assert cli(tmp_path, dialogue_file, early, "target_similarity=null", "patience=10", "--resume", epochs=4) == 0
    assert epochs_in(early) == [1, 2, 3, 4]
    assert cli(tmp_path, dialogue_file, early, "--resume", epochs=3) == 2, "fewer epochs than it trained"
    assert "is not more than the 4 epochs" in capsys.readouterr().err


def test_evaluate_of_a_best_pt_scores_the_floors_its_run_trained(tmp_path, fake_teacher, dialogue_file,
                                                                 monkeypatch, capsys):
    """evaluate runs/cube/best.pt said the floors were "not stored (written before they were stored with the
    run); train the run again" right after a fresh run: a run stores them in its last.pt, after its last epoch.
    Where they are missing, the note says truly why and what brings them."""
    from cubecore.training.checkpoint import load_checkpoint_file, save_checkpoint_file
    from cubecore.training.report import results_table

    out = tmp_path / "run"
    assert cli(tmp_path, dialogue_file, out, epochs=2) == 0
    table = results_table(json.loads((out / "results.json").read_text())).splitlines()
    capsys.readouterr()
    assert evaluate_cli.main([str(out / "best.pt")]) == 0
    said = capsys.readouterr().out
    for model in ("cube", "mlp", "linear"):  # the run's own report's rows
        assert next(line for line in table if line.startswith(f"| {model} |")) in said, said
    assert f"those the run stored in {out / 'last.pt'}" in said and "not in the table" not in said
    alone = tmp_path / "alone"  # a best.pt without its run's last.pt
    alone.mkdir()
    shutil.copy(out / "best.pt", alone / "best.pt")
    assert evaluate_cli.main([str(alone / "best.pt")]) == 0
    said = capsys.readouterr().out
    assert "| mlp |" not in said and "mlp and linear floors are not in the table" in said
    assert "stores them in its last.pt" in said and "with no last.pt beside it that holds them" in said, said
    cut = tmp_path / "cut"  # a run stopped before its last epoch
    steps_per_epoch = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["step"]
    original = _interrupt_at_step(monkeypatch, steps_per_epoch + 1)  # in epoch 2
    assert cli(tmp_path, dialogue_file, cut, epochs=2) == 130
    monkeypatch.setattr(CubeTrainer, "loss", original)
    capsys.readouterr()
    assert evaluate_cli.main([str(cut / "best.pt")]) == 0
    said = capsys.readouterr().out
    assert "saved before that (epoch 1 of 2)" in said and "--resume" in said, said
    # A finished run's last.pt without them (saved before they were stored): --resume trains them, nothing else.
    state = load_checkpoint_file(out / "last.pt")
    del state["trained_floors"]
    save_checkpoint_file(state, out / "last.pt")
    assert evaluate_cli.main([str(out / "best.pt")]) == 0
    said = capsys.readouterr().out
    assert f"{out / 'last.pt'} holds the finished run without them" in said, said
    assert train_cli.main(["--resume", str(out / "last.pt"), "--quiet"]) == 0
    assert "the mlp floor, the linear floor" in capsys.readouterr().out
    assert load_checkpoint_file(out / "last.pt")["step"] == state["step"]
    assert evaluate_cli.main([str(out / "best.pt")]) == 0
    said = capsys.readouterr().out
    assert next(line for line in table if line.startswith("| linear |")) in said, said


def test_a_failed_model_write_keeps_the_previous_model_folder(tmp_path, fake_teacher, dialogue_file, monkeypatch):
    from cubecore import EmbeddingProcessor

    out = tmp_path / "run"
    assert cli(tmp_path, dialogue_file, out, epochs=1) == 0
    before = {p.name: p.read_bytes() for p in (out / "model").iterdir()}
    (out / "results.json").unlink()
    monkeypatch.setattr(EmbeddingProcessor, "generate_model_card",
                        lambda self, *a, **k: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    assert train_cli.main(["--resume", "--output-dir", str(out), "--quiet"]) == 2
    assert {p.name: p.read_bytes() for p in (out / "model").iterdir()} == before
    # a staging folder left by a kill -9 while writing model/ is removed by the next run into the folder
    stale = out / ".model.staging-999999999-abc"
    stale.mkdir()
    monkeypatch.undo()
    monkeypatch.setattr(CubeTrainer, "teacher", property(lambda self: fake_teacher))
    assert train_cli.main(["--resume", "--output-dir", str(out), "--quiet"]) == 0
    assert not stale.exists() and (out / "results.json").is_file()


def test_resume_on_other_data_is_refused_by_name(tmp_path, fake_teacher, dialogue_file, capsys):
    """A data file replaced between runs was trained on, and the best epoch chosen across two validation splits."""
    from cubecore.training.checkpoint import load_checkpoint_file, save_checkpoint_file

    out = tmp_path / "run"
    assert cli(tmp_path, dialogue_file, out, epochs=1) == 0
    original = open(dialogue_file).read()
    open(dialogue_file, "w").write(original.replace("answer 7\n", "another answer\n"))  # same number of pairs
    before = {name: (out / name).read_bytes() for name in ("last.pt", "train.log", "metrics.jsonl")}
    assert train_cli.main(["--resume", "--output-dir", str(out), "--epochs", "2", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert dialogue_file in err and "not the data this run trained on" in err, err
    assert {name: (out / name).read_bytes() for name in before} == before, "nothing written"
    assert evaluate_cli.main([str(out / "last.pt")]) == 0  # evaluate scores the data as it is, and says so
    assert "has changed since" in capsys.readouterr().err
    (out / "results.json").unlink()  # finishing a stopped report on other data: refused the same way
    assert train_cli.main(["--resume", "--output-dir", str(out), "--quiet"]) == 2
    assert "not the data this run trained on" in capsys.readouterr().err
    open(dialogue_file, "w").write(original)
    assert train_cli.main(["--resume", "--output-dir", str(out), "--epochs", "2", "--quiet"]) == 0
    # A checkpoint saved before fingerprints were stored resumes, with a warning that it cannot be checked.
    state = load_checkpoint_file(out / "last.pt")
    del state["data"]
    save_checkpoint_file(state, out / "last.pt")
    open(dialogue_file, "w").write(original.replace("answer 7\n", "another answer\n"))
    assert train_cli.main(["--resume", "--output-dir", str(out), "--epochs", "3", "--quiet"]) == 0
    assert "no fingerprint of its data" in capsys.readouterr().err
    assert "data" in load_checkpoint_file(out / "last.pt"), "stored from then on"


def test_a_model_too_large_to_train_comfortably_is_said_with_its_estimate(tmp_path, fake_teacher, dialogue_file,
                                                                         monkeypatch, capsys):
    """global_channels=1e5 took 10.5 GB and 300 s an epoch without a word."""
    from cubecore import EmbeddingProcessor, ModelConfig

    need, parameters, external = EmbeddingProcessor.training_bytes(384, ModelConfig(global_channels=100000), 32)
    assert 9e9 < need < 12e9 and parameters > 4e7 and external == 100001  # measured: 10.5 GB
    assert EmbeddingProcessor.training_bytes(384, ModelConfig(), 32)[0] < 1e8
    monkeypatch.setattr(train_cli, "available_bytes", lambda device: 256 * 1024 ** 2)  # 256 MiB free

    def fit(self, *args, **kwargs):  # the warning comes before training: no need to train
        raise KeyboardInterrupt

    monkeypatch.setattr(CubeTrainer, "fit", fit)
    assert cli(tmp_path, dialogue_file, tmp_path / "small", epochs=1) == 130
    assert "GiB of memory" not in capsys.readouterr().err
    assert cli(tmp_path, dialogue_file, tmp_path / "wide", "global_channels=200000", epochs=1) == 130
    err = capsys.readouterr().err
    assert "GiB of memory to train" in err and "model.global_channels" in err and "0.2 GiB are free" in err, err


def test_the_command_that_ran_a_run_with_config_resumes_it(tmp_path, fake_teacher, dialogue_file, capsys):
    """docs/training.md: the command that ran a run, plus --resume, resumes it; with --config FILE that was "error:
    --config cannot be combined with --resume". The file's values are compared as key=value overrides are."""
    out = tmp_path / "run"
    settings = tmp_path / "settings.yaml"
    settings.write_text(f"cube_training:\n  seed: 7\n  epochs: 1\n  data:\n    source: {dialogue_file}\n")
    command = ["--config", str(settings), "--output-dir", str(out), f"cache_dir={tmp_path / 'cache'}", *TINY]
    assert train_cli.main(command) == 0
    assert train_cli.main(command + ["--resume"]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert train_cli.main(command + ["--resume", "--epochs", "2"]) == 0 and epochs_in(out) == [1, 2]
    settings.write_text("cube_training:\n  seed: 8\n  epochs: 3\n")
    capsys.readouterr()
    assert train_cli.main(command + ["--resume"]) == 2
    assert "cannot change ['seed']" in capsys.readouterr().err


def test_evaluate_of_a_best_pt_beside_a_damaged_last_pt_scores_it_without_the_floors(tmp_path, fake_teacher,
                                                                                     dialogue_file, capsys):
    """python -m cubecore.evaluate best.pt failed when the last.pt beside it was damaged (its error even advised
    using best.pt): the neighbour is skipped with one line saying why, and best.pt is scored."""
    out = tmp_path / "run"
    assert cli(tmp_path, dialogue_file, out, epochs=2) == 0
    (out / "last.pt").write_bytes(b"not a checkpoint")
    capsys.readouterr()
    assert evaluate_cli.main([str(out / "best.pt")]) == 0
    said = capsys.readouterr()
    assert "| cube |" in said.out and "| identity |" in said.out
    assert f"the trained floors are left out: {out / 'last.pt'} beside {out / 'best.pt'} cannot be read" in said.err


def test_finishing_a_run_that_lacks_only_its_floors_says_it_writes_its_report_again(tmp_path, fake_teacher,
                                                                                   dialogue_file, capsys):
    """--resume of a finished run whose last.pt lacks only its floors rewrites every report file, while its plan
    and evaluate's note said it "writes what it lacks" / "trains nothing else": they say what it does now."""
    from cubecore.training.checkpoint import load_checkpoint_file, save_checkpoint_file

    out = tmp_path / "run"
    assert cli(tmp_path, dialogue_file, out, epochs=1) == 0
    state = load_checkpoint_file(out / "last.pt")
    del state["trained_floors"]
    save_checkpoint_file(state, out / "last.pt")
    capsys.readouterr()
    assert evaluate_cli.main([str(out / "best.pt")]) == 0
    assert "trains and stores them (no epoch) and writes the run's report files again" in capsys.readouterr().out
    assert train_cli.main(["--resume", str(out / "last.pt"), "--quiet"]) == 0
    said = capsys.readouterr().out
    assert ("it lacks the mlp floor, the linear floor; training no epoch, writing its report again (curves.png, "
            "rollout.gif, report.md, model, results.json)") in said, said
