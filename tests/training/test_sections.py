"""Configuration in sections: one field per option, addressed flat, dotted or by section, with one set of
defaults; configs, checkpoints and model folders written before the sections load and score as they did."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from cubecore import EmbeddingProcessor, ModelConfig, TrainingConfig
from cubecore.data import DataConfig
from cubecore.errors import UnknownKeyError

LEGACY_RUN = Path(__file__).parents[1] / "fixtures" / "legacy_run"  # written by python -m cubecore.train before sections


@pytest.mark.parametrize("key", ["steps", "model.steps"])
def test_a_flat_or_dotted_key_names_one_field(key):
    cfg = TrainingConfig().override(**{key: 6})
    assert cfg.model.steps == 6 and cfg == TrainingConfig(model=ModelConfig(steps=6))
    assert TrainingConfig(**{key: 6}) == cfg and TrainingConfig.from_dict({"model": {"steps": 6}}) == cfg


def test_the_legacy_data_key_is_the_source_and_sections_merge():
    cfg = TrainingConfig.from_dict({"data": "file.txt", "validation_split": 0.1, "model": {"hidden_size": 7}})
    assert cfg.data.source == "file.txt" and cfg.data.validation_split == 0.1 and cfg.model.hidden_size == 7
    assert cfg.get("data") == "file.txt" and cfg.get("hidden_size") == 7  # the flat key of old configs


@pytest.mark.parametrize("key,match", [("model.stepz", "model.stepz"), ("stepz", "did you mean"),
                                       ("data.steps", "section 'data'")])
def test_an_unknown_key_is_named(key, match):
    with pytest.raises(UnknownKeyError, match=match):
        TrainingConfig().override(**{key: 1})


def test_a_bad_value_names_the_section_key():
    with pytest.raises(ValueError, match="model.steps"):
        TrainingConfig(steps=0)
    with pytest.raises(ValueError, match="data.validation_split"):
        DataConfig(validation_split=1.0)


def test_one_set_of_defaults():
    """What EmbeddingProcessor() builds is what training builds."""
    assert EmbeddingProcessor(384).config == TrainingConfig().model == ModelConfig()
    torch.manual_seed(0)
    a = EmbeddingProcessor(384)
    torch.manual_seed(0)
    b = EmbeddingProcessor(384, TrainingConfig().model)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_info_and_report_list_every_model_field():
    """get_info and the report header iterate over the section: a new field shows without another edit."""
    from cubecore.training.report import markdown_report
    from cubecore.training.trainer import CubeTrainer

    trainer = CubeTrainer(TrainingConfig(lattice_size=(2, 2, 3), position_channels=2))
    trainer.initialize_components(dim=12)
    info = trainer.get_info()
    fields = ModelConfig.field_names()
    assert set(fields) <= set(info) and info["position_channels"] == 2
    header = markdown_report({"cube": dict.fromkeys(("cosine", "mse", "r@1", "r@5", "r@10", "mrr"), 0.5)}, info)
    assert all(f"{name} " in header for name in fields)


def test_a_flat_config_file_from_before_the_sections_loads(tmp_path):
    flat = yaml.safe_load((LEGACY_RUN / "config.yaml").read_text())
    assert "steps" in flat["cube_training"] and "model" not in flat["cube_training"]
    (tmp_path / "old.yaml").write_text(yaml.safe_dump(flat))
    cfg = TrainingConfig.from_yaml(tmp_path / "old.yaml")
    assert cfg.model.steps == flat["cube_training"]["steps"] and cfg.data.source == flat["cube_training"]["data"]


def test_a_model_folder_from_before_the_sections_loads_and_matches_its_checkpoint():
    from cubecore.training.trainer import CubeTrainer

    assert "config" not in json.loads((LEGACY_RUN / "model" / "config.json").read_text())  # the flat format
    model = EmbeddingProcessor.from_pretrained(LEGACY_RUN / "model")
    trainer = CubeTrainer.from_checkpoint(LEGACY_RUN / "last.pt")
    x = torch.nn.functional.normalize(torch.randn(3, 384, generator=torch.Generator().manual_seed(0)), dim=-1)
    with trainer.weights_of("best"), torch.no_grad():
        assert torch.equal(model.eval()(x), trainer.predict(x))


def test_a_run_from_before_the_sections_evaluates_as_it_did(tmp_path, monkeypatch):
    """evaluate on the checkpoint of a run written before the sections gives the cosine that run reported (the
    shipped teacher and data, offline), and trains nothing: the mlp and linear floors it did not store are said so.
    Retrieval now ranks among the distinct answers (that run counted a duplicate answer as a rival): its ranks can
    only have improved, and they are those of the run's best weights on its split."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUBECORE_CACHE_DIR": str(tmp_path / "cache")}
    result = subprocess.run([sys.executable, "-m", "cubecore.evaluate", str(LEGACY_RUN / "last.pt")],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr
    expected = json.loads((LEGACY_RUN / "results.json").read_text())
    from cubecore.data import prepare_data
    from cubecore.training.metrics import retrieval
    from cubecore.training.trainer import CubeTrainer

    monkeypatch.setenv("CUBECORE_CACHE_DIR", str(tmp_path / "cache"))  # the embeddings evaluate just cached
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    trainer = CubeTrainer.from_checkpoint(LEGACY_RUN / "last.pt")
    data = prepare_data(trainer.config.data, trainer.config.seed, trainer.teacher)
    with trainer.weights_of("best"):
        counted = {"cube": retrieval(trainer.predict(data.val[0]), data.val[1]),
                   "identity": retrieval(data.val[0], data.val[1])}
    for model in ("cube", "identity", "ridge"):
        row = next(line for line in result.stdout.splitlines() if line.startswith(f"| {model} |"))
        cells = [float(cell) for cell in row.split("|")[2:8]]
        assert cells[:2] == [round(expected[model][key], 4) for key in ("cosine", "mse")], model
        for got, key in zip(cells[2:], ("r@1", "r@5", "r@10", "mrr")):
            assert got >= round(expected[model][key], 4), (model, key)
            if model != "ridge":
                assert got == round(counted[model][key], 4), (model, key)
    # The run stored no trained floors (it was saved before they were): evaluate leaves them out of the table,
    # trains nothing, and says why and what trains them.
    assert "| mlp |" not in result.stdout and "| linear |" not in result.stdout
    checkpoint = LEGACY_RUN / "last.pt"
    assert (f"The mlp and linear floors are not in the table: {checkpoint} holds a finished run without them "
            f"(stopped before it trained them, or saved before they were stored); python -m cubecore.train "
            f"--resume {checkpoint} trains and stores them") in result.stdout
