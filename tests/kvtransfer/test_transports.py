"""The byte movers: leased blocks read through each transport arrive bit for bit; refusals
arrive with their reason; a stalled, truncated, corrupted or absent server is a
TransferError, never bytes in the cache."""

from __future__ import annotations

import glob
import socket
import subprocess
import sys
import threading

import msgpack
import pytest
import torch
from lease_helpers import grant

from fleetlm.kvtransfer.kv_io import gather_blocks, layout_of, scatter_blocks
from fleetlm.kvtransfer.leases import LeaseTable, TransferError
from fleetlm.kvtransfer.pd_connector import LeasedKV
from fleetlm.kvtransfer.tcp import TCPClient
from fleetlm.kvtransfer.transport import checksum, connect, serve

NUM_BLOCKS = 8


def make_caches(seed: int):
    generator = torch.Generator().manual_seed(seed)
    shape = (NUM_BLOCKS, 4, 2, 3)  # blocks, block size, KV heads, head dim
    return [(torch.randn(shape, generator=generator), torch.randn(shape, generator=generator))
            for _ in range(2)]


@pytest.fixture
def leases():
    table = LeaseTable(30.0, notify=lambda: None)
    yield table
    assert table.num_active == 0
    table.close()


@pytest.mark.parametrize("transport", ["inproc", "tcp", "shm", "dist"])
def test_blocks_arrive_bit_for_bit_and_a_consumed_transfer_is_refused(transport, leases):
    source, target = make_caches(0), make_caches(1)
    layout = layout_of(source)
    block_bytes = layout.bytes_per_block(layout.num_layers, layout.num_kv_heads)
    server = serve(transport, LeasedKV(leases, source), "127.0.0.1", 0)
    try:
        transfer_id = grant(leases, "r", [5, 2, 7])
        client = connect(server.address, 5.0)
        try:
            # A read's buffer may be the client's own, valid until its next read.
            scatter_blocks(target, [0, 1], client.read(transfer_id, 0, 2, 2 * block_bytes, 5.0))
            scatter_blocks(target, [3], client.read(transfer_id, 2, 1, block_bytes, 5.0))
            with pytest.raises(TransferError, match="out_of_range"):
                client.read(transfer_id, 2, 2, 2 * block_bytes, 5.0)
            client.release(transfer_id, 5.0)
            with pytest.raises(TransferError) as refused:
                client.read(transfer_id, 0, 1, block_bytes, 5.0)
            assert refused.value.reason == "consumed"
        finally:
            client.close()
    finally:
        server.close()
    for (k, v), (k2, v2) in zip(source, target):
        assert torch.equal(k2[[0, 1, 3]], k[[5, 2, 7]]) and torch.equal(v2[[0, 1, 3]], v[[5, 2, 7]])
    assert leases.drain_finished() == {"r"}


def test_a_wrong_size_is_refused_before_anything_is_written(leases):
    source = make_caches(0)
    server = serve("inproc", LeasedKV(leases, source), "", 0)
    transfer_id = grant(leases, "r", [1])
    with pytest.raises(TransferError, match="corrupt"):
        connect(server.address, 1.0).read(transfer_id, 0, 1, 1, 1.0)
    leases.release(transfer_id)
    server.close()
    with pytest.raises(TransferError, match="unreachable"):  # the server is gone
        connect(server.address, 1.0).read(transfer_id, 0, 1, 1, 1.0)


class FakeServer:
    """Accepts one connection, reads one request frame, answers with `answer` bytes, closes."""

    def __init__(self, answer: bytes) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, args=(answer,), daemon=True)
        self.thread.start()

    def _serve(self, answer: bytes) -> None:
        conn, _ = self.listener.accept()
        with conn:
            length = int.from_bytes(conn.recv(4), "big")
            conn.recv(length)
            conn.sendall(answer)
        self.listener.close()


def frame(header: dict, payload: bytes = b"") -> bytes:
    packed = msgpack.packb(header)
    return len(packed).to_bytes(4, "big") + packed + payload


PAYLOAD = bytes(range(64))


@pytest.mark.parametrize(("answer", "message"), [
    (b"\x00\x00\x00\x05garbage!", "not msgpack"),
    (b"\xff\xff\xff\xff", "header of"),
    (frame({"ok": True, "nbytes": 64, "crc32": checksum(PAYLOAD)}, PAYLOAD[:40]), "truncated"),
    (frame({"ok": True, "nbytes": 64, "crc32": checksum(PAYLOAD) ^ 1}, PAYLOAD), "checksum"),
    (frame({"ok": True, "nbytes": 32, "crc32": 0}, PAYLOAD[:32]), "expected 64"),
    (frame([1, 2]), "not a map"),
    (b"", "closed the connection"),
])
def test_a_truncated_or_corrupted_answer_is_an_error(answer, message):
    server = FakeServer(answer)
    client = TCPClient("127.0.0.1", server.port, 5.0)
    with pytest.raises(TransferError, match=message) as error:
        client.read("t", 0, 1, 64, 5.0)
    assert error.value.reason == "corrupt"
    client.close()
    server.thread.join()


def test_a_server_that_never_answers_times_out():
    listener = socket.create_server(("127.0.0.1", 0))  # accepts into its backlog, never reads
    client = TCPClient("127.0.0.1", listener.getsockname()[1], 5.0)
    with pytest.raises(TransferError) as error:
        client.read("t", 0, 1, 64, 0.2)
    assert error.value.reason == "timeout"
    client.close()
    listener.close()


def test_nobody_listening_is_unreachable():
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
    with pytest.raises(TransferError) as error:
        connect(f"tcp://127.0.0.1:{port}", 1.0)
    assert error.value.reason == "unreachable"


SERVE_IN_ANOTHER_PROCESS = """
import sys
from fleetlm.kvtransfer.tcp import TCPServer

class Source:
    def read(self, transfer_id, first_block, num_blocks, layers=None, heads=None, out=None):
        data = bytes((first_block + i) % 251 for i in range(num_blocks * 1000))
        if out is None or len(out) < len(data):
            return data
        out[:len(data)] = data
        return memoryview(out)[:len(data)]
    def release(self, transfer_id, reader=0, num_readers=1):
        print("released", transfer_id, flush=True)

server = TCPServer(Source(), "127.0.0.1", 0, scheme="shm")
print(server.address, flush=True)
sys.stdin.read()
server.close()
"""


def test_shared_memory_between_processes():
    server = subprocess.Popen([sys.executable, "-c", SERVE_IN_ANOTHER_PROCESS],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        address = server.stdout.readline().strip()
        assert address.startswith("shm://")
        before = set(glob.glob("/dev/shm/fleetlm-kv-*"))
        client = connect(address, 5.0)
        data = client.read("t", 3, 2, 2000, 5.0)
        assert data == bytes((3 + i) % 251 for i in range(2000))
        assert len(set(glob.glob("/dev/shm/fleetlm-kv-*")) - before) == 1  # it went that way
        client.release("t", 5.0)
        assert server.stdout.readline() == "released t\n"
        client.close()
    finally:
        server.communicate("", timeout=10)
    assert set(glob.glob("/dev/shm/fleetlm-kv-*")) <= before  # the server removed its file


def test_gather_then_scatter_is_the_identity():
    source, target = make_caches(0), make_caches(1)
    scatter_blocks(target, [4, 6], bytearray(gather_blocks(source, [1, 3])))
    for (k, v), (k2, v2) in zip(source, target):
        assert torch.equal(k2[[4, 6]], k[[1, 3]]) and torch.equal(v2[[4, 6]], v[[1, 3]])


def test_part_of_the_layers_and_heads_lands_in_part_of_another_split():
    """A rank holding layers [0, 2) x heads [0, 2) sends layer 1, head 1; the reader holds
    that head as its head 0 (its own split) and writes only there."""
    source, target = make_caches(0), make_caches(1)
    untouched = [(k.clone(), v.clone()) for k, v in target]
    data = bytearray(gather_blocks(source, [2], layers=(1, 2), heads=(1, 2)))
    assert len(data) == layout_of(source).bytes_per_block(1, 1)
    scatter_blocks(target, [5], data, layers=(1, 2), heads=(0, 1))
    assert torch.equal(target[1][0][5, :, 0], source[1][0][2, :, 1])
    assert torch.equal(target[1][1][5, :, 0], source[1][1][2, :, 1])
    target[1][0][5, :, 0], target[1][1][5, :, 0] = untouched[1][0][5, :, 0], untouched[1][1][5, :, 0]
    assert all(torch.equal(k, k2) and torch.equal(v, v2)
               for (k, v), (k2, v2) in zip(target, untouched))  # nothing else changed


class FakeDistServer:
    """Opens the dist channel as the real server does, then answers one read with a header
    promising PAYLOAD's 64 bytes and sends `payload` (None: nothing) over the group."""

    def __init__(self, payload: bytes | None) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._serve, args=(payload,), daemon=True)
        self.thread.start()

    def _serve(self, payload: bytes | None) -> None:
        from fleetlm.kvtransfer.dist import DistPeer
        from fleetlm.kvtransfer.tcp import recv_header, send_frame

        conn, _ = self.listener.accept()
        with conn:
            recv_header(conn)  # {"op": "dist"}
            store, port = DistPeer.listen("127.0.0.1", 10.0)
            send_frame(conn, {"ok": True, "nbytes": 0, "port": port})
            peer = DistPeer(store, 0, "127.0.0.1", 10.0)
            recv_header(conn)  # the read
            send_frame(conn, {"ok": True, "nbytes": 64, "crc32": checksum(PAYLOAD),
                              "in_dist": True})
            if payload is not None:
                peer.send(payload, 10.0)  # sent; the reader's recv refuses it
            self.done.wait(30)  # the reader has given up
        self.listener.close()


@pytest.mark.parametrize(("payload", "reason"), [(None, "timeout"), (PAYLOAD[:40], "corrupt")],
                         ids=["stalled", "short"])
def test_a_distributed_transfer_that_stalls_or_is_short_is_an_error(payload, reason):
    server = FakeDistServer(payload)
    client = connect(f"dist://127.0.0.1:{server.port}", 5.0)
    try:
        with pytest.raises(TransferError) as error:
            client.read("t", 0, 1, 64, 0.5)
        if reason is not None:
            assert error.value.reason == reason
    finally:
        server.done.set()
        client.close()
        server.thread.join(30)
