"""``NcaTrainer``: trains a ``CubicCore`` 3D NCA to grow a target structure from a seed, by the upstream's recipe
(``recipe``), and scores it.

One iteration: a batch from the sample pool (worst first, the worst replaced by the seed, the best damaged when
``nca.damage``), a random number of steps in [min_steps, max_steps] through the core (the fused kernel with
``model.backend: auto``, the plain-PyTorch reference with ``reference``), the loss, Adam, ``ExponentialLR``, and
the final states written back to the pool.  Every random draw (pool, steps, damage, fire masks) comes from
torch's generator, whose state a checkpoint holds with the weights, optimizer, scheduler, pool and target, so a
resumed run continues exactly as the uninterrupted one.  Evaluations draw from a generator of their own, so
that when they run does not change training.
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from ..checks import check_device
from ..errors import InvalidValueError, NotFoundError, TrainingDivergedError, UnavailableError
from ..model.core import CubicCore
from ..ops.front import fire_masks
from ..training.checkpoint import load_checkpoint_file, rng_states, save_checkpoint_file, set_rng_states
from ..training.memory import available_bytes
from ..training.peers import in_group, weights_digest
from .config import NcaTrainingConfig
from .model import NcaModel, initial_weights
from .recipe import (SamplePool, damage, nca_loss, normalize_gradients, seed_states, structure_metrics,
                     upstream_init)
from .targets import VoxelTarget, load_target

log = logging.getLogger("cubecore.epochs")  # one line per checkpoint (``--quiet`` leaves them out)

# What the report scores, by name: how many times the training steps a seed grows, or a regrowth after damage.
GROWTH = {"grown": 1, "grown_2x": 2, "grown_4x": 4}


def resolve_device(device: str) -> torch.device:
    if device == "auto":  # one GPU per process under torchrun
        return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if torch.cuda.is_available() else "cpu")
    return check_device(device, "config key 'device'")


class NcaTrainer:
    def __init__(self, config: Optional[NcaTrainingConfig] = None, target: Optional[VoxelTarget] = None,
                 seed_state: Optional[torch.Tensor] = None, initialize: bool = True) -> None:
        """``target``: the structure placed in its lattice (by default read from ``config.nca.target`` and
        placed in ``nca.lattice``); ``seed_state`` [X, Y, Z, C]: the state to grow from (by default the one of
        ``nca.seed_state``, or one living cell).  The weights start from ``nca.init_from``'s model where it names
        one (``initialize=False``: not read, for a checkpoint's weights to replace)."""
        config = config or NcaTrainingConfig()
        self.target = target if target is not None else load_target(config.nca.target).placed(config.nca.lattice)
        self.config = config.for_target(self.target.types, self.target.alive_channel, self.target.shape)
        self.device = resolve_device(self.config.device)
        m = self.config.model
        if seed_state is None and self.config.nca.seed_state is not None:
            seed_state = read_seed_state(self.config.nca.seed_state, (*m.lattice_size, m.state_size))
        self.seed_state = seed_state
        torch.manual_seed(self.config.seed)
        dead = None
        if self.target.kind == "blocks" and self.config.nca.alive_loss == "air":  # dead cells are air
            dead = [1.0] + [0.0] * (m.state_size - 1)
        self.core = CubicCore(m.lattice_size, m.state_size, m.hidden_sizes, input_size=0, dead_state=dead,
                              **m.core_options()).to(self.device)
        upstream_init(self.core, self.config.nca.init_std)
        if initialize and self.config.nca.init_from is not None:
            start = initial_weights(self.config.nca.init_from, self.config, self.target.types, self.target.kind)
            with torch.no_grad():
                for name, p in self.core.named_parameters():
                    p.copy_(start[name])
        self.optimizer = torch.optim.Adam(self.core.parameters(), lr=self.config.learning_rate)
        self.scheduler = torch.optim.lr_scheduler.ExponentialLR(self.optimizer, gamma=self.config.lr_gamma)
        check_pool_fits(self.config, self.device)
        self.seed = self.seeds(1)[0]
        self.pool = SamplePool(self.seeds(self.config.nca.pool_size))
        self.iteration = 0
        self.history: List[Dict[str, float]] = []
        self.finished: Optional[str] = None
        self.seconds = 0.0  # spent in training iterations, this run and the ones it resumes
        self._ddp: Optional[DistributedDataParallel] = None  # the core under torchrun, made at its first batch

    # -- processes (torchrun) -----------------------------------------------------------------------------------

    @property
    def distributed(self) -> bool:
        return in_group()

    @property
    def rank(self) -> int:
        return dist.get_rank() if self.distributed else 0

    @property
    def world_size(self) -> int:
        return dist.get_world_size() if self.distributed else 1

    def weights_digest(self) -> str:
        """A hash of the weights (peers.weights_digest): equal across the processes of a correct distributed run."""
        return weights_digest(self.core)

    def _forward_share(self, states: torch.Tensor, steps: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Under torchrun: this process's share of the batch through the DistributedDataParallel core, and the
        whole batch's result (gathered, without gradient).  Every process holds the same pool and draws the same
        random numbers (the batch, the damage, the steps, and the whole batch's fire masks as the core would
        draw them), so that the run is the one-process run with the batch split: the same pool, and the gradient
        averaged over the processes' equal shares is the whole batch's."""
        world, batch = self.world_size, states.shape[0]
        if batch % world:
            raise InvalidValueError(f"nca.batch_size ({batch}) must be a multiple of the {world} processes: each "
                                    f"trains an equal share of the batch")
        if self._ddp is None:
            self._ddp = DistributedDataParallel(self.core)
        masks = fire_masks(self.core.fire_rate, steps, states)
        share = batch // world
        mine = slice(self.rank * share, (self.rank + 1) * share)
        out = self._ddp(state=states[mine], fire_mask=None if masks is None else masks[:, mine])
        parts = [torch.empty_like(out) for _ in range(world)]
        dist.all_gather(parts, out.detach().contiguous())
        return out, torch.cat(parts)

    # -- the recipe's pieces ------------------------------------------------------------------------------------

    def seeds(self, count: int) -> torch.Tensor:
        m = self.config.model
        return seed_states(count, m.lattice_size, m.state_size, self.target.alive_channel,
                           self.config.nca.spawn_at_bottom, self.seed_state).to(self.device)

    @property
    def damage_radius(self) -> int:
        return max(self.config.model.lattice_size) // self.config.nca.damage_radius_denominator

    def _batch(self):
        nca = self.config.nca
        if not nca.sample_pool:
            return None, self.seeds(nca.batch_size)
        indices, states = self.pool.batch(nca.batch_size, self.target, self.seed)
        if nca.damage:
            damage(states, nca.num_damaged, self.damage_radius, air=self.target.kind == "blocks")
        return indices, states

    def train_iteration(self) -> float:
        """One batch through a random number of steps, one optimizer step; returns the loss."""
        nca = self.config.nca
        indices, states = self._batch()
        self.core.steps = int(torch.randint(nca.min_steps, nca.max_steps + 1, ()))
        if self.distributed:
            out, whole = self._forward_share(states, self.core.steps)
        else:
            out = whole = self.core(state=states)
        loss, _ = nca_loss(out, self.target, nca.alive_loss, nca.iou_loss)
        value = loss.detach().clone()
        if self.distributed:  # the mean over the processes: every process stops (or diverges) together
            dist.all_reduce(value)
            value /= self.world_size
        if not torch.isfinite(value):
            raise TrainingDivergedError(f"loss became {loss.item()} at iteration {self.iteration + 1}; "
                                        f"learning_rate or nca.init_std is likely too large")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.config.normalize_gradients:
            normalize_gradients(self.core.parameters())
        self.optimizer.step()
        self.scheduler.step()
        if indices is not None:
            self.pool.update(indices, whole)
        self.iteration += 1
        return value.item()

    def fit(self, on_record: Optional[Callable[["NcaTrainer", Dict[str, float]], None]] = None,
            progress: bool = False) -> List[Dict[str, float]]:
        """Train until ``iterations`` or ``loss_threshold``; every ``checkpoint_every`` iterations (and at the
        end) a record of the mean loss, the learning rate and a quick evaluation goes into ``history`` and to
        ``on_record`` (which saves the checkpoint)."""
        from tqdm.auto import tqdm

        cfg = self.config
        losses: List[float] = []
        bar = tqdm(total=cfg.iterations, initial=self.iteration, disable=not progress, unit="it", leave=False,
                   desc="iterations")
        started = time.perf_counter()
        while self.iteration < cfg.iterations and self.finished is None:
            loss = self.train_iteration()
            losses.append(loss)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")
            if cfg.loss_threshold is not None and loss <= cfg.loss_threshold:
                self.finished = f"the loss {loss:.4g} reached loss_threshold {cfg.loss_threshold}"
            elif self.iteration >= cfg.iterations:
                self.finished = f"all {cfg.iterations} iterations"
            if self.iteration % cfg.checkpoint_every == 0 or self.finished:
                self.seconds += time.perf_counter() - started
                started = time.perf_counter()
                record = {"iteration": self.iteration, "loss": sum(losses) / len(losses),
                          "lr": self.optimizer.param_groups[0]["lr"], **self.quick_metrics(),
                          "seconds": self.seconds}
                losses = []
                self.history.append(record)
                log.info(f"iteration {self.iteration}/{cfg.iterations}: loss {record['loss']:.4f}, accuracy "
                         f"{record['accuracy']:.3f}, IoU {record['iou']:.3f} ({record['seconds']:.0f} s)")
                if on_record is not None:
                    on_record(self, record)
        bar.close()
        return self.history

    def reopen(self) -> None:
        """Let a finished run train on (asked for on purpose: more iterations, another loss_threshold)."""
        self.finished = None

    # -- scoring ------------------------------------------------------------------------------------------------

    def _fresh_generator(self):
        """Evaluations draw from their own generator: training's stream is left where it was."""
        devices = [self.device] if self.device.type == "cuda" else []
        return torch.random.fork_rng(devices=devices)

    @torch.no_grad()
    def grow(self, states: torch.Tensor, steps: int, trajectory: bool = False) -> torch.Tensor:
        kept = self.core.steps
        self.core.steps = steps
        try:
            return self.core(state=states, return_trajectory=trajectory)
        finally:
            self.core.steps = kept

    def quick_metrics(self) -> Dict[str, float]:
        """``structure_metrics`` of ``eval_samples`` seeds grown ``max_steps`` steps."""
        with self._fresh_generator():
            torch.manual_seed(self.config.seed + 1)
            out = self.grow(self.seeds(self.config.eval_samples), self.config.nca.max_steps)
        metrics = structure_metrics(out.float(), self.target)
        return {"accuracy": metrics["accuracy"], "iou": metrics["iou"]}

    def evaluate(self, with_states: bool = False):
        """The report's metrics: ``eval_samples`` seeds grown the training steps (``max_steps``), twice and four
        times as many (does the structure stay?), and the grown ones damaged (a ball of ``damage_radius`` at a
        random centre each) and grown ``max_steps`` steps again (does it regrow?).  ``with_states``: also each
        row's first sample's state [X, Y, Z, C]."""
        steps = self.config.nca.max_steps
        results, grown, kept = {}, None, {}
        with self._fresh_generator():
            torch.manual_seed(self.config.seed + 1)
            states, done = self.seeds(self.config.eval_samples), 0
            for name, times in GROWTH.items():
                states = self.grow(states, times * steps - done)
                done = times * steps
                results[name] = {"steps": float(done), **structure_metrics(states.float(), self.target)}
                grown = states.clone() if grown is None else grown
                kept[name] = states[0].float().cpu()
            damaged = damage(grown, grown.shape[0], max(1, self.damage_radius), air=self.target.kind == "blocks")
            results["damaged"] = {"steps": 0.0, **structure_metrics(damaged.float(), self.target)}
            kept["damaged"] = damaged[0].float().cpu()
            regrown = self.grow(damaged, steps)
            results["regenerated"] = {"steps": float(steps), **structure_metrics(regrown.float(), self.target)}
            kept["regenerated"] = regrown[0].float().cpu()
        return (results, kept) if with_states else results

    def growth(self, steps: Optional[int] = None) -> torch.Tensor:
        """One seed grown ``steps`` (default ``max_steps``) steps: every state, [steps + 1, X, Y, Z, C]."""
        with self._fresh_generator():
            torch.manual_seed(self.config.seed + 1)
            return self.grow(self.seeds(1), steps or self.config.nca.max_steps, trajectory=True)[:, 0].float().cpu()

    # -- checkpoints --------------------------------------------------------------------------------------------

    def save_checkpoint(self, path: Union[str, os.PathLike]) -> Path:
        """Everything a resumed run needs to continue bit-exactly, as a checksummed weights-only file (the
        target and seed state included: a resumed run does not read the target file again)."""
        state = {"kind": "nca", "config": self.config.to_dict(), "model": self.core.state_dict(),
                 "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "pool": self.pool.states.cpu(), "iteration": self.iteration, "history": self.history,
                 "finished": self.finished, "seconds": self.seconds, "rng": rng_states(),
                 "target": {"voxels": self.target.voxels, "kind": self.target.kind, "names": list(self.target.names),
                            "colours": self.target.colours, "source": self.target.source},
                 "seed_state": self.seed_state}
        return save_checkpoint_file(state, path)

    @classmethod
    def from_checkpoint(cls, path: Union[str, os.PathLike], device: Optional[str] = None,
                        backend: Optional[str] = None) -> "NcaTrainer":
        """A trainer in the state the checkpoint saved, built on ``device`` with ``backend`` where given (the
        build keys a resumed run may change)."""
        path = Path(path)
        state = load_checkpoint_file(path)
        if state.get("kind") != "nca":
            raise InvalidValueError(f"{path} is a checkpoint of cubecore.train, not of cubecore.nca")
        try:
            config = NcaTrainingConfig.from_saved(state["config"])
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidValueError(f"{path} holds no valid cubecore.nca training config ({exc})") from exc
        # the caller's values: a bad one, or a pool too large for the device, is the caller's error, not the file's
        config = config.built_for(device, backend)
        try:
            t = state["target"]
            target = VoxelTarget(t["voxels"], t["kind"], tuple(t["names"]), t["colours"], t["source"])
            trainer = cls(config, target, state["seed_state"], initialize=False)
            trainer.core.load_state_dict(state["model"])
            trainer.optimizer.load_state_dict(state["optimizer"])
            trainer.scheduler.load_state_dict(state["scheduler"])
            trainer.pool.states = state["pool"].to(trainer.device)
            trainer.iteration, trainer.history = state["iteration"], list(state["history"])
            trainer.finished, trainer.seconds = state["finished"], state["seconds"]
            set_rng_states(state["rng"])
        except UnavailableError:  # the pool does not fit this device: the caller's choice of device
            raise
        except (RuntimeError, KeyError, ValueError, TypeError, AttributeError, IndexError) as exc:
            raise InvalidValueError(f"{path} does not hold a consistent cubecore.nca training state "
                                    f"({type(exc).__name__}: {exc})") from exc
        return trainer

    def pretrained(self) -> NcaModel:
        """The trained model as an ``NcaModel`` (on the CPU, float32), what ``save_pretrained`` writes."""
        t, nca = self.target, self.config.nca
        model = NcaModel(self.config.model, t.kind, t.names, dead_air=nca.alive_loss == "air",
                         spawn_at_bottom=nca.spawn_at_bottom,
                         colours=None if t.colours is None else torch.as_tensor(t.colours).tolist(),
                         seed_state=self.seed_state is not None)
        model.core.load_state_dict({k: v.detach().float().cpu() for k, v in self.core.state_dict().items()})
        if self.seed_state is not None:
            model.seed_state.copy_(self.seed_state)
        return model.eval()

    def save_pretrained(self, folder: Union[str, os.PathLike],
                        results: Optional[Dict[str, Dict[str, float]]] = None) -> Path:
        """The model as a Hub-style folder (``model.safetensors``, ``config.json``, a model card with the
        ``results`` where given): ``NcaModel.from_pretrained(folder)`` loads it, ``nca.init_from=folder`` trains on
        from it."""
        from .report import results_table

        t = self.target
        card = (f"Trained {self.iteration} iterations on {t.source} ({int(t.occupied.sum())} voxels, "
                f"{'RGBA' if t.kind == 'rgba' else f'{len(t.names) - 1} block types'}), {self.config.nca.min_steps}-"
                f"{self.config.nca.max_steps} steps an iteration.")
        if results:
            card += "\n\n" + results_table(results)
        self.pretrained().save_pretrained(folder, model_card_kwargs={"results": card})
        return Path(folder)

    def get_info(self) -> Dict[str, object]:
        info = {"target": self.target.source, "kind": self.target.kind, "block types": len(self.target.names) - 1
                if self.target.kind == "blocks" else None, "voxels": int(self.target.occupied.sum()),
                "device": str(self.device), "iteration": self.iteration}
        info.update(self.core.get_info())
        info["steps"] = f"{self.config.nca.min_steps}-{self.config.nca.max_steps}"  # (the core holds the last draw)
        return info


def check_pool_fits(config: NcaTrainingConfig, device: torch.device) -> None:
    """Refuse, before it is allocated, a sample pool larger than the free memory of ``device`` (a run whose pool
    fits but whose training may not is warned about by ``training_bytes``' estimate instead)."""
    m = config.model
    need = 4 * (config.nca.pool_size + 1) * math.prod(m.lattice_size) * m.state_size
    have = available_bytes(device)
    if have is not None and need > have:
        gib = 1024 ** 3
        raise UnavailableError(f"the sample pool (nca.pool_size {config.nca.pool_size} states of "
                               f"{math.prod(m.lattice_size):,} cells x {m.state_size} channels) needs "
                               f"{need / gib:.1f} GiB, more than the {have / gib:.1f} GiB free on {device}: lower "
                               f"nca.lattice, nca.pool_size or nca.hidden_channels")


def training_bytes(trainer: NcaTrainer) -> Tuple[int, str]:
    """Roughly the memory one process needs to train, in bytes, and what it is made of.  The parameters count
    four times (weights, gradients, Adam's two moments); a batch (this process's share) keeps the states of every
    step (the kernel keeps those alone and recomputes the rest: ``max_steps + 1`` states and a byte per cell and
    step for each mask; the reference also keeps each step's perception, hidden layers and update), the pool,
    and the loss's copies of the last state."""
    c, m = trainer.config, trainer.config.model
    parameters = sum(p.numel() for p in trainer.core.parameters())
    batch, cells, steps, S = c.nca.batch_size // trainer.world_size, math.prod(m.lattice_size), c.nca.max_steps, \
        m.state_size
    reference = trainer.core.active_backend() == "reference"
    per_step = S + (trainer.core.w1.shape[1] + 2 * sum(m.hidden_sizes) + 3 * S if reference else 0)
    floats = (4 * parameters + batch * cells * ((steps + 1) * per_step + 4 * S)
              + (c.nca.pool_size + c.nca.batch_size) * cells * S)
    need = 4 * floats + 2 * batch * cells * steps
    detail = (f"{c.nca.batch_size // trainer.world_size} samples a process, {cells:,} cells of {S} channels, "
              f"{steps} steps, the {'reference' if reference else 'kernel'} backend")
    return need, detail


def read_seed_state(path: str, shape) -> torch.Tensor:
    """A seed state [X, Y, Z, C] from a .npy file (``nca.seed_state``)."""
    from ..data.readers import _reason

    try:
        array = np.load(Path(path).expanduser(), allow_pickle=False)
    except FileNotFoundError:
        raise NotFoundError(f"nca.seed_state not found: {path}") from None
    except OSError:
        raise
    except (ValueError, EOFError) as exc:
        raise InvalidValueError(f"nca.seed_state {path}: not a readable .npy file ({_reason(exc)})") from None
    if not isinstance(array, np.ndarray) or array.dtype.kind not in "biuf" or tuple(array.shape) != tuple(shape):
        raise InvalidValueError(f"nca.seed_state {path}: expected a real array of shape {list(shape)} (the lattice "
                                f"and the state's channels), got {getattr(array, 'shape', None)}")
    if not np.isfinite(array).all():
        raise InvalidValueError(f"nca.seed_state {path}: holds values that are not finite")
    return torch.from_numpy(array.astype(np.float32))
