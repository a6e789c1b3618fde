"""The byte mover: how a decode engine reads leased KV blocks from a prefill engine.

One interface, several transports, picked by the address's scheme:
    inproc://ID       a direct call into a source in this process (tests, colocated engines)
    tcp://HOST:PORT   msgpack-framed requests, raw bytes back (`tcp.py`)
    shm://HOST:PORT   the same requests over TCP, the bytes through a shared-memory file
                      (both processes on one host)
    dist://HOST:PORT  the same requests over TCP, the bytes by torch.distributed send/recv
                      on a two-rank gloo group of their own (`dist.py`)
The prefill side serves a `KVSource` (its leases and its cache) with `serve`; the decode
side `connect`s to the address in the transfer params. Every failure on the way is a
`TransferError` whose reason the decode side reports; nothing here retries.
"""

from __future__ import annotations

import itertools
import weakref
import zlib
from abc import ABC, abstractmethod
from typing import Protocol

from fleetlm.kvtransfer.leases import TransferError

Range = tuple[int, int]  # [start, end) of a rank's layers or KV heads (local indices)


class KVSource(Protocol):
    """What a server serves: a prefill rank's leased blocks (see `pd_connector.LeasedKV`).
    `layers` and `heads` narrow a read to part of what the rank holds (None: all); the
    bytes go into the start of `out` when it is large enough (a buffer: the result)."""

    def read(self, transfer_id: str, first_block: int, num_blocks: int,
             layers: Range | None = None, heads: Range | None = None, out=None): ...

    def release(self, transfer_id: str, reader: int = 0, num_readers: int = 1) -> None: ...


class KVServer(ABC):
    address: str

    @abstractmethod
    def close(self) -> None: ...


class KVClient(ABC):
    """One decode-side connection to one prefill engine's server."""

    @abstractmethod
    def read(self, transfer_id: str, first_block: int, num_blocks: int, num_bytes: int,
             timeout: float, layers: Range | None = None, heads: Range | None = None):
        """`num_blocks` blocks from `first_block` of the transfer, over `layers` and `heads`
        of the source rank (None: all): exactly `num_bytes` bytes, checked, or
        TransferError. The buffer may be the client's own (reused): valid until the next
        call on this client."""

    @abstractmethod
    def release(self, transfer_id: str, timeout: float, reader: int = 0,
                num_readers: int = 1) -> None:
        """Reader `reader` of `num_readers` has read everything: once all have, the prefill
        rank may free the blocks."""

    def close(self) -> None:
        pass


def serve(transport: str, source: KVSource, host: str, port: int) -> KVServer:
    if transport == "inproc":
        return InProcessServer(source)
    from fleetlm.kvtransfer.tcp import TCPServer

    return TCPServer(source, host, port, scheme=transport)


def connect(address: str, timeout: float) -> KVClient:
    scheme, _, rest = address.partition("://")
    if scheme == "inproc":
        return InProcessClient(rest)
    if scheme in ("tcp", "shm", "dist"):
        from fleetlm.kvtransfer.tcp import TCPClient

        host, _, port = rest.rpartition(":")
        if not port.isdigit():
            raise TransferError("bad_request", f"address {address!r} has no port")
        return TCPClient(host, int(port), timeout, scheme=scheme)
    raise TransferError("bad_request", f"unknown transport in address {address!r}")


def checksum(data: bytes | bytearray | memoryview) -> int:
    return zlib.crc32(data)


# The in-process transport's address book: the only way an address found in a message can
# name an object. Entries go when their server is closed or collected.
_IN_PROCESS: weakref.WeakValueDictionary[str, InProcessServer] = weakref.WeakValueDictionary()
_IN_PROCESS_IDS = itertools.count()


class InProcessServer(KVServer):
    def __init__(self, source: KVSource) -> None:
        self.source = source
        name = str(next(_IN_PROCESS_IDS))
        self.address = f"inproc://{name}"
        _IN_PROCESS[name] = self

    def close(self) -> None:
        _IN_PROCESS.pop(self.address.removeprefix("inproc://"), None)


class InProcessClient(KVClient):
    """Copies straight out of the source: the bytes are still checked like any transport's."""

    def __init__(self, name: str) -> None:
        self.name = name

    def _source(self) -> KVSource:
        server = _IN_PROCESS.get(self.name)
        if server is None:
            raise TransferError("unreachable", f"no KV server inproc://{self.name}")
        return server.source

    def read(self, transfer_id: str, first_block: int, num_blocks: int, num_bytes: int,
             timeout: float, layers: Range | None = None, heads: Range | None = None):
        data = self._source().read(transfer_id, first_block, num_blocks, layers, heads)
        if len(data) != num_bytes:
            raise TransferError("corrupt", f"{len(data)} bytes, expected {num_bytes}")
        return data  # a fresh copy of the blocks, gathered under the lease

    def release(self, transfer_id: str, timeout: float, reader: int = 0,
                num_readers: int = 1) -> None:
        self._source().release(transfer_id, reader, num_readers)
