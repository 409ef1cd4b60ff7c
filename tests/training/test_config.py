"""TrainingConfig: YAML round trip, the shipped file, and a clear error for every bad key."""

import pytest

from cubecore import TrainingConfig
from cubecore.errors import UnknownKeyError
from cubecore.training.config import parse_override


def test_yaml_round_trip(tmp_path):
    cfg = TrainingConfig(mode="mixed", lattice_size=(4, 4, 24), learning_rate=1e-3, target_similarity=0.9)
    cfg.save_yaml(tmp_path / "c.yaml")
    assert TrainingConfig.from_yaml(tmp_path / "c.yaml") == cfg
    assert "cube_training:" in (tmp_path / "c.yaml").read_text()


def test_shipped_config_holds_the_defaults():
    assert TrainingConfig.from_yaml("config/cube_training.yaml") == TrainingConfig()


@pytest.mark.parametrize("values,error,match", [
    ({"learnig_rate": 0.1}, UnknownKeyError, "learnig_rate"),
    ({"learning_rate": -1.0}, ValueError, "learning_rate"),
    ({"learning_rate": "fast"}, TypeError, "learning_rate"),
    ({"epochs": 2.5}, TypeError, "epochs"),
    ({"epochs": 0}, ValueError, "epochs"),
    ({"batch_size": True}, TypeError, "batch_size"),
    ({"mode": "translate"}, ValueError, "mode"),
    ({"optimizer": "lion"}, ValueError, "optimizer"),
    ({"loss_function": "l1"}, ValueError, "loss_function"),
    ({"lattice_size": [8, 8]}, ValueError, "lattice_size"),
    ({"lattice_size": [8, 8, "6"]}, TypeError, "lattice_size"),
    ({"seed": 2**70}, ValueError, "seed"),
    ({"seed": -1}, ValueError, "seed"),
    ({"step_size": float("nan")}, ValueError, "step_size"),
    ({"validation_split": 1.0}, ValueError, "validation_split"),
    ({"boundary": "open"}, ValueError, "boundary"),
    ({"precision": "fp8"}, ValueError, "precision"),
    ({"target_similarity": 2.0}, ValueError, "target_similarity"),
    ({"global_channels": -1}, ValueError, "global_channels"),
    ({"global_channels": 1.5}, TypeError, "global_channels"),
])
def test_bad_keys_raise_naming_the_key(values, error, match):
    with pytest.raises(error, match=match):
        TrainingConfig.from_dict(values)


def test_yaml_with_unknown_key_is_rejected(tmp_path):
    (tmp_path / "bad.yaml").write_text("cube_training:\n  epochs: 3\n  colour: blue\n")
    with pytest.raises(UnknownKeyError, match="colour"):
        TrainingConfig.from_yaml(tmp_path / "bad.yaml")
    with pytest.raises(FileNotFoundError):
        TrainingConfig.from_yaml(tmp_path / "missing.yaml")


def test_lattice_must_fit_the_teacher_unless_projecting():
    TrainingConfig(lattice_size=(8, 8, 6)).model.check_fits(384)
    with pytest.raises(ValueError, match="lattice_size.*8x8x6"):
        TrainingConfig(lattice_size=(8, 8, 8)).model.check_fits(384)
    TrainingConfig(lattice_size=(8, 8, 8), reshaping_method="projection").model.check_fits(384)


def test_overrides():
    assert parse_override("lattice_size=[4, 4, 24]") == ("lattice_size", [4, 4, 24])
    assert parse_override("target_similarity=null") == ("target_similarity", None)
    cfg = TrainingConfig().override(epochs=3, learning_rate=0.01)
    assert cfg.epochs == 3 and cfg.learning_rate == 0.01
    with pytest.raises(KeyError, match="nope"):
        TrainingConfig().override(nope=1)
    with pytest.raises(ValueError, match="key=value"):
        parse_override("epochs")


@pytest.mark.parametrize("text,value", [("1e-3", 1e-3), ("3e-4", 3e-4), ("1E5", 1e5), ("2.5e+2", 250.0),
                                        (".5", 0.5), ("7", 7)])
def test_numbers_parse_as_users_write_them(tmp_path, text, value):
    """YAML 1.1 reads 1e-3 as a string; overrides and config files read it as the number it is."""
    key, got = parse_override(f"learning_rate={text}")
    assert got == value and type(got) is type(value)
    assert TrainingConfig().override(learning_rate=got).learning_rate == float(value)
    (tmp_path / "c.yaml").write_text(f"cube_training:\n  learning_rate: {text}\n")
    assert TrainingConfig.from_yaml(tmp_path / "c.yaml").learning_rate == float(value)


def test_empty_or_broken_yaml_is_a_clear_error(tmp_path):
    (tmp_path / "empty.yaml").write_text("# nothing\n")
    with pytest.raises(ValueError, match="empty.yaml is empty"):
        TrainingConfig.from_yaml(tmp_path / "empty.yaml")
    (tmp_path / "broken.yaml").write_text("cube_training:\n  epochs: [3\n")
    with pytest.raises(ValueError, match="broken.yaml: not valid YAML.*line"):
        TrainingConfig.from_yaml(tmp_path / "broken.yaml")
    (tmp_path / "bom.yaml").write_bytes("\ufeffcube_training:\n  epochs: 3\n".encode("utf-8"))
    assert TrainingConfig.from_yaml(tmp_path / "bom.yaml").epochs == 3


def test_a_key_given_twice_is_an_error_naming_it_and_both_lines(tmp_path):
    """YAML keeps the last of two equal keys silently: epochs 5 won over epochs 3 without a word."""
    (tmp_path / "twice.yaml").write_text("cube_training:\n  epochs: 3\n  model:\n    steps: 2\n  epochs: 5\n")
    with pytest.raises(ValueError, match=r"twice.yaml: not valid YAML \(found the key 'epochs' twice in one mapping "
                                         r"\(first at line 2\).*at line 5"):
        TrainingConfig.from_yaml(tmp_path / "twice.yaml")
    with pytest.raises(ValueError, match="'steps' twice"):
        parse_override("model={steps: 2, steps: 3}")
    assert parse_override("x=[{a: 1}, {a: 2}]")[1] == [{"a": 1}, {"a": 2}], "equal keys in different mappings"


def test_a_billion_laughs_yaml_is_refused_at_once(tmp_path):
    """Nested aliases took 40 s and built a multi-GB message; a config takes no aliases."""
    import time

    lines = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"{n}: &{n} [{', '.join([f'*{p}'] * 9)}]" for p, n in zip("abcdefgh", "bcdefghi")]
    (tmp_path / "laughs.yaml").write_text("\n".join(lines) + "\ncube_training:\n  epochs: *i\n")
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"laughs.yaml: not valid YAML \(found an alias \(\*a\).*line 2") as info:
        TrainingConfig.from_yaml(tmp_path / "laughs.yaml")
    assert time.perf_counter() - start < 1.0 and len(str(info.value)) < 300
    (tmp_path / "alias.yaml").write_text("cube_training:\n  epochs: &n 3\n  patience: *n\n")
    with pytest.raises(ValueError, match=r"found an alias \(\*n\).*line 3"):
        TrainingConfig.from_yaml(tmp_path / "alias.yaml")


def test_numpy_integers_are_ints():
    np = pytest.importorskip("numpy")
    cfg = TrainingConfig(epochs=np.int64(3), lattice_size=np.array([8, 8, 6]).tolist(), seed=np.int32(5))
    assert cfg.epochs == 3 and type(cfg.epochs) is int and cfg.seed == 5
    assert TrainingConfig(lattice_size=tuple(np.array([8, 8, 6]))).model.lattice_size == (8, 8, 6)
