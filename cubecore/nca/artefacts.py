"""The pretrained 3D NCAs of real-itu/3d-artefacts-nca (Sudhakaran et al., "Growing 3D Artefacts and Functional
Machines with Neural Cellular Automata", 2021, MIT) as ``CubicCore`` modules: the converter, their seed, and their
structure files (``structs_dataset/jsons``).  ``nca.init_from=MODEL.pt`` starts training from one of their models
(``cubecore.nca.model.initial_weights``); ``examples/artefacts_nca.py`` grows one.

Their rule (``artefact_nca/model/voxel_ca_model.py``, ``VoxelCAModel``) is a member of CubicCore's rule family, so
a model of theirs runs on cubecore's fused kernel unchanged:

- perception: a depthwise ``Conv3d(C, 3C, 3, padding=1, groups=C, bias=False)``: ``perception="depthwise"`` with
  ``perception_filters=3`` over the ``moore`` neighbourhood, ``boundary="zeros"``;
- update net: 1x1x1 convolutions 3C -> dims... (ReLU) -> C, the last without bias: ``hidden_size=dims``,
  ``activation="relu"``, ``output_activation="identity"``, ``output_bias=False``;
- ``x = x + out`` where a cell fires (rand < ``cell_fire_rate``, 0.5): ``update="residual"``, ``step_size=1``
  (their ``step_size`` option is never used by the rule);
- alive masking: a cell lives where the max-pool over its 3x3x3 block of the living channel exceeds
  ``alpha_living_threshold`` before and after the step: ``alive_channel``, ``alive_threshold``;
- dead cells are zeroed and then get +1 on channel 0 (the "air" category) unless ``use_bce_loss``:
  ``dead_state`` = one-hot on channel 0 (zeros with ``use_bce_loss``).

A state has C = num_categories + 1 + num_hidden_channels channels: the block categories' logits (0 is air; the
block a cell shows is their argmax), the living channel (index num_categories), then the hidden channels: the
layout of ``cubecore.nca``'s states.  Their seed is one cell in the middle of the lattice with the living and
hidden channels at 1.  Their layout ``[B, depth, height, width, C]`` is CubicCore's ``[B, X, Y, Z, S]`` as it is:
no transposition.  Their ``.pt`` files hold ``{"model", "optimizer", "scheduler"}`` and are read with
``torch.load(..., weights_only=True)``: no code in them runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from ..errors import InvalidValueError, NotFoundError
from ..model.core import CubicCore
from ..ops.rule import MAX_HIDDEN_LAYERS

PathLike = Union[str, Path]
# Their lattice for a structure of at most 10 blocks a side: a cube whose side is the longest one rounded up to
# a multiple of 10.
UPSTREAM_LATTICE = (10, 10, 10)

PERCEPTION_KEY = "perception_net.conv1.weight"
UPDATE_PREFIX = "update_network.out."

# The defaults of the upstream's VoxelCAModelConfig / VoxelCATrainerConfig, for keys a yaml leaves out.
UPSTREAM_DEFAULTS = {"hidden_channels": 12, "fire_rate": 0.5, "alive_threshold": 0.1, "use_bce_loss": False,
                     "update_net_channel_dims": [32, 32]}


def _update_layers(state_dict: Mapping[str, torch.Tensor]) -> List[Tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """The update net's (weight, bias) pairs in order, read from ``update_network.out.{0,2,4,...}`` (the
    ``nn.Sequential`` of 1x1x1 Conv3d and ReLU that ``make_sequental`` builds)."""
    layers = []
    while f"{UPDATE_PREFIX}{2 * len(layers)}.weight" in state_dict:
        i = 2 * len(layers)
        layers.append((state_dict[f"{UPDATE_PREFIX}{i}.weight"], state_dict.get(f"{UPDATE_PREFIX}{i}.bias")))
    return layers


def _not_a_model(reason: str) -> InvalidValueError:
    return InvalidValueError(f"not a 3d-artefacts-nca VoxelCAModel state dict: {reason} (expected {PERCEPTION_KEY} "
                      f"[3C, 1, 3, 3, 3] and {UPDATE_PREFIX}0.weight/bias, {UPDATE_PREFIX}2.weight/bias, ..., the "
                      f"last {UPDATE_PREFIX}N.weight [C, dims[-1], 1, 1, 1] without bias)")


def artefact_state_dict(checkpoint: Mapping[str, Any]) -> Mapping[str, torch.Tensor]:
    """The model's state dict from what ``torch.load`` returns for one of their files: their trainer saves
    ``{"model": state_dict, "optimizer": ..., "scheduler": ...}``; a bare state dict is returned as it is."""
    if not isinstance(checkpoint, Mapping):
        raise _not_a_model(f"got a {type(checkpoint).__name__}, not a dict")
    model = checkpoint.get("model")
    return model if isinstance(model, Mapping) and PERCEPTION_KEY not in checkpoint else checkpoint


def core_from_artefact_nca(state_dict: Mapping[str, Any], hidden_channels: int,
                           lattice_size: Sequence[int] = UPSTREAM_LATTICE, steps: int = 1, *, fire_rate: float = 0.5,
                           alive_threshold: float = 0.1, use_bce_loss: bool = False,
                           backend: str = "auto") -> CubicCore:
    """A ``CubicCore`` that runs a pretrained 3d-artefacts-nca ``VoxelCAModel`` exactly.

    ``state_dict``: the model's state dict (or the checkpoint dict their trainer saves, with a ``"model"`` entry),
    as ``torch.load(path, weights_only=True)`` reads it.  ``hidden_channels``: their ``num_hidden_channels``
    (the trainer's yaml, 12 by default); the state's C channels are then ``C - hidden_channels - 1`` block
    categories, the living channel (their ``living_channel_dim`` = the number of categories), and the hidden
    channels.  ``fire_rate``, ``alive_threshold`` and ``use_bce_loss`` are their ``cell_fire_rate``,
    ``alpha_living_threshold`` and ``use_bce_loss`` (see :func:`load_config`).  ``lattice_size`` [X, Y, Z] is
    their [depth, height, width]; ``steps`` and ``backend`` are CubicCore's.

    The module has the state dict's dtype (float32 for theirs: ``.double()`` it for float64) and its weights are
    copies: ``perception`` is ``conv1.weight.view(C, 3, 27)``, ``w{i}`` the 1x1x1 convolutions' weights as
    matrices.  Raises ``ValueError`` if ``state_dict`` is not such a model, or has more hidden layers than
    CubicCore runs.
    """
    sd = artefact_state_dict(state_dict)
    if PERCEPTION_KEY not in sd:
        raise _not_a_model(f"no {PERCEPTION_KEY}")
    layers = _update_layers(sd)
    known = {PERCEPTION_KEY} | {f"{UPDATE_PREFIX}{2 * i}.{part}" for i in range(len(layers))
                                for part in ("weight", "bias")}
    unknown = sorted(str(k) for k in sd if k not in known)
    if unknown:
        raise _not_a_model(f"unexpected keys {unknown[:5]}")
    if len(layers) < 2:
        raise _not_a_model("no update net of at least one hidden layer")
    conv = sd[PERCEPTION_KEY]
    if not isinstance(conv, torch.Tensor) or conv.dim() != 5 or tuple(conv.shape[1:]) != (1, 3, 3, 3) \
            or conv.shape[0] % 3:
        raise _not_a_model(f"{PERCEPTION_KEY} must be [3C, 1, 3, 3, 3], got "
                           f"{tuple(conv.shape) if isinstance(conv, torch.Tensor) else type(conv).__name__}")
    C = conv.shape[0] // 3
    inputs = 3 * C
    for i, (w, b) in enumerate(layers):
        name, last = f"{UPDATE_PREFIX}{2 * i}", i == len(layers) - 1
        if not isinstance(w, torch.Tensor) or not isinstance(b, (torch.Tensor, type(None))):
            raise _not_a_model(f"{name} holds a {type(w).__name__} weight and a {type(b).__name__} bias, not tensors")
        if w.dim() != 5 or tuple(w.shape[2:]) != (1, 1, 1) or w.shape[1] != inputs or (last and w.shape[0] != C):
            want = f"[{C if last else 'dims[%d]' % i}, {inputs}, 1, 1, 1]"
            raise _not_a_model(f"{name}.weight must be {want}, got {tuple(w.shape)}")
        if last and b is not None:
            raise _not_a_model(f"the output layer {name} has a bias")
        if not last and (b is None or tuple(b.shape) != (w.shape[0],)):
            raise _not_a_model(f"{name}.bias must be [{w.shape[0]}], got {None if b is None else tuple(b.shape)}")
        inputs = w.shape[0]
    dims = [w.shape[0] for w, _ in layers[:-1]]
    if len(dims) > MAX_HIDDEN_LAYERS:
        raise InvalidValueError(f"update_net_channel_dims {dims}: CubicCore runs at most {MAX_HIDDEN_LAYERS} hidden "
                                f"layers")
    if not isinstance(hidden_channels, int) or not 0 <= hidden_channels <= C - 2:
        raise InvalidValueError(f"hidden_channels must be an int in 0 .. C - 2 = {C - 2} (the model has C = {C} "
                                f"channels: categories, the living channel, hidden channels), got {hidden_channels!r}")
    categories = C - hidden_channels - 1
    dead = None
    if not use_bce_loss:  # their update: x = x * life_mask, then x[:, :1][life_mask == 0] += 1
        dead = [0.0] * C
        dead[0] = 1.0
    core = CubicCore(
        lattice_size=lattice_size, state_size=C, hidden_size=dims, input_size=0, steps=steps, boundary="zeros",
        activation="relu", update="residual", step_size=1.0, backend=backend, neighbourhood="moore",
        perception="depthwise", perception_filters=3, output_activation="identity", output_bias=False,
        fire_rate=fire_rate, alive_channel=categories, alive_threshold=alive_threshold, dead_state=dead,
    ).to(conv.dtype)
    with torch.no_grad():
        core.perception.copy_(conv.reshape(C, 3, 27))
        for (wname, bname), (w, b) in zip(core.layer_names, layers):
            getattr(core, wname).copy_(w.reshape(w.shape[0], w.shape[1]))
            if b is not None:
                getattr(core, bname).copy_(b)
    return core


def load_config(path: Path) -> Dict[str, Any]:
    """The rule's settings from one of their trainer yaml files (``pretrained_models/*/*.yaml``), with their
    config's defaults for what it leaves out: ``hidden_channels``, ``fire_rate``, ``alive_threshold``,
    ``use_bce_loss`` (the keyword arguments of :func:`core_from_artefact_nca`) and ``update_net_channel_dims``."""
    import yaml

    trainer = (yaml.safe_load(Path(path).expanduser().read_text()) or {}).get("trainer", {})
    model = trainer.get("model_config", {}) or {}
    found = {"hidden_channels": trainer.get("num_hidden_channels"), "fire_rate": model.get("cell_fire_rate"),
             "alive_threshold": model.get("alpha_living_threshold"), "use_bce_loss": trainer.get("use_bce_loss"),
             "update_net_channel_dims": model.get("update_net_channel_dims")}
    return {k: UPSTREAM_DEFAULTS[k] if v is None else v for k, v in found.items()}


def read_artefact(path: PathLike) -> Mapping[str, Any]:
    """One of their ``.pt`` files, read with ``weights_only=True`` (no code runs); a file that cannot be read is
    one ``InvalidValueError`` naming it."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise NotFoundError(f"3d-artefacts-nca model not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # (pickle, zip and torch's own errors: a file that is not such a model)
        raise InvalidValueError(f"{path} is not a readable 3d-artefacts-nca model file "
                                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None


def load_artefact_nca(model_path: PathLike, config_path: PathLike, lattice_size: Sequence[int] = UPSTREAM_LATTICE,
                      steps: int = 1, backend: str = "auto") -> CubicCore:
    """Their ``.pt`` (read with ``weights_only=True``: no code runs) and yaml as a ``CubicCore``."""
    config = load_config(config_path)
    core = core_from_artefact_nca(read_artefact(model_path), config["hidden_channels"], lattice_size, steps,
                                  fire_rate=config["fire_rate"],
                                  alive_threshold=config["alive_threshold"], use_bce_loss=config["use_bce_loss"],
                                  backend=backend)
    if list(core.hidden_sizes) != list(config["update_net_channel_dims"]):
        raise InvalidValueError(f"{model_path} has update net dims {list(core.hidden_sizes)}, but {config_path} says "
                         f"{config['update_net_channel_dims']}")
    return core


def categories(core: CubicCore) -> int:
    """How many block categories the state holds: the living channel's index."""
    return core.rule.alive_channel


def artefact_seed(core: CubicCore, batch: int = 1, spawn_at_bottom: bool = False) -> torch.Tensor:
    """Their seed (``VoxelDataset.get_seed``), [batch, X, Y, Z, C]: zeros but for one cell at
    (X // 2, Y // 2, Z // 2), or (X // 2, 0, Z // 2) with ``spawn_at_bottom``, whose living and hidden channels
    are 1.  (Their ``use_random_seed_block`` option, a random category set in the seed too, is not used by the
    published models.)"""
    X, Y, Z = core.lattice_size
    seed = core.w1.new_zeros((batch, X, Y, Z, core.state_size))
    seed[:, X // 2, 0 if spawn_at_bottom else Y // 2, Z // 2, categories(core):] = 1.0
    return seed


def blocks(state: torch.Tensor, num_categories: int) -> torch.Tensor:
    """The block each cell shows, [..., X, Y, Z] (long): the argmax of the category channels (0 is air)."""
    return state[..., :num_categories].argmax(-1)


def grow(core: CubicCore, seed: torch.Tensor, fire_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Run ``core.steps`` steps from ``seed``: every state, [steps + 1, B, X, Y, Z, C] (entry 0 the seed).  The
    fire masks are drawn from torch's generator at the model's rate unless ``fire_mask`` [steps, B, X, Y, Z]
    gives them."""
    with torch.no_grad():
        return core(state=seed, return_trajectory=True, fire_mask=fire_mask)


def json_target(path: PathLike, lattice_size: Sequence[int] = UPSTREAM_LATTICE) -> torch.Tensor:
    """A structure of their ``structs_dataset/jsons`` (e.g. the house their PlainVillageHouse model was trained
    on), [X, Y, Z] = [depth, height, width] of block categories (long).

    ``path`` is such a file, e.g. their ``plain_village_house.json`` (the structure's blocks, ``{"type",
    "position": {x, y, z}}``; air left out).  As their ``get_block_array`` does: categories are the block types
    sorted, after air; the blocks' bounding box is centred in width (x) and depth (z) and stands on the floor in
    height (y)."""
    listed = json.loads(Path(path).read_text())
    types = sorted({b["type"] for b in listed})
    pos = torch.tensor([[b["position"]["z"], b["position"]["y"], b["position"]["x"]] for b in listed])
    pos -= pos.min(0).values
    extent = pos.max(0).values + 1
    X, Y, Z = lattice_size
    offset = torch.tensor([(X - extent[0]) // 2, 0, (Z - extent[2]) // 2])
    target = torch.zeros(X, Y, Z, dtype=torch.long)
    idx = pos + offset
    target[idx[:, 0], idx[:, 1], idx[:, 2]] = torch.tensor([types.index(b["type"]) + 1 for b in listed])
    return target


def iou(placed: torch.Tensor, target: torch.Tensor) -> float:
    """Intersection over union of the non-air cells."""
    a, b = placed > 0, target > 0
    return ((a & b).sum() / (a | b).sum().clamp_min(1)).item()
