"""``NcaTrainingConfig``: the settings of ``python -m cubecore.nca``: the optimisation and the run at the top level,
the ``nca:`` section (``NcaConfig``: the target, the pool, the steps, the damage and the loss) and the ``model:``
section (the same ``ModelConfig`` as ``cubecore.train``'s, defaulting to the upstream's rule).

Every key of the recipe defaults to the upstream's value (real-itu/3d-artefacts-nca's ``VoxelCATrainerConfig``,
``VoxelCAModelConfig`` and ``VoxelCADatasetConfig``; Adam and ``ExponentialLR`` at their config defaults); the
target has no upstream default.  The command's own settings (``SMALL_RUN``, written out in
``config/nca_training.yaml``) change those that make a run of a minute on a 2-core CPU: the target and its 8^3
lattice, ``iterations`` (their ``epochs``: 20,000), the steps (48 to 64) and the batch (their default 32, their
published models 5), the learning rate, initialisation and hidden channels of their published models, and a
learning rate that falls within the shorter run plus normalised gradients (docs/nca.md says why).

The state's size, the alive channel, the lattice and the steps of the ``model:`` section follow from the target
and the ``nca:`` section (``for_target``): block types, then the living channel, then ``nca.hidden_channels``
hidden channels (RGBA: four colour channels, alpha the living one).  Given other values, they are refused,
naming the key that sets them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

from ..checks import check_choice, check_int, check_ints, check_number
from ..errors import InvalidValueError
from ..model.config import ModelConfig
from ..sections import ConfigSection
from ..training.config import MAX_SEED, RunConfig
from ..training.tracking import LOGGERS
from .recipe import ALIVE_LOSSES
from .targets import MAX_SIDE


@dataclass
class NcaConfig(ConfigSection):
    section = "nca"

    target: str = "tree"  # a shipped structure's name, or a .npy, .vox or .nbt file
    lattice: Optional[Tuple[int, int, int]] = None  # None: the upstream's cube (the longest side rounded up to 10)
    hidden_channels: int = 12  # the upstream's num_hidden_channels
    pool_size: int = 32
    sample_pool: bool = True  # False: every batch starts from seeds (the upstream's use_sample_pool)
    batch_size: int = 32
    min_steps: int = 48  # each iteration runs a random number of steps in [min_steps, max_steps]
    max_steps: int = 64
    spawn_at_bottom: bool = False  # the seed cell on the floor (Y = 0) rather than in the middle
    seed_state: Optional[str] = None  # a .npy [X, Y, Z, C] to start from instead of one living cell
    damage: bool = False  # damage the batch's best samples (regeneration)
    num_damaged: int = 2
    damage_radius_denominator: int = 5  # the damage's radius is max(lattice) // this
    alive_loss: str = "air"  # air: dead cells are air (cross-entropy); mse: the living channel (their use_bce_loss)
    iou_loss: bool = True  # add 1 - IoU (no gradient) to the loss, as the upstream does
    init_std: float = 0.0002  # weights from N(0, init_std), biases zero (the upstream's normal_std)
    init_from: Optional[str] = None  # start from a model: a run's RUN_DIR/model or an upstream pretrained .pt

    def check(self) -> None:
        for key in ("hidden_channels",):
            check_int(self.key(key), getattr(self, key), minimum=0)
        for key in ("pool_size", "batch_size", "min_steps", "max_steps", "damage_radius_denominator"):
            check_int(self.key(key), getattr(self, key), minimum=1)
        check_int(self.key("num_damaged"), self.num_damaged, minimum=0)
        check_choice(self.key("alive_loss"), self.alive_loss, ALIVE_LOSSES)
        check_number(self.key("init_std"), self.init_std, minimum=0.0)
        if self.lattice is not None:
            lattice = check_ints(self.key("lattice"), self.lattice, 3, minimum=1)
            if max(lattice) > MAX_SIDE:
                raise InvalidValueError(f"{self.key('lattice')} {list(lattice)}: cubecore.nca takes at most {MAX_SIDE} "
                                        f"cells a side")
        if self.max_steps < self.min_steps:
            raise InvalidValueError(f"{self.key('max_steps')} ({self.max_steps}) must be >= "
                                    f"{self.key('min_steps')} ({self.min_steps})")
        if self.sample_pool and self.batch_size > self.pool_size:
            raise InvalidValueError(f"{self.key('batch_size')} ({self.batch_size}) must be <= "
                                    f"{self.key('pool_size')} ({self.pool_size}): a batch is drawn from the pool")


def nca_model() -> ModelConfig:
    """The upstream's rule (``VoxelCAModel``) as a ``ModelConfig``; its size, lattice, alive channel and steps
    are set by ``for_target``."""
    return ModelConfig(lattice_size=(10, 10, 10), state_size=23, hidden_size=32, hidden_layers=2, steps=64,
                       neighbourhood="moore", perception="depthwise", perception_filters=3, boundary="zeros",
                       activation="relu", output_activation="identity", output_bias=False, update="residual",
                       step_size=1.0, fire_rate=0.5, alive_channel=0, alive_threshold=0.1, global_channels=0,
                       readout_skip=False)


# What the command trains without --config (config/nca_training.yaml writes the same out): the shipped tree in
# an 8^3 lattice, fewer steps and a smaller batch than the upstream's defaults, the learning rate and
# initialisation of their published models, so that it takes minutes on a 2-core CPU.  In 1,200 iterations the
# learning rate falls 11x (the upstream's 0.9999 falls 7x over their 20,000), and each gradient is normalised:
# without both, one seed in three lost its pool (docs/nca.md, "Measured").
SMALL_RUN = {"iterations": 1200, "learning_rate": 2e-3, "lr_gamma": 0.998, "normalize_gradients": True,
             "checkpoint_every": 50, "nca.target": "tree", "nca.lattice": [8, 8, 8], "nca.hidden_channels": 10,
             "nca.pool_size": 32, "nca.batch_size": 5, "nca.min_steps": 16, "nca.max_steps": 24, "nca.init_std": 0.1}


def small_run(given: Optional[Dict[str, Any]] = None) -> "NcaTrainingConfig":
    """The command's own settings (``SMALL_RUN``); given another target (``given``, the command line's values)
    and no lattice, that target's own lattice (the upstream's cube), not the tree's 8^3."""
    given = given or {}
    settings = dict(SMALL_RUN)
    if given.get("nca.target", SMALL_RUN["nca.target"]) != SMALL_RUN["nca.target"] and "nca.lattice" not in given:
        settings["nca.lattice"] = None
    return NcaTrainingConfig(**settings)


# model keys set by the target and the nca section, and the key to set instead
DERIVED = {"lattice_size": "nca.lattice", "state_size": "nca.hidden_channels", "alive_channel": "nca.hidden_channels",
           "steps": "nca.max_steps"}
EMBEDDING_ONLY = ("reshaping_method", "position_channels", "global_channels", "readout_skip")


@dataclass(init=False)
class NcaTrainingConfig(RunConfig):
    sections = {"model": ModelConfig, "nca": NcaConfig}
    yaml_section = "nca_training"
    defaults_file = "config/nca_training.yaml"

    iterations: int = 20000  # the upstream's epochs (one batch each)
    learning_rate: float = 1e-3  # Adam, the upstream's optimizer
    lr_gamma: float = 0.9999  # ExponentialLR, each iteration, the upstream's scheduler
    normalize_gradients: bool = False  # each parameter's gradient divided by its norm (not in the upstream)
    loss_threshold: Optional[float] = 0.005  # stop once an iteration's loss is at most this (null: never)
    eval_samples: int = 8  # seeds grown for each evaluation
    seed: int = 0
    device: str = "auto"
    output_dir: str = "runs/nca"
    checkpoint_every: int = 100  # iterations between checkpoints, each a line of metrics
    logger: str = "csv"
    model: ModelConfig = field(default_factory=nca_model)
    nca: NcaConfig = field(default_factory=NcaConfig)

    def check(self) -> None:
        for key in ("iterations", "eval_samples", "checkpoint_every"):
            check_int(self.key(key), getattr(self, key), minimum=1)
        check_int(self.key("seed"), self.seed, minimum=0, maximum=MAX_SEED)
        check_number(self.key("learning_rate"), self.learning_rate, minimum=0.0, strict_minimum=True)
        check_number(self.key("lr_gamma"), self.lr_gamma, minimum=0.0, maximum=1.0, strict_minimum=True)
        if self.loss_threshold is not None:
            check_number(self.key("loss_threshold"), self.loss_threshold)
        check_choice(self.key("logger"), self.logger, LOGGERS)
        default = nca_model()
        for key in EMBEDDING_ONLY:
            if getattr(self.model, key) != getattr(default, key):
                raise InvalidValueError(f"config key 'model.{key}' belongs to the embedding model of cubecore.train; "
                                        f"a 3D NCA has no embedding (leave it at {getattr(default, key)!r})")

    def for_target(self, types: int, alive_channel: int, lattice: Tuple[int, int, int]) -> "NcaTrainingConfig":
        """The config with the model keys the target decides: ``types`` state channels per voxel (block types
        with air, or RGBA), the living channel ``alive_channel``, the ``lattice``.  A model key given another
        value is refused, naming the key that sets it."""
        state = max(types, alive_channel + 1) + self.nca.hidden_channels
        derived = {"lattice_size": tuple(lattice), "state_size": state, "alive_channel": alive_channel,
                   "steps": self.nca.max_steps}
        default = nca_model()
        for key, value in derived.items():
            given = getattr(self.model, key)
            if given != getattr(default, key) and given != value:
                raise InvalidValueError(f"config key 'model.{key}' is set by the target and {DERIVED[key]} "
                                        f"(here {value}), not given: set {DERIVED[key]} instead")
        return self.override(**{f"model.{k}": v for k, v in derived.items()})
