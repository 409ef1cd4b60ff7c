"""``CubeTrainer``: trains an ``EmbeddingProcessor`` in autoencoder, dialogue or mixed mode.

Loss in float32 (cosine, MSE or the original's 0.7 cosine + 0.3 MSE), AdamW by default, gradient clipping, a
linear warm-up then cosine learning-rate schedule, early stop on ``convergence_threshold``/``patience`` and on
``target_similarity``.  The shuffling of epoch e depends only on (seed, e), and checkpoints carry model,
optimizer, scheduler, RNG states, epoch, step, config and history, so a resumed run continues exactly where the
killed one stopped.  Checkpoints load weights-only and carry a checksum (``cubecore.training.checkpoint``).

The schedule is torch's ``LambdaLR`` over ``_lr_factor`` rather than a library's ready-made one, measured against
both on the default run's 1,200 steps (30 an epoch, one warm-up epoch) and on 64,000 (1,600 of warm-up):
transformers' ``get_cosine_with_min_lr_schedule_with_warmup(min_lr_rate=0.1)`` gives the same factor bit for bit
after the warm-up, but starts the warm-up one step late, at a learning rate of 0 (a first step that trains
nothing; up to 1/30 of the peak apart in the default warm-up), so every run would change.  torch's
``SequentialLR(LinearLR, CosineAnnealingLR)`` follows it to within 4e-13 of the peak, not exactly (its cosine is
computed step from step), climbs back once past its ``T_max`` (0.14 of the peak apart 300 steps on), and its
state (two schedulers, ``T_max`` fixed) is not the ``LambdaLR`` state that checkpoints hold, so the runs saved so
far would not resume; a ``LambdaLR`` holds no schedule in its state (the factor reads ``total_steps`` as it
stands), so a resume with other ``epochs`` follows the new one.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler

from .checkpoint import load_checkpoint_file, rng_states, save_checkpoint_file, set_rng_states
from ..checks import check_device, check_int
from .config import TrainingConfig
from ..data.datasets import check_embedding_pairs
from .floors import TRAINED_FLOORS, floor_model, floor_settings
from .losses import training_loss
from .metrics import RETRIEVAL_RULE, EmbeddingMetrics, retrieval
from .peers import in_group, weights_digest
from ..model.processor import EmbeddingProcessor
from ..errors import InvalidTypeError, InvalidValueError, NotReadyError, TrainingDivergedError

Pairs = Tuple[torch.Tensor, torch.Tensor]
log = logging.getLogger("cubecore.epochs")  # one line per epoch (``--quiet`` leaves them out of the console)

# What to look at when the loss or its gradient stops being finite.
DIVERGENCE_KEYS = ("the loss's scale (cosine_weight, mse_weight, infonce_weight, temperature) or learning_rate "
                   "is likely too large or too small for float32")


def _as_pairs(data, name: str) -> Pairs:
    """(inputs, targets) from a tuple of tensors or a dataset with ``split_tensors``."""
    if hasattr(data, "split_tensors"):
        return data.split_tensors()
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        x, y = data
        check_embedding_pairs(x, y, name)
        return x, y
    raise InvalidTypeError(f"{name} must be (inputs, targets) tensors or a cubecore dataset, got {type(data).__name__}")


class CubeTrainer:
    def __init__(self, config: Optional[TrainingConfig] = None, model_factory: Optional[Callable[[int], nn.Module]] = None
                 ) -> None:
        """``model_factory(dim)`` builds another model to train the same way (a trained floor); by default an
        ``EmbeddingProcessor`` as the config describes."""
        self.config = config or TrainingConfig()
        self.model_factory = model_factory
        self.device = self._resolve_device(self.config.device)
        self.model: Optional[EmbeddingProcessor] = None
        self.optimizer = None
        self.scheduler = None
        self.dim: Optional[int] = None
        self.epoch = 0  # epochs completed
        self.step = 0  # optimizer steps taken
        self.total_steps = 1
        self.history: List[Dict[str, float]] = []
        self.best_val_loss = math.inf  # for early stopping: improved by at least convergence_threshold
        self.epochs_without_improvement = 0
        self.best_score = math.inf  # the best epoch by config.select_by (as a loss: lower is better) ...
        self.best_epoch = 0  # ... which epoch it was ...
        self.best_state: Optional[Dict[str, torch.Tensor]] = None  # ... and its weights (CPU copies)
        self.finished: Optional[str] = None  # why training ended (early stop or all epochs), None while it goes on
        self._teacher = None
        # the trained floors by name (``train_floors``): their settings, scored epoch and weights
        self.trained_floors: Dict[str, Dict[str, object]] = {}
        self.data_fingerprint: Optional[Dict[str, object]] = None  # what the run trains on (use_data)
        self.retrieval_rule: Optional[str] = RETRIEVAL_RULE  # how the validation MRR was counted (None: before)

    local_only = False  # True: train in this process alone, even under torchrun

    @property
    def distributed(self) -> bool:
        return not self.local_only and in_group()

    @property
    def rank(self) -> int:
        return dist.get_rank() if self.distributed else 0

    @property
    def world_size(self) -> int:
        return dist.get_world_size() if self.distributed else 1

    @staticmethod
    def _resolve_device(device: str) -> torch.device:
        if device == "auto":
            if torch.cuda.is_available():
                local = int(os.environ.get("LOCAL_RANK", "0"))  # one GPU per process under torchrun
                return torch.device(f"cuda:{local % torch.cuda.device_count()}")
            return torch.device("cpu")
        return check_device(device, "config key 'device'")

    # -- components ---------------------------------------------------------------------------------------------

    @property
    def teacher(self):
        """The teacher encoder this trainer learns from (loaded on first use)."""
        if self._teacher is None:
            from ..data.teacher import TeacherEncoder

            self._teacher = TeacherEncoder(self.config.data.teacher, device=None)
        return self._teacher

    @property
    def components_initialized(self) -> bool:
        return self.model is not None

    def initialize_components(self, dim: Optional[int] = None) -> None:
        cfg = self.config
        self.dim = dim if dim is not None else self.teacher.dim
        torch.manual_seed(cfg.seed)
        if self.model_factory is not None:
            self.model = self.model_factory(self.dim).to(self.device)
        else:
            self.model = EmbeddingProcessor(self.dim, cfg.model).to(self.device)
        params = self.model.parameters()
        if cfg.optimizer == "adamw":
            self.optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        elif cfg.optimizer == "adam":
            self.optimizer = torch.optim.Adam(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        else:
            self.optimizer = torch.optim.SGD(params, lr=cfg.learning_rate, momentum=0.9, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)

    def _lr_factor(self, step: int) -> float:
        """Linear warm-up over ``warmup_epochs``, then cosine decay to a tenth of the peak (why not a library's
        schedule: the module's docstring)."""
        warmup = max(1, int(self.config.warmup_epochs * self.total_steps / max(1, self.config.epochs)))
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, self.total_steps - warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    def get_info(self) -> Dict[str, object]:
        """The data and model settings (every field of both sections), the device, and where training stands."""
        info = {"mode": self.config.data.mode, "teacher": self.config.data.teacher, "data": self.config.data.source,
                "device": str(self.device), "epoch": self.epoch, "step": self.step, **self.config.model.info()}
        if isinstance(self.model, EmbeddingProcessor):
            info.update(self.model.get_info())
        return info

    # -- the model ------------------------------------------------------------------------------------------------

    def _require_model(self) -> EmbeddingProcessor:
        if self.model is None:
            raise NotReadyError("call initialize_components() (or fit) before using the model")
        return self.model

    def _autocast(self):
        enabled = self.config.precision == "bf16" and self.device.type == "cuda"
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=enabled)

    def forward(self, input_embedding: torch.Tensor) -> torch.Tensor:
        model = self._require_model()
        with self._autocast():
            return model(input_embedding.to(self.device)).float()

    @torch.no_grad()
    def predict(self, inputs: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        model = self._require_model()
        was_training = model.training
        model.eval()
        out = torch.cat([self.forward(inputs[i:i + batch_size]).cpu() for i in range(0, inputs.shape[0], batch_size)])
        model.train(was_training)
        return out

    def loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The configured loss, always in float32, whatever autocast did to the forward."""
        return training_loss(pred, target, self.config)

    # -- training -------------------------------------------------------------------------------------------------

    def fit(self, train_data, val_data=None, epochs: Optional[int] = None,
            on_epoch_end: Optional[Callable[["CubeTrainer", Dict[str, float]], None]] = None,
            on_step_end: Optional[Callable[["CubeTrainer", float], None]] = None,
            progress: bool = True, log_epochs: bool = True) -> List[Dict[str, float]]:
        """Train until ``epochs`` (config default) or an early stop; returns the per-epoch history."""
        from tqdm.auto import tqdm

        cfg = self.config
        x, y = _as_pairs(train_data, "train_data")
        val = _as_pairs(val_data, "val_data") if val_data is not None else None
        if self.model is None:
            self.initialize_components(dim=x.shape[1])
        model = self._require_model()
        if x.shape[1] != self.dim:
            raise InvalidValueError(f"train_data has dim {x.shape[1]} but the model was built for {self.dim}")
        if cfg.uses_infonce and torch.unique(y, dim=0).shape[0] < 2:
            raise InvalidValueError("InfoNCE needs at least two different targets to tell apart, but every training target "
                             "is the same; use loss_function cosine or mse")
        reshaper = getattr(model, "reshaper", None)
        if reshaper is not None and reshaper.needs_fit and not reshaper.is_fitted:  # adaptive / semantic placement
            reshaper.fit(x)  # from the training inputs
        epochs = epochs if epochs is not None else cfg.epochs
        progress = progress and self.rank == 0 and sys.stderr.isatty()  # no bars in a redirected log
        # Each process takes its share of every epoch's permutation, which depends only on (seed, epoch); with
        # one process that is the whole permutation.  Gradients are averaged across processes by DDP.
        sampler = DistributedSampler(range(x.shape[0]), num_replicas=self.world_size, rank=self.rank, shuffle=True,
                                     seed=cfg.seed)
        train_model = DistributedDataParallel(model) if self.distributed else model
        steps_per_epoch = math.ceil(len(sampler) / cfg.batch_size)
        self.total_steps = max(1, steps_per_epoch * cfg.epochs)
        if val is not None and self.retrieval_rule != RETRIEVAL_RULE:
            self._rescore_best(val)
        while self.epoch < epochs:
            model.train()
            sampler.set_epoch(self.epoch)
            order = torch.tensor(list(iter(sampler)), dtype=torch.long)
            running, seen = 0.0, 0
            bar = tqdm(range(steps_per_epoch), desc=f"epoch {self.epoch + 1}/{epochs}", disable=not progress,
                       leave=False, unit="batch")
            for b in bar:
                idx = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
                xb, yb = x[idx].to(self.device), y[idx].to(self.device)
                with self._autocast():
                    pred = train_model(xb).float()
                loss = self.loss(pred, yb)
                if not torch.isfinite(loss):
                    raise TrainingDivergedError(f"loss became {loss.item()} at epoch {self.epoch + 1}, step {self.step}; "
                                                f"{DIVERGENCE_KEYS}")
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                # The gradient norm (clipped where grad_clip > 0): a non-finite one would make every update NaN or
                # be clipped to nothing, leaving the model where it started without a word.
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(),
                                                      cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
                if not torch.isfinite(norm):
                    raise TrainingDivergedError(f"the gradient norm became {norm.item()} at epoch {self.epoch + 1}, "
                                                f"step {self.step} (the loss was {loss.item():.4g}); {DIVERGENCE_KEYS}")
                self.optimizer.step()
                self.scheduler.step()
                self.step += 1
                running += loss.item() * idx.numel()
                if on_step_end is not None:
                    on_step_end(self, loss.item())
                seen += idx.numel()
                bar.set_postfix(loss=f"{running / seen:.4f}")
            if self.distributed:  # the epoch's loss over all processes
                totals = torch.tensor([running, float(seen)], dtype=torch.float64, device=self.device)
                dist.all_reduce(totals)
                running, seen = totals[0].item(), int(totals[1].item())
            record = {"epoch": self.epoch + 1, "step": self.step, "train_loss": running / seen,
                      "lr": self.optimizer.param_groups[0]["lr"]}
            if val is not None:
                pred = self.predict(val[0])
                record["val_loss"] = self.loss(pred, val[1]).item()
                record["val_cosine"] = F.cosine_similarity(pred, val[1].float(), dim=-1).mean().item()
                ranks = retrieval(pred, val[1])
                record["val_r@1"], record["val_mrr"] = ranks["r@1"], ranks["mrr"]
            bar.close()
            self.epoch += 1
            self.history.append(record)
            stop = self._update_early_stop(record)
            if stop is None and self.epoch >= epochs:
                stop = f"trained all {epochs} epochs"
            if stop:
                record["stopped"] = stop
                self.finished = stop
            shown = ", ".join(f"{k} {v:.4f}" for k, v in record.items() if k not in ("epoch", "step", "stopped"))
            if log_epochs:
                log.info(f"epoch {record['epoch']}/{epochs}: {shown}")
            if on_epoch_end is not None:
                on_epoch_end(self, record)
            if stop:
                if log_epochs:
                    log.info(f"stopped: {stop}")
                break
        return self.history

    def use_data(self, fingerprint: Optional[Dict[str, object]], source: str = "the data") -> None:
        """Train on the data of ``fingerprint`` (``TrainingData.fingerprint``): a new run stores it with its
        checkpoints; a resumed run must be given the data it trained on, else an InvalidValueError names
        ``source`` (training on would mix two data sets in one run and pick its best epoch across two
        validation splits).  A checkpoint saved before fingerprints were stored is not checked."""
        saved = self.data_fingerprint
        if fingerprint is None or saved is None:
            if saved is None and self.epoch > 0 and fingerprint is not None:
                logging.getLogger("cubecore").warning(
                    f"the checkpoint holds no fingerprint of its data (saved before they were stored): cannot check "
                    f"that {source!r} is the data it trained on")
            self.data_fingerprint = fingerprint if saved is None else saved
            return
        if saved.get("sha256") != fingerprint.get("sha256"):
            def sizes(f):
                return (f"{f.get('train')} training and {f.get('validation')} validation pairs, sha256 "
                        f"{str(f.get('sha256'))[:12]}")

            raise InvalidValueError(
                f"data {source!r} is not the data this run trained on for {self.epoch} epochs ({sizes(saved)}); "
                f"it now gives other pairs ({sizes(fingerprint)}). Resuming would train on other data and choose "
                f"the best epoch across two validation splits, so it is refused: put the data back as it was, or "
                f"train a new run on it (another --output-dir, or --overwrite)")

    def _rescore_best(self, val: Tuple[torch.Tensor, torch.Tensor]) -> None:
        """A checkpoint from before retrieval ranked among the distinct answers: its best epoch's MRR is counted
        again the current way, so that ``select_by=val_mrr`` does not compare epochs counted two ways."""
        if self.config.select_by == "val_mrr" and self.best_state is not None:
            with self.weights_of("best"):
                self.best_score = -retrieval(self.predict(val[0]), val[1])["mrr"]
            logging.getLogger("cubecore").warning(
                f"the checkpoint counted retrieval the earlier way (a duplicate answer as a rival): the best epoch "
                f"({self.best_epoch}) is scored again the current way, MRR {-self.best_score:.4f}; the val_mrr of "
                f"the epochs before this resume in metrics.jsonl stay as they were counted")
        self.retrieval_rule = RETRIEVAL_RULE

    def reopen(self) -> None:
        """Let a finished run train on (asked for on purpose: more epochs, another stop rule): the early-stop count
        restarts, and the trained floors, trained for the old length, are trained again at the end."""
        self.finished = None
        self.epochs_without_improvement = 0
        self.trained_floors = {}

    def _update_early_stop(self, record: Dict[str, float]) -> Optional[str]:
        cfg = self.config
        loss = record.get("val_loss", record["train_loss"])
        key = cfg.select_by if cfg.select_by in record else "train_loss"
        score = record[key] if key.endswith("loss") else -record[key]
        if score < self.best_score:
            self.best_score, self.best_epoch = score, self.epoch
            self.best_state = {k: v.detach().cpu().clone() for k, v in self._require_model().state_dict().items()}
        if loss < self.best_val_loss - cfg.convergence_threshold:
            self.best_val_loss = loss
            self.epochs_without_improvement = 0
        else:
            self.epochs_without_improvement += 1
        if cfg.target_similarity is not None and record.get("val_cosine", -2.0) >= cfg.target_similarity:
            return f"validation cosine {record['val_cosine']:.4f} reached target_similarity {cfg.target_similarity}"
        if self.epochs_without_improvement >= cfg.patience:
            return (f"no improvement above convergence_threshold {cfg.convergence_threshold} for {cfg.patience} "
                    f"epochs")
        return None

    def weights_digest(self) -> str:
        """A hash of the model's weights (peers.weights_digest): equal across processes of a correct distributed
        run."""
        return weights_digest(self._require_model())

    def evaluate(self, data, train_data=None, baselines: bool = True, weights: str = "best"
                 ) -> Dict[str, Dict[str, float]]:
        """Metrics of the model on ``data`` with the weights of the best epoch (``weights="best"``, by
        ``select_by``) or of the last one, and, given the training pairs, of the floors: identity, mean, offset and
        ridge (fit on ``train_data``), and ``mlp`` and ``linear`` where ``train_floors`` trained them (or the
        checkpoint stored them).  Nothing is trained."""
        if weights not in ("best", "last"):
            raise InvalidValueError(f"weights must be 'best' or 'last', got {weights!r}")
        x, y = _as_pairs(data, "data")
        autoencoder = self.config.data.mode == "autoencoder"
        with self.weights_of(weights):
            results = {"cube": EmbeddingMetrics.score(self.predict(x), x, y, autoencoder)}
        if baselines and train_data is not None:
            tx, ty = _as_pairs(train_data, "train_data")
            results.update(EmbeddingMetrics(tx, ty).baselines(x, y, autoencoder))
            for name in self.trained_floors:
                results[name] = self.score_floor(name, x, y, autoencoder)
        return results

    @contextmanager
    def weights_of(self, which: str):
        """The model holds the ``best`` epoch's weights (if one was recorded) or the ``last`` inside the block."""
        model = self._require_model()
        epoch = self.scored_epoch(which)
        if epoch == self.epoch:  # the weights in the model already
            yield epoch
            return
        last = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.load_state_dict(self.best_state)
        try:
            yield epoch
        finally:
            model.load_state_dict(last)

    def save_pretrained(self, folder: Union[str, os.PathLike], results: Optional[Dict[str, Dict[str, float]]] = None,
                        weights: str = "best") -> Path:
        """The model (the best epoch's weights by default) as a Hub-style folder: safetensors weights, the
        constructor's config as JSON, and a model card with the results table against the floors."""
        from .report import results_table

        model = self._require_model()
        if not isinstance(model, EmbeddingProcessor):
            raise InvalidTypeError(f"save_pretrained saves an EmbeddingProcessor, not a {type(model).__name__}")
        with self.weights_of(weights) as epoch:
            card = (f"Weights of epoch {epoch} ({weights}, by {self.config.select_by}); teacher "
                    f"{self.config.data.teacher}, mode {self.config.data.mode}, data {self.config.data.source}.")
            if results:
                card += "\n\nValidation split, against the floors:\n\n" + results_table(results)
            model.save_pretrained(folder, model_card_kwargs={"results": card})
        return Path(folder)

    def scored_epoch(self, which: str = "best") -> int:
        """The epoch whose weights ``weights_of(which)`` gives: the best one where it was recorded."""
        return self.best_epoch if which == "best" and self.best_state is not None else self.epoch

    def train_floors(self, train: Pairs, val: Pairs, names: Tuple[str, ...] = TRAINED_FLOORS,
                     progress: bool = False) -> None:
        """Train the trained floors (``mlp``: a skip-path MLP with as many parameters as this model; ``linear``:
        input + W input, W zero-initialised), each with the same settings as this model (loss, optimiser, epochs,
        early stop, best-epoch rule); each one's best epoch's weights are kept in ``trained_floors`` and saved
        with the checkpoint, so that ``evaluate`` scores them without training."""
        parameters = sum(p.numel() for p in self._require_model().parameters())
        for name in names:
            settings = floor_settings(name, self.dim, parameters)
            floor = CubeTrainer(self.config, model_factory=lambda dim, n=name, s=settings: floor_model(n, dim, s))
            floor.local_only = True  # trained by this process alone, also inside a distributed run
            floor.fit(train, val, progress=progress, log_epochs=False)
            with floor.weights_of("best") as epoch:
                weights = {k: v.detach().cpu().clone() for k, v in floor.model.state_dict().items()}
            self.trained_floors[name] = {**settings, "epoch": epoch, "model": weights}

    def missing_floors(self) -> Tuple[str, ...]:
        """The trained floors this trainer does not hold: a run trains them after its last epoch and stores them
        in its last.pt, so a checkpoint saved before (best.pt, an unfinished run's last.pt) has none."""
        return tuple(name for name in TRAINED_FLOORS if name not in self.trained_floors)

    def goes_on_from(self, earlier: "CubeTrainer") -> bool:
        """Whether this trainer holds ``earlier``'s run at the same epoch or later (a run's last.pt against its
        best.pt): the same data and dimension, and a history that begins with ``earlier``'s."""
        return (self.dim == earlier.dim and self.data_fingerprint == earlier.data_fingerprint
                and len(self.history) >= len(earlier.history)
                and json.dumps(self.history[:len(earlier.history)]) == json.dumps(earlier.history))

    def score_floor(self, name: str, x: torch.Tensor, y: torch.Tensor, autoencoder: bool) -> Dict[str, float]:
        """The stored trained floor ``name``'s metrics on (x, y), with its size and scored epoch."""
        stored = self.trained_floors[name]
        floor = floor_model(name, self.dim, stored)
        floor.load_state_dict(stored["model"])
        floor.eval()
        with torch.no_grad():
            pred = torch.cat([floor(x[i:i + 512].float()) for i in range(0, x.shape[0], 512)])
        result = EmbeddingMetrics.score(pred, x, y, autoencoder)
        result.update(parameters=float(sum(p.numel() for p in floor.parameters())), epoch=float(stored["epoch"]))
        result.update({k: float(v) for k, v in stored.items() if k not in ("epoch", "model")})
        return result

    # -- checkpoints ----------------------------------------------------------------------------------------------

    def save_checkpoint(self, path: Union[str, os.PathLike]) -> Path:
        """Everything a resumed run needs to continue bit-exactly, as a checksummed weights-only file."""
        model = self._require_model()
        state = {
            "config": self.config.to_dict(), "dim": self.dim,
            "model": model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "epoch": self.epoch, "step": self.step,
            "total_steps": self.total_steps, "history": self.history, "best_val_loss": self.best_val_loss,
            "epochs_without_improvement": self.epochs_without_improvement, "best_score": self.best_score,
            "best_epoch": self.best_epoch, "best_model": self.best_state, "finished": self.finished,
            "rng": rng_states(), "retrieval": self.retrieval_rule,
        }
        if self.data_fingerprint is not None:
            state["data"] = self.data_fingerprint
        if self.trained_floors:
            state["trained_floors"] = self.trained_floors
        return save_checkpoint_file(state, path)

    @classmethod
    def from_checkpoint(cls, path: Union[str, os.PathLike], device: Optional[str] = None,
                        backend: Optional[str] = None) -> "CubeTrainer":
        """A trainer in the state the checkpoint saved (a damaged, foreign or unsafe file is a ValueError), built
        on ``device`` with ``backend`` where given (the build keys a resumed run may change)."""
        path = Path(path)
        state = load_checkpoint_file(path)
        try:
            config = TrainingConfig.from_saved(state["config"])
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidValueError(f"{path} holds no valid cubecore training config ({exc})") from exc
        # a device that is not here is the caller's error
        config = config.built_for(device, backend)
        trainer = cls(config)
        try:
            check_int("epoch", state["epoch"], minimum=0)
            check_int("step", state["step"], minimum=0)
            trainer.initialize_components(dim=state["dim"])
            trainer.model.load_state_dict(state["model"])
            trainer.optimizer.load_state_dict(state["optimizer"])
            trainer.scheduler.load_state_dict(state["scheduler"])
            trainer.epoch, trainer.step, trainer.total_steps = state["epoch"], state["step"], state["total_steps"]
            trainer.history = list(state["history"])
            trainer.best_val_loss = state["best_val_loss"]
            trainer.epochs_without_improvement = state["epochs_without_improvement"]
            trainer.best_score, trainer.best_epoch = state["best_score"], state["best_epoch"]
            trainer.best_state = state["best_model"]
            trainer.finished = state["finished"]
            # Checkpoints written before floors were stored hold none; those before the linear floor, the mlp alone.
            floors = state.get("trained_floors") or ({"mlp": state["mlp_floor"]} if state.get("mlp_floor") else {})
            trainer.trained_floors = {name: floors[name] for name in TRAINED_FLOORS if name in floors}
            trainer.data_fingerprint = state.get("data")  # absent in checkpoints written before fingerprints were
            trainer.retrieval_rule = state.get("retrieval")  # absent: retrieval counted the earlier way
            set_rng_states(state["rng"])
        except (RuntimeError, KeyError, ValueError, TypeError, AttributeError, IndexError) as exc:
            raise InvalidValueError(f"{path} does not hold a consistent cubecore training state "
                             f"({type(exc).__name__}: {exc})") from exc
        return trainer
