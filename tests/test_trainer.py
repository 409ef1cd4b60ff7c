"""CubeTrainer and the CLIs: learning in every mode, checkpoints, exact resume, corrupt files, the commands."""

import json
import subprocess
import sys

import pytest
import torch

from cubecore import CubeTrainer, TrainingConfig
from cubecore.data import prepare_data
from test_data import FakeEncoder


def tiny_config(tmp_path, **kw):
    base = dict(lattice_size=(2, 2, 3), state_size=4, hidden_size=8, steps=2, epochs=3, batch_size=8,
                learning_rate=1e-2, warmup_epochs=0.5, output_dir=str(tmp_path / "run"), device="cpu",
                cache_dir=str(tmp_path / "cache"))
    base.update(kw)
    return TrainingConfig(**base)


@pytest.fixture
def dialogue_file(tmp_path):
    path = tmp_path / "dialogue.txt"
    path.write_text("\n".join(f"question {i % 25}\tanswer {i}" for i in range(80)) + "\n")
    return str(path)


@pytest.mark.parametrize("skip", [False, True], ids=["plain", "readout_skip"])
@pytest.mark.parametrize("mode", ["autoencoder", "dialogue", "mixed"])
def test_a_few_epochs_reduce_the_loss_in_each_mode(tmp_path, dialogue_file, mode, skip):
    data_path = dialogue_file
    if mode == "autoencoder":
        data_path = str(tmp_path / "texts.txt")
        (tmp_path / "texts.txt").write_text("\n".join(f"sentence {i}" for i in range(60)))
    cfg = tiny_config(tmp_path, mode=mode, data=data_path, epochs=12, learning_rate=3e-2, readout_skip=skip)
    data = prepare_data(cfg.data, cfg.seed, FakeEncoder())
    trainer = CubeTrainer(cfg)
    trainer.initialize_components(dim=data.train[0].shape[1])
    x, y = data.train

    def train_loss():
        return trainer.loss(trainer.predict(x), y).item()

    before = train_loss()
    trainer.fit(data.train, data.val, progress=False)
    after = train_loss()
    if skip and mode == "autoencoder":  # the skip path starts as the identity: already the answer
        assert before < 1e-6 and after < 0.05, (before, after)
    else:  # in mixed mode half the pairs map an answer to itself, which the skip path's start already solves
        assert after < (0.98 if skip and mode == "mixed" else 0.9) * before, (before, after)
    assert set(trainer.evaluate(data.val, train_data=data.train)) == {"cube", "identity", "mean", "offset", "ridge"}
    trainer.train_mlp_floor(data.train, data.val)
    results = trainer.evaluate(data.val, train_data=data.train)
    assert set(results) == {"cube", "identity", "mean", "offset", "ridge", "mlp"}
    assert ("semantic_preservation" in results["cube"]) == (mode == "autoencoder")


def test_checkpoint_round_trip_gives_identical_outputs(tmp_path):
    torch.manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(40, 12), dim=-1)
    trainer = CubeTrainer(tiny_config(tmp_path))
    trainer.fit((x, x), progress=False)
    path = trainer.save_checkpoint(tmp_path / "ck.pt")
    loaded = CubeTrainer.from_checkpoint(path)
    assert torch.equal(loaded.predict(x), trainer.predict(x))
    assert loaded.epoch == trainer.epoch and loaded.history == trainer.history
    assert loaded.get_info()["parameters"] == sum(p.numel() for p in trainer.model.parameters())
    assert not list(tmp_path.glob("*.tmp"))


def test_a_checkpoint_saved_before_a_key_existed_loads_as_the_model_it_trained(tmp_path):
    """Runs saved before readout_skip and global_channels existed trained without them: loading one must not
    give it today's defaults (a missing weight, or a skip path it never had)."""
    from cubecore.training.checkpoint import load_checkpoint_file, save_checkpoint_file

    torch.manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(40, 12), dim=-1)
    trainer = CubeTrainer(tiny_config(tmp_path, readout_skip=False, global_channels=0))
    trainer.fit((x, torch.roll(x, 1, dims=1)), progress=False)
    state = load_checkpoint_file(trainer.save_checkpoint(tmp_path / "ck.pt"))
    for key in ("readout_skip", "global_channels"):
        del state["config"]["model"][key]
    save_checkpoint_file(state, tmp_path / "old.pt")
    loaded = CubeTrainer.from_checkpoint(tmp_path / "old.pt")
    assert not loaded.config.model.readout_skip and loaded.config.model.global_channels == 0
    assert torch.equal(loaded.predict(x), trainer.predict(x))


def test_kill_and_resume_matches_an_uninterrupted_run(tmp_path):
    torch.manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(50, 12), dim=-1)
    y = torch.roll(x, 1, dims=1)
    straight = CubeTrainer(tiny_config(tmp_path, epochs=4))
    straight.fit((x, y), (x[:10], y[:10]), progress=False)

    first = CubeTrainer(tiny_config(tmp_path, epochs=4))
    first.fit((x, y), (x[:10], y[:10]), epochs=2, progress=False)  # "killed" after epoch 2
    first.save_checkpoint(tmp_path / "half.pt")
    del first
    resumed = CubeTrainer.from_checkpoint(tmp_path / "half.pt")
    resumed.fit((x, y), (x[:10], y[:10]), progress=False)
    assert resumed.epoch == straight.epoch == 4
    for (name, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), name
    assert [h["train_loss"] for h in resumed.history] == [h["train_loss"] for h in straight.history]


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    x = torch.randn(20, 12)
    trainer = CubeTrainer(tiny_config(tmp_path, epochs=1))
    trainer.fit((x, x), progress=False)
    path = trainer.save_checkpoint(tmp_path / "ck.pt")
    (tmp_path / "cut.pt").write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        CubeTrainer.from_checkpoint(tmp_path / "cut.pt")
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a cubecore checkpoint"):
        CubeTrainer.from_checkpoint(tmp_path / "other.pt")
    with pytest.raises(FileNotFoundError):
        CubeTrainer.from_checkpoint(tmp_path / "missing.pt")


def test_bad_training_data_raises(tmp_path):
    trainer = CubeTrainer(tiny_config(tmp_path))
    with pytest.raises(ValueError, match="NaN"):
        trainer.fit((torch.full((4, 12), float("nan")), torch.zeros(4, 12)), progress=False)
    with pytest.raises(ValueError, match="matching"):
        trainer.fit((torch.zeros(4, 12), torch.zeros(5, 12)), progress=False)
    with pytest.raises(ValueError, match="lattice_size"):
        CubeTrainer(tiny_config(tmp_path)).initialize_components(dim=10)


def test_target_similarity_stops_early(tmp_path):
    x = torch.nn.functional.normalize(torch.randn(40, 12), dim=-1)
    trainer = CubeTrainer(tiny_config(tmp_path, epochs=50, target_similarity=-1.0))
    history = trainer.fit((x, x), (x, x), progress=False)
    assert len(history) == 1 and "target_similarity" in history[-1]["stopped"]


def run_cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})


def test_cli_help():
    for module in ("cubecore.train", "cubecore.evaluate"):
        result = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True)
        assert result.returncode == 0 and "--data" in result.stdout


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


# --- trustworthy runs: the command in-process, on a fake teacher ------------------------------------------------

import os  # noqa: E402
import shutil  # noqa: E402

from cubecore import train as train_cli  # noqa: E402
from cubecore import evaluate as evaluate_cli  # noqa: E402
from cubecore.training.checkpoint import CheckpointError  # noqa: E402
from cubecore.training.rundir import RunDirectory  # noqa: E402

TINY = ["lattice_size=[2, 2, 3]", "state_size=4", "hidden_size=8", "steps=2", "batch_size=8", "device=cpu",
        "learning_rate=1e-2", "--quiet"]


@pytest.fixture
def fake_teacher(monkeypatch):
    teacher = FakeEncoder(dim=12)
    monkeypatch.setattr(CubeTrainer, "teacher", property(lambda self: teacher))
    return teacher


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


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_malicious_checkpoint_runs_nothing(tmp_path, fake_teacher, dialogue_file, capsys):
    marker = tmp_path / "pwned"
    from cubecore.training.checkpoint import MAGIC
    import hashlib, io
    buffer = io.BytesIO()
    torch.save({"model": _Evil(marker)}, buffer)
    inner = buffer.getvalue()  # an evil payload under a correct header and checksum
    (tmp_path / "wrapped.pt").write_bytes(MAGIC + hashlib.sha256(inner).hexdigest().encode() + b"\n" + inner)
    torch.save(_Evil(marker), tmp_path / "plain.pt")
    for name in ("wrapped.pt", "plain.pt"):
        with pytest.raises(CheckpointError, match="refused"):
            CubeTrainer.from_checkpoint(tmp_path / name)
        assert evaluate_cli.main([str(tmp_path / name)]) == 2
        assert cli(tmp_path, dialogue_file, tmp_path / "r", "--resume", str(tmp_path / name)) == 2
        assert "refused" in capsys.readouterr().err
    assert not marker.exists()


def test_every_damaged_byte_of_a_checkpoint_is_an_error_naming_the_file(tmp_path):
    trainer = CubeTrainer(tiny_config(tmp_path, epochs=1))
    trainer.fit((torch.randn(20, 12), torch.randn(20, 12)), progress=False)
    good = trainer.save_checkpoint(tmp_path / "ck.pt").read_bytes()
    bad = tmp_path / "flipped.pt"
    for offset in list(range(0, 200)) + list(range(200, len(good), max(1, len(good) // 60))):
        data = bytearray(good)
        data[offset] ^= 0x10
        bad.write_bytes(bytes(data))
        with pytest.raises(ValueError, match="flipped.pt"):
            CubeTrainer.from_checkpoint(bad)


def _interrupt_at_step(monkeypatch, step):
    original = CubeTrainer.loss

    def loss(self, pred, target):
        if torch.is_grad_enabled() and self.step == step:
            raise KeyboardInterrupt
        return original(self, pred, target)

    monkeypatch.setattr(CubeTrainer, "loss", loss)
    return original


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


@pytest.mark.parametrize("method", ["adaptive", "semantic"])
def test_fitting_reshapers_are_fit_on_the_training_inputs_and_saved(tmp_path, method):
    """adaptive / semantic place embedding dimensions by a fit on the training inputs; the fit travels with the
    checkpoint (not the identity permutation of an unfitted reshaper)."""
    gen = torch.Generator().manual_seed(0)
    scale = torch.linspace(0.1, 3.0, 12)[torch.randperm(12, generator=gen)]
    x = torch.randn(40, 12, generator=gen) * scale
    trainer = CubeTrainer(tiny_config(tmp_path, epochs=1, reshaping_method=method))
    trainer.fit((x, x), progress=False)
    reshaper = trainer.model.reshaper
    assert reshaper.is_fitted
    assert not torch.equal(reshaper.permutation, torch.arange(12)), "the fit placed the dimensions"
    loaded = CubeTrainer.from_checkpoint(trainer.save_checkpoint(tmp_path / "ck.pt"))
    assert loaded.model.reshaper.is_fitted
    assert torch.equal(loaded.predict(x), trainer.predict(x))


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


# --- found by a hostile run of the above ------------------------------------------------------------------------


def test_a_damaged_header_or_a_directory_is_named_as_such_not_as_malicious(tmp_path):
    trainer = CubeTrainer(tiny_config(tmp_path, epochs=1))
    trainer.fit((torch.randn(20, 12), torch.randn(20, 12)), progress=False)
    data = bytearray(trainer.save_checkpoint(tmp_path / "ck.pt").read_bytes())
    data[5] ^= 1
    (tmp_path / "header.pt").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="header is damaged"):
        CubeTrainer.from_checkpoint(tmp_path / "header.pt")
    (tmp_path / "adir.pt").mkdir()
    with pytest.raises(CheckpointError, match="is a directory"):
        CubeTrainer.from_checkpoint(tmp_path / "adir.pt")


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
    from PIL import Image

    with Image.open(out / "rollout.gif") as gif:  # the report's rollout: one frame per step and the start
        assert gif.n_frames == trainer.config.model.steps + 1
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


# --- found by a hostile review of the learning and ecosystem options ---------------------------------------------


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


def test_infonce_without_negatives_is_refused_before_training(tmp_path):
    with pytest.raises(ValueError, match="batch_size"):
        TrainingConfig(loss_function="infonce", batch_size=1)
    x = torch.randn(20, 12)
    same = torch.randn(1, 12).expand(20, 12).clone()
    trainer = CubeTrainer(tiny_config(tmp_path, loss_function="infonce"))
    with pytest.raises(ValueError, match="two different targets"):
        trainer.fit((x, same), progress=False)


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
