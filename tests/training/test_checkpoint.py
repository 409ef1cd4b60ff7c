"""Checkpoint files: weights-only loading runs no code; a damaged, foreign or truncated file is an error naming it."""

import os

import pytest
import torch

from conftest import tiny_config
from cubecore import CubeTrainer
from cubecore import evaluate as evaluate_cli
from cubecore import train as train_cli
from cubecore.training.checkpoint import CheckpointError

TINY = ["lattice_size=[2, 2, 3]", "state_size=4", "hidden_size=8", "steps=2", "batch_size=8", "device=cpu",
        "learning_rate=1e-2", "--quiet"]


def cli(tmp_path, data, out, *extra):
    return train_cli.main(["--data", str(data), "--output-dir", str(out), f"cache_dir={tmp_path / 'cache'}", *TINY, *extra])


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
    from cubecore.training.checkpoint import TRAILER

    inner = inner[:-2] + (len(TRAILER) + 64).to_bytes(2, "little")  # an evil torch file with a correct trailer
    (tmp_path / "trailed.pt").write_bytes(inner + TRAILER + hashlib.sha256(inner).hexdigest().encode())
    for name in ("wrapped.pt", "plain.pt", "trailed.pt"):
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


def test_a_damaged_header_or_a_directory_is_named_as_such_not_as_malicious(tmp_path):
    trainer = CubeTrainer(tiny_config(tmp_path, epochs=1))
    trainer.fit((torch.randn(20, 12), torch.randn(20, 12)), progress=False)
    from cubecore.training.checkpoint import TRAILER_SIZE

    data = bytearray(trainer.save_checkpoint(tmp_path / "ck.pt").read_bytes())
    data[-TRAILER_SIZE + 5] ^= 1
    (tmp_path / "header.pt").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum is damaged"):
        CubeTrainer.from_checkpoint(tmp_path / "header.pt")
    (tmp_path / "adir.pt").mkdir()
    with pytest.raises(CheckpointError, match="is a directory"):
        CubeTrainer.from_checkpoint(tmp_path / "adir.pt")


def test_a_checkpoint_is_a_plain_torch_file(tmp_path):
    """The docs said a checkpoint loads with torch.load(weights_only=True); its header line made torch.load fail
    (and torch's hint, weights_only=False, failed too)."""
    trainer = CubeTrainer(tiny_config(tmp_path, epochs=1))
    trainer.fit((torch.randn(20, 12), torch.randn(20, 12)), progress=False)
    path = trainer.save_checkpoint(tmp_path / "ck.pt")
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert state["epoch"] == 1 and state["model"].keys() == trainer.model.state_dict().keys()
    for name, tensor in trainer.model.state_dict().items():
        assert torch.equal(state["model"][name], tensor), name


def test_a_checkpoint_of_the_previous_format_still_loads():
    """tests/fixtures/legacy_run/last.pt: a header line with the checksum before the torch file."""
    from pathlib import Path

    from cubecore.training.checkpoint import MAGIC

    path = Path(__file__).parents[1] / "fixtures" / "legacy_run" / "last.pt"
    assert path.read_bytes().startswith(MAGIC)
    assert CubeTrainer.from_checkpoint(path).epoch > 0


def test_a_checkpoint_that_counted_retrieval_the_earlier_way_has_its_best_mrr_counted_again(tmp_path, caplog):
    """select_by=val_mrr must not compare the epochs of a resumed run counted two ways: the best epoch of a
    checkpoint written before retrieval ranked among the distinct answers is scored again when training goes on."""
    from cubecore.training.checkpoint import load_checkpoint_file, save_checkpoint_file
    from cubecore.training.metrics import retrieval

    g = torch.Generator().manual_seed(0)
    answers = torch.randn(6, 12, generator=g)
    y = answers[torch.arange(40) % 6]  # every answer given to several questions: the two rules differ
    x = y + 0.5 * torch.randn(40, 12, generator=g)
    trainer = CubeTrainer(tiny_config(tmp_path, epochs=2, select_by="val_mrr"))
    trainer.fit((x[:30], y[:30]), (x[30:], y[30:]), progress=False)
    state = load_checkpoint_file(trainer.save_checkpoint(tmp_path / "ck.pt"))
    del state["retrieval"]  # as an older cubecore wrote it, with the best MRR counted the earlier way
    state["best_score"] = -0.01
    save_checkpoint_file(state, tmp_path / "old.pt")

    resumed = CubeTrainer.from_checkpoint(tmp_path / "old.pt")
    assert resumed.retrieval_rule is None
    with resumed.weights_of("best"):
        expected = -retrieval(resumed.predict(x[30:]), y[30:])["mrr"]
    with caplog.at_level("WARNING", logger="cubecore"):
        resumed.fit((x[:30], y[:30]), (x[30:], y[30:]), epochs=2, progress=False)  # nothing left to train
    assert resumed.best_score == expected and "scored again the current way" in caplog.text
    assert CubeTrainer.from_checkpoint(resumed.save_checkpoint(tmp_path / "new.pt")).retrieval_rule is not None
