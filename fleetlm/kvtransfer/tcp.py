"""KV blocks over TCP, or over a shared-memory file or torch.distributed (`dist.py`) with
TCP for the requests.

Every message is a frame: a 4-byte big-endian header length, a msgpack map (never
pickle), then `nbytes` raw bytes. Requests: {"op": "read", "transfer_id", "first_block",
"num_blocks", "layers", "heads"} (the last two [start, end) of the rank's, or nil: all)
and {"op": "release", "transfer_id", "reader", "num_readers"}; with shared memory first {"op":
"attach", "nbytes"}, answered with the path of a file in /dev/shm that the server writes
each read's bytes into (gathered straight into it: the bytes never cross a socket, and
carry no CRC: nothing on the way can change them, the reader reads them only after the
answer, which a writer that dies mid-write never sends); with torch.distributed
first {"op": "dist", "timeout_s"}, answered with a store's port (`dist.py`). Answers: {"ok": true,
"nbytes", "crc32"} then the bytes, or {"ok": false, "error": reason, "message"}. The
client checks the length and the CRC of everything that crossed a socket: a truncated or
corrupted answer is a TransferError, never bytes in the cache. A client receives into one
buffer of its own, reused by each read.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import socket
import socketserver
import struct
import tempfile
import threading
from typing import Any

import msgpack

from fleetlm.kvtransfer.leases import TransferError
from fleetlm.kvtransfer.transport import KVClient, KVServer, KVSource, checksum

logger = logging.getLogger("fleetlm.kvtransfer")

_LENGTH = struct.Struct(">I")
MAX_HEADER_BYTES = 1 << 16
_SHM_DIR = "/dev/shm" if os.path.isdir("/dev/shm") else None


def send_frame(sock: socket.socket, header: dict[str, Any], payload=b"") -> None:
    """`payload`: any bytes-like buffer."""
    packed = msgpack.packb(header, use_bin_type=True)
    sock.sendall(_LENGTH.pack(len(packed)) + packed)
    if len(payload):
        sock.sendall(payload)


def recv_exact(sock: socket.socket, into: int | memoryview) -> bytearray | memoryview:
    """Exactly `into` bytes (a count: a new buffer; a memoryview: filled)."""
    view = memoryview(bytearray(into)) if isinstance(into, int) else into
    num_bytes = len(view)
    received = 0
    while received < num_bytes:
        count = sock.recv_into(view[received:])
        if count == 0:
            raise TransferError("corrupt", f"truncated: {received} of {num_bytes} bytes")
        received += count
    return view.obj if isinstance(into, int) else view


def recv_header(sock: socket.socket) -> dict[str, Any] | None:
    """The next frame's header; None if the peer closed between frames."""
    first = sock.recv(1)
    if not first:
        return None
    (length,) = _LENGTH.unpack(first + recv_exact(sock, _LENGTH.size - 1))
    if length > MAX_HEADER_BYTES:
        raise TransferError("corrupt", f"header of {length} bytes")
    try:
        header = msgpack.unpackb(recv_exact(sock, length), raw=False)
    except (ValueError, msgpack.UnpackException) as e:
        raise TransferError("corrupt", f"header is not msgpack: {e}") from None
    if not isinstance(header, dict):
        raise TransferError("corrupt", "header is not a map")
    return header


class _Handler(socketserver.BaseRequestHandler):
    server: _Server

    def handle(self) -> None:
        self.shm: _ShmFile | None = None
        self.peer = None  # a DistPeer, once the reader asked for a dist channel
        try:
            while (header := recv_header(self.request)) is not None:
                if header.get("op") == "dist" and self.server.scheme == "dist" and \
                        self.peer is None:
                    self._open_dist(header)
                else:
                    self._answer(header)
        except (TransferError, OSError) as e:
            logger.debug("KV connection from %s ends: %s", self.client_address, e)
        finally:
            if self.shm is not None:
                self.shm.close()

    def _open_dist(self, header: dict[str, Any]) -> None:
        """Answer with a fresh store's port, then build this end of the two-rank group (a
        failure ends the connection: the reader's end fails too)."""
        from fleetlm.kvtransfer.dist import MAX_TIMEOUT_S, DistPeer

        timeout_s = min(float(header.get("timeout_s", 60.0)), MAX_TIMEOUT_S)
        host = self.request.getsockname()[0]
        store, port = DistPeer.listen(host, timeout_s)
        send_frame(self.request, {"ok": True, "nbytes": 0, "port": port})
        self.peer = DistPeer(store, 0, host, timeout_s)
        self.timeout_s = timeout_s

    def _answer(self, header: dict[str, Any]) -> None:
        source = self.server.source
        try:
            op = header.get("op")
            if op == "read":
                data = source.read(str(header["transfer_id"]), int(header["first_block"]),
                                   int(header["num_blocks"]), _range(header.get("layers")),
                                   _range(header.get("heads")),
                                   self.shm.map if self.shm is not None else None)
                if self.shm is not None and len(data) <= self.shm.size:  # gathered into it
                    send_frame(self.request, {"ok": True, "nbytes": len(data), "in_shm": True})
                    return
                answer = {"ok": True, "nbytes": len(data), "crc32": checksum(data)}
                if self.peer is not None:
                    send_frame(self.request, {**answer, "in_dist": True})
                    self.peer.send(data, self.timeout_s)
                else:
                    send_frame(self.request, answer, data)
            elif op == "release":
                source.release(str(header["transfer_id"]), int(header.get("reader", 0)),
                               int(header.get("num_readers", 1)))
                send_frame(self.request, {"ok": True, "nbytes": 0})
            elif op == "attach" and self.server.scheme == "shm" and self.shm is None:
                self.shm = _ShmFile.create(int(header["nbytes"]))
                send_frame(self.request, {"ok": True, "nbytes": 0, "path": self.shm.path})
            else:
                raise TransferError("bad_request", f"op {op!r}")
        except TransferError as e:
            if e.reason in ("timeout", "unreachable") and self.peer is not None:
                raise  # the dist channel broke mid-send: end the connection
            send_frame(self.request, {"ok": False, "error": e.reason, "message": str(e)})
        except (KeyError, TypeError, ValueError) as e:
            send_frame(self.request, {"ok": False, "error": "bad_request", "message": repr(e)})


def _range(value: Any) -> tuple[int, int] | None:
    if value is None:
        return None
    start, end = value  # a malformed range: ValueError / TypeError, a bad_request
    return int(start), int(end)


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], source: KVSource, scheme: str) -> None:
        self.source = source
        self.scheme = scheme
        super().__init__(address, _Handler)


class TCPServer(KVServer):
    """Serves a KVSource on host:port (port 0: any free one), one thread per connection;
    `scheme` (tcp, shm or dist) is how the bytes go."""

    def __init__(self, source: KVSource, host: str, port: int, scheme: str = "tcp") -> None:
        self._server = _Server((host, port), source, scheme)
        bound_host, bound_port = self._server.server_address[:2]
        self.address = f"{scheme}://{bound_host}:{bound_port}"
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,),
                                        name="fleetlm-kv-server", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


class TCPClient(KVClient):
    def __init__(self, host: str, port: int, timeout: float, scheme: str = "tcp") -> None:
        try:
            self._sock = socket.create_connection((host, port), timeout=max(timeout, 1e-3))
        except TimeoutError:
            raise TransferError("timeout", f"connecting to {host}:{port}") from None
        except OSError as e:
            raise TransferError("unreachable", f"{host}:{port}: {e}") from None
        self._shm: _ShmFile | None = None
        self._buffer = bytearray()  # reused by every read: no fresh pages per chunk
        self._peer = None
        self._host = host
        self._scheme = scheme

    def read(self, transfer_id: str, first_block: int, num_blocks: int, num_bytes: int,
             timeout: float, layers: tuple[int, int] | None = None,
             heads: tuple[int, int] | None = None) -> bytearray:
        if self._scheme == "shm" and self._shm is None:
            answer = self._ask({"op": "attach", "nbytes": num_bytes}, timeout)
            self._shm = _ShmFile.open(str(answer.get("path")), num_bytes)
        elif self._scheme == "dist" and self._peer is None:
            from fleetlm.kvtransfer.dist import DistPeer

            answer = self._ask({"op": "dist", "timeout_s": timeout}, timeout)
            self._peer = DistPeer.connect(self._host, int(answer.get("port", 0)),
                                          self._sock.getsockname()[0], timeout)
        answer = self._ask({"op": "read", "transfer_id": transfer_id,
                            "first_block": first_block, "num_blocks": num_blocks,
                            "layers": layers and list(layers), "heads": heads and list(heads)},
                           timeout)
        if answer.get("nbytes") != num_bytes:
            raise TransferError("corrupt", f"{answer.get('nbytes')} bytes, expected {num_bytes}")
        if answer.get("in_shm"):
            if self._shm is None or num_bytes > self._shm.size:
                raise TransferError("corrupt", "bytes in shared memory that was not attached")
            return memoryview(self._shm.map)[:num_bytes]  # read in place: no copy
        if len(self._buffer) < num_bytes:
            self._buffer = bytearray(num_bytes)
        data = memoryview(self._buffer)[:num_bytes]
        if answer.get("in_dist"):
            if self._peer is None:
                raise TransferError("corrupt", "bytes on a distributed channel never opened")
            self._peer.recv(data, timeout)
        else:
            self._guarded(recv_exact, data)
        if checksum(data) != answer.get("crc32"):
            raise TransferError("corrupt", "checksum mismatch")
        return data

    def release(self, transfer_id: str, timeout: float, reader: int = 0,
                num_readers: int = 1) -> None:
        self._ask({"op": "release", "transfer_id": transfer_id, "reader": reader,
                   "num_readers": num_readers}, timeout)

    def close(self) -> None:
        if self._shm is not None:
            self._shm.close()
        self._sock.close()

    def _ask(self, request: dict[str, Any], timeout: float) -> dict[str, Any]:
        if timeout <= 0:
            raise TransferError("timeout", f"no time left for {request['op']}")
        self._sock.settimeout(timeout)
        self._guarded(send_frame, request)
        answer = self._guarded(recv_header)
        if answer is None:
            raise TransferError("corrupt", "the server closed the connection")
        if not answer.get("ok"):
            raise TransferError(str(answer.get("error", "corrupt")), str(answer.get("message")))
        return answer

    def _guarded(self, fn, *args):
        """Socket errors as TransferErrors."""
        try:
            return fn(self._sock, *args)
        except TimeoutError:
            raise TransferError("timeout", "the KV server did not answer in time") from None
        except OSError as e:
            raise TransferError("unreachable", str(e)) from None


class _ShmFile:
    """A file in shared memory, mapped: the server writes each read's bytes, the client
    copies them out. The server unlinks it when the connection ends."""

    def __init__(self, path: str, fd: int, size: int, is_owner: bool) -> None:
        self.path, self.size, self._is_owner = path, size, is_owner
        self.map = mmap.mmap(fd, size)
        os.close(fd)

    @classmethod
    def create(cls, size: int) -> _ShmFile:
        if not 0 < size <= 1 << 34:
            raise TransferError("bad_request", f"shared memory of {size} bytes")
        fd, path = tempfile.mkstemp(prefix="fleetlm-kv-", dir=_SHM_DIR)
        os.ftruncate(fd, size)
        return cls(path, fd, size, is_owner=True)

    @classmethod
    def open(cls, path: str, size: int) -> _ShmFile:
        directory, name = os.path.split(path)
        if directory != (_SHM_DIR or tempfile.gettempdir()) or not name.startswith("fleetlm-kv-"):
            raise TransferError("corrupt", f"shared memory path {path!r}")
        try:
            fd = os.open(path, os.O_RDWR)
            if os.fstat(fd).st_size < size:
                os.close(fd)
                raise TransferError("corrupt", f"shared memory {path} is too small")
        except OSError as e:
            raise TransferError("unreachable", f"shared memory {path}: {e}") from None
        return cls(path, fd, size, is_owner=False)

    def close(self) -> None:
        with contextlib.suppress(BufferError):  # a read's view still alive: the GC closes it
            self.map.close()
        if self._is_owner:
            os.unlink(self.path)
