"""The benchmark harness itself works: every contestant agrees with the reference at a tiny size, a wrong
contestant is caught rather than timed, and one run writes its table, JSON and plot."""

import gc
import json
import time

import pytest
import torch

from benchmarks import run
from benchmarks.contestants import all_contestants, conv3d, eager
from benchmarks.harness import Size, check, measure, time_it

TINY = Size("tiny", 2, 3, 4, 5, S=3, H=5, E=2, T=3)


def test_every_contestant_matches_reference_at_every_boundary():
    for boundary in ("wall", "periodic", "reflect"):
        size = Size("tiny", 2, 3, 4, 5, S=3, H=5, E=2, T=3, boundary=boundary)
        for name, fn in all_contestants(torch.device("cpu")).items():
            if name == "compiled":
                continue  # compiled once below; compiling per boundary is slow on 2 cores
            ok, err = check(fn, size, "cpu")
            assert ok, (boundary, name, err)


def test_a_wrong_contestant_is_reported_not_timed():
    def off_by_a_little(state, external, w1, b1, w2, b2, **rule):
        return eager(state, external, w1 * 1.01, b1, w2, b2, **rule)

    row = measure("wrong", off_by_a_little, TINY, "cpu", repeats=1)
    assert row["status"] == "wrong" and "forward_backward" not in row


def test_measure_reports_times_memory_and_rates():
    row = measure("conv3d", conv3d, TINY, "cpu", repeats=1)
    assert row["status"] == "ok", row
    assert row["forward_backward"]["median_s"] > 0 and row["forward"]["median_s"] > 0
    assert row["cell_updates_per_s"] > 0 and row["max_rel_error"] < 1e-3
    assert row["memory_method"]


def test_run_writes_table_json_and_plot(tmp_path, monkeypatch):
    monkeypatch.setattr(run, "sizes_for", lambda device, quick: [TINY])
    assert run.main(["--quick", "--repeats", "1", "--min-time", "0", "--contestants", "kernel,eager,compiled", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "cpu-quick.json").read_text())
    assert {r["contestant"] for r in data["rows"]} == {"kernel", "eager", "compiled"}
    assert all(r["status"] == "ok" for r in data["rows"]), data["rows"]
    assert data["machine"]["cores"] >= 1 and data["limits"]["matmul_flops_per_s"] > 0
    table = (tmp_path / "cpu-quick.md").read_text()
    assert "| tiny | eager |" in table and "x |" in table
    # both FLOP conventions, the kernel's executed count above 3 x forward (its backward recomputes)
    kernel = next(r for r in data["rows"] if r["contestant"] == "kernel")
    assert kernel["executed_flops_per_s"] > kernel["train_flops_per_s"] > 0
    assert "3 x forward GFLOP/s" in table and "executed GFLOP/s" in table


def test_executed_flops_count_each_pass_of_the_kernels():
    """At the original size (S = 8, H = 16, E = 1): forward 1,040 multiply-adds per cell update; the CPU
    backward 912 (first layer again) + 128 (W2^T) + 1,040 (both weight gradients) + 912 (W1^T, external
    column included); the CUDA backward 1,040 + 128 + 1,040 + 912."""
    size = Size("original", 32, 8, 8, 12)
    assert size.executed_train_flops("cpu") == 2 * (1040 + 912 + 128 + 1040 + 912) * size.cell_updates
    assert size.executed_train_flops("cuda") == 2 * (1040 + 1040 + 128 + 1040 + 912) * size.cell_updates


def test_time_it_runs_until_min_time_with_gc_off_then_restores_it():
    seen = []

    def step():
        seen.append(gc.isenabled())
        time.sleep(0.01)

    stats = time_it(step, "cpu", repeats=2, warmup=1, min_time=0.06)
    assert 6 <= stats["repeats"] <= 40 and stats["repeats"] == len(seen) - 1
    assert seen[0] and not any(seen[1:])  # the warm-up runs as usual; the timed runs without the collector
    assert stats["min_s"] <= stats["median_s"] <= stats["max_s"] and stats["min_s"] >= 0.01
    assert gc.isenabled()
    with pytest.raises(ZeroDivisionError):
        time_it(lambda: 1 / 0, "cpu", repeats=1, warmup=0)
    assert gc.isenabled()


def test_learning_study_refuses_a_shared_override_that_a_variant_sets(capsys):
    """``--set`` comes before a variant's own overrides, so a key the variant sets would silently lose."""
    from benchmarks import learning

    with pytest.raises(SystemExit) as exc:
        learning.main(["--set", "global_channels=4 epochs=2", "--variants", "skip", "--out", "unused"])
    assert exc.value.code == 2
    assert "global_channels" in capsys.readouterr().err


def test_learning_study_table_names_the_shared_overrides():
    from benchmarks import learning

    metrics = {k: (0.5, 0.01) for k in learning.METRICS}
    summary = {m: metrics for m in ("cube", "identity", "mean", "offset", "ridge", "mlp")}
    results = {"skip": {"overrides": learning.VARIANTS["skip"], "summary": summary, "seconds_per_epoch": 1.0,
                        "mlp_parameters": 10}}
    text = learning.table(results, "chitchat", [42], ["max_samples=64000", "epochs=6"])
    assert "Every run: `max_samples=64000 epochs=6`" in text
    assert "| cube skip | readout_skip=true global_channels=0 |" in text
