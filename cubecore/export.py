"""`python -m cubecore.export RUN_DIR --to OUT`: a training run as a sentence-transformers query adapter.

OUT loads offline with ``cubecore.model.adapter.load_adapter(OUT)``, which runs no code from the folder (it
refuses module classes other than sentence-transformers' own and cubecore's adapter; ``SentenceTransformer(OUT,
trust_remote_code=True)`` loads it too, for folders you trust): ``encode_query`` gives the run's
prediction for a question (teacher, then cube, with the weights of its best epoch; ``--weights last`` for the
last), ``encode_document`` (and plain ``encode``) the teacher's embedding of an answer.  RUN_DIR is a
dialogue or mixed training run's folder (its last.pt is read) or a checkpoint file.  OUT is written whole or
not at all; with --overwrite it replaces an earlier export (and nothing else).
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

from .atomic import atomic_write_dir, staging_prefix  # noqa: F401 (staging_prefix: where an export stages)
from .errors import InvalidTypeError, InvalidValueError
from .training.checkpoint import rng_states, set_rng_states
from .cli import CommandParser, add_weights_argument, run_command
from .model.processor import EmbeddingProcessor
from .training.rundir import RunFiles
from .training.trainer import CubeTrainer


def run_checkpoint(run: Path) -> Path:
    """The checkpoint of a run folder (its last.pt), or the file itself."""
    if run.is_dir():
        checkpoint = RunFiles(run).last
        if not checkpoint.is_file():
            raise FileNotFoundError(f"{run} holds no last.pt: not a finished or interrupted training run folder")
        return checkpoint
    if not run.exists():
        raise FileNotFoundError(f"run folder or checkpoint not found: {run}")
    return run


MARKER = "cubecore_export.json"  # what the export was made from; marks a folder --overwrite may replace

CARD = """# cubecore query adapter

A sentence-transformers model exported by cubecore from the run `{run}` (weights of epoch {epoch}, {weights};
mode {mode}, data {data}).  Queries go through the teacher `{teacher}` and then the cubic core; documents
through the teacher alone.

```python
from cubecore.model.adapter import load_adapter
model = load_adapter("path/to/this/folder")  # a SentenceTransformer; runs no code from the folder
queries = model.encode_query(["How are you?"])
documents = model.encode_document(["I am fine, thanks."])
scores = model.similarity(queries, documents)
```

`SentenceTransformer("path/to/this/folder", trust_remote_code=True)` loads it too, but imports whatever class
the folder's files name, code in the folder included: use it only for a folder you trust.
"""


def check_destination(run: Path, out: Path, overwrite: bool) -> None:
    """OUT may be new, or (with overwrite) an earlier export; never the run, a folder holding it, or the
    current directory."""
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--to {out} is a file; the export is a folder")
    for parent in out.parents:
        if parent.exists() and not parent.is_dir():
            raise NotADirectoryError(f"--to {out}: {parent} is a file, not a folder")
    if not out.exists():
        return
    resolved, source, here = out.resolve(), run.resolve(), Path.cwd().resolve()
    if resolved == source or resolved in source.parents or resolved == here or resolved in here.parents:
        raise InvalidValueError(f"--to {out} holds the run {run} or the current directory; choose a new folder")
    if not any(out.iterdir()):
        return
    if not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace an earlier export there")
    if not (out / MARKER).is_file():
        raise FileExistsError(f"{out} is not an earlier export (it has no {MARKER}); --overwrite replaces only "
                              f"those: choose a new folder")


def export_run(run, out, weights: str = "best", overwrite: bool = False) -> Path:
    """Writes the query adapter of a run (see the module docstring) to ``out`` and returns it."""
    run, out = Path(run), Path(out)
    check_destination(run, out, overwrite)
    states = rng_states()  # loading a checkpoint restores its random states; the caller's are kept
    try:
        trainer = CubeTrainer.from_checkpoint(run_checkpoint(run), device="cpu")
    finally:
        set_rng_states(states)
    if not isinstance(trainer.model, EmbeddingProcessor):
        raise InvalidTypeError(f"{run} holds a {type(trainer.model).__name__}, not an EmbeddingProcessor")
    if trainer.config.data.mode == "autoencoder":
        raise InvalidValueError(f"{run} is an autoencoder run: it learned to give the teacher's embedding back, not a "
                         f"query's answer; the query adapter is exported from dialogue or mixed runs")
    from .model.adapter import query_adapter  # sentence-transformers loads only for an export

    with trainer.weights_of(weights) as epoch:
        processor = copy.deepcopy(trainer.model).float().eval()
    model = query_adapter(trainer.teacher, processor)
    info = {"run": str(run.resolve()), "epoch": epoch, "weights": weights, "teacher": trainer.config.data.teacher,
            "mode": trainer.config.data.mode, "data": trainer.config.data.source}

    def write(staging: Path) -> None:
        model.save(str(staging))
        (staging / MARKER).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        (staging / "README.md").write_text(CARD.format(**info), encoding="utf-8")

    # Written in a hidden folder beside OUT, then renamed: whole or not at all (staging folders of killed
    # exports are removed by the next).
    atomic_write_dir(out, write)
    return out


def main(argv=None) -> int:
    p = CommandParser(prog="python -m cubecore.export", description=__doc__)
    p.add_argument("run", help="a training run's folder (e.g. runs/cube) or a checkpoint file")
    p.add_argument("--to", required=True, help="the folder to write")
    add_weights_argument(p, "run")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export in --to")
    args = p.parse_args(argv)

    def body() -> int:
        out = export_run(args.run, args.to, weights=args.weights, overwrite=args.overwrite)
        print(f"wrote {out}: cubecore.model.adapter.load_adapter({str(out)!r}) loads it as a SentenceTransformer; "
              f"encode_query = teacher + cube, encode_document = teacher")
        return 0

    return run_command(body)


if __name__ == "__main__":
    sys.exit(main())
