"""Train the cube as a query adapter, export it to sentence-transformers, and retrieve answers with it.

    python examples/query_adapter.py [--out runs/query-adapter] [--epochs N]

1. ``python -m cubecore.train`` in dialogue mode on the shipped chatterbot pairs, with the loss that trains for
   retrieval (cosine + 0.3 x in-batch InfoNCE) and the best epoch chosen by validation MRR;
2. ``python -m cubecore.export`` turns the run into a sentence-transformers model: ``encode_query`` = teacher +
   cube, ``encode_document`` = the teacher alone;
3. sentence-transformers' own ``InformationRetrievalEvaluator`` ranks the held-out answers for each held-out
   question, with the exported adapter and with the teacher alone.

Prints both models' accuracy@1 and MRR@10, and the R@1 of the run's own report, which counts retrieval the same
way.  Runs offline on a CPU in about a minute.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator

from cubecore import export, train
from cubecore.data import prepare_data
from cubecore.training.trainer import CubeTrainer
from cubecore.model.adapter import load_adapter


def retrieval_task(questions, answers):
    """The evaluator's queries, corpus (each distinct answer once) and each query's relevant answers."""
    corpus_ids = {}
    for answer in answers:
        corpus_ids.setdefault(answer, f"a{len(corpus_ids)}")
    queries = {f"q{i}": q for i, q in enumerate(questions)}
    relevant = {}
    for i, (question, answer) in enumerate(zip(questions, answers)):
        relevant.setdefault(f"q{i}", set()).add(corpus_ids[answer])
    return queries, {cid: text for text, cid in corpus_ids.items()}, relevant


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/query-adapter", help="folder for the run and the exported model")
    p.add_argument("--epochs", type=int, help="training epochs (default: the trainer's)")
    args = p.parse_args()
    run, exported = Path(args.out) / "run", Path(args.out) / "sentence-transformer"

    flags = ["--output-dir", str(run), "--overwrite", "--quiet"] + (["--epochs", str(args.epochs)] if args.epochs else [])
    if train.main(flags + ["infonce_weight=0.3", "select_by=val_mrr"]) != 0:
        raise SystemExit("training failed")
    if export.main([str(run), "--to", str(exported), "--overwrite"]) != 0:
        raise SystemExit("export failed")

    trainer = CubeTrainer.from_checkpoint(run / "last.pt")
    data = prepare_data(trainer.config.data, trainer.config.seed, trainer.teacher)  # the run's own held-out split (from the cache)
    queries, corpus, relevant = retrieval_task(data.val_questions, data.val_answers)
    evaluator = InformationRetrievalEvaluator(queries, corpus, relevant, name="chatterbot-val",
                                              accuracy_at_k=[1, 10], mrr_at_k=[10], show_progress_bar=False)
    adapter = load_adapter(exported)  # runs no code from the folder
    teacher = SentenceTransformer(trainer.teacher.location)
    print(f"held-out retrieval: {len(queries)} questions, {len(corpus)} distinct answers")
    for name, model in (("teacher alone", teacher), ("teacher + cube", adapter)):
        scores = evaluator(model)
        print(f"{name:>15}: accuracy@1 {scores['chatterbot-val_cosine_accuracy@1']:.4f}  "
              f"MRR@10 {scores['chatterbot-val_cosine_mrr@10']:.4f}")
    # The run's own report counts retrieval the same way (each distinct answer once): its R@1 is this accuracy@1.
    results = json.loads((run / "results.json").read_text())
    print(f"the run's report: R@1 {results['identity']['r@1']:.4f} (teacher alone), "
          f"{results['cube']['r@1']:.4f} (teacher + cube)")


if __name__ == "__main__":
    main()
