"""Shared helpers: random problems of the cell rule, a fake teacher, a tiny training config and data file."""

import hashlib
import itertools
import os
from typing import List

import pytest
import torch

import cubecore
from cubecore import CubeTrainer, TrainingConfig

RULES = list(itertools.product(["zeros", "circular", "replicate", "reflect"], ["tanh", "relu", "sigmoid"], ["replace", "residual"]))
# (B, X, Y, Z, S, H, E): odd lattices, B = 1 and B > 1, E = 0 and E > 0.
# S = 8 and 16 take the kernels' paths compiled for those state sizes; other S the general one.  A B that
# divides by the thread count gives threads whole samples, X = 1 or 2 with fewer samples makes the CPU
# backward split each step over tiles and gather; 1x1x1 makes every periodic or reflecting neighbour the cell
# itself.
SHAPES = [(1, 1, 1, 1, 2, 3, 0), (2, 1, 7, 13, 3, 5, 1), (3, 3, 5, 2, 4, 6, 2), (1, 3, 5, 2, 1, 1, 0),
          (3, 2, 3, 4, 8, 16, 1), (2, 3, 1, 2, 16, 9, 0), (2, 1, 1, 1, 8, 4, 1)]


def skip_unless_fits(boundary, shape):
    """boundary='reflect' reads the mirror cell, which a lattice side of 1 does not have."""
    if boundary == "reflect" and min(shape[1:4]) < 2:
        pytest.skip("boundary='reflect' needs every lattice side >= 2")


def make_problem(B, X, Y, Z, S, H, E, dtype=torch.float64, device="cpu", seed=0, scale=0.5) -> List[torch.Tensor]:
    """Random (state, external, w1, b1, w2, b2) with weights large enough that every term matters."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, s=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * s).to(dtype=dtype, device=device)

    return [
        rnd(B, X, Y, Z, S, s=scale),
        rnd(B, X, Y, Z, E),
        rnd(H, 7 * S + E, s=0.4),
        rnd(H, s=0.2),
        rnd(S, H, s=0.4),
        rnd(S, s=0.2),
    ]


requires_kernel = pytest.mark.skipif(
    cubecore.kernel_unavailable_reason("cpu", torch.float32) is not None,
    reason=f"CPU kernel not built: {cubecore.kernel_unavailable_reason('cpu', torch.float32)}",
)

requires_cuda_kernel = pytest.mark.skipif(
    not torch.cuda.is_available() or cubecore.kernel_unavailable_reason("cuda", torch.float32) is not None,
    reason="needs a CUDA device and cubecore built with CUDA kernels",
)


@pytest.fixture(scope="session")
def tiny_st_model(tmp_path_factory):
    """A small sentence-transformers model on disk with [CLS] pooling and query/document prompts (as bge and e5
    publish theirs), built from random weights and the default teacher's tokenizer: no network."""
    import shutil

    from cubecore.data.teacher import resolve_model
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer import modules as models
    from transformers import BertConfig, BertModel

    _, minilm = resolve_model("minilm")
    root = tmp_path_factory.mktemp("st")
    bert = root / "bert"
    bert.mkdir()
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(os.path.join(minilm, name), bert / name)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(bert)
    st = SentenceTransformer(modules=[models.Transformer(str(bert), max_seq_length=32),
                                      models.Pooling(32, pooling_mode="cls")],
                             prompts={"query": "query: ", "document": "passage: "})
    st.save(str(root / "st"))
    return str(root / "st")


@pytest.fixture
def umask():
    """umask(mask) sets the process's umask for the test; the old one comes back after it."""
    def set_mask(mask):
        os.umask(mask)
        return mask

    old = os.umask(0o022)
    os.umask(old)
    yield set_mask
    os.umask(old)


class FakeEncoder:
    """Embeds a text as a fixed random vector seeded by its hash; counts how often it runs."""

    def __init__(self, dim=12, name="fake"):
        self.dim, self.name, self.calls = dim, name, 0

    def fingerprint(self):
        return {"model": self.name, "dim": self.dim}

    def encode(self, texts):
        self.calls += 1
        rows = []
        for t in texts:
            seed = int(hashlib.sha256(t.encode()).hexdigest()[:8], 16)
            rows.append(torch.randn(self.dim, generator=torch.Generator().manual_seed(seed)))
        return torch.stack(rows)


def tiny_config(tmp_path, **kw):
    base = dict(lattice_size=(2, 2, 3), state_size=4, hidden_size=8, steps=2, epochs=3, batch_size=8,
                learning_rate=1e-2, warmup_epochs=0.5, output_dir=str(tmp_path / "run"), device="cpu",
                cache_dir=str(tmp_path / "cache"))
    base.update(kw)
    return TrainingConfig(**base)


@pytest.fixture
def dialogue_file(tmp_path):
    path = tmp_path / "dialogue.txt"
    path.write_text("\n".join(f"question {i % 25}\tanswer {i}" for i in range(80)) + "\n")
    return str(path)


@pytest.fixture
def fake_teacher(monkeypatch):
    teacher = FakeEncoder(dim=12)
    monkeypatch.setattr(CubeTrainer, "teacher", property(lambda self: teacher))
    return teacher
