"""The scripts in examples/ run as a user would run them, and reach what they print."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_example(name, *args):
    result = subprocess.run([sys.executable, str(ROOT / "examples" / name), *args], cwd=ROOT, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_grow_nca_grows_the_ball_and_times_the_kernel():
    out = run_example("grow_nca.py")
    reached = float(re.search(r"IoU with the ball ([0-9.]+)", out).group(1))
    assert reached > 0.5, out  # 0.81 with the defaults on the project's CPU machine
    assert re.search(r"fused kernel [0-9.]+ ms, reference [0-9.]+ ms", out), out
