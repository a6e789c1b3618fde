"""The per-step control path between an engine (the driver) and its worker group.

Every worker dials the driver once over TCP (authenticated with a per-group token). That link
carries the workers' log records, their errors and, by its closing, their death, whatever
carries the steps. Three ways to carry the steps (`ParallelConfig.control_plane`):

    ray     one Ray actor call per worker per step; replies are the calls' results
    socket  each step is written to every worker's link; the reply rank writes back
    shm     each step is written once into a shared-memory ring; the links carry only a
            few-byte doorbell (workers on other nodes get the step over their link)

Frames on a link: 1-byte type, 4-byte length, payload. Payloads are msgpack (see wire.py).
"""

from __future__ import annotations

import collections
import logging
import mmap
import os
import queue
import secrets
import socket
import struct
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack

logger = logging.getLogger("fleetlm.control")
worker_logger = logging.getLogger("fleetlm.worker")

_HEADER = struct.Struct("!BI")
_DOORBELL = struct.Struct("!QI")  # sequence number, length
_COUNTER = struct.Struct("Q")

HELLO, STEP, STEP_SHM, OUTPUT, LOG, ERROR, STOP, NEWS = range(8)


class WorkerGroupError(RuntimeError):
    """The worker group cannot go on: a worker died, failed or stopped answering."""


@dataclass(frozen=True)
class LinkAddress:
    """Where workers dial the driver, and the token that proves they belong to the group."""

    host: str
    port: int
    token: str
    shm_path: str | None = None  # the step ring, for workers on the driver's node
    shm_num_readers: int = 0
    shm_slots: int = 0
    shm_slot_bytes: int = 0


def _send_frame(sock: socket.socket, lock: threading.Lock, kind: int, payload: bytes) -> None:
    with lock:
        sock.sendall(_HEADER.pack(kind, len(payload)) + payload)


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    chunks, remaining = [], n
    while remaining:
        chunk = sock.recv(remaining)
        if not chunk:
            return None
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def _recv_frame(sock: socket.socket) -> tuple[int, bytes] | None:
    header = _recv_exact(sock, _HEADER.size)
    if header is None:
        return None
    kind, length = _HEADER.unpack(header)
    payload = _recv_exact(sock, length) if length else b""
    return None if payload is None else (kind, payload)


# ---- the shared-memory step ring ----------------------------------------------------------

class ShmRing:
    """A ring of step slots in one /dev/shm file: one writer (the driver), several readers.

    Region map: [reader i's last read sequence number: 8 bytes each][slot 0]...[slot n-1].
    The writer reuses a slot only when every reader has read what it held; otherwise (or for a
    step larger than a slot) the step goes over the link instead, so nothing ever waits.
    """

    def __init__(self, path: str, num_readers: int, num_slots: int, slot_bytes: int,
                 create: bool) -> None:
        self.path, self.num_readers = path, num_readers
        self.num_slots, self.slot_bytes = num_slots, slot_bytes
        self.slots_offset = _COUNTER.size * num_readers
        size = self.slots_offset + num_slots * slot_bytes
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(path, flags, 0o600)
        try:
            if create:
                os.ftruncate(fd, size)
            self.buffer = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self.next_seq = 1

    def write(self, payload: bytes) -> int | None:
        """Put `payload` in the next slot; its sequence number, or None if it cannot go now."""
        seq = self.next_seq
        if len(payload) > self.slot_bytes or self._oldest_read() < seq - self.num_slots:
            return None
        offset = self.slots_offset + (seq % self.num_slots) * self.slot_bytes
        self.buffer[offset:offset + len(payload)] = payload
        self.next_seq += 1
        return seq

    def read(self, reader: int, seq: int, length: int) -> bytes:
        offset = self.slots_offset + (seq % self.num_slots) * self.slot_bytes
        payload = self.buffer[offset:offset + length]
        _COUNTER.pack_into(self.buffer, reader * _COUNTER.size, seq)
        return payload

    def _oldest_read(self) -> int:
        return min(_COUNTER.unpack_from(self.buffer, i * _COUNTER.size)[0]
                   for i in range(self.num_readers))

    def unlink(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def close(self) -> None:
        self.buffer.close()


# ---- driver side ---------------------------------------------------------------------------

class WorkerLinks:
    """The driver's end of every worker's link: accepts the workers, then one reader thread
    per worker files replies by rank, re-logs log records with the rank, calls `on_news`
    for a news frame (a KV transfer ended on that rank), and turns an error frame or a
    closed link into a group failure (`on_failure` is called once)."""

    def __init__(self, host: str, num_workers: int,
                 on_failure: Callable[[BaseException], None]) -> None:
        self.num_workers = num_workers
        self.on_failure = on_failure
        self.on_news: Callable[[], None] = lambda: None
        self.token = secrets.token_hex(16)
        self.listener = socket.create_server((host, 0))
        self.host, self.port = host, self.listener.getsockname()[1]
        self.socks: list[socket.socket | None] = [None] * num_workers
        self.locks = [threading.Lock() for _ in range(num_workers)]
        self.replies: list[queue.SimpleQueue] = [queue.SimpleQueue() for _ in range(num_workers)]
        self.error: BaseException | None = None
        self._failure_lock = threading.Lock()
        self._is_closing = False

    def address(self, ring: ShmRing | None = None) -> LinkAddress:
        if ring is None:
            return LinkAddress(self.host, self.port, self.token)
        return LinkAddress(self.host, self.port, self.token, ring.path, ring.num_readers,
                           ring.num_slots, ring.slot_bytes)

    def accept_all(self, timeout_s: float) -> None:
        """Wait until every worker has dialled in; then start the reader threads."""
        self.listener.settimeout(timeout_s)
        num_connected = 0
        while num_connected < self.num_workers:
            try:
                sock, _ = self.listener.accept()
            except TimeoutError:
                raise WorkerGroupError(
                    f"only {num_connected} of {self.num_workers} workers connected to "
                    f"{self.host}:{self.port} within {timeout_s:.0f} s") from None
            sock.settimeout(timeout_s)
            frame = _recv_frame(sock)
            rank = self._check_hello(frame)
            if rank is None:
                sock.close()  # not one of ours
                continue
            sock.settimeout(None)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.socks[rank] = sock
            num_connected += 1
        self.listener.close()
        for rank in range(self.num_workers):
            threading.Thread(target=self._read, args=(rank,), daemon=True,
                             name=f"fleetlm-link-{rank}").start()

    def _check_hello(self, frame) -> int | None:
        if frame is None or frame[0] != HELLO:
            return None
        token, rank = msgpack.unpackb(frame[1])
        is_valid = (secrets.compare_digest(str(token), self.token)
                    and isinstance(rank, int) and 0 <= rank < self.num_workers
                    and self.socks[rank] is None)
        return rank if is_valid else None

    def send(self, rank: int, kind: int, payload: bytes) -> None:
        try:
            _send_frame(self.socks[rank], self.locks[rank], kind, payload)
        except OSError as e:
            self.fail(WorkerGroupError(f"worker {rank}'s link broke: {e}"))
            raise self.error from None

    def reply(self, rank: int, timeout_s: float) -> bytes:
        try:
            item = self.replies[rank].get(timeout=timeout_s)
        except queue.Empty:
            self.fail(WorkerGroupError(f"worker {rank} sent no result within {timeout_s:.0f} s"))
            raise self.error from None
        if isinstance(item, BaseException):
            raise item
        return item

    def _read(self, rank: int) -> None:
        sock = self.socks[rank]
        while True:
            try:
                frame = _recv_frame(sock)
            except OSError:
                frame = None
            if frame is None:
                if not self._is_closing:
                    self.fail(WorkerGroupError(f"worker {rank} died (its link closed)"))
                return
            kind, payload = frame
            if kind == OUTPUT:
                self.replies[rank].put(payload)
            elif kind == NEWS:
                self.on_news()
            elif kind == LOG:
                level, name, message = msgpack.unpackb(payload)
                worker_logger.log(level, "[rank %d] %s: %s", rank, name, message)
            elif kind == ERROR:
                (text,) = msgpack.unpackb(payload)
                self.fail(WorkerGroupError(f"worker {rank} failed:\n{text}"))

    def fail(self, error: BaseException) -> None:
        """Record the group's first failure, wake every waiter with it, tell `on_failure`."""
        with self._failure_lock:
            if self.error is not None or self._is_closing:
                return
            self.error = error
        logger.error("worker group failed: %s", error)
        for replies in self.replies:
            replies.put(error)
        self.on_failure(error)

    def close(self) -> None:
        self._is_closing = True
        for rank, sock in enumerate(self.socks):
            if sock is None:
                continue
            try:
                _send_frame(sock, self.locks[rank], STOP, b"")
            except OSError:
                pass
            sock.close()
        self.listener.close()


class ControlPlane(ABC):
    """Carries steps to the workers. `submit` sends one encoded step to every rank; `result`
    returns the replies (one per reply rank) of the oldest step not yet collected."""

    @abstractmethod
    def submit(self, message: bytes) -> None: ...

    @abstractmethod
    def result(self) -> list[bytes]: ...


class LinkControlPlane(ControlPlane):
    """`socket` and `shm`: steps go over the links, or once into the ring with a doorbell on
    the link of each worker that maps it."""

    def __init__(self, links: WorkerLinks, reply_ranks: Sequence[int], timeout_s: float,
                 ring: ShmRing | None = None, ring_ranks: Sequence[int] = ()) -> None:
        self.links, self.reply_ranks, self.timeout_s = links, list(reply_ranks), timeout_s
        self.ring, self.ring_ranks = ring, set(ring_ranks)

    def submit(self, message: bytes) -> None:
        if self.links.error is not None:
            raise self.links.error
        seq = self.ring.write(message) if self.ring is not None else None
        doorbell = None if seq is None else _DOORBELL.pack(seq, len(message))
        for rank in range(self.links.num_workers):
            if doorbell is not None and rank in self.ring_ranks:
                self.links.send(rank, STEP_SHM, doorbell)
            else:
                self.links.send(rank, STEP, message)

    def result(self) -> list[bytes]:
        return [self.links.reply(rank, self.timeout_s) for rank in self.reply_ranks]


class RayCallControlPlane(ControlPlane):
    """`ray`: one actor call per worker per step; the links only report logs and deaths."""

    _POLL_S = 0.5  # how often a wait for results looks at the links for a death

    def __init__(self, workers: Sequence[Any], links: WorkerLinks, reply_ranks: Sequence[int],
                 timeout_s: float) -> None:
        self.workers, self.links = list(workers), links
        self.reply_ranks, self.timeout_s = list(reply_ranks), timeout_s
        self.pending: collections.deque[list[Any]] = collections.deque()

    def submit(self, message: bytes) -> None:
        if self.links.error is not None:
            raise self.links.error
        refs = [worker.execute_step.remote(message) for worker in self.workers]
        self.pending.append([refs[rank] for rank in self.reply_ranks])

    def result(self) -> list[bytes]:
        import ray

        refs = self.pending.popleft()
        waited = 0.0
        while True:
            done, _ = ray.wait(refs, num_returns=len(refs), timeout=self._POLL_S)
            if len(done) == len(refs):
                break
            waited += self._POLL_S
            if self.links.error is not None:
                raise self.links.error
            if waited >= self.timeout_s:
                self.links.fail(WorkerGroupError(f"no step result within {self.timeout_s:.0f} s"))
                raise self.links.error
        try:
            return ray.get(refs)
        except Exception as e:  # noqa: BLE001 - the group is lost either way
            self.links.fail(WorkerGroupError(f"a worker's step failed: {e}"))
            raise self.links.error from e


# ---- worker side ---------------------------------------------------------------------------

class WorkerEndpoint:
    """A worker's end of its link: steps in (inline or from the ring), results, log records
    and errors out."""

    def __init__(self, address: LinkAddress, rank: int, reader_index: int | None = None) -> None:
        """`reader_index`: this worker's place among the ring's readers (None: no ring)."""
        self.rank = rank
        self.ring = None
        if reader_index is not None and address.shm_path is not None:
            self.ring = ShmRing(address.shm_path, address.shm_num_readers, address.shm_slots,
                                address.shm_slot_bytes, create=False)
        self.reader_index = reader_index
        self.sock = socket.create_connection((address.host, address.port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.lock = threading.Lock()
        self.send(HELLO, msgpack.packb([address.token, rank]))

    def send(self, kind: int, payload: bytes) -> None:
        _send_frame(self.sock, self.lock, kind, payload)

    def recv_step(self) -> bytes | None:
        """The next step's message; None when the driver stops the group or goes away."""
        frame = _recv_frame(self.sock)
        if frame is None or frame[0] == STOP:
            return None
        kind, payload = frame
        if kind == STEP_SHM:
            seq, length = _DOORBELL.unpack(payload)
            return self.ring.read(self.reader_index, seq, length)
        return payload

    def close(self) -> None:
        self.sock.close()
        if self.ring is not None:
            self.ring.close()

