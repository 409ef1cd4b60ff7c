"""``NcaModel``: a trained 3D NCA as a Hub-style folder (``model.safetensors``, ``config.json``, a model card),
and ``initial_weights``: the weights a run starts from (``nca.init_from``).

A run of ``python -m cubecore.nca`` writes its model to ``RUN_DIR/model`` (``NcaTrainer.save_pretrained``), which
``NcaModel.from_pretrained(RUN_DIR/model)`` loads: the rule (a ``CubicCore``), the ``ModelConfig`` it was built
from, and what a state means (block types and their names, or RGBA; the living channel; where the seed grows).
The mechanism is ``EmbeddingProcessor``'s (huggingface_hub's mixin; ``cubecore.model.processor``'s checksummed
weights, checked against the config before the model is built; ``cubecore.locate`` for folder or Hub id).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Union

import torch
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from ..checks import check_choice
from ..errors import CubecoreError, InvalidTypeError, InvalidValueError, NotFoundError
from ..locate import locate_pretrained
from ..model.config import ModelConfig
from ..model.core import CubicCore
from ..model.processor import WEIGHTS_FILE, check_weights_file, read_saved_config, save_weights
from .recipe import seed_states

MODEL_CARD = """
---
{{ card_data }}
---

# cubecore 3D neural cellular automaton

A 3D NCA ({{ lattice }} lattice, state of {{ state_size }} channels, {{ steps }} steps) that grows a voxel
structure from one living cell, trained with `python -m cubecore.nca`.

```python
from cubecore.nca.model import NcaModel
model = NcaModel.from_pretrained("path/to/this/folder")
grown = model.grow()          # [1, X, Y, Z, C] from the seed
voxels = model.voxels(grown)  # block types (0 = air) or RGBA
```

`python -m cubecore.nca nca.init_from=path/to/this/folder` trains on from it.

{{ results | default("", true) }}
"""

KINDS = ("blocks", "rgba")


class NcaModel(nn.Module, PyTorchModelHubMixin, library_name="cubecore", license="mit",
               tags=["cubecore", "neural-cellular-automaton", "3d-nca"], model_card_template=MODEL_CARD):
    """A 3D NCA: ``core`` (the ``CubicCore`` rule of ``config``), what its state means and its seed.

    ``kind``: "blocks" (the state's first ``len(names)`` channels are the block types' logits, air first) or
    "rgba" (the first four are RGBA); the living channel is ``config.alive_channel``.  ``dead_air``: dead cells
    are air (the upstream's default; else zeros).  ``spawn_at_bottom``: the seed cell on the floor.  ``colours``
    [types, 3]: the block types' colours, to draw them.  ``seed_state``: the model grows from a state of its own
    (the ``seed_state`` buffer [X, Y, Z, C], saved with the weights; a run with ``nca.seed_state`` exports it)
    rather than from one living cell."""

    def __init__(self, config: ModelConfig, kind: str = "blocks", names: Sequence[str] = (), dead_air: bool = True,
                 spawn_at_bottom: bool = False, colours: Optional[Sequence[Sequence[float]]] = None,
                 seed_state: bool = False) -> None:
        super().__init__()
        if not isinstance(config, ModelConfig):
            raise InvalidTypeError(f"config must be a cubecore.ModelConfig, got {type(config).__name__}")
        check_choice("kind", kind, KINDS)
        self.config, self.kind, self.names = config, kind, tuple(names)
        self.dead_air, self.spawn_at_bottom = bool(dead_air), bool(spawn_at_bottom)
        self.colours = None if colours is None else [[float(v) for v in c] for c in colours]
        self._hub_mixin_config = {"config": config.to_dict(), "kind": kind, "names": list(self.names),
                                  "dead_air": self.dead_air, "spawn_at_bottom": self.spawn_at_bottom,
                                  "colours": self.colours, "seed_state": bool(seed_state)}  # what config.json holds
        dead = None
        if dead_air and kind == "blocks":
            dead = [1.0] + [0.0] * (config.state_size - 1)
        self.core = CubicCore(config.lattice_size, config.state_size, config.hidden_sizes, input_size=0,
                              dead_state=dead, **config.core_options())
        if seed_state:
            self.register_buffer("seed_state", torch.zeros(*config.lattice_size, config.state_size))
        else:
            self.seed_state = None

    @property
    def types(self) -> int:
        """The state channels that show a voxel: the block types with air, or RGBA's 4."""
        return len(self.names) if self.kind == "blocks" else 4

    def seed(self, batch: int = 1) -> torch.Tensor:
        """[batch, X, Y, Z, C]: what training grew from: the model's ``seed_state``, or one living cell (its
        living and hidden channels 1)."""
        c = self.config
        return seed_states(batch, c.lattice_size, c.state_size, c.alive_channel, self.spawn_at_bottom,
                           self.seed_state).to(self.core.w1.device, self.core.w1.dtype)

    def forward(self, state: Optional[torch.Tensor] = None, steps: Optional[int] = None,
                return_trajectory: bool = False) -> torch.Tensor:
        """``steps`` steps (default the config's) from ``state`` [B, X, Y, Z, C] (default one seed)."""
        state = self.seed() if state is None else state
        kept = self.core.steps
        self.core.steps = self.core.steps if steps is None else steps
        try:
            return self.core(state=state, return_trajectory=return_trajectory)
        finally:
            self.core.steps = kept

    @torch.no_grad()
    def grow(self, batch: int = 1, steps: Optional[int] = None) -> torch.Tensor:
        """``batch`` seeds grown ``steps`` steps, without gradients: [batch, X, Y, Z, C]."""
        return self(self.seed(batch), steps)

    def voxels(self, state: torch.Tensor) -> torch.Tensor:
        """What a state [..., X, Y, Z, C] shows: the block type of each cell (long, 0 = air), or its RGBA clipped
        to [0, 1] (alpha 0 where the cell is dead)."""
        if self.kind == "blocks":
            return state[..., :self.types].argmax(-1)
        return state[..., :4].clamp(0.0, 1.0)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """A model from a folder that ``save_pretrained`` wrote (a run's is ``RUN_DIR/model``) or a Hub id; a folder
        that is not there is a NotFoundError at once, not a hub request (``cubecore.locate``)."""
        where = locate_pretrained(pretrained_model_name_or_path, "NCA model folder",
                                  ": from_pretrained takes the folder save_pretrained wrote (a cubecore.nca run's is "
                                  "RUN_DIR/model)", kwargs)
        if isinstance(where, Path):
            saved = read_config(where)
            for key in ("kind", "names", "dead_air", "spawn_at_bottom", "colours", "seed_state"):
                if key in saved:
                    kwargs.setdefault(key, saved[key])
            try:
                kwargs.setdefault("config", ModelConfig.from_saved(saved["config"]))
            except CubecoreError as exc:
                raise type(exc)(f"{where / 'config.json'}: {exc}") from None
            check_weights_file(where / WEIGHTS_FILE, cls, kwargs["config"], kind=kwargs["kind"],
                               names=kwargs["names"], dead_air=kwargs.get("dead_air", True),
                               seed_state=kwargs.get("seed_state", False))
        return super().from_pretrained(where, **kwargs)

    def _save_pretrained(self, save_directory: Path) -> None:
        save_weights(self, save_directory)

    @classmethod
    def _from_pretrained(cls, *, strict: bool = True, **kwargs):
        return super()._from_pretrained(strict=strict, **kwargs)  # the mixin's default is not strict

    def generate_model_card(self, *args, **kwargs):
        X, Y, Z = self.core.lattice_size
        return super().generate_model_card(*args, lattice=f"{X}x{Y}x{Z}", state_size=self.core.state_size,
                                           steps=self.core.steps, **kwargs)

    def get_info(self) -> Dict[str, Any]:
        return {"kind": self.kind, "block types": len(self.names) - 1 if self.kind == "blocks" else None,
                **self.config.info(), "parameters": sum(p.numel() for p in self.parameters())}


def read_config(folder: Path) -> Dict[str, Any]:
    """The ``config.json`` of an ``NcaModel`` folder, checked to be one (``read_saved_config``)."""
    return read_saved_config(folder, lambda saved: isinstance(saved.get("config"), dict) and "kind" in saved,
                             "NcaModel")


# -- the weights a run starts from (nca.init_from) -----------------------------------------------------------------

# The model keys that decide what a weight does (beyond its shape): a model started from must have the run's.
RULE_KEYS = ("neighbourhood", "perception", "perception_filters", "activation", "output_activation", "output_bias",
             "update")


def initial_weights(path: Union[str, Path], config, types: int, kind: str = "blocks") -> Dict[str, torch.Tensor]:
    """The parameters a run of ``config`` (an ``NcaTrainingConfig`` set for its target of ``kind``, ``types``
    state channels per voxel) starts from, by name: those of ``path`` (``nca.init_from``), an ``NcaModel`` folder
    (a run's ``RUN_DIR/model``) or one of the upstream's pretrained ``.pt`` files (real-itu/3d-artefacts-nca, read
    by ``cubecore.nca.artefacts``; its state's channels split as the target's block types, the living channel and
    ``nca.hidden_channels``).  A model that is not the run's (another kind of state or living channel, other
    channels, update net or rule) is one ``InvalidValueError`` naming the keys to set."""
    from . import artefacts

    key = "nca.init_from"
    where = Path(path).expanduser()
    m = config.model
    if where.is_dir():
        model = NcaModel.from_pretrained(where)
        source = model.config
        if model.kind != kind or source.alive_channel != m.alive_channel:
            raise InvalidValueError(
                f"{key} {path}: the model's state is another's ({model.kind}, living channel {source.alive_channel}; "
                f"this run's: {kind}, living channel {m.alive_channel}): its channels would mean other things here; "
                f"train on a target of its kind and block types")
        differ = [f"model.{k} ({getattr(source, k)!r} there, {getattr(m, k)!r} here)" for k in RULE_KEYS
                  if getattr(source, k) != getattr(m, k)]
        if differ:
            raise InvalidValueError(f"{key} {path}: the model's rule is not this run's: set {', '.join(differ)}")
        core, what = model.core, f"a state of {source.state_size} channels"
    elif where.is_file():
        if kind != "blocks":
            raise InvalidValueError(f"{key} {path}: the upstream's models grow block types, this run's target is "
                                    f"{kind}: train on a target of block types")
        sd = artefacts.read_artefact(where)
        if isinstance(sd, dict) and "config" in sd and ("iteration" in sd or "epoch" in sd):
            raise InvalidValueError(f"{key} {path} is a cubecore training checkpoint, not a model: give its run's "
                                    f"model folder (RUN_DIR/model) to start from its weights, or --resume {path} to "
                                    f"continue that run")
        hidden = config.nca.hidden_channels
        state = artefacts.artefact_state_dict(sd).get(artefacts.PERCEPTION_KEY)
        channels = state.shape[0] // 3 if isinstance(state, torch.Tensor) and state.dim() == 5 else None
        if channels is not None and channels != m.state_size:
            raise InvalidValueError(
                f"{key} {path}: the model's state has {channels} channels, this run's {m.state_size} (the target's "
                f"{types} block types with air, the living channel and nca.hidden_channels {hidden}): set "
                f"nca.hidden_channels={channels - types - 1} or train on the model's own structure"
                if channels - types - 1 >= 0 else
                f"{key} {path}: the model's state has {channels} channels, fewer than the target's {types} block "
                f"types with air and the living channel: train on the model's own structure")
        try:
            core = artefacts.core_from_artefact_nca(sd, hidden, m.lattice_size)
        except InvalidValueError as exc:
            raise InvalidValueError(f"{key} {where}: {exc}") from None
        what = f"an update net {list(core.hidden_sizes)}"
    else:
        raise NotFoundError(f"{key} not found: {path} (give a model folder, e.g. a run's RUN_DIR/model, or one of "
                            f"the upstream's .pt files)")
    got = {name: p.detach().float() for name, p in core.named_parameters()}
    with torch.device("meta"):
        want = {name: tuple(p.shape) for name, p in CubicCore(m.lattice_size, m.state_size, m.hidden_sizes,
                                                              input_size=0, **m.core_options()).named_parameters()}
    if {k: tuple(v.shape) for k, v in got.items()} != want:
        sizes = list(core.hidden_sizes)
        raise InvalidValueError(f"{key} {path}: the model ({what}, update net {sizes}) does not have this run's "
                                f"weights (state {m.state_size}, update net {list(m.hidden_sizes)}): set "
                                f"model.hidden_size={sizes[0] if len(set(sizes)) == 1 else sizes} "
                                f"model.hidden_layers={len(sizes)}, nca.hidden_channels or the target to match")
    return got
