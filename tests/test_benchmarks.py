"""The benchmark harness itself works: every contestant agrees with the reference at a tiny size, a wrong
contestant is caught rather than timed, and one run writes its table, JSON and plot.  The `nca` size: every
contestant computes the kernel's final state and gradients in float64, and the largest-lattice search."""

import gc
import json
import time

import pytest
import torch

from benchmarks import nca, run
from benchmarks.contestants import all_contestants, contestants_for, conv3d, eager
from benchmarks.harness import Size, _forward_backward, check, measure, relative_error, time_it

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


@pytest.mark.parametrize("argv, says", [
    (["--set", "epochs"], "--set: override 'epochs' is not key=value"),
    (["--set", "=2"], "--set: unknown config key ''"),
    (["--set", "max_sampels=64000"], "--set: unknown config key 'max_sampels'"),
    (["--set", "epochs=0"], "--set: config key 'epochs' must be an int >= 1, got 0"),
    (["--out", "{file}/sub"], "cannot make that folder"),
    (["--out", "{file}/sub", "--cost"], "cannot make that folder"),
])
def test_learning_study_names_a_bad_argument_before_it_trains_anything(tmp_path, monkeypatch, capsys, argv, says):
    from benchmarks import learning

    monkeypatch.setattr(learning, "run_variant", lambda *a: pytest.fail("trained despite a bad argument"))
    monkeypatch.setattr(learning, "step_costs", lambda *a: pytest.fail("timed despite a bad argument"))
    (tmp_path / "file").write_text("")
    argv = [a.replace("{file}", str(tmp_path / "file")) for a in argv]
    with pytest.raises(SystemExit) as exc:
        learning.main([*argv, "--variants", "skip"] + ([] if "--out" in argv else ["--out", str(tmp_path)]))
    assert exc.value.code == 2 and says in capsys.readouterr().err


def test_learning_study_table_names_the_shared_overrides():
    from benchmarks import learning

    metrics = {k: (0.5, 0.01) for k in learning.METRICS}
    summary = {m: metrics for m in ("cube", "identity", "mean", "offset", "ridge", "mlp")}
    results = {"skip": {"overrides": learning.VARIANTS["skip"], "summary": summary, "seconds_per_epoch": 1.0,
                        "mlp_parameters": 10}}
    text = learning.table(results, "chitchat", [42], ["max_samples=64000", "epochs=6"])
    assert "Every run: `max_samples=64000 epochs=6`" in text
    assert "| cube skip | readout_skip=true global_channels=0 |" in text



def test_learning_rule_variants_are_valid_runs_and_differ_from_their_base_by_their_lever():
    """Every variant of the rules group is a valid configuration that fits the default teacher, and is compared
    seed by seed with the variant that lacks its last lever."""
    from benchmarks import learning
    from cubecore import TrainingConfig
    from cubecore.training.config import parse_override

    built = {}
    for name, overrides in learning.RULE_VARIANTS.items():
        config = TrainingConfig().override(**dict(parse_override(o) for o in overrides))
        config.model.check_fits(384)
        built[name] = config.to_dict()
    assert built["g8 moore"]["model"]["neighbourhood"] == "moore" and built["g0"]["model"]["global_channels"] == 0
    assert learning.base_of("g8 moore", learning.RULE_VARIANTS) == "g8"
    assert learning.base_of("g0 moore steps=16", learning.RULE_VARIANTS) == "g0 moore"
    assert learning.base_of("g8 moore cosine+infonce", learning.RULE_VARIANTS) == "g8 cosine+infonce"
    assert learning.base_of("g8 cosine+infonce", learning.RULE_VARIANTS) is None
    for name, base in ((n, learning.base_of(n, learning.RULE_VARIANTS)) for n in learning.RULE_VARIANTS):
        if base is not None:  # the base is the variant without one lever: they differ, the base's keys kept
            assert built[name] != built[base] and set(learning.RULE_VARIANTS[base]) < set(learning.RULE_VARIANTS[name])


def test_learning_study_pairs_each_variant_with_every_floor_and_its_base_seed_by_seed():
    from benchmarks import learning

    def run(cube, linear):
        per_seed = {}
        for seed, shift in (("42", 0.0), ("1", 0.1)):
            models = {m: {k: 0.3 + shift for k in learning.METRICS} for m in learning.FLOORS}
            models["cube"] = {k: cube + shift for k in learning.METRICS}
            models["linear"] = {**{k: linear + shift for k in learning.METRICS}, "parameters": 144.0}
            per_seed[seed] = models
        summary = {m: {k: (0.5, 0.01) for k in learning.METRICS} for m in ("cube", *learning.FLOORS)}
        return {"overrides": learning.RULE_VARIANTS["g8"], "summary": summary, "seconds_per_epoch": 2.0,
                "cube_seconds_per_epoch": 1.0, "seconds": 60.0, "mlp_parameters": 10, "per_seed": per_seed}

    results = {"g8": run(0.5, 0.6), "g8 moore": run(0.55, 0.6)}
    text = learning.table(results, "chatterbot", [42, 1], [], where="a test machine", variants=learning.RULE_VARIANTS)
    assert "Measured on a test machine." in text
    assert "| g8 | +0.2000 / +0.2000 (2/2) |" in text  # cosine against identity, seed by seed
    assert "+0.2000 / +0.2000 (2/2) | -0.1000 / -0.1000 (0/2) |" in text  # ... against mlp and linear
    assert "| g8 moore | g8 | +0.0500 / +0.0500 (2/2) |" in text  # against its base
    assert "| linear (as trained for g8) | 144 parameters |" in text


def test_learning_cost_times_each_variant_and_gives_ratios_to_the_first():
    from benchmarks import learning

    costs = learning.step_costs(["g8", "g8 state 32"], learning.RULE_VARIANTS, rounds=1, steps=1)
    assert set(costs) == {"g8", "g8 state 32"} and all(ms > 0 for ms in costs.values())
    text = learning.cost_table(costs, learning.RULE_VARIANTS, "a test machine")
    assert "| g8 | readout_skip=true global_channels=8 |" in text and "| 1.00 |" in text

# --- the `nca` size: the 3D artefacts NCA (benchmarks/nca.py) ----------------------------------------------

# A lattice of unequal sides, so that an axis taken for another (D, H, W against X, Y, Z) shows.
NCA_TINY = nca.NcaSize("nca-tiny", 2, 6, 7, 8, T=4)


def test_nca_every_contestant_computes_the_kernels_state_and_gradients_in_float64():
    """What makes the `nca` comparison fair: the upstream's formulation (eager), its torch.compile and its
    checkpointed form give the kernel's final state and the gradients of the state and of every weight."""
    inputs = NCA_TINY.make_inputs("cpu", torch.float64)
    state, perception, w1, b1, w2, b2, w3, fire, dead = inputs
    assert [t.requires_grad for t in inputs] == [True] * 7 + [False] * 2
    assert fire.dtype == torch.bool and 0 < fire.float().mean() < 1  # some cells fire, some do not
    assert perception.shape == (60, 1, 3, 3, 3) and w1.shape == (64, 60, 1, 1, 1) and w3.shape == (20, 64, 1, 1, 1)
    want_out, want_grads = _forward_backward(nca.kernel, inputs, NCA_TINY)
    # the masks matter here: some cells end dead (one-hot on channel 0), others alive
    is_dead = (want_out.detach() == dead).all(-1)
    assert 0 < is_dead.float().mean() < 1
    contestants = contestants_for(NCA_TINY, torch.device("cpu"))
    assert set(contestants) == {"kernel", "eager", "compiled", "checkpointed"}
    for name, fn in contestants.items():
        got = _forward_backward(fn, NCA_TINY.make_inputs("cpu", torch.float64), NCA_TINY)
        assert len(got[1]) == 7
        err = relative_error(got, (want_out, want_grads))
        assert err < 1e-9, (name, err)
        assert getattr(fn, "note", None) is None, (name, fn.note)  # compiled: the full graph, no fallback


def test_nca_check_catches_a_wrong_contestant():
    def off_by_a_little(state, perception, w1, *rest, **rule):
        return nca.eager(state, perception, w1 * 1.01, *rest, **rule)

    assert nca.NcaSize.check(NCA_TINY, nca.kernel, "cpu") == (True, pytest.approx(0, abs=1e-3))
    ok, err = check(off_by_a_little, NCA_TINY, "cpu")
    assert not ok and err > 1e-9


def test_nca_compiled_falls_back_and_says_why(monkeypatch):
    def fake_compile(fn, mode="default", dynamic=None, fullgraph=False):
        if fullgraph:
            def broken(*args):
                raise RuntimeError("no full graph here")
            return broken
        return fn

    monkeypatch.setattr(torch, "compile", fake_compile)
    run_ = nca.compiled()
    inputs = NCA_TINY.make_inputs("cpu", torch.float64)
    out = run_(*inputs, **NCA_TINY.rule())
    assert torch.equal(out, nca.eager(*inputs, **NCA_TINY.rule()))
    assert "fullgraph compile failed (RuntimeError: no full graph here)" in run_.note
    row = measure("compiled", run_, NCA_TINY, "cpu", repeats=1)
    assert row["status"] == "ok" and "graph breaks" in row["note"]


def test_nca_size_counts_its_multiply_adds():
    """Per cell update: depthwise 20 x 3 x 27, then 64 x 60, 64 x 64 and 20 x 64; the kernel executes 4x the
    forward (the backward recomputes the step, then a transpose and a weight gradient per product)."""
    size = nca.NcaSize("nca", 5, 32, 32, 32)
    assert (size.S, size.F, size.H, size.H2, size.E, size.T, size.B) == (20, 3, 64, 64, 0, 48, 5)
    assert size.forward_macs() == 1620 + 3840 + 4096 + 1280
    assert size.forward_flops() == 2 * 10836 * 5 * 32**3 * 48
    assert size.executed_train_flops("cpu") == 4 * size.forward_flops()
    assert run.nca_size() == size and size in run.sizes_for(torch.device("cpu"), quick=False)
    smaller = nca.NcaSize("nca-24", 5, 24, 24, 24, T=24)
    assert smaller in run.sizes_for(torch.device("cpu"), quick=False) and run.NCA_SPEED_GOALS["nca-24"] == 2.0
    assert size not in run.sizes_for(torch.device("cpu"), quick=True)


def test_largest_lattice_doubles_then_bisects():
    tried = []

    def attempt(side):
        tried.append(side)
        return {"status": "fits" if side <= 37 else "too large", "seconds": 0.0}

    found = nca.largest_lattice("eager", start=8, attempt=attempt, log=lambda line: None)
    assert (found["side"], found["cells"]) == (37, 37**3) and "error" not in found
    assert tried[:4] == [8, 16, 32, 64] and tried[4:] == [48, 40, 36, 38, 37]
    assert [t["side"] for t in found["tries"]] == tried

    def broken(side):
        return {"status": "error", "reason": "boom"} if side > 16 else {"status": "fits"}

    found = nca.largest_lattice("eager", start=8, attempt=broken, log=lambda line: None)
    assert found["side"] == 16 and "boom" in found["error"]


def test_a_try_fits_or_runs_out_of_its_address_space():
    """One real child process each way: a tiny lattice within 3 GiB, a large one in 1.25 GiB (the
    interpreter and torch alone take about 0.8 GiB of address space)."""
    fits = nca.try_side("kernel", 6, batch=1, steps=2, limit_bytes=3 * nca.GIB)
    assert fits["status"] == "fits", fits
    assert 0 < fits["vm_peak_bytes"] <= 3 * nca.GIB and fits["train_step_s"] > 0
    too_large = nca.try_side("eager", 96, batch=2, steps=4, limit_bytes=int(1.25 * nca.GIB))
    assert too_large["status"] == "too large", too_large


def test_run_reports_the_nca_size_and_the_largest_lattice(tmp_path, monkeypatch):
    monkeypatch.setattr(run, "sizes_for", lambda device, quick: [NCA_TINY])
    searched = []

    def fake_search(name, *, batch, steps, limit_bytes, start):
        searched.append((name, batch, steps, limit_bytes, start))
        side = {"eager": 10, "kernel": 21}[name]
        return {"contestant": name, "batch": batch, "steps": steps, "limit_bytes": limit_bytes, "side": side,
                "cells": side**3, "tries": [{"side": side, "status": "fits"}], "seconds": 1.0}

    monkeypatch.setattr(run, "largest_lattice", fake_search)
    monkeypatch.setattr(run, "_available_memory", lambda: 64 * nca.GIB)
    assert run.main(["--repeats", "1", "--min-time", "0", "--contestants", "kernel,eager,checkpointed,conv3d",
                     "--largest-lattice", "--lattice-limit-gib", "2", "--lattice-batch", "2",
                     "--lattice-steps", "4", "--out", str(tmp_path)]) == 0
    assert searched == [("eager", 2, 4, 2 * nca.GIB, 16), ("kernel", 2, 4, 2 * nca.GIB, 16)]
    data = json.loads((tmp_path / "cpu.json").read_text())
    assert [r["contestant"] for r in data["rows"]] == ["kernel", "eager", "checkpointed"]  # no conv3d form
    assert all(r["status"] == "ok" and r["family"] == "nca" for r in data["rows"]), data["rows"]
    goals = {g["target"]: g for g in data["targets"]}
    assert goals["nca-tiny: >= 2.5x the fastest pure PyTorch"]["measured"] > 0
    assert goals["nca-tiny: >= 0.65 of the matmul limit"]["measured"] > 0
    assert goals["nca-tiny peak memory: kernel <= 1/10 eager"]["measured"] > 0
    assert goals["nca largest lattice: kernel >= 8x eager's cells"]["measured"] == pytest.approx(21**3 / 10**3)
    assert "CPU every size: the fastest contestant" not in goals  # no lattice size ran
    assert data["largest_lattice"]["results"][1]["side"] == 21
    table = (tmp_path / "cpu.md").read_text()
    assert "| nca-tiny | eager |" in table and "| kernel | 21 | 9261 | 9.26x |" in table
    assert not (tmp_path / "cpu.png").exists()  # no lattice series to draw


def test_largest_lattice_refuses_a_limit_above_the_available_memory(monkeypatch, capsys):
    monkeypatch.setattr(run, "_available_memory", lambda: 4 * nca.GIB)
    with pytest.raises(SystemExit) as exc:
        run.main(["--sizes", "none", "--largest-lattice", "--lattice-limit-gib", "16"])
    assert exc.value.code == 2 and "--lattice-force" in capsys.readouterr().err


@pytest.mark.parametrize("flag,value", [("--lattice-limit-gib", "nan"), ("--lattice-limit-gib", "inf"),
                                        ("--lattice-limit-gib", "-1"), ("--lattice-limit-gib", "0"),
                                        ("--lattice-start", "0"), ("--lattice-batch", "-2"), ("--lattice-steps", "0")])
def test_largest_lattice_checks_its_numbers(tmp_path, monkeypatch, capsys, flag, value):
    """Every bad value: one error line naming the flag, exit 2, nothing searched or written."""
    monkeypatch.setattr(run, "largest_lattice", lambda *a, **k: pytest.fail("searched with a bad value"))
    with pytest.raises(SystemExit) as exc:
        run.main(["--sizes", "none", "--largest-lattice", flag, value, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and flag in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_targets_cover_only_the_sizes_that_ran():
    """A run of some sizes (--sizes nca) reports the goals of those sizes, not every other goal as missed."""
    def row(size, contestant, seconds, peak, family="lattice"):
        return {"size": size, "contestant": contestant, "status": "ok", "family": family, "peak_bytes": peak,
                "forward_backward": {"median_s": seconds}, "executed_flops_per_s": 1.0}
    nca_rows = [row("nca", "kernel", 1.0, 10, "nca"), row("nca", "eager", 2.0, 200, "nca"),
                row("nca", "compiled", 1.5, 150, "nca")]
    goals = run.targets(nca_rows, torch.device("cpu"), {"matmul_flops_per_s": 4.0})
    assert [g["target"] for g in goals] == ["nca: >= 2.5x the fastest pure PyTorch",
                                            "nca: >= 0.65 of the matmul limit",
                                            "nca peak memory: kernel <= 1/10 eager"]
    assert [g["measured"] for g in goals] == [1.5, 0.25, 20.0]
    smaller = [row("nca-24", "kernel", 1.0, 10, "nca"), row("nca-24", "eager", 2.5, 200, "nca")]
    goals = run.targets(smaller, torch.device("cpu"), {"matmul_flops_per_s": 4.0})
    assert goals[0]["target"] == "nca-24: >= 2x the fastest pure PyTorch" and goals[0]["met"]
    original = [row("original", "kernel", 1.0, 10), row("original", "compiled", 3.0, 30),
                row("original", "eager", 4.0, 60)]
    names = [g["target"] for g in run.targets(original, torch.device("cpu"), {"matmul_flops_per_s": 4.0})]
    assert "CPU original: >= 2x compiled" in names and "peak memory T=10: kernel <= 1/5 eager" in names
    assert not any("32^3" in n or "nca" in n for n in names)


def _variant_without_training(name, overrides, data, seeds, out, shared):
    """What ``learning.run_variant`` returns, every model at 0.4, without training anything."""
    from benchmarks import learning

    models = {m: {k: 0.4 for k in learning.METRICS} for m in ("cube", *learning.FLOORS)}
    return {"overrides": overrides, "summary": {m: {k: (0.4, 0.0) for k in learning.METRICS} for m in models},
            "seconds_per_epoch": 1.0, "seconds": 60.0, "mlp_parameters": 10,
            "per_seed": {str(s): models for s in seeds}}


def test_learning_study_runs_in_parts_but_never_mixes_retrieval_rules(tmp_path, monkeypatch, capsys):
    """A variant measured before stays in the table when it was counted the same way; a study counted another
    way is neither mixed in nor replaced."""
    from benchmarks import learning

    monkeypatch.setattr(learning, "run_variant", _variant_without_training)
    args = ["--group", "rules", "--seeds", "42,1", "--out", str(tmp_path)]
    assert learning.main(args + ["--variants", "g8"]) == 0
    assert learning.main(args + ["--variants", "g8 moore"]) == 0
    saved = tmp_path / "chatterbot-rules.json"
    assert list(json.loads(saved.read_text())["results"]) == ["g8", "g8 moore"]  # the parts make one table

    noted = json.loads(saved.read_text())  # a file's notes (how each part was measured) outlive the next part
    assert noted["notes"] == []
    noted["notes"] = ["g8 shared the machine with other work"]
    saved.write_text(json.dumps(noted))
    assert learning.main(args + ["--variants", "g8 fire 0.5"]) == 0
    kept = json.loads(saved.read_text())
    assert kept["notes"] == noted["notes"] and list(kept["results"]) == ["g8", "g8 moore", "g8 fire 0.5"]

    older = json.loads(saved.read_text())
    del older["retrieval"]  # as written before the rule was recorded: counted the earlier way
    saved.write_text(json.dumps(older))
    table = (tmp_path / "chatterbot-rules.md").read_text()
    with pytest.raises(SystemExit) as stop:
        learning.main(args + ["--variants", "g8 2 hidden"])
    assert stop.value.code == 2 and "measured with other retrieval" in capsys.readouterr().err
    assert json.loads(saved.read_text()) == older and (tmp_path / "chatterbot-rules.md").read_text() == table


def test_a_second_study_into_the_same_results_file_is_refused_while_the_first_runs(tmp_path, monkeypatch, capsys):
    """Each study reads the results file at its start and writes it after each variant: two at once would drop
    each other's variants, so the second stops at once, naming the first."""
    import subprocess
    import sys

    from benchmarks import learning

    monkeypatch.setattr(learning, "run_variant", _variant_without_training)
    args = ["--group", "rules", "--seeds", "42", "--out", str(tmp_path)]
    assert learning.main(args + ["--variants", "g8"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chatterbot-rules.json", "chatterbot-rules.md"]
    saved = (tmp_path / "chatterbot-rules.json").read_text()
    holder = subprocess.Popen([sys.executable, "-c", "import sys; from cubecore.training.rundir import take_lock; "
                               f"take_lock({str(tmp_path / 'chatterbot-rules.lock')!r}); print('held', flush=True); "
                               "sys.stdin.read()"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(SystemExit) as stop:
            learning.main(args + ["--variants", "g8 moore"])
        assert stop.value.code == 2
        assert f"being written by another study (process {holder.pid})" in capsys.readouterr().err
        assert (tmp_path / "chatterbot-rules.json").read_text() == saved
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    assert learning.main(args + ["--variants", "g8 moore"]) == 0  # the lock went with the process
    assert list(json.loads((tmp_path / "chatterbot-rules.json").read_text())["results"]) == ["g8", "g8 moore"]


def test_the_gpu_roofline_target_is_measured_at_its_own_size():
    """The CUDA target reads '64^3, B = 8 at >= 50% of the roofline': the GPU run's 64^3 size is that one."""
    from benchmarks import run

    size = next(s for s in run.sizes_for(torch.device("cuda"), quick=False) if s.name == "64^3")
    assert (size.B, size.X, size.Y, size.Z) == (8, 64, 64, 64)


def test_on_a_gpu_each_precision_is_timed_against_pure_pytorch_at_the_same_switches():
    """The GPU `nca` rows: the kernel at each precision (FMA path with TF32 off, tensor cores at tf32 and under
    bfloat16 autocast) against eager and torch.compile at the same precision, each with its own goal."""
    found = nca.contestants(torch.device("cuda"))
    for suffix, precision in (("-tf32", "tf32"), ("-bf16", "bfloat16")):
        for name in ("kernel", "eager", "compiled"):
            assert found[name + suffix].precision == precision
    assert all(getattr(found[n], "precision", "ieee") == "ieee"
               for n in ("kernel", "eager", "compiled", "compiled-ro", "checkpointed"))
    assert not any(n.endswith(("-tf32", "-bf16")) for n in nca.contestants(torch.device("cpu")))

    def row(contestant, seconds):
        return {"size": "nca", "contestant": contestant, "status": "ok", "family": "nca", "peak_bytes": 1,
                "forward_backward": {"median_s": seconds}, "executed_flops_per_s": 1.0}
    rows = [row("kernel", 4.0), row("eager", 8.0), row("compiled", 6.0), row("checkpointed", 9.0),
            row("compiled-ro", 12.0), row("kernel-tf32", 1.0), row("eager-tf32", 5.0), row("compiled-tf32", 7.0),
            row("kernel-bf16", 0.5), row("eager-bf16", 3.0), row("compiled-bf16", 2.0)]
    goals = {g["target"]: g for g in run.targets(rows, torch.device("cuda"), {"matmul_flops_per_s": 1.0})}
    assert goals["nca (ieee): >= 5x the fastest pure PyTorch at ieee"]["measured"] == 6.0 / 4.0
    assert goals["nca (tf32): >= 5x the fastest pure PyTorch at tf32"]["measured"] == 5.0
    assert goals["nca (tf32): >= 5x the fastest pure PyTorch at tf32"]["met"]
    assert goals["nca (bfloat16): >= 5x the fastest pure PyTorch at bfloat16"]["measured"] == 4.0


def test_float32_precision_sets_the_switches_for_its_block_and_puts_them_back():
    """``float32_precision``: the new fp32_precision switches of cuBLAS and cuDNN (cuDNN's default is TF32, so
    the full-precision rows set it off), put back afterwards, even after an error; on the CPU only "ieee"."""
    from benchmarks.harness import float32_precision

    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    kept = matmul.fp32_precision, conv.fp32_precision
    for name, want in (("ieee", "ieee"), ("tf32", "tf32"), ("bfloat16", "ieee")):
        with float32_precision(name, "cuda"):
            assert (matmul.fp32_precision, conv.fp32_precision) == (want, want)
        assert (matmul.fp32_precision, conv.fp32_precision) == kept
    with pytest.raises(RuntimeError, match="inside"):
        with float32_precision("tf32", "cuda"):
            raise RuntimeError("inside")
    assert (matmul.fp32_precision, conv.fp32_precision) == kept
    with float32_precision("ieee", "cpu"):
        pass
    with pytest.raises(ValueError, match="GPU only"):
        with float32_precision("tf32", "cpu"):
            pass
    with pytest.raises(ValueError, match="precision must be one of"):
        with float32_precision("fp8", "cuda"):
            pass


def test_a_contestant_that_fails_while_timed_is_a_row_not_the_end_of_the_run():
    """A reduced-precision row on a GPU is checked at full precision, then timed at its own: a failure there is
    its row's status, and the run goes on to write the others."""
    calls = []

    def flaky(*args, **kwargs):
        calls.append(torch.is_grad_enabled())
        if len(calls) > 1:  # after the check
            raise RuntimeError("no kernel for this precision")
        return eager(*args, **kwargs)

    row = measure("flaky", flaky, TINY, "cpu", repeats=1)
    assert row["status"] == "error at ieee: RuntimeError: no kernel for this precision"
    assert row["precision"] == "ieee" and "forward_backward" not in row


def test_a_kernel_row_records_the_precision_the_kernel_took_and_refuses_another(monkeypatch):
    """A GPU row timed at tf32 whose kernel would run its FMA path (a switch not taken) is reported, not timed."""
    from contextlib import nullcontext

    from benchmarks import harness

    size = nca.NcaSize("tiny-nca", 1, 4, 4, 4, T=2, H=8, H2=8, S=5)
    row = measure("kernel", nca.kernel, size, "cpu", repeats=1)
    assert row["status"] == "ok" and row["kernel_precision"] == "ieee"
    monkeypatch.setattr(harness, "float32_precision", lambda name, device: nullcontext())  # the switch not set
    row = measure("kernel-tf32", nca.AtPrecision(nca.kernel, "tf32"), size, "cpu", repeats=1)
    assert row["status"] == "wrong precision: the kernel runs ieee, the row is tf32" and "forward" not in row
