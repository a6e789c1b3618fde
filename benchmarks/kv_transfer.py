"""KV transfer throughput of each transport against a plain memory copy.

    flock -x /tmp/fleetlm-cpu.lock .venv/bin/python -m benchmarks.kv_transfer \
        --out docs/results/kv_transfer.json

The built-in model's KV layout (SmolLM2-135M: 30 layers, 3 KV heads of 64, blocks of 16
tokens, the engine's dtype on this CPU) on one rank each side. A prefill side in another
process (`--serve`) holds a random cache and one lease on its blocks, behind a server per
transport; this process reads a transfer of N tokens as the decode side's loader does
(connect, read in `--chunk-bytes` chunks, write each chunk into its own cache) and times
the whole of it:
    copy    one `Tensor.copy_` of the same number of bytes (the floor: memory bandwidth)
    inproc  the in-process transport (gather, copy, scatter in this process; its own source)
    tcp     msgpack-framed requests, raw bytes over a localhost socket, CRC32 checked
    shm     requests over TCP, bytes through a shared-memory file
    dist    requests over TCP, bytes by torch.distributed send/recv on a two-rank gloo group
For each size the transports take turns, `--repeats` times; the figure is the median GiB/s.
`crc32` is zlib.crc32 alone over one chunk, for scale.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import zlib
from pathlib import Path

import torch

from fleetlm.bench.machine import cpu_name
from fleetlm.executor.model_runner import resolve_dtype
from fleetlm.kvtransfer.kv_io import gather_blocks, layout_of, scatter_blocks
from fleetlm.kvtransfer.leases import LeaseTable, new_transfer_id
from fleetlm.kvtransfer.pd_connector import LeasedKV
from fleetlm.kvtransfer.transport import connect, serve

NUM_LAYERS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 30, 3, 64, 16
TOKEN_COUNTS = (256, 2048, 8192)
TRANSPORTS = ("inproc", "tcp", "shm", "dist")
SERVED = ("tcp", "shm", "dist")


def make_cache(num_blocks: int, dtype: torch.dtype, seed: int):
    generator = torch.Generator().manual_seed(seed)
    shape = (num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    return [(torch.randn(shape, generator=generator).to(dtype),
             torch.randn(shape, generator=generator).to(dtype)) for _ in range(NUM_LAYERS)]


def serve_forever(num_blocks: int, dtype: str) -> None:
    """The prefill side: one lease on every block, a server per transport; prints the
    transfer id and the addresses, serves until stdin closes."""
    torch.set_num_threads(1)
    cache = make_cache(num_blocks, getattr(torch, dtype), 0)
    leases = LeaseTable(3600.0, notify=lambda: None)
    transfer_id = new_transfer_id(1)
    leases.grant("bench", transfer_id, list(range(num_blocks)))
    servers = [serve(t, LeasedKV(leases, cache), "127.0.0.1", 0) for t in SERVED]
    print(json.dumps({"transfer_id": transfer_id,
                      "addresses": {t: s.address for t, s in zip(SERVED, servers)}}), flush=True)
    sys.stdin.read()
    for server in servers:
        server.close()
    leases.close()


def load(address: str, transfer_id: str, target, num_blocks: int, chunk_blocks: int,
         block_bytes: int) -> None:
    """What the loader does for one transfer (one rank each side)."""
    client = connect(address, 60.0)
    try:
        for start in range(0, num_blocks, chunk_blocks):
            count = min(chunk_blocks, num_blocks - start)
            data = client.read(transfer_id, start, count, count * block_bytes, 60.0)
            scatter_blocks(target, list(range(start, start + count)), data)
    finally:
        client.close()


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--chunk-bytes", type=int, default=4 << 20)
    parser.add_argument("--tokens", type=int, nargs="+", default=list(TOKEN_COUNTS))
    parser.add_argument("--out", type=Path)
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)  # the prefill side
    parser.add_argument("--dtype", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    dtype = resolve_dtype("auto", torch.device("cpu"))
    if args.serve:
        serve_forever(args.serve, args.dtype)
        return
    torch.set_num_threads(1)
    num_blocks = max(args.tokens) // BLOCK_SIZE
    target = make_cache(num_blocks, dtype, 1)
    layout = layout_of(target)
    block_bytes = layout.bytes_per_block(NUM_LAYERS, NUM_KV_HEADS)
    chunk_blocks = max(1, args.chunk_bytes // block_bytes)
    server = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.kv_transfer", "--serve", str(num_blocks),
         "--dtype", str(dtype).removeprefix("torch.")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        remote = json.loads(server.stdout.readline())
        local_leases = LeaseTable(3600.0, notify=lambda: None)
        local_id = new_transfer_id(1)
        local_leases.grant("bench", local_id, list(range(num_blocks)))
        inproc = serve("inproc", LeasedKV(local_leases, make_cache(num_blocks, dtype, 0)), "", 0)
        addresses = {"inproc": inproc.address, **remote["addresses"]}
        ids = {t: remote["transfer_id"] for t in SERVED} | {"inproc": local_id}
        results = []
        for num_tokens in args.tokens:
            blocks = num_tokens // BLOCK_SIZE
            nbytes = blocks * block_bytes
            source = torch.empty(nbytes, dtype=torch.uint8)
            copy_target = torch.empty(nbytes, dtype=torch.uint8)
            samples: dict[str, list[float]] = {name: [] for name in ("copy", *TRANSPORTS)}
            runs = {"copy": lambda source=source, copy_target=copy_target:
                    copy_target.copy_(source)}
            for t in TRANSPORTS:
                runs[t] = lambda t=t, blocks=blocks: load(addresses[t], ids[t], target, blocks,
                                                          chunk_blocks, block_bytes)
            for repeat in range(args.repeats + 1):  # the first round warms up
                for name, run in runs.items():
                    seconds = timed(run)
                    if repeat:
                        samples[name].append(seconds)
            row = {"tokens": num_tokens, "bytes": nbytes}
            for name, values in samples.items():
                row[name] = {"median_s": statistics.median(values),
                             "gib_per_s": nbytes / statistics.median(values) / 2**30}
            results.append(row)
            print(f"{num_tokens:6d} tokens {nbytes / 2**20:7.1f} MiB  " + "  ".join(
                f"{name} {row[name]['gib_per_s']:.2f}" for name in samples) + "  GiB/s",
                flush=True)
        chunk = torch.empty(chunk_blocks * block_bytes, dtype=torch.uint8).numpy()
        crc_s = statistics.median(timed(lambda: zlib.crc32(chunk)) for _ in range(9))
        print(f"crc32 alone: {chunk.nbytes / crc_s / 2**30:.2f} GiB/s")
        gather_s = statistics.median(timed(lambda: gather_blocks(target, list(range(
            chunk_blocks))))for _ in range(9))
        print(f"gather alone: {chunk.nbytes / gather_s / 2**30:.2f} GiB/s")
    finally:
        server.communicate("", timeout=60)
    if args.out:
        args.out.write_text(json.dumps({
            "cpu": cpu_name(), "dtype": str(dtype), "chunk_bytes": args.chunk_bytes,
            "block_bytes": block_bytes, "repeats": args.repeats, "torch": torch.__version__,
            "crc32_gib_per_s": chunk.nbytes / crc_s / 2**30,
            "gather_gib_per_s": chunk.nbytes / gather_s / 2**30,
            "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
