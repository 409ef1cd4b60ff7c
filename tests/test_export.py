"""A trained run exported as a sentence-transformers query adapter: encode_query is the trainer's prediction,
encode_document the teacher's embedding, after a save and a reload."""

import json
import stat

import pytest
import torch
from sentence_transformers import SentenceTransformer

from cubecore import EmbeddingProcessor, TeacherEncoder
from cubecore import export
from cubecore import train as train_cli
from cubecore.model.adapter import query_adapter, teacher_modules
from cubecore.training.trainer import CubeTrainer

QUESTIONS = ["How are you today?", "What is your favourite colour, and why is it that one?", "Tell me a joke",
             "where do you live", "Do you like music?", "What time is it?", "Can you swim?", "Who made you?"]
ANSWERS = ["I am fine.", "Blue, like the sea.", "Why did the chicken cross the road?", "In a computer.",
           "Yes, jazz mostly.", "Time to learn.", "Not at all.", "Some engineers."]


@pytest.fixture(scope="module")
def trained_run(tiny_st_model, tmp_path_factory):
    """A short dialogue run with the tiny 32-D sentence-transformers teacher (the kernel's backend)."""
    root = tmp_path_factory.mktemp("export")
    data = root / "dialogue.txt"
    data.write_text("".join(f"{q} ({i})\t{a} ({i})\n" for i in range(6) for q, a in zip(QUESTIONS, ANSWERS)))
    code = train_cli.main(["--data", str(data), "--teacher", tiny_st_model, "--output-dir", str(root / "run"),
                           "--epochs", "6", "--quiet", "lattice_size=[2,2,8]", "state_size=4", "hidden_size=8",
                           "steps=2", "batch_size=8", "learning_rate=0.05", "readout_skip=false",
                           f"cache_dir={root / 'cache'}"])
    assert code == 0
    return root / "run"


def trainer_prediction(run, texts, weights):
    """The trainer's prediction (unit length, as the exported query route gives it where the teacher
    normalises), the teacher's embedding, and the epoch of the weights."""
    trainer = CubeTrainer.from_checkpoint(run / "last.pt")
    assert trainer.teacher.normalize
    with trainer.weights_of(weights) as epoch:
        prediction = torch.nn.functional.normalize(trainer.predict(trainer.teacher.encode(texts)), dim=-1)
        return prediction, trainer.teacher.encode(texts), epoch


@pytest.mark.parametrize("weights", ["best", "last"])
def test_encode_query_is_the_trainers_prediction_and_encode_document_the_teacher(trained_run, tmp_path, weights):
    out = tmp_path / "st"
    assert export.main([str(trained_run), "--to", str(out), "--weights", weights]) == 0
    expected, teacher, _ = trainer_prediction(trained_run, QUESTIONS, weights)
    for _ in range(2):  # a second load reads the same files to the same numbers
        model = SentenceTransformer(str(out), trust_remote_code=True, local_files_only=True)
        query = model.encode_query(QUESTIONS, convert_to_tensor=True)
        torch.testing.assert_close(query, expected, atol=1e-6, rtol=0)
        # unit length like the documents, so that an inner-product index ranks as cosine does
        torch.testing.assert_close(query.norm(dim=-1), torch.ones(len(QUESTIONS)), atol=1e-5, rtol=0)
        torch.testing.assert_close(model.encode_document(QUESTIONS, convert_to_tensor=True), teacher, atol=1e-6,
                                   rtol=0)
        torch.testing.assert_close(model.encode(QUESTIONS, convert_to_tensor=True), teacher, atol=1e-6, rtol=0)
    assert (query - teacher).abs().max() > 1e-3  # the cube is on the query path, not the identity


def test_best_and_last_weights_are_exported_as_chosen(trained_run, tmp_path):
    """A checkpoint whose best epoch holds other weights than its last: each export takes the one asked for."""
    trainer = CubeTrainer.from_checkpoint(trained_run / "last.pt")
    trainer.best_state = {k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v
                          for k, v in trainer.model.state_dict().items()}
    trainer.best_epoch = trainer.epoch - 1
    checkpoint = trainer.save_checkpoint(tmp_path / "last.pt")
    predictions = {}
    for weights in ("best", "last"):
        with trainer.weights_of(weights):
            predictions[weights] = torch.nn.functional.normalize(trainer.predict(trainer.teacher.encode(QUESTIONS)),
                                                                 dim=-1)
        export.export_run(checkpoint, tmp_path / weights, weights=weights)
        model = SentenceTransformer(str(tmp_path / weights), trust_remote_code=True)
        torch.testing.assert_close(model.encode_query(QUESTIONS, convert_to_tensor=True), predictions[weights],
                                   atol=1e-6, rtol=0)
    assert (predictions["best"] - predictions["last"]).abs().max() > 1e-3


def test_loading_asks_for_trust_remote_code(trained_run, tmp_path):
    export.export_run(trained_run, tmp_path / "st")
    with pytest.raises(ValueError, match="trust_remote_code"):
        SentenceTransformer(str(tmp_path / "st"))


@pytest.mark.parametrize("pooling,folder", [("mean", "st"), ("cls", "bert")])
def test_a_teacher_pooled_by_transformers_exports_to_the_same_numbers(tiny_st_model, tmp_path, pooling, folder):
    """A model that is not a sentence-transformers model (or whose pooling is forced) becomes Transformer +
    Pooling + Normalize, pooling as the teacher pools."""
    from pathlib import Path

    location = Path(tiny_st_model).parent / folder
    teacher = TeacherEncoder(str(location), pooling=pooling, max_length=32)
    assert teacher.backend == "transformers"
    torch.manual_seed(0)
    processor = EmbeddingProcessor(32, lattice_size=(2, 2, 8), state_size=4, hidden_size=8, steps=2).eval()
    model = query_adapter(teacher, processor)
    model.save(str(tmp_path / "st"))
    model = SentenceTransformer(str(tmp_path / "st"), trust_remote_code=True)
    embedded = teacher.encode(QUESTIONS)
    torch.testing.assert_close(model.encode_document(QUESTIONS, convert_to_tensor=True), embedded, atol=1e-5, rtol=0)
    with torch.no_grad():
        expected = torch.nn.functional.normalize(processor(embedded), dim=-1)  # the teacher normalises
    torch.testing.assert_close(model.encode_query(QUESTIONS, convert_to_tensor=True), expected, atol=1e-5, rtol=0)


def test_mismatched_or_unexportable_teachers_are_refused(tiny_st_model):
    processor = EmbeddingProcessor(24, lattice_size=(2, 3, 4))
    with pytest.raises(ValueError, match="24-D embeddings"):
        query_adapter(TeacherEncoder(tiny_st_model), processor)
    with pytest.raises(ValueError, match="prompt"):
        teacher_modules(TeacherEncoder(tiny_st_model, prompt_name="query"))


def test_command_mistakes_are_one_error_line_and_write_nothing(trained_run, tmp_path, capsys):
    out = tmp_path / "st"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert export.main([str(trained_run), "--to", str(out)]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert export.main([str(trained_run), "--to", str(out), "--overwrite"]) == 2  # not an earlier export
    assert "is not an earlier export" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "mine"
    (out / "notes.txt").unlink()
    assert export.main([str(tmp_path / "nowhere"), "--to", str(tmp_path / "x")]) == 2
    assert "not found" in capsys.readouterr().err
    assert export.main([str(tmp_path), "--to", str(tmp_path / "x")]) == 2
    assert "holds no last.pt" in capsys.readouterr().err
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert export.main([str(tmp_path / "junk.pt"), "--to", str(tmp_path / "x")]) == 2
    assert "not a cubecore checkpoint" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.pt", "st"]  # no half-written folders
    assert export.main([str(trained_run), "--to", str(out), "--overwrite"]) == 0
    assert (out / "modules.json").is_file()


def test_overwrite_never_replaces_the_run_or_the_current_directory(trained_run, tmp_path, monkeypatch, capsys):
    for target in (trained_run, trained_run.parent):
        assert export.main([str(trained_run), "--to", str(target), "--overwrite"]) == 2
        assert "holds the run" in capsys.readouterr().err
    assert (trained_run / "last.pt").is_file()
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "keep.txt").write_text("x")
    monkeypatch.chdir(tmp_path / "work")
    assert export.main([str(trained_run), "--to", ".", "--overwrite"]) == 2
    assert "current directory" in capsys.readouterr().err
    assert (tmp_path / "work" / "keep.txt").is_file()
    (tmp_path / "file").write_text("x")
    assert export.main([str(trained_run), "--to", str(tmp_path / "file" / "sub")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err


def test_an_export_is_an_ordinary_folder_and_leaves_the_callers_random_state(trained_run, tmp_path, umask):
    umask(0o027)
    empty = tmp_path / "made-first"
    empty.mkdir()  # an empty folder made beforehand is fine
    torch.manual_seed(123)
    export.export_run(trained_run, empty)
    after = torch.rand(3)
    torch.manual_seed(123)
    assert torch.equal(after, torch.rand(3))
    assert stat.S_IMODE(empty.stat().st_mode) == 0o750
    assert "trust_remote_code=True" in (empty / "README.md").read_text()
    assert json.loads((empty / export.MARKER).read_text())["weights"] == "best"
    assert export.main([str(trained_run), "--to", str(empty), "--overwrite"]) == 0  # an earlier export


def test_an_export_runs_with_the_reference_whatever_backend_the_run_trained_with(trained_run, tmp_path):
    trainer = CubeTrainer.from_checkpoint(trained_run / "last.pt")
    trainer.config = trainer.config.override(backend="reference")
    trainer.model.core.backend = "reference"
    checkpoint = trainer.save_checkpoint(tmp_path / "last.pt")
    export.export_run(checkpoint, tmp_path / "st")
    model = SentenceTransformer(str(tmp_path / "st"), trust_remote_code=True)
    adapter = [m for m in model.modules() if type(m).__name__ == "CubeAdapter"][0]
    assert adapter.processor.core.backend == "auto"


def test_an_autoencoder_run_is_not_exported_as_a_query_adapter(trained_run, tmp_path, capsys):
    trainer = CubeTrainer.from_checkpoint(trained_run / "last.pt")
    trainer.config = trainer.config.override(mode="autoencoder")
    checkpoint = trainer.save_checkpoint(tmp_path / "last.pt")
    assert export.main([str(checkpoint), "--to", str(tmp_path / "st")]) == 2
    assert "autoencoder run" in capsys.readouterr().err
    assert not (tmp_path / "st").exists()


def test_staging_left_by_a_killed_export_is_removed_by_the_next(trained_run, tmp_path):
    """kill -9 during an export left its hidden staging folder (88 MB with a real teacher) for ever."""
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f"{export.staging_prefix(tmp_path / 'st')}{dead.stdout.strip()}-abc"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"x" * 1000)
    alive = tmp_path / f"{export.staging_prefix(tmp_path / 'st')}{__import__('os').getpid()}-def"
    alive.mkdir()  # a running export's (this process is alive): kept
    export.export_run(trained_run, tmp_path / "st")
    assert not stale.exists() and alive.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["st", alive.name])


def test_load_adapter_runs_no_code_from_the_folder(trained_run, tmp_path):
    """The documented load needed trust_remote_code=True, which ran a module file named by a tampered router
    config without a warning."""
    from cubecore.errors import CubecoreError
    from cubecore.model.adapter import load_adapter

    out = tmp_path / "st"
    export.export_run(trained_run, out)
    expected, teacher, _ = trainer_prediction(trained_run, QUESTIONS, "best")
    model = load_adapter(out)
    torch.testing.assert_close(model.encode_query(QUESTIONS, convert_to_tensor=True), expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(model.encode_document(QUESTIONS, convert_to_tensor=True), teacher, atol=1e-6, rtol=0)
    ran = tmp_path / "ran"
    (out / "evil.py").write_text(
        "import pathlib\n"
        f"pathlib.Path({str(ran)!r}).write_text('ran')\n"
        "from cubecore.model.adapter import CubeAdapter as Evil\n")
    router = json.loads((out / "router_config.json").read_text())
    cube = next(name for name, ref in router["types"].items() if ref.endswith("CubeAdapter"))
    router["types"][cube] = "evil.Evil"
    (out / "router_config.json").write_text(json.dumps(router))
    with pytest.raises(CubecoreError, match="router_config.json.*evil.Evil"):
        load_adapter(out)
    assert not ran.exists()
    router["types"][cube] = "cubecore.model.adapter.CubeAdapter"
    (out / "router_config.json").write_text(json.dumps(router))
    modules = json.loads((out / "modules.json").read_text())
    modules[0]["type"] = "evil.Evil"
    (out / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(CubecoreError, match="modules.json.*evil.Evil"):
        load_adapter(out)
    assert not ran.exists()
