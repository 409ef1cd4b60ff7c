"""CubeTrainer and the CLIs: learning in every mode, checkpoints, exact resume, corrupt files, the commands."""

import json
import subprocess
import sys

import pytest
import torch

from cubecore import CubeTrainer, TrainingConfig
from cubecore.trainer import prepare_data
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


@pytest.mark.parametrize("mode", ["autoencoder", "dialogue", "mixed"])
def test_a_few_epochs_reduce_the_loss_in_each_mode(tmp_path, dialogue_file, mode):
    data_path = dialogue_file
    if mode == "autoencoder":
        data_path = str(tmp_path / "texts.txt")
        (tmp_path / "texts.txt").write_text("\n".join(f"sentence {i}" for i in range(60)))
    cfg = tiny_config(tmp_path, mode=mode, data=data_path, epochs=6)
    data = prepare_data(cfg, FakeEncoder())
    trainer = CubeTrainer(cfg)
    history = trainer.fit(data.train, data.val, progress=False)
    assert history[-1]["train_loss"] < 0.9 * history[0]["train_loss"], history
    results = trainer.evaluate(data.val, train_data=data.train)
    assert set(results) == {"cube", "identity", "mean", "ridge"}
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
    assert loaded.get_info()["components_initialized"]
    assert not list(tmp_path.glob("*.tmp"))


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
