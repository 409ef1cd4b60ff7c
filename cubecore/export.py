"""`python -m cubecore.export RUN_DIR --to OUT`: a training run as a sentence-transformers query adapter.

OUT loads offline with ``SentenceTransformer(OUT, trust_remote_code=True)``: ``encode_query`` gives the run's
prediction for a question (teacher, then cube, with the weights of its best epoch; ``--weights last`` for the
last), ``encode_document`` (and plain ``encode``) the teacher's embedding of an answer.  RUN_DIR is a training
run's folder (its last.pt is read) or a checkpoint file.  OUT is written whole or not at all; an OUT that
exists is replaced only with --overwrite.
"""

from __future__ import annotations

import copy
import shutil
import sys
import tempfile
from pathlib import Path

from .cli import CommandParser, run_command
from .processor import EmbeddingProcessor
from .trainer import CubeTrainer


def run_checkpoint(run: Path) -> Path:
    """The checkpoint of a run folder (its last.pt), or the file itself."""
    if run.is_dir():
        checkpoint = run / "last.pt"
        if not checkpoint.is_file():
            raise FileNotFoundError(f"{run} holds no last.pt: not a finished or interrupted training run folder")
        return checkpoint
    if not run.exists():
        raise FileNotFoundError(f"run folder or checkpoint not found: {run}")
    return run


def export_run(run, out, weights: str = "best", overwrite: bool = False) -> Path:
    """Writes the query adapter of a run (see the module docstring) to ``out`` and returns it."""
    run, out = Path(run), Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite (overwrite=True) to replace it")
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out} is a file; the export is a folder")
    trainer = CubeTrainer.from_checkpoint(run_checkpoint(run), device="cpu")
    if not isinstance(trainer.model, EmbeddingProcessor):
        raise TypeError(f"{run} holds a {type(trainer.model).__name__}, not an EmbeddingProcessor")
    from .adapter import query_adapter  # sentence-transformers loads only for an export

    with trainer.weights_of(weights) as epoch:
        processor = copy.deepcopy(trainer.model).float().eval()
    model = query_adapter(trainer.teacher, processor)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save(str(staging))
        (staging / "CUBECORE.md").write_text(
            f"Exported by cubecore from {run} (weights of epoch {epoch}, {weights}); teacher "
            f"{trainer.config.teacher}, mode {trainer.config.mode}, data {trainer.config.data}.\n\n"
            f"    SentenceTransformer({str(out)!r}, trust_remote_code=True).encode_query(questions)\n",
            encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def main(argv=None) -> int:
    p = CommandParser(prog="python -m cubecore.export", description=__doc__)
    p.add_argument("run", help="a training run's folder (e.g. runs/cube) or a checkpoint file")
    p.add_argument("--to", required=True, help="the folder to write")
    p.add_argument("--weights", choices=("best", "last"), default="best",
                   help="the run's best epoch (by its select_by, the default) or its last one")
    p.add_argument("--overwrite", action="store_true", help="replace --to if it exists")
    args = p.parse_args(argv)

    def body() -> int:
        out = export_run(args.run, args.to, weights=args.weights, overwrite=args.overwrite)
        print(f"wrote {out}: SentenceTransformer({str(out)!r}, trust_remote_code=True); encode_query = teacher + "
              f"cube, encode_document = teacher")
        return 0

    return run_command(body)


if __name__ == "__main__":
    sys.exit(main())
