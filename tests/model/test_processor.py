"""EmbeddingProcessor: embedding -> lattice -> core -> per-cell readout -> embedding, for both reshapers."""

import json
import os
import stat
import subprocess
import sys

import pytest
import torch

from cubecore import EmbeddingProcessor, ModelConfig


@pytest.mark.parametrize("method,lattice", [("simple", (2, 2, 3)), ("projection", (3, 3, 3))])
def test_shapes_and_gradients(method, lattice):
    torch.manual_seed(0)
    proc = EmbeddingProcessor(12, lattice_size=lattice, state_size=4, hidden_size=6, steps=2, reshaping_method=method,
                              readout_skip=False, global_channels=0)
    x = torch.randn(5, 12)
    y = proc(x)
    assert y.shape == (5, 12)
    y.square().sum().backward()
    for name, p in proc.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert proc.core.w1.grad.abs().sum() > 0
    info = proc.get_info()
    assert info["parameters"] == sum(p.numel() for p in proc.parameters())
    assert info["reshaping_method"] == method


def test_readout_is_per_cell():
    proc = EmbeddingProcessor(12, lattice_size=(2, 2, 3), state_size=4, hidden_size=6, steps=1)
    with torch.no_grad():
        proc.readout_bias.zero_()
        proc.readout_bias[0, 0, 0, 0] = 5.0
    out = proc(torch.zeros(1, 12))
    others = out[0, 1:]
    assert out[0, 0] - others.mean() > 4.0, "one cell's bias moves only its own dimension"


def test_bad_input_raises():
    proc = EmbeddingProcessor(12, lattice_size=(2, 2, 3), state_size=4, hidden_size=6, steps=1)
    with pytest.raises(ValueError, match=r"\[B, 12\]"):
        proc(torch.randn(3, 11))
    # These named the core's internal tensors ("state", "external") instead of the argument given.
    with pytest.raises(ValueError, match="input embedding is an empty batch"):
        proc(torch.randn(0, 12))
    with pytest.raises(TypeError, match="input embedding has dtype torch.float64 but the model's weights are "
                                        "torch.float32"):
        proc(torch.randn(3, 12, dtype=torch.float64))
    assert proc.double()(torch.randn(3, 12, dtype=torch.float64)).dtype == torch.float64
    with pytest.raises(ValueError, match="does not fit"):
        EmbeddingProcessor(12, lattice_size=(2, 2, 2))


def test_readout_skip_starts_as_the_identity_and_learns():
    torch.manual_seed(0)
    proc = EmbeddingProcessor(24, lattice_size=(2, 3, 4), state_size=3, hidden_size=5, steps=2, readout_skip=True)
    x = torch.randn(5, 24)
    assert torch.equal(proc(x), x), "a zero-initialised readout adds nothing at first"
    proc(x).square().sum().backward()
    assert proc.readout_weight.grad.abs().sum() > 0


def test_position_channels_widen_the_external_input_and_get_gradients():
    torch.manual_seed(0)
    proc = EmbeddingProcessor(24, lattice_size=(2, 3, 4), state_size=3, hidden_size=5, steps=2, position_channels=2,
                              global_channels=0, readout_skip=False)
    assert proc.core.input_size == 1 + 2 and proc.position.shape == (2, 3, 4, 2)
    proc(torch.randn(5, 24)).square().sum().backward()
    assert proc.position.grad.abs().sum() > 0
    info = proc.get_info()
    assert info["position_channels"] == 2 and info["readout_skip"] is False
    with pytest.raises(ValueError, match="position_channels"):
        EmbeddingProcessor(24, lattice_size=(2, 3, 4), position_channels=-1)
    with pytest.raises(TypeError, match="readout_skip"):
        EmbeddingProcessor(24, lattice_size=(2, 3, 4), readout_skip="yes")


def test_global_channels_give_every_cell_the_projection_of_the_whole_embedding():
    torch.manual_seed(0)
    proc = EmbeddingProcessor(24, lattice_size=(2, 3, 4), state_size=3, hidden_size=5, steps=2, position_channels=1,
                              global_channels=3, readout_skip=False)
    assert proc.core.input_size == 1 + 1 + 3 and proc.global_projection.weight.shape == (3, 24)
    x = torch.randn(5, 24)
    external = proc.external(x)
    assert external.shape == (5, 2, 3, 4, 5)
    expected = x @ proc.global_projection.weight.T  # [5, 3], the same at every cell
    torch.testing.assert_close(external[..., 2:], expected[:, None, None, None, :].expand(5, 2, 3, 4, 3))
    assert torch.equal(external[..., :1], proc.reshaper.to_lattice(x)), "the placed embedding comes first"
    # A change in one dimension reaches every cell's input at once, not only its own cell's.
    x2 = x.clone()
    x2[:, 0] += 1.0
    changed = (proc.external(x2) - external)[..., 2:].abs().sum(-1)
    assert (changed > 0).all()
    proc(x).square().sum().backward()
    assert proc.global_projection.weight.grad.abs().sum() > 0
    assert proc.get_info()["global_channels"] == 3
    with pytest.raises(TypeError, match="dtype"):  # the core's error naming the tensors, as without them
        proc.double()(x)
    with pytest.raises(ValueError, match="global_channels"):
        EmbeddingProcessor(24, lattice_size=(2, 3, 4), global_channels=-1)


def _fit_mse(proc, x, y, iterations=100):
    opt = torch.optim.Adam(proc.parameters(), lr=1e-2)
    for _ in range(iterations):
        opt.zero_grad()
        loss = (proc(x) - y).square().mean()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return (proc(x) - y).square().mean().item()


def test_global_channels_learn_a_map_that_no_neighbourhood_sees():
    """Each output dimension moves with a projection of the whole embedding: in one step a cell sees only its
    neighbours, so without global channels the cube cannot fit it, and with one it can."""
    torch.manual_seed(0)
    x = torch.randn(256, 24)
    u, v = torch.randn(24), torch.randn(24) / 24 ** 0.5
    y = x + torch.outer(x @ v, u)
    baseline = (x - y).square().mean().item()
    losses = {}
    for g in (0, 1):
        torch.manual_seed(1)
        proc = EmbeddingProcessor(24, lattice_size=(2, 3, 4), state_size=4, hidden_size=8, steps=1, readout_skip=True,
                                  global_channels=g)
        losses[g] = _fit_mse(proc, x, y)
    assert losses[0] > 0.5 * baseline, losses  # the local cube gains little over predicting the input
    assert losses[1] < 0.1 * baseline, losses


def test_global_channels_survive_save_pretrained(tmp_path):
    torch.manual_seed(0)
    proc = EmbeddingProcessor(24, lattice_size=(2, 3, 4), state_size=3, hidden_size=5, steps=2, global_channels=2,
                              readout_skip=True)
    with torch.no_grad():
        proc.readout_weight.normal_()
    proc.save_pretrained(tmp_path / "m")
    loaded = EmbeddingProcessor.from_pretrained(tmp_path / "m")
    assert loaded.config.global_channels == 2
    x = torch.randn(4, 24)
    assert torch.equal(loaded(x), proc(x))


def test_save_pretrained_round_trip_is_exact_and_loading_is_strict(tmp_path):
    torch.manual_seed(0)
    proc = EmbeddingProcessor(24, lattice_size=(2, 3, 4), state_size=3, hidden_size=5, steps=2, reshaping_method="adaptive",
                              position_channels=2, readout_skip=True)
    proc.reshaper.fit(torch.randn(12, 24))
    with torch.no_grad():
        proc.readout_weight.normal_()
    proc.save_pretrained(tmp_path / "m", model_card_kwargs={"results": "| cube | 0.5 |"})
    assert {p.name for p in (tmp_path / "m").iterdir()} >= {"model.safetensors", "config.json", "README.md"}
    loaded = EmbeddingProcessor.from_pretrained(tmp_path / "m")
    x = torch.randn(4, 24)
    assert torch.equal(loaded(x), proc(x)) and loaded.reshaper.is_fitted
    assert "| cube | 0.5 |" in (tmp_path / "m" / "README.md").read_text()
    from safetensors.torch import load_file, save_file

    weights = load_file(tmp_path / "m" / "model.safetensors")
    weights.pop("readout_bias")
    save_file(weights, tmp_path / "m" / "model.safetensors")
    with pytest.raises(ValueError, match="missing.*readout_bias"):
        EmbeddingProcessor.from_pretrained(tmp_path / "m")


def test_a_rule_family_processor_round_trips_through_save_pretrained(tmp_path):
    torch.manual_seed(0)
    proc = EmbeddingProcessor(24, lattice_size=(2, 3, 4), state_size=4, hidden_size=5, hidden_layers=2, steps=2,
                              neighbourhood="moore", perception="depthwise", perception_filters=2,
                              output_activation="identity", output_bias=False, boundary="reflect")
    with torch.no_grad():
        proc.readout_weight.normal_()
    proc.save_pretrained(tmp_path / "m")
    loaded = EmbeddingProcessor.from_pretrained(tmp_path / "m")
    assert loaded.config == proc.config and loaded.core.perception.shape == (4, 2, 27)
    x = torch.randn(3, 24)
    assert torch.equal(loaded(x), proc(x))


def test_a_model_saved_with_the_old_reflect_loads_as_replicate(tmp_path):
    """Before the rule family, boundary 'reflect' read the edge cell again (PyTorch's 'replicate'); a model
    saved then (its config has no 'neighbourhood') rebuilds that rule, while a new config's 'reflect' mirrors."""
    proc = EmbeddingProcessor(24, lattice_size=(2, 3, 4), state_size=3, hidden_size=5, steps=2, boundary="replicate")
    proc.save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    for key in ("neighbourhood", "perception", "perception_filters", "hidden_layers", "output_activation",
                "output_bias", "fire_rate", "alive_channel", "alive_threshold"):
        del config["config"][key]
    config["config"]["boundary"] = "reflect"
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    loaded = EmbeddingProcessor.from_pretrained(tmp_path / "m")
    assert loaded.config.boundary == "replicate"
    x = torch.randn(3, 24)
    assert torch.equal(loaded(x), proc(x))
    assert ModelConfig.from_saved({**ModelConfig().to_dict(), "boundary": "reflect"}).boundary == "reflect"


def _saved(tmp_path):
    torch.manual_seed(0)
    proc = EmbeddingProcessor(24, lattice_size=(2, 3, 4), state_size=3, hidden_size=5, steps=2)
    proc.save_pretrained(tmp_path / "m")
    return proc, tmp_path / "m"


def test_a_config_that_does_not_match_the_weights_is_refused_before_building(tmp_path):
    """hidden_size 20,000,000 in config.json allocated gigabytes before the size mismatch showed."""
    _, folder = _saved(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["config"]["hidden_size"] = 20_000_000
    (folder / "config.json").write_text(json.dumps(config))
    import tracemalloc

    tracemalloc.start()
    with pytest.raises(ValueError, match=r"model.safetensors does not hold the model.*core.w1"):
        EmbeddingProcessor.from_pretrained(folder)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 50e6, f"{peak / 1e6:.0f} MB traced before the refusal"


def test_a_saved_config_missing_a_key_is_refused(tmp_path):
    """A missing 'steps' used to load with today's default: another model than the one trained."""
    _, folder = _saved(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    del config["config"]["steps"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config.json.*lacks the key\(s\) \['steps'\]"):
        EmbeddingProcessor.from_pretrained(folder)


def test_a_corrupted_weight_file_is_refused(tmp_path):
    proc, folder = _saved(tmp_path)
    weights = folder / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-3] ^= 0x10  # a bit flip in the last tensor's values
    weights.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="corrupted"):
        EmbeddingProcessor.from_pretrained(folder)
    weights.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        EmbeddingProcessor.from_pretrained(folder)


@pytest.mark.skipif(os.name != "posix", reason="RLIMIT_FSIZE")
def test_a_full_disk_while_saving_is_an_os_error_naming_the_file_and_leaves_no_part(tmp_path):
    """safetensors raised its own SafetensorError and left a zero-byte or partial model.safetensors."""
    script = f"""
import resource, signal, sys
import torch
from cubecore import EmbeddingProcessor
model = EmbeddingProcessor(384)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
try:
    model.save_pretrained({str(tmp_path / "m")!r})
except OSError as exc:
    print("OSError", exc)
except Exception as exc:
    print("other", type(exc).__name__, exc)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.stdout.startswith("OSError") and "model.safetensors" in result.stdout, result.stdout + result.stderr
    assert not (tmp_path / "m" / "model.safetensors").exists()


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
def test_saved_weights_follow_the_umask_like_the_other_files(tmp_path, umask):
    umask(0o022)
    EmbeddingProcessor(16, ModelConfig(lattice_size=(2, 2, 4), state_size=2, hidden_size=4, steps=1)).save_pretrained(
        tmp_path / "m")
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "m").iterdir()}
    assert modes["model.safetensors"] == 0o644 and modes["config.json"] == 0o644, modes
