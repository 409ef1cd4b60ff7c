"""``EmbeddingProcessor``: embedding -> lattice -> CubicCore -> per-cell readout -> embedding."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from huggingface_hub import PyTorchModelHubMixin

from ..atomic import atomic_write
from ..checks import check_int, check_tensor
from ..errors import CubecoreError, InvalidTypeError, InvalidValueError
from ..locate import locate_pretrained
from .config import ModelConfig
from .core import CubicCore
from .reshaper import EmbeddingReshaper


MODEL_CARD = """
---
{{ card_data }}
---

# cubecore EmbeddingProcessor

A cubic core ({{ lattice }} lattice of cells sharing one network, {{ steps }} steps) that maps a teacher
embedding to an embedding, trained with cubecore.

```python
from cubecore import EmbeddingProcessor
model = EmbeddingProcessor.from_pretrained("path/to/this/folder")
```

{{ results | default("", true) }}
"""


WEIGHTS_FILE = "model.safetensors"
CHECKSUM_KEY = "cubecore_sha256"


def weights_checksum(state: Dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().contiguous().cpu()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def check_weights_file(path: Path, cls, *args: Any, **kwargs: Any) -> None:
    """Refuse a weight file that is not this model's before the model is built: its tensors' names and shapes
    against those of the model ``cls(*args, **kwargs)`` that the config describes (built on the meta device, so
    that a config asking for billions of parameters allocates nothing), and its checksum where it has one."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the folder holds no weights")
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in cls(*args, **kwargs).state_dict().items()}
    try:
        with safe_open(str(path), framework="pt") as f:
            found = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            checksum = (f.metadata() or {}).get(CHECKSUM_KEY)
            if checksum is not None and weights_checksum({k: f.get_tensor(k) for k in found}) != checksum:
                raise InvalidValueError(f"{path} is corrupted: its values do not match the checksum written with "
                                        f"them")
    except SafetensorError as exc:
        raise InvalidValueError(f"{path} is not a readable safetensors file ({exc})") from None
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    wrong = [f"{k}: {found[k]} in the file, {expected[k]} for the config" for k in sorted(expected)
             if k in found and found[k] != expected[k]]
    if missing or extra or wrong:
        detail = "; ".join(filter(None, [f"missing {missing}" if missing else "", f"unexpected {extra}" if extra else "",
                                          "; ".join(wrong[:3])]))
        raise InvalidValueError(f"{path} does not hold the model its config.json describes: {detail}")


def save_weights(module: nn.Module, directory: Path) -> None:
    """``module``'s state dict as ``directory/model.safetensors``, with a checksum of its values in the file's
    metadata (``check_weights_file`` checks it), serialised in memory and written atomically (the
    ``_save_pretrained`` of cubecore's Hub models)."""
    from safetensors.torch import save

    state = {k: v.detach().contiguous() for k, v in module.state_dict().items()}
    data = save(state, metadata={"format": "pt", CHECKSUM_KEY: weights_checksum(state)})
    atomic_write(Path(directory) / WEIGHTS_FILE, lambda f: f.write(data))


def read_saved_config(folder: Path, is_ours, kind: str) -> Dict[str, Any]:
    """The ``config.json`` a model's ``save_pretrained`` wrote into ``folder``, checked to be a ``kind``'s
    (``is_ours(saved)``): a missing file, bad JSON or another model's config is one cubecore error naming it."""
    config = folder / "config.json"
    if not config.is_file():
        hint = f" (this looks like a run folder: its model is {folder / 'model'})" if (folder / "model").is_dir() \
            else ""
        raise FileNotFoundError(f"{folder} has no config.json: not a folder written by save_pretrained{hint}")
    try:
        saved = json.loads(config.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise InvalidValueError(f"{config} is not valid JSON ({exc})") from None
    if not isinstance(saved, dict) or not is_ours(saved):
        raise InvalidValueError(f"{config} is not the config of a cubecore {kind}")
    return saved


class EmbeddingProcessor(nn.Module, PyTorchModelHubMixin, library_name="cubecore", license="mit",
                         tags=["cubecore", "neural-cellular-automaton", "embedding-adapter"],
                         model_card_template=MODEL_CARD):
    """Maps an embedding [B, dim] to an embedding [B, dim] through the cubic core.

    The reshaper lays the embedding onto the lattice as the core's external input; after ``steps`` steps a
    learned per-cell readout (each cell its own map from state to output channels, and its own bias) gives the
    lattice that the reshaper reads back.  The cell rule is shared and sees only neighbours; the per-cell
    readout is what lets each embedding dimension have its own scale and offset.

    Three options give the shared rule what it lacks on small data: ``position_channels`` learned channels per
    cell, appended to the external input, let the one rule act differently at each place; ``global_channels``
    learned projections of the whole embedding (a bias-free linear map to N values), appended to every cell's
    external input, give each cell what lies beyond its neighbourhood in one step instead of none (a low-rank
    map, so it stays small for small data); ``readout_skip`` adds the input embedding to the output and
    zero-initialises the readout, so that the model starts as the identity and learns the difference (as the
    skip-path ``mlp`` floor does).

    ``save_pretrained(folder)`` / ``from_pretrained(folder)`` (huggingface_hub's mixin) store the weights as
    safetensors beside ``config.json`` (``input_dim`` and the ``ModelConfig``) and a model card; ``push_to_hub``
    works too.  A folder saved before ``ModelConfig`` existed (its fields flat in ``config.json``) loads too.
    Loading is strict: every weight must be in the file.
    """

    def __init__(self, input_dim: int, config: Optional[ModelConfig] = None, **options: Any) -> None:
        """``config`` (default ``ModelConfig()``, the model that training builds), with any of its fields
        overridden by keyword: ``EmbeddingProcessor(384, steps=6)``."""
        super().__init__()
        if config is not None and not isinstance(config, ModelConfig):
            raise InvalidTypeError(f"config must be a cubecore.ModelConfig, got {type(config).__name__}")
        self.config = config = (config or ModelConfig()).replace(**options) if options else (config or ModelConfig())
        self._hub_mixin_config = {"input_dim": input_dim, "config": config.to_dict()}  # what config.json holds
        self.input_dim = check_int("input_dim", input_dim, minimum=1)
        config.check_fits(input_dim)  # the reshaper's check, said in the config's keys
        self.reshaper = EmbeddingReshaper(input_dim, config.lattice_size, strategy=config.reshaping_method)
        self.core = CubicCore(config.lattice_size, config.state_size, config.hidden_sizes,
                              input_size=self.reshaper.channels + config.position_channels + config.global_channels,
                              **config.core_options())
        X, Y, Z = self.core.lattice_size
        out = self.reshaper.output_channels
        if config.position_channels:
            self.position = nn.Parameter(0.1 * torch.randn(X, Y, Z, config.position_channels))
        if config.global_channels:
            # nn.Linear's default init: each global value starts with the scale of one embedding dimension.
            self.global_projection = nn.Linear(input_dim, config.global_channels, bias=False)
        self.readout_weight = nn.Parameter(torch.empty(X, Y, Z, config.state_size, out))
        self.readout_bias = nn.Parameter(torch.zeros(X, Y, Z, out))
        if config.readout_skip:
            nn.init.zeros_(self.readout_weight)
        else:
            nn.init.uniform_(self.readout_weight, -config.state_size ** -0.5, config.state_size ** -0.5)

    @classmethod
    def training_bytes(cls, input_dim: int, config: ModelConfig, batch_size: int) -> Tuple[int, int, int]:
        """Roughly the memory that training the model of ``config`` on ``input_dim``-D embeddings in batches of
        ``batch_size`` needs in float32, and what it is made of: (bytes, parameters, external input channels per
        cell).  The parameters count four times (the weights, their gradients, AdamW's two moments); the
        activations of a batch that the backward keeps are the external input and its gradient, and each step's
        state and hidden layers.  The model is built on the meta device to count: nothing is allocated."""
        with torch.device("meta"):
            model = cls(input_dim, config)
        parameters = sum(p.numel() for p in model.parameters())
        external = model.core.input_size
        per_step = config.state_size + sum(config.hidden_sizes)
        floats = 4 * parameters + batch_size * config.cells * (2 * external + 2 * (config.steps + 1) * per_step)
        return 4 * floats, parameters, external

    def readout(self, state: torch.Tensor) -> torch.Tensor:
        """[B, X, Y, Z, S] -> [B, X, Y, Z, E_out], with each cell's own weights."""
        return torch.einsum("bxyzs,xyzse->bxyze", state, self.readout_weight) + self.readout_bias

    def external(self, embedding: torch.Tensor) -> torch.Tensor:
        """The core's external input for an embedding [B, dim]:
        [B, X, Y, Z, channels + position_channels + global_channels]."""
        check_tensor("input embedding", embedding, f"[B, {self.input_dim}]", ndim=2)
        if embedding.shape[1] != self.input_dim:
            raise InvalidValueError(f"input embedding must have shape [B, {self.input_dim}], got {tuple(embedding.shape)}")
        if embedding.shape[0] == 0:
            raise InvalidValueError(f"input embedding is an empty batch (shape {tuple(embedding.shape)}): give at "
                                    f"least one row")
        weights = self.readout_weight.dtype
        if embedding.dtype != weights:
            raise InvalidTypeError(f"input embedding has dtype {embedding.dtype} but the model's weights are "
                                   f"{weights}: convert the embedding (e.g. embedding.to({weights})) or the model "
                                   f"(model.to({weights}))")
        placed = self.reshaper.to_lattice(embedding)
        parts = [placed]
        if self.config.position_channels:
            parts.append(self.position.to(placed.dtype).expand(placed.shape[0], *self.position.shape))
        if self.config.global_channels:
            # In the embedding's dtype, so that a dtype that does not match the core is the core's clear error.
            weight = self.global_projection.weight
            summary = F.linear(embedding, weight.to(embedding.dtype)).to(placed.dtype)
            parts.append(summary[:, None, None, None, :].expand(*placed.shape[:4], self.config.global_channels))
        return torch.cat(parts, dim=-1) if len(parts) > 1 else placed  # one copy, whatever is appended

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        state = self.core(self.external(embedding))
        out = self.reshaper.from_lattice(self.readout(state))
        return embedding + out if self.config.readout_skip else out

    def trajectory(self, embedding: torch.Tensor) -> torch.Tensor:
        """The lattice states of every step for an embedding [B, dim]: [steps + 1, B, X, Y, Z, state_size]
        (entry 0 the initial zero state), for inspection: ``cubecore.training.viz.rollout_gif(traj[:, 0], path)``."""
        return self.core(self.external(embedding), return_trajectory=True)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """A model from a folder that ``save_pretrained`` wrote (a run's is ``RUN_DIR/model``) or a Hub id; a folder
        that is not there is a NotFoundError at once, not a hub request (``cubecore.locate``)."""
        where = locate_pretrained(pretrained_model_name_or_path, "model folder",
                                  ": from_pretrained takes the folder save_pretrained wrote (a training run's is "
                                  "RUN_DIR/model; checkpoints load with CubeTrainer.from_checkpoint)", kwargs)
        if isinstance(where, Path):
            path = where
            config = path / "config.json"
            saved = read_saved_config(path, lambda saved: "input_dim" in saved, "EmbeddingProcessor")
            # {"input_dim", "config": {...}}; a folder saved before ModelConfig holds the fields flat beside input_dim
            section = saved["config"] if isinstance(saved.get("config"), dict) else \
                {k: v for k, v in saved.items() if k != "input_dim"}
            try:
                kwargs.setdefault("config", ModelConfig.from_saved(section))
            except CubecoreError as exc:
                raise type(exc)(f"{config}: {exc}") from None
            kwargs.setdefault("input_dim", saved["input_dim"])
            check_weights_file(path / WEIGHTS_FILE, cls, kwargs["input_dim"], kwargs["config"])
        return super().from_pretrained(where, **kwargs)

    def _save_pretrained(self, save_directory: Path) -> None:
        """The weights as safetensors, with a checksum of their values in the file's metadata (from_pretrained
        checks it: a corrupted file is refused rather than loaded).  Serialised in memory, then written
        atomically: a full disk is an OSError naming the file, never a raw SafetensorError or a part of a file,
        and the file's mode follows the umask like the folder's other files."""
        save_weights(self, save_directory)

    @classmethod
    def _from_pretrained(cls, *, strict: bool = True, **kwargs):
        return super()._from_pretrained(strict=strict, **kwargs)  # the mixin's default is not strict

    def generate_model_card(self, *args, **kwargs):
        X, Y, Z = self.core.lattice_size
        return super().generate_model_card(*args, lattice=f"{X}x{Y}x{Z}", steps=self.core.steps, **kwargs)

    def get_info(self) -> Dict[str, Any]:
        """Every ``ModelConfig`` field, the input size, the parameter count and the backend in use."""
        return {"input_dim": self.input_dim, **self.config.info(), "parameters": sum(p.numel() for p in self.parameters()),
                "active_backend": self.core.get_info()["active_backend"]}
