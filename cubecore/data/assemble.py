"""The pairs a run trains and validates on, assembled from ``DataConfig`` by its mode: autoencoder (each text to
itself), dialogue (question -> answer) or mixed (dialogue pairs plus answers to themselves)."""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch

from ..errors import InvalidValueError
from .config import DataConfig
from .datasets import AutoencoderDataset, DialogueDataset
from .teacher import TeacherEncoder

Pairs = Tuple[torch.Tensor, torch.Tensor]


class TrainingData:
    """Training and validation pairs of one mode, with the validation texts (for example predictions) and the
    data's ``fingerprint`` (what the pairs of each split are: a run stores it, and a resume on other data is
    refused)."""

    def __init__(self, train: Pairs, val: Pairs, val_questions: Optional[List[str]] = None,
                 val_answers: Optional[List[str]] = None, fingerprint: Optional[Dict[str, object]] = None) -> None:
        self.train, self.val = train, val
        self.val_questions, self.val_answers = val_questions, val_answers
        self.fingerprint = fingerprint


def prepare_data(config: DataConfig, seed: int, encoder: Optional[TeacherEncoder] = None) -> TrainingData:
    """The pairs ``config.mode`` trains on, from ``config.source`` (a named source or a file), split by ``seed``;
    an empty side is an error that says why, before any training."""
    if config.mode == "autoencoder":
        ds = AutoencoderDataset.from_files(config.source, config=config, encoder=encoder, seed=seed)
        return _checked(TrainingData(*_splits(ds, config), fingerprint=ds.fingerprint()), config)
    dialogue = DialogueDataset.from_source(config.source, config=config, encoder=encoder, seed=seed)
    vq, va = dialogue.texts(validation=True) if dialogue.questions is not None else (None, None)
    train, val = _splits(dialogue, config)
    if config.mode == "dialogue":
        return _checked(TrainingData(train, val, vq, va, dialogue.fingerprint()), config)
    # mixed: dialogue pairs plus autoencoder pairs (each answer to itself), in the configured proportion;
    # validation stays dialogue, the harder task.
    qx, qy = train
    f = config.mixed_dialogue_fraction
    n_auto = int(round(qx.shape[0] * (1 - f) / f)) if f > 0 else qx.shape[0]
    gen = torch.Generator().manual_seed(seed)
    pick = torch.randint(0, qy.shape[0], (n_auto,), generator=gen)
    auto = qy[pick]
    inputs = torch.cat([qx, auto]) if f > 0 else auto
    targets = torch.cat([qy, auto]) if f > 0 else auto
    return _checked(TrainingData((inputs, targets), val, vq, va, dialogue.fingerprint()), config)


def _splits(dataset, config: DataConfig) -> Tuple[Pairs, Pairs]:
    """The training and validation pairs; an empty side is an error that says why, before any training."""
    train, val = dataset.split_tensors(), dataset.split_tensors(validation=True)
    if val[0].shape[0] == 0:
        why = ("; a dialogue split keeps every answer of one question on one side" if config.mode != "autoencoder"
               else "")
        raise InvalidValueError(
            f"the validation split of data {config.source!r} is empty ({train[0].shape[0]} training pair(s), "
            f"validation_split={config.validation_split}{why}): give more data"
            f"{' (or more distinct questions)' if why else ''}, or a larger validation_split")
    return train, val


def _checked(data: TrainingData, config: DataConfig) -> TrainingData:
    n = data.train[0].shape[0]
    if n < 2:
        raise InvalidValueError(f"data {config.source!r} leaves {n} training pair(s); training needs at least 2")
    return data
