"""What the commands share: a user's mistake is one error line with status 2, a bug keeps its traceback, and
the console output goes through logging (per-epoch lines left out with --quiet, kept in the log file)."""

import logging
import subprocess
import sys

import pytest

from cubecore.cli import USAGE_ERROR, log_to_file, run_command, setup_logging
from cubecore.errors import CubecoreError, InvalidValueError, UnknownKeyError
from cubecore.training.checkpoint import CheckpointError
from cubecore.training.rundir import RunDirectoryError


@pytest.mark.parametrize("error", [InvalidValueError("bad value"), UnknownKeyError("bad key"),
                                   CheckpointError("bad file"), RunDirectoryError("busy"), FileNotFoundError("gone")])
def test_a_users_mistake_is_one_error_line(error, capsys):
    def body():
        raise error

    assert run_command(body) == USAGE_ERROR
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("bug", [KeyError("internal"), TypeError("internal"), RuntimeError("internal"),
                                 ZeroDivisionError("internal")])
def test_a_bug_keeps_its_traceback(bug):
    def body():
        raise bug

    with pytest.raises(type(bug)):
        run_command(body)


def test_every_package_error_has_the_one_base():
    for error in (InvalidValueError, UnknownKeyError, CheckpointError, RunDirectoryError):
        assert issubclass(error, CubecoreError)
    assert issubclass(InvalidValueError, ValueError) and issubclass(UnknownKeyError, KeyError)


def test_quiet_leaves_out_epoch_lines_on_the_console_but_not_in_the_log(tmp_path, capsys):
    setup_logging(quiet=True)
    with log_to_file(tmp_path / "train.log", first="plan"):
        logging.getLogger("cubecore").info("a run line")
        logging.getLogger("cubecore.epochs").info("epoch 1/2: loss 0.5")
    out = capsys.readouterr().out
    assert "a run line" in out and "epoch 1/2" not in out
    log = (tmp_path / "train.log").read_text()
    assert log.splitlines()[0].endswith("plan") and "a run line" in log and "epoch 1/2" in log
    setup_logging()
    logging.getLogger("cubecore.epochs").info("epoch 2/2: loss 0.4")
    assert "epoch 2/2" in capsys.readouterr().out


@pytest.mark.parametrize("command,argv", [
    ("cubecore", ["--batch-size", "0"]), ("cubecore", ["--batch-size", "-1"]), ("cubecore", ["--repeats", "0"]),
    ("cubecore", ["--device", "cuda:99"]), ("cubecore", ["--device", "bogus"]),
    ("benchmarks.learning", ["--seeds", "42,a"]), ("benchmarks.learning", ["--seeds", ""]),
    ("benchmarks.learning", ["--seeds", "1,1"]), ("benchmarks.learning", ["--variants", "bogus"]),
    ("benchmarks", ["--sizes", "bogus"]), ("benchmarks", ["--sizes", ""]), ("benchmarks", ["--sizes", "none"]),
    ("benchmarks", ["--repeats", "0"]), ("benchmarks", ["--min-time", "-1"]), ("benchmarks", ["--contestants", ""]),
    ("benchmarks", ["--device", "cuda:99"]), ("benchmarks", ["--quick", "--sizes", "64^3"]),
])
def test_a_bad_option_of_any_command_is_one_error_line_and_writes_nothing(command, argv, tmp_path, capsys):
    """These raised tracebacks (torch's device errors), printed `inf ms`, or ran nothing and overwrote the
    published benchmark tables with empty ones."""
    import importlib

    module = importlib.import_module({"cubecore": "cubecore.__main__", "benchmarks": "benchmarks.run"}.get(command,
                                                                                                         command))
    out = tmp_path / "results"
    out.mkdir()
    (out / "cpu.md").write_text("published")
    extra = [] if command == "cubecore" else ["--out", str(out)]
    with pytest.raises(SystemExit) as exc:
        module.main(argv + extra)
    err = capsys.readouterr().err
    assert exc.value.code == USAGE_ERROR and err.startswith("error: ") and err.count("\n") == 1, err
    assert sorted(p.name for p in out.iterdir()) == ["cpu.md"] and (out / "cpu.md").read_text() == "published"


def test_sigterm_stops_a_command_as_ctrl_c_does():
    """SIGTERM killed a command without its cleanup; it is a KeyboardInterrupt now (status 130, "interrupted"),
    a second one while the command stops lets the cleanup finish, and the handlers are put back afterwards."""
    code = """
import os, signal, time
from cubecore.cli import run_command
def body():
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)
    finally:
        os.kill(os.getpid(), signal.SIGTERM)  # a scheduler's second SIGTERM
        print("cleaned up")
status = run_command(body)
print("status", status, signal.getsignal(signal.SIGTERM) == signal.SIG_DFL)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:2] == ["cleaned up", "status 130 True"] and "interrupted" in result.stderr
