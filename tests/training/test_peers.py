"""How the ranks of a distributed run wait for each other (cubecore.training.peers), as two processes on gloo."""

import os
import socket
import subprocess
import sys
import time

# Two ranks of a process group whose collectives time out after TIMEOUT seconds; rank 0 takes longer than that
# before it meets the others (preparing data) and again before the end (writing its report).
DRIVER = """
import datetime, os, sys, time
import torch.distributed as dist
from cubecore.cli import run_command
from cubecore.training.peers import barrier, in_process_group
init = dist.init_process_group
dist.init_process_group = lambda backend: init(backend, timeout=datetime.timedelta(seconds=float(os.environ["TIMEOUT"])))
def body():
    slow = dist.get_rank() == 0
    if slow:
        time.sleep(float(os.environ["WORK"]))
    barrier()
    if slow:
        time.sleep(float(os.environ["WORK"]))
    print("rank", dist.get_rank(), "done", flush=True)
    return 0
sys.exit(run_command(lambda: in_process_group(body)))
"""


def test_the_other_ranks_wait_for_a_slow_rank_zero_past_the_process_groups_timeout(tmp_path):
    """The other ranks waited for rank 0 in a gloo barrier, which gives up after the process group's timeout (30
    minutes by default): the waiting rank then posted a stop, and the watcher stopped the healthy rank 0 that was
    still preparing data or writing its report.  They wait for it as long as it works now."""
    driver = tmp_path / "ranks.py"
    driver.write_text(DRIVER)
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "WORLD_SIZE": "2", "TIMEOUT": "2", "WORK": "5"}
    start = time.monotonic()
    ranks = [subprocess.Popen([sys.executable, str(driver)], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    try:
        said = [rank.communicate(timeout=120) for rank in ranks]
    finally:
        for rank in ranks:
            rank.kill()
    for r in (0, 1):
        assert ranks[r].returncode == 0, said[r][1][-3000:]
        assert f"rank {r} done" in said[r][0]
    assert time.monotonic() - start >= 10, "rank 0 worked its 2 x 5 seconds"
