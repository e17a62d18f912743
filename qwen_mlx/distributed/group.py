"""The process group of a distributed run: who is who, the collectives we use, and
errors that name a rank and its host.

`mlx.launch` starts one process per rank and `mx.distributed.init` joins them (ring,
MPI or JACCL); nothing here is a transport of its own. Every rank learns every other
rank's host name and pid once, at `init`, so that a lost connection can be reported as
"rank 1 (host b, pid 4242) died" instead of the backend's "connection to a peer was lost".
The collectives go through `Comm`, which also counts the bytes each rank puts on the
link, for the cost figures in benchmarks/distributed_speed.py.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import threading
from dataclasses import dataclass, field
from typing import Iterator

import mlx.core as mx

from ..errors import QwenMLXError

HOST_BYTES = 64
BACKENDS = ("any", "ring", "mpi", "jaccl", "nccl")


class RankError(QwenMLXError):
    """A failure on one rank, or of a peer as one rank saw it; the message names both."""


@dataclass
class Traffic:
    """Bytes this rank handed to collectives, as payload and as sent on its links
    (a ring all-reduce of S bytes over N ranks sends 2(N-1)/N·S per rank)."""

    payload: int = 0
    sent: int = 0
    calls: int = 0
    hops: int = 0  # sequential link crossings a forward waits for (latency count)

    def add(self, payload: int, sent: float, hops: int) -> None:
        self.payload += payload
        self.sent += int(sent)
        self.calls += 1
        self.hops += hops


@dataclass
class Comm:
    """One rank's view of the group: its rank, size, every rank's host and pid."""

    group: "mx.distributed.Group"
    rank: int
    size: int
    hosts: list[str]
    pids: list[int]
    traffic: Traffic = field(default_factory=Traffic)
    broken: bool = False  # a peer was lost: no collective can complete any more
    # The ring, MPI and JACCL collectives run on the CPU (Metal has no kernels for them;
    # with MLX_METAL_FAST_SYNCH=1 the crossing is cheap); NCCL's run on the GPU.
    stream: "mx.Stream | mx.Device | None" = mx.cpu

    @property
    def lead(self) -> bool:
        """Rank 0 owns the terminal, the UI or the HTTP server."""
        return self.rank == 0

    def name(self, rank: int | None = None) -> str:
        """'rank R (host)' for `rank`, this one by default."""
        r = self.rank if rank is None else rank
        return f"rank {r} ({self.hosts[r]})"

    # -- collectives (all counted) --------------------------------------------------
    def all_sum(self, x: mx.array) -> mx.array:
        if self.size == 1:
            return x
        self.traffic.add(x.nbytes, 2 * (self.size - 1) / self.size * x.nbytes,
                         2 * (self.size - 1))
        return mx.distributed.all_sum(x, group=self.group, stream=self.stream)

    def all_gather(self, x: mx.array) -> mx.array:
        """Concatenates every rank's `x` along axis 0."""
        if self.size == 1:
            return x
        self.traffic.add(x.nbytes, (self.size - 1) * x.nbytes, self.size - 1)
        return mx.distributed.all_gather(x, group=self.group, stream=self.stream)

    def gather_last(self, x: mx.array) -> mx.array:
        """Every rank's `x` [..., n] joined on the last axis, rank order: [..., N·n]."""
        if self.size == 1:
            return x
        lead, n = x.shape[:-1], x.shape[-1]
        parts = self.all_gather(x.reshape(1, -1, n))  # [N, rows, n]
        return parts.transpose(1, 0, 2).reshape(*lead, self.size * n)

    def broadcast(self, x: mx.array) -> mx.array:
        """Rank 0's `x` on every rank (the others pass an array of the same shape)."""
        if self.size == 1:
            return x
        return self.all_sum(x if self.lead else mx.zeros_like(x))

    def send(self, x: mx.array, dst: int) -> mx.array:
        self.traffic.add(x.nbytes, x.nbytes, 1)
        return mx.distributed.send(x, dst, group=self.group, stream=self.stream)

    def recv(self, shape: tuple[int, ...], dtype: mx.Dtype, src: int) -> mx.array:
        return mx.distributed.recv(shape, dtype, src, group=self.group, stream=self.stream)

    # -- errors ---------------------------------------------------------------------
    def dead_ranks(self) -> list[int]:
        """Ranks on this host whose process is gone (or a zombie): those we can see."""
        here = self.hosts[self.rank]
        return [r for r in range(self.size)
                if r != self.rank and self.hosts[r] == here and not _alive(self.pids[r])]

    def lost(self, error: Exception) -> RankError:
        """The backend's lost-connection error, told as which rank died."""
        self.broken = True
        dead = self.dead_ranks()
        if dead:
            who = ", ".join(f"{self.name(r)}, pid {self.pids[r]}," for r in dead)
            return RankError(f"{self.name()}: {who} died mid-run, so the model cannot go on; "
                             "every rank stops. See that rank's output for its error "
                             f"(backend: {error})")
        left, right = (self.rank - 1) % self.size, (self.rank + 1) % self.size
        peers = sorted({left, right} - {self.rank})
        who = " or ".join(self.name(r) for r in peers)
        return RankError(f"{self.name()}: lost the connection to {who} (backend: {error}); "
                         "that rank died or its host is unreachable, so every rank stops")

    @contextlib.contextmanager
    def named(self) -> Iterator[None]:
        """Errors inside name this rank; a lost peer becomes a `RankError` naming it."""
        try:
            yield
        except RankError:
            raise
        except QwenMLXError as e:
            raise type(e)(f"{self.name()}: {e}") from None
        except RuntimeError as e:
            if self.size > 1 and _is_link_error(e):
                raise self.lost(e) from None
            raise


def _is_link_error(e: Exception) -> bool:
    text = str(e).lower()
    return any(s in text for s in ("peer", "connection", "socket", "[ring]", "[mpi]",
                                   "[jaccl]", "recv", "send"))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed child that its launcher has not reaped yet
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


_COMM: Comm | None = None


def init(backend: str = "any") -> Comm:
    """Join the group `mlx.launch` started (a group of one without it); once per process.

    Raises a `QwenMLXError` for an unknown backend or one that cannot start."""
    global _COMM
    if _COMM is not None:
        return _COMM
    if backend not in BACKENDS:
        raise QwenMLXError(f"distributed backend '{backend}' is not one of: "
                           f"{', '.join(BACKENDS)}")
    launched = any(k in os.environ for k in ("MLX_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK"))
    try:
        group = mx.distributed.init(strict=launched and backend != "any", backend=backend)
    except RuntimeError as e:
        rank = os.environ.get("MLX_RANK", "?")
        raise QwenMLXError(f"rank {rank} ({socket.gethostname()}): the '{backend}' distributed "
                           f"backend did not start ({e}); start every rank with mlx.launch "
                           "(see `mlx.launch --help`), with the same --backend") from None
    rank, size = group.rank(), group.size()
    hosts, pids = [socket.gethostname()], [os.getpid()]
    if size > 1:
        mine = socket.gethostname().encode()[:HOST_BYTES].ljust(HOST_BYTES, b"\0")
        row = mx.array(list(mine) + list(os.getpid().to_bytes(4, "little")), dtype=mx.uint8)
        try:
            table = mx.distributed.all_gather(row[None], group=group).tolist()
        except RuntimeError as e:
            raise RankError(f"rank {rank} ({socket.gethostname()}): could not reach the other "
                            f"ranks ({e})") from None
        hosts = [bytes(r[:HOST_BYTES]).rstrip(b"\0").decode(errors="replace") for r in table]
        pids = [int.from_bytes(bytes(r[HOST_BYTES:]), "little") for r in table]
    _COMM = Comm(group, rank, size, hosts, pids,
                 stream=None if backend == "nccl" else mx.cpu)
    if size > 1:
        _report_termination(_COMM)
    return _COMM


def _report_termination(comm: Comm) -> None:
    """When the launcher stops this rank (it does once any rank ends badly), say which
    rank died before exiting, even while the main thread waits inside a collective."""
    def stop(*_) -> None:
        dead = comm.dead_ranks()
        why = (", ".join(f"{comm.name(r)}, pid {comm.pids[r]}," for r in dead) + " died"
               if dead else "another rank ended (the launcher's warning names it)")
        sys.stderr.write(f"qwen-mlx: error: {comm.name()}: stopping, since {why}\n")
        sys.stderr.flush()
        os._exit(128 + signal.SIGTERM)

    if threading.current_thread() is not threading.main_thread():
        return
    # The Python handler runs when the main thread next runs Python; the wakeup fd lets a
    # thread act at once while the main thread waits in MLX (which releases the GIL).
    signal.signal(signal.SIGTERM, stop)
    read, write = os.pipe()
    os.set_blocking(write, False)
    signal.set_wakeup_fd(write)

    def watch() -> None:
        while True:
            if signal.SIGTERM in os.read(read, 64):
                stop()

    threading.Thread(target=watch, name="qwen-mlx-sigterm", daemon=True).start()
