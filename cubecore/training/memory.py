"""How much memory a training run needs, said before it starts: the training commands' shared warning (each command
estimates its own model's bytes: ``EmbeddingProcessor.training_bytes``, ``cubecore.nca.trainer.training_bytes``)."""

from __future__ import annotations

from typing import Optional

import torch

LARGE_BYTES = 4 * 1024 ** 3  # a model that needs more to train is said to, with what sets its size


def available_bytes(device: torch.device) -> Optional[int]:
    """The memory free for a new allocation on ``device`` (Linux MemAvailable for the CPU), or None if unknown."""
    try:
        if device.type == "cuda":
            return torch.cuda.mem_get_info(device)[0]
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, RuntimeError, ValueError, IndexError):
        pass
    return None


def memory_warning(need: int, detail: str, keys: str, device: torch.device, have: Optional[int]) -> Optional[str]:
    """A warning when training needs ``need`` bytes, more than ``LARGE_BYTES`` or half of ``have`` (the free memory
    on ``device``, None if unknown), else None: the estimate, what it is made of (``detail``), the free memory and
    the config keys that set the size (``keys``)."""
    if need <= LARGE_BYTES and (have is None or 2 * need <= have):
        return None
    gib = 1024 ** 3
    return (f"this model needs about {need / gib:.1f} GiB of memory to train ({detail})"
            f"{f'; {have / gib:.1f} GiB are free on {device}' if have is not None else ''}; its size is set by "
            f"{keys}")
