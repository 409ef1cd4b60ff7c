"""What a run writes besides checkpoints: the metrics files, the results table, the report and seed summaries."""

import csv
import json

import pytest

from cubecore.training.report import markdown_report, results_table, seed_summary, write_metrics
from cubecore.training.rundir import RunFiles

HISTORY = [{"epoch": 1, "step": 3, "train_loss": 0.5, "val_loss": 0.4, "val_cosine": 0.6, "val_r@1": 0.1,
            "val_mrr": 0.2, "lr": 0.01},
           {"epoch": 2, "step": 6, "train_loss": 0.3, "val_loss": 0.35, "val_cosine": 0.7, "val_r@1": 0.2,
            "val_mrr": 0.3, "lr": 0.005, "stopped": "trained all 2 epochs"}]
ROW = dict.fromkeys(("cosine", "mse", "r@1", "r@5", "r@10", "mrr"), 0.25)


def test_metrics_files_hold_exactly_the_history(tmp_path):
    files = RunFiles(tmp_path)
    write_metrics(files, HISTORY + [{"epoch": 3, "step": 9, "train_loss": 0.1, "lr": 0.0}])
    write_metrics(files, HISTORY)  # a resumed run rewrites from its checkpoint's history: no epoch twice
    assert [json.loads(line) for line in files.metrics_jsonl.read_text().splitlines()] == HISTORY
    rows = list(csv.DictReader(files.metrics_csv.open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2] and float(rows[1]["val_cosine"]) == 0.7
    assert not list(tmp_path.glob("*.tmp"))


def test_results_table_has_a_row_per_model_in_order():
    table = results_table({"cube": ROW, "identity": {**ROW, "cosine": 0.125}})
    lines = table.splitlines()
    assert lines[2].startswith("| cube | 0.2500") and lines[3].startswith("| identity | 0.1250")


def test_the_report_names_its_settings_and_says_where_the_cube_stands():
    info = {"mode": "dialogue", "teacher": "minilm", "steps": 4, "state_size": 8}
    report = markdown_report({"cube": {**ROW, "cosine": 0.5}, "identity": ROW}, info, note="Scored: epoch 2.")
    assert report.startswith("# cubecore run: dialogue mode")
    assert "steps 4" in report and "state_size 8" in report and "Scored: epoch 2." in report
    assert "The cube" in report and "identity" in report


def test_seed_summary_gives_mean_and_spread():
    runs = {1: {"cube": {**ROW, "cosine": 0.4}}, 2: {"cube": {**ROW, "cosine": 0.6}}}
    mean, spread = seed_summary(runs)["cube"]["cosine"]
    assert mean == pytest.approx(0.5) and spread == pytest.approx(0.02 ** 0.5)  # the sample standard deviation


def test_the_curves_mark_the_scored_epoch_and_draw_the_floors(tmp_path, monkeypatch):
    """The curves showed neither which epoch the report scores nor where the floors lie."""
    from matplotlib.figure import Figure

    from cubecore.training.report import plot_curves

    drawn = {}
    save = Figure.savefig

    def savefig(fig, *args, **kwargs):
        drawn["labels"] = [[line.get_label() for line in ax.get_lines()] for ax in fig.axes]
        drawn["floors"] = {line.get_label(): line.get_ydata()[0] for line in fig.axes[1].get_lines()}
        return save(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig)
    results = {"cube": ROW, "identity": {**ROW, "cosine": 0.375}, "ridge": {**ROW, "cosine": float("nan")}}
    assert plot_curves(HISTORY, tmp_path / "curves.png", scored_epoch=1, floors=results).is_file()
    loss, cosine = drawn["labels"]
    assert "scored: epoch 1" in loss and "scored: epoch 1" in cosine
    assert drawn["floors"]["identity floor"] == 0.375
    assert "cube floor" not in cosine and "ridge floor" not in cosine  # the cube itself, an undefined floor
