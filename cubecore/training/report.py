"""What a training run leaves behind: per-epoch metrics (CSV and JSONL), the curves (PNG), and the Markdown
report table of the cube against the floors (identity, mean, offset, ridge, mlp, linear), with example predictions."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from ..atomic import atomic_write, atomic_write_text
from .rundir import RunFiles

COLUMNS = ("cosine", "mse", "r@1", "r@5", "r@10", "mrr")


METRIC_FIELDS = ("epoch", "step", "train_loss", "val_loss", "val_cosine", "val_r@1", "val_mrr", "lr")


def write_metrics(files: RunFiles, history: List[Dict[str, object]], fields: Sequence[str] = METRIC_FIELDS) -> None:
    """metrics.jsonl and metrics.csv holding exactly ``history``, one line per epoch, each written atomically (a
    resumed run starts from its checkpoint's history, so an epoch written after the checkpoint is not listed
    twice)."""
    atomic_write_text(files.metrics_jsonl, "".join(json.dumps(record) + "\n" for record in history))
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    atomic_write_text(files.metrics_csv, table.getvalue())


def seed_summary(runs: Dict[int, Dict[str, Dict[str, float]]], metrics: Optional[Sequence[str]] = COLUMNS
                 ) -> Dict[str, Dict[str, List[float]]]:
    """{row: {metric: [mean, standard deviation over the seeds]}} from each seed's results (row -> metric ->
    value), for ``metrics`` (None: every metric of the first seed's rows)."""
    first = next(iter(runs.values()))
    summary = {}
    for row, values_of_first in first.items():
        summary[row] = {}
        for metric in (values_of_first if metrics is None else metrics):
            values = torch.tensor([runs[s][row][metric] for s in runs], dtype=torch.float64)
            spread = values.std(unbiased=True).item() if len(values) > 1 else 0.0
            summary[row][metric] = [values.mean().item(), spread]
    return summary


def seed_table(summary: Dict[str, Dict[str, List[float]]], seeds: List[int], columns: Sequence[str] = COLUMNS,
               label: str = "model") -> str:
    """The Markdown table of ``seed_summary``: a row per ``label`` (model, structure), mean ± spread of each of
    ``columns``."""
    lines = [f"Mean and standard deviation over seeds {', '.join(map(str, seeds))}.", "",
             f"| {label} | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for row, metrics in summary.items():
        lines.append(f"| {row} | " + " | ".join(f"{m:.4f} ± {s:.4f}" for m, s in (metrics[c] for c in columns))
                     + " |")
    return "\n".join(lines)


def plot_curves(history: List[Dict[str, float]], path: Path, scored_epoch: Optional[int] = None,
                floors: Optional[Dict[str, Dict[str, float]]] = None) -> Optional[Path]:
    """Training and validation loss, and validation cosine, against epoch; ``scored_epoch``, the epoch whose
    weights the report scores, as a dashed line on both; ``floors`` (the results table: model -> metrics), each
    floor's validation cosine as a dotted horizontal line beside the cube's."""
    if not history:
        return None
    import math

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax_l, ax_c) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax_l.plot(epochs, [h["train_loss"] for h in history], label="train loss")
    if "val_loss" in history[0]:
        ax_l.plot(epochs, [h["val_loss"] for h in history], label="validation loss")
        ax_c.plot(epochs, [h["val_cosine"] for h in history], color="C2", label="validation cosine")
    for i, (name, metrics) in enumerate((floors or {}).items()):
        cosine = metrics.get("cosine")
        if name != "cube" and cosine is not None and math.isfinite(cosine):
            ax_c.axhline(cosine, color=f"C{3 + i % 7}", linestyle=":", linewidth=1.2, label=f"{name} floor")
    if scored_epoch is not None:
        for ax in (ax_l, ax_c):
            ax.axvline(scored_epoch, color="0.4", linestyle="--", linewidth=1, label=f"scored: epoch {scored_epoch}")
    ax_l.set_xlabel("epoch")
    ax_l.set_ylabel("loss")
    ax_l.legend()
    ax_c.set_xlabel("epoch")
    ax_c.set_ylabel("mean cosine to target")
    ax_c.legend(fontsize="small")
    for ax in (ax_l, ax_c):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return atomic_write(path, lambda f: f.write(buffer.getvalue()))


def results_table(results: Dict[str, Dict[str, float]]) -> str:
    lines = ["| model | " + " | ".join(COLUMNS) + " |", "|---|" + "---:|" * len(COLUMNS)]
    for name, metrics in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{metrics[c]:.4f}" for c in COLUMNS) + " |")
    if any("semantic_preservation" in m for m in results.values()):
        lines += ["", "| model | semantic_preservation |", "|---|---:|"]
        lines += [f"| {n} | {m['semantic_preservation']:.4f} |" for n, m in results.items()]
    return "\n".join(lines)


def example_predictions(pred: torch.Tensor, targets: torch.Tensor, questions: List[str], answers: List[str],
                        count: int = 5) -> List[Dict[str, str]]:
    """For the first ``count`` validation questions: the true answer and the validation answer nearest to the
    cube's output."""
    sim = F.normalize(pred.float(), dim=-1) @ F.normalize(targets.float(), dim=-1).T
    nearest = sim.argmax(1)
    return [{"question": questions[i], "true answer": answers[i], "nearest answer": answers[int(nearest[i])]}
            for i in range(min(count, len(questions)))]


FLOOR_WORDS = {"identity": "predicting the input", "mean": "predicting the mean training target",
               "offset": "the input plus a fitted multiple of the mean training target",
               "ridge": "a linear map fit on the training pairs",
               "mlp": "a skip-path MLP with as many parameters, trained the same way",
               "linear": "the input plus a learned linear map of it, the standard query adapter, trained the same "
                         "way"}


def standing(results: Dict[str, Dict[str, float]], model: str = "cube") -> List[str]:
    """In words, where the model stands against each floor on mean cosine and on retrieval (MRR, R@1)."""
    ours = results.get(model)
    lines = []
    for floor, words in FLOOR_WORDS.items():
        if ours is None or floor not in results:
            continue
        theirs = results[floor]
        parts = []
        for metric in ("cosine", "mrr", "r@1"):
            gap = ours[metric] - theirs[metric]
            verdict = "above" if gap > 0 else "below" if gap < 0 else "level with"
            parts.append(f"{metric} {ours[metric]:.4f} vs {theirs[metric]:.4f} ({verdict})")
        beats = sum(ours[m] > theirs[m] for m in ("cosine", "mrr", "r@1"))
        summary = ("beats" if beats == 3 else "does NOT beat" if beats == 0 else "partly beats")
        lines.append(f"- The {model} {summary} `{floor}` ({words}): {'; '.join(parts)}.")
    return lines


def markdown_report(results: Dict[str, Dict[str, float]], info: Dict[str, object],
                    examples: Optional[List[Dict[str, str]]] = None, note: str = "") -> str:
    """The report of a run: its settings (``info``: every field of the run's data and model, as ``get_info``
    gives them), the table against the floors, where the cube stands, the rollout and example predictions."""
    settings = ", ".join(f"{key} {value}" for key, value in info.items())
    lines = [f"# cubecore run: {info.get('mode')} mode", "", f"Settings: {settings}.", "",
             "Validation split. Retrieval: the rank of the true target among the distinct validation targets (two "
             "identical targets are one candidate; a tie with another target counts against). Floors: identity = "
             "predict the input, mean = the mean training target, offset = the input plus c times the mean "
             "training target (c fit on the training pairs), ridge = a closed-form linear "
             "map fit on the training pairs (its regularisation chosen by cross-validation on them), mlp = a "
             "one-hidden-layer MLP with a skip path and as many parameters as the cube, linear = the input plus W "
             "times the input (W zero-initialised, the standard query adapter); mlp and linear are trained with "
             "the same loss, epochs and best-epoch rule as the cube.", "", results_table(results), ""]
    if note:
        lines += [note, ""]
    lines += standing(results)
    lines += ["", "![The lattice state (L2 norm over channels, one panel per z-slice) at each step, for the first "
              "validation example](rollout.gif)"]
    if examples:
        lines += ["", "## Example predictions", "", "| question | true answer | nearest answer to the cube's output |",
                  "|---|---|---|"]
        for ex in examples:
            cells = [ex[k].replace("|", "\\|").replace("\n", " ") for k in ("question", "true answer", "nearest answer")]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
