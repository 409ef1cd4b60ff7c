"""How the processes of a distributed run stop together: a process that stops (an error anywhere, Ctrl-C,
SIGTERM) stops every other one at once, with its reason.

Without this, the other processes would wait for it at their next collective (a barrier, a gradient's
all-reduce) until the backend's timeout, 30 minutes with gloo, or fail there with the backend's traceback
instead of its reason.  Each process posts why it stopped in the process group's store and waits (a few
seconds at most) until every other process has read it; a thread in every process watches the store and stops
its main thread with the first reason posted (``cubecore.cli.stop_main``): ``error: rank R stopped: REASON``,
or an interruption where that process was interrupted.  A process blocked in a collective stops as soon as
the stopped process has gone, which the backend sees at once.
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Callable, Optional

import torch
import torch.distributed as dist

from ..cli import INTERRUPTED, USER_ERRORS, stop_main, stopping_now
from ..errors import PeerStoppedError

STOPPED = "cubecore/stopped/"  # + rank: why that process stopped, [interrupted, reason] as JSON
POSTS = "cubecore/stops"  # how many processes have posted
READ = "cubecore/read/"  # + rank: how many other processes have read its post
MET = "cubecore/met/"  # + meeting number: how many processes have come to that meeting


def reason_of(exc: BaseException) -> str:
    """What a stop says: a user's mistake as its ``error:`` line says it, anything else with its type."""
    return str(exc) if isinstance(exc, USER_ERRORS) else f"{type(exc).__name__}: {exc}"


class PeerWatch:
    """One process's link to the others' stops through ``store`` (the process group's), for as long as it runs
    its part of the run; ``end`` when that part ends, ``close`` last."""

    def __init__(self, store, rank: int, world_size: int, poll: float = 0.1, wait: float = 5.0) -> None:
        self.store, self.rank, self.world_size, self.poll, self.wait = store, rank, world_size, poll, wait
        self.peer: Optional[BaseException] = None  # the first other process's stop, as this one raises it
        self._ended = False
        self._seen = set()
        self._meetings = 0
        self._lock = threading.Lock()  # one store request at a time from this process
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="cubecore-peers", daemon=True)
        self._thread.start()

    def _request(self, method: str, *args):
        with self._lock:
            return getattr(self.store, method)(*args)

    def _watch(self) -> None:
        try:
            while not self._done.wait(self.poll):
                if int(self._request("add", POSTS, 0)) > len(self._seen):
                    self._read_posts()
        except Exception:  # the store has gone with the process that held it: the collectives say the rest
            return

    def _read_posts(self) -> None:
        for rank in range(self.world_size):
            key = f"{STOPPED}{rank}"
            if rank == self.rank or rank in self._seen or not self._request("check", [key]):
                continue
            self._seen.add(rank)
            interrupted, reason = json.loads(self._request("get", key))
            self._request("add", f"{READ}{rank}", 1)
            if self.peer is None and not self._ended:
                self.peer = (KeyboardInterrupt() if interrupted
                             else PeerStoppedError(f"rank {rank} stopped: {reason}"))
                stop_main(self.peer)

    def meet(self) -> None:
        """Wait until every process has come to this meeting (its n-th), however long that takes: a process that
        stops instead posts why, and the watcher stops this one with it.  (A barrier of the backend would give up
        after the process group's timeout, gloo's 30 minutes, and stop a rank 0 that is merely slow: preparing
        the data, writing its report.)  A process killed outright is torchrun's to stop."""
        self._meetings += 1
        key = f"{MET}{self._meetings}"
        self._request("add", key, 1)
        while int(self._request("add", key, 0)) < self.world_size:
            time.sleep(self.poll)
        dist.barrier()  # all are here: over at once, and no process leaves (rank 0 with the store) before the rest

    def end(self, exc: Optional[BaseException] = None, status: int = 0) -> Optional[BaseException]:
        """This process's part ended, by ``exc`` or with exit ``status``: what it stops with (another process's
        stop where one came first, its cause), having told the others why where it stops by itself."""
        stopping_now()  # from here on, nothing stops this process's main thread but its own end
        self._ended = True
        if self.peer is not None:
            return self.peer
        if exc is None and status == 0:
            return None
        interrupted = isinstance(exc, KeyboardInterrupt) or (exc is None and status == INTERRUPTED)
        reason = "interrupted" if interrupted else reason_of(exc) if exc is not None else f"exit status {status}"
        try:
            self._request("set", f"{STOPPED}{self.rank}", json.dumps([interrupted, reason]))
            self._request("add", POSTS, 1)
            deadline = time.monotonic() + self.wait
            while (int(self._request("add", f"{READ}{self.rank}", 0)) < self.world_size - 1
                   and time.monotonic() < deadline):
                time.sleep(self.poll / 2)
        except Exception:  # the store has gone: the others see this process go at their next collective
            pass
        return exc

    def close(self) -> None:
        self._done.set()
        self._thread.join()


_current: Optional[PeerWatch] = None  # this process's, while in_process_group runs its body


def in_process_group(body: Callable[[], int]) -> int:
    """``body()`` in a process group when launched by torchrun (WORLD_SIZE > 1): gloo on CPU, nccl on CUDA.  A
    rank that stops (an error anywhere, Ctrl-C, SIGTERM) stops every other rank at once with its reason
    (``PeerWatch``); on success all ranks leave together, however long rank 0 takes to report (``barrier``)."""
    global _current
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return body()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    peers = _current = PeerWatch(dist.distributed_c10d._get_default_store(), dist.get_rank(), dist.get_world_size())
    try:
        try:
            status = body()
            if status == 0:
                peers.meet()  # every rank leaves together, or learns why one did not
        except BaseException as exc:
            cause = peers.end(exc)
            if cause is exc:
                raise
            raise cause from None  # another rank stopped first: this rank's end follows from it
        peers.end(status=status)  # (an interruption it has reported itself, as such)
        return status
    finally:
        _current = None
        peers.close()
        dist.destroy_process_group()


def rank() -> int:
    """This process's rank in the process group, 0 outside one."""
    return dist.get_rank() if dist.is_initialized() else 0


def barrier() -> None:
    """Wait for every process of the group (none outside one), without a timeout under ``in_process_group``
    (``PeerWatch.meet``): the others wait for rank 0 as long as it works, and stop with it if it stops."""
    if _current is not None:
        _current.meet()
    elif dist.is_initialized():
        dist.barrier()


def in_group() -> bool:
    """Whether this process is one of a process group of more than one (a distributed run)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def weights_digest(module: torch.nn.Module) -> str:
    """A hash of a module's weights: equal across the processes of a correct distributed run (same_weights)."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def same_weights(trainer) -> int:
    """After a distributed run: 0 if every process ends with the same weights (``trainer.weights_digest()``), else
    1 (having said so); 0 outside one."""
    import logging

    if not trainer.distributed:
        return 0
    log = logging.getLogger("cubecore")
    digests = [None] * trainer.world_size
    dist.all_gather_object(digests, trainer.weights_digest())  # every rank sees every digest
    same = len(set(digests)) == 1
    log.info(f"weights identical across {trainer.world_size} processes: {same}")
    if not same:
        log.error("error: distributed processes diverged")
        return 1
    return 0
