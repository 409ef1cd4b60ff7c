"""A published 3D NCA runs on CubicCore exactly: the PlainVillageHouse model of real-itu/3d-artefacts-nca
(tests/fixtures/artefacts_nca), converted by cubecore.nca.artefacts, against a copy of the upstream's rule; and
examples/artefacts_nca.py, the converter's user, grows it."""

import contextlib
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cubecore
from cubecore.nca import artefacts as N

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("artefacts_nca", ROOT / "examples" / "artefacts_nca.py")
A = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(A)

STEPS, BATCH = 40, 2  # the house's first blocks appear near step 15; by step 40 most of it stands
HIDDEN, CATEGORIES, CHANNELS, DIMS = 10, 10, 21, [32, 32]  # the fixture's model (its yaml: num_hidden_channels 10)
KERNEL_REASON = cubecore.kernel_unavailable_reason("cpu", torch.float64)


# --- A copy of the upstream's rule --------------------------------------------------------------------------------
# From real-itu/3d-artefacts-nca at d308f29, artefact_nca/model/voxel_ca_model.py (MIT License, Copyright (c) 2021
# Shyam Sudhakaran; the text is in tests/fixtures/artefacts_nca/LICENSE): make_sequental, the modules of
# VoxelPerceptionNet and SmallerVoxelUpdateNet under the same names (so that their state dict loads as it is),
# and VoxelCAModel.alive / update.  Changed: the fire mask is an argument instead of
# ``torch.rand_like(x[:, :1, :, :, :]) < self.cell_fire_rate``, ``.to(self.device)`` is dropped, the init code
# (overwritten by the state dict) is left out, and ``.float()`` of the masks is ``.to(x.dtype)`` so that the
# rule runs in float64 throughout.

def make_sequental(num_channels, channel_dims):
    conv3d = torch.nn.Conv3d(num_channels * 3, channel_dims[0], kernel_size=1)
    relu = torch.nn.ReLU()
    layer_list = [conv3d, relu]
    for i in range(1, len(channel_dims)):
        layer_list.append(
            torch.nn.Conv3d(channel_dims[i - 1], channel_dims[i], kernel_size=1)
        )
        layer_list.append(torch.nn.ReLU())
    layer_list.append(
        torch.nn.Conv3d(channel_dims[-1], num_channels, kernel_size=1, bias=False)
    )
    return torch.nn.Sequential(*layer_list)


class UpstreamVoxelCA(nn.Module):
    """VoxelCAModel's rule, [B, C, D, H, W]."""

    def __init__(self, num_hidden_channels, living_channel_dim, update_net_channel_dims,
                 alpha_living_threshold=0.1, use_bce_loss=False):
        super().__init__()
        self.living_channel_dim = living_channel_dim
        self.alpha_living_threshold = alpha_living_threshold
        self.use_bce_loss = use_bce_loss
        self.num_channels = num_hidden_channels + living_channel_dim + 1
        self.perception_net = nn.Module()
        self.perception_net.conv1 = torch.nn.Conv3d(self.num_channels, self.num_channels * 3, 3, stride=1,
                                                    padding=1, groups=self.num_channels, bias=False)
        self.update_network = nn.Module()
        self.update_network.out = make_sequental(self.num_channels, update_net_channel_dims)

    def alive(self, x):
        return F.max_pool3d(
            x[:, self.living_channel_dim : self.living_channel_dim + 1, :, :, :],
            kernel_size=3,
            stride=1,
            padding=1,
        )

    def perceive(self, x):
        return self.perception_net.conv1(x)

    def update(self, x, rand_mask):
        pre_life_mask = self.alive(x) > self.alpha_living_threshold

        out = self.perceive(x)
        out = self.update_network.out(out)

        out = out * rand_mask.to(x.dtype)
        x = x + out

        post_life_mask = self.alive(x) > self.alpha_living_threshold
        life_mask = (pre_life_mask & post_life_mask).to(x.dtype)
        x = x * life_mask
        if not self.use_bce_loss:
            x[:, :1, :, :, :][life_mask == 0.0] += torch.tensor(1.0)
        return x, life_mask


@contextlib.contextmanager
def one_thread():
    """float64 Conv3d on the CPU (the upstream copy) and the reference backend are tiny work here, which two
    threads on a busy two-core machine make 10-20x slower, not faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def upstream_trajectory(model, seed, masks):
    """Their rollout from ``seed`` [B, D, H, W, C] (their dataset's layout) under ``masks`` [steps, B, D, H, W]:
    every state, [steps + 1, B, D, H, W, C]."""
    x = seed.permute(0, 4, 1, 2, 3)  # their forward: rearrange(x, "b d h w c -> b c d h w")
    states = [x]
    with torch.no_grad():
        for mask in masks:
            x, _ = model.update(x, mask[:, None])
            states.append(x)
    return torch.stack(states).permute(0, 1, 3, 4, 5, 2)


# --- fixtures -----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def state_dict():
    return torch.load(A.HOUSE_MODEL, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def problem(state_dict):
    """The seed, the fire masks, and the upstream copy's trajectory from them, in float64."""
    upstream = UpstreamVoxelCA(HIDDEN, CATEGORIES, DIMS)
    upstream.load_state_dict(state_dict)  # strict: their names, their shapes
    upstream.double()
    core = N.core_from_artefact_nca(state_dict, HIDDEN, A.HOUSE_LATTICE, STEPS).double()
    seed = N.artefact_seed(core, BATCH)
    masks = torch.rand((STEPS, BATCH, *A.HOUSE_LATTICE), generator=torch.Generator().manual_seed(0)) < 0.5
    with one_thread():
        return seed, masks, upstream_trajectory(upstream, seed, masks)


def core_trajectory(state_dict, backend, seed, masks, **options):
    core = N.core_from_artefact_nca(state_dict, options.pop("hidden_channels", HIDDEN), A.HOUSE_LATTICE, STEPS,
                                    backend=backend, **options).double()
    with torch.no_grad(), (one_thread() if backend == "reference" else contextlib.nullcontext()):
        return core(state=seed, fire_mask=masks, return_trajectory=True)


def step_differences(a, b):
    return (a - b).abs().flatten(1).amax(1)


# --- the converted model is the upstream's rule -------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["kernel", "reference"])
def test_converted_model_matches_the_upstream_rule_at_every_step(state_dict, problem, backend):
    if backend == "kernel" and KERNEL_REASON is not None:
        pytest.skip(f"no CPU float64 kernel: {KERNEL_REASON}")
    seed, masks, want = problem
    got = core_trajectory(state_dict, backend, seed, masks)
    assert got.shape == want.shape == (STEPS + 1, BATCH, *A.HOUSE_LATTICE, CHANNELS)
    diffs = step_differences(got, want)
    assert diffs.max() < 1e-9, [f"{d:.1e}" for d in diffs.tolist()]
    # and the rollout is not trivial: the cells come alive, the house's blocks appear, the dead cells are air
    living = (want[..., CATEGORIES] > 0.1).flatten(2).sum(-1)
    placed = (N.blocks(want, CATEGORIES) > 0).flatten(2).sum(-1)
    assert living[0].tolist() == [1] * BATCH and (living[-1] > 900).all(), living
    assert (placed[15] < 10).all() and (placed[-1] > 50).all(), placed
    assert torch.equal(want[1, :, 0, 0, 0], torch.eye(CHANNELS, dtype=want.dtype)[0].expand(BATCH, -1))

MUTATIONS = {
    # the perception's kernel read with the X and Z axes swapped (a [W, H, D] layout mistaken for [D, H, W])
    "perception axes swapped": lambda core, conv: core.perception.copy_(
        conv.transpose(2, 4).reshape(CHANNELS, 3, 27)),
    # channel f*C + c read as filter f over channel c (the grouped conv's channels are c*3 + f)
    "perception channels interleaved wrongly": lambda core, conv: core.perception.copy_(
        conv.reshape(3, CHANNELS, 27).transpose(0, 1)),
    "dead cells zeros, not air": lambda core, conv: core.dead_state.zero_(),
    "alive channel off by one": lambda core, conv: setattr(core, "rule", type(core.rule)(
        **{**core.rule.__dict__, "alive_channel": CATEGORIES + 1})),
}


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_the_comparison_sees_a_wrong_conversion(state_dict, problem, mutation):
    """The check above can fail: each of these mistakes makes the states differ by far more than 1e-9."""
    seed, masks, want = problem
    steps = 25
    core = N.core_from_artefact_nca(state_dict, HIDDEN, A.HOUSE_LATTICE, steps).double()
    core.backend = "reference" if KERNEL_REASON is not None else "kernel"
    with torch.no_grad(), one_thread():
        MUTATIONS[mutation](core, state_dict[N.PERCEPTION_KEY].double())
        got = core(state=seed, fire_mask=masks[:steps], return_trajectory=True)
    assert step_differences(got, want[:steps + 1]).max() > 1e-3


def test_load_artefact_nca_builds_the_rule_from_their_files():
    core = A.load_artefact_nca(steps=7)
    assert core.get_info() | {"active_backend": None, "parameters": None, "cpu_engine": None, "precision": None} == {
        "lattice_size": (10, 10, 10), "cells": 1000, "state_size": CHANNELS, "hidden_size": (32, 32),
        "input_size": 0, "steps": 7, "neighbourhood": "moore", "perception": "depthwise", "perception_filters": 3,
        "boundary": "zeros", "activation": "relu", "output_activation": "identity", "output_bias": False,
        "update": "residual", "step_size": 1.0, "fire_rate": 0.5, "alive_channel": CATEGORIES,
        "alive_threshold": 0.1, "backend": "auto", "active_backend": None, "cpu_engine": None, "precision": None,
        "parameters": None,
        "device": "cpu", "dtype": "float32"}
    assert torch.equal(core.dead_state, torch.eye(CHANNELS)[0])
    target = A.house_target()
    assert target.shape == (10, 10, 10) and int((target > 0).sum()) == 84 and int(target.max()) == 9
    assert int((target[:, 5:] > 0).sum()) == 0  # the house stands on the floor (Y is height), 5 blocks high


def test_load_config_reads_their_yaml_with_their_defaults(tmp_path):
    assert N.load_config(A.HOUSE_CONFIG) == {"hidden_channels": 10, "fire_rate": 0.5, "alive_threshold": 0.1,
                                             "use_bce_loss": False, "update_net_channel_dims": [32, 32]}
    other = tmp_path / "other.yaml"
    other.write_text("trainer:\n  use_bce_loss: true\n  model_config:\n    cell_fire_rate: 0.25\n")
    assert N.load_config(other) == {"hidden_channels": 12, "fire_rate": 0.25, "alive_threshold": 0.1,
                                    "use_bce_loss": True, "update_net_channel_dims": [32, 32]}


def test_use_bce_loss_leaves_dead_cells_zero_and_the_checkpoint_dict_is_taken(state_dict):
    checkpoint = {"model": state_dict, "optimizer": {}, "scheduler": {}}  # what their trainer saves
    core = N.core_from_artefact_nca(checkpoint, HIDDEN, use_bce_loss=True)
    assert core.dead_state is None
    assert torch.equal(N.core_from_artefact_nca(state_dict, HIDDEN).dead_state, torch.eye(CHANNELS)[0])
    assert torch.equal(core.perception, state_dict[N.PERCEPTION_KEY].view(CHANNELS, 3, 27))


# --- what is not such a model -------------------------------------------------------------------------------------

def _with(state_dict, **changes):
    sd = dict(state_dict)
    for key, value in changes.items():
        key = key.replace("__", ".")
        if value is None:
            del sd[key]
        else:
            sd[key] = value
    return sd


@pytest.mark.parametrize("make, match", [
    (lambda sd: {}, "no perception_net.conv1.weight"),
    (lambda sd: nn.Linear(3, 4).state_dict(), "no perception_net.conv1.weight"),
    (lambda sd: [1, 2], "not a dict"),
    (lambda sd: {**sd, "extra.weight": torch.zeros(1)}, r"unexpected keys \['extra.weight'\]"),
    (lambda sd: {N.PERCEPTION_KEY: sd[N.PERCEPTION_KEY]}, "no update net"),
    (lambda sd: {**sd, N.PERCEPTION_KEY: torch.zeros(63, 2, 3, 3, 3)}, r"must be \[3C, 1, 3, 3, 3\]"),
    (lambda sd: {**sd, "update_network.out.4.bias": torch.zeros(21)}, "the output layer .* has a bias"),
    (lambda sd: _with(sd, update_network__out__0__bias=None), r"update_network.out.0.bias must be \[32\]"),
    (lambda sd: {**sd, "update_network.out.4.weight": torch.zeros(20, 32, 1, 1, 1)},
     r"update_network.out.4.weight must be \[21, 32, 1, 1, 1\]"),
    (lambda sd: {**sd, "update_network.out.0.weight": torch.zeros(32, 63, 3, 3, 3)}, "out.0.weight must be"),
    (lambda sd: {**sd, "update_network.out.2.weight": [[0.0]]}, "update_network.out.2 holds a list weight"),
])
def test_rejects_what_is_not_a_voxel_ca_model(state_dict, make, match):
    with pytest.raises(ValueError, match="not a 3d-artefacts-nca VoxelCAModel state dict: .*" + match):
        N.core_from_artefact_nca(make(state_dict), HIDDEN)


def test_rejects_more_hidden_layers_than_cubecore_runs_and_a_wrong_hidden_channel_count(state_dict):
    deep = UpstreamVoxelCA(HIDDEN, CATEGORIES, [8, 8, 8]).state_dict()
    with pytest.raises(ValueError, match=r"update_net_channel_dims \[8, 8, 8\]: CubicCore runs at most 2"):
        N.core_from_artefact_nca(deep, HIDDEN)
    for wrong in (20, -1, 10.0):
        with pytest.raises(ValueError, match="hidden_channels must be an int in 0 .. C - 2 = 19"):
            N.core_from_artefact_nca(state_dict, wrong)


def test_the_example_grows_the_house_and_plots_it(tmp_path):
    image = tmp_path / "house.png"
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "artefacts_nca.py"), "--steps", "60",
                             "--plot", str(image)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    reached = float(re.search(r"after 60 steps: IoU with the house ([0-9.]+)", result.stdout).group(1))
    assert reached > 0.9, result.stdout  # 0.988 with the defaults
    assert re.search(r"^\s+30\s+\d+\s+\d+\s+[0-9.]+\s+\d+/84$", result.stdout, re.M), result.stdout
    assert image.stat().st_size > 10_000
