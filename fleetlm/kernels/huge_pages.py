"""CPU memory on transparent huge pages (2 MiB), for what a decode step streams: the GGUF
weights, gathered into one arena after loading (`gather_gguf_weights`).

A one-sequence decode step reads every weight once, about 100 MB for the built-in model, far
more than the caches. On 4 KiB pages that is a TLB miss every 4 KiB, and inside a virtual
machine each miss is a two-level page walk. On the 2-vCPU EPYC of docs/benchmarks.md a sum over
256 MiB read up to 40% faster on 2 MiB pages, and a one-sequence decode step took 3-7% less
with the weights there (paired runs in one process; docs/benchmarks.md, "Weights on huge
pages").

torch's CPU allocator asks for huge pages only when `THP_MEM_ALLOC_ENABLE=1` is set before its
first allocation. Here the memory is an anonymous mapping advised `MADV_HUGEPAGE` before it is
touched, so the kernel backs each aligned 2 MiB with one page at the first write, wherever the
system's THP mode is `madvise` or `always`. Where it is `never`, or `FLEETLM_HUGE_PAGES=0`, the
weights stay where they were loaded.
"""

from __future__ import annotations

import logging
import mmap
import os
from pathlib import Path

import torch

from fleetlm.kernels.gguf_linear import GGUFWeight, QuantizedMatrix

logger = logging.getLogger(__name__)

HUGE_PAGE = 2 << 20
ENV = "FLEETLM_HUGE_PAGES"
THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def available() -> bool:
    """Whether `empty` hands out memory advised for huge pages: Linux with transparent huge
    pages not `never`, and not turned off by $FLEETLM_HUGE_PAGES=0."""
    if os.environ.get(ENV, "1") == "0" or not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        return "[never]" not in THP_MODE.read_text()
    except OSError:
        return False


def empty(nbytes: int) -> torch.Tensor:
    """`nbytes` of zero-filled uint8 memory starting on a 2 MiB boundary, advised for huge
    pages where the platform knows the advice (whether the system grants them is
    `available()`'s question). The memory lives as long as the tensor or a view of it."""
    size = -(-nbytes // HUGE_PAGE) * HUGE_PAGE + HUGE_PAGE  # room to start on a boundary
    mapping = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        mapping.madvise(mmap.MADV_HUGEPAGE)  # before the first touch: faults then take 2 MiB
    memory = torch.frombuffer(mapping, dtype=torch.uint8)  # holds the mapping
    start = -memory.data_ptr() % HUGE_PAGE
    return memory[start:start + nbytes]


def huge_page_bytes(tensor: torch.Tensor) -> int:
    """Bytes of huge pages backing the mapping that holds `tensor` (this process's smaps); 0
    where none or unknown. For tests and benchmarks."""
    address = tensor.data_ptr()
    inside = False
    try:
        with open("/proc/self/smaps") as smaps:
            for line in smaps:
                fields = line.split()
                if "-" in fields[0] and len(fields) >= 5:
                    low, high = (int(a, 16) for a in fields[0].split("-"))
                    inside = low <= address < high
                elif inside and fields[0] == "AnonHugePages:":
                    return int(fields[1]) * 1024
    except OSError:
        return 0
    return 0


def gather_gguf_weights(module: torch.nn.Module) -> int:
    """Copy every whole GGUF matrix of `module` (`QuantizedMatrix.whole`; a tied one once) into
    one huge-page arena, in the order the module lists them (a decode step's order), each
    starting on a cache line; the copies replace the weights' `data`, and the old memory goes
    with its last reference, matrix by matrix. Returns the bytes moved: 0 where huge pages
    are not `available()` or there is nothing to move. Call after loading, before anything
    takes the matrices' data pointers (the native decode stack takes them at its first
    step)."""
    if not available():
        return 0
    weights: dict[int, GGUFWeight] = {}
    for parameter in module.parameters():
        matrix = getattr(parameter, "quantized", None)
        if isinstance(matrix, QuantizedMatrix) and matrix.whole is not None:
            weights.setdefault(id(matrix.whole), matrix.whole)
    sizes = [-(-weight.data.numel() // 64) * 64 for weight in weights.values()]
    if not sizes:
        return 0
    arena, at = empty(sum(sizes)), 0
    for weight, size in zip(weights.values(), sizes):
        piece = arena[at:at + weight.data.numel()].view(weight.data.shape)
        piece.copy_(weight.data)
        weight.data = piece
        at += size
    logger.info("%.1f MB of GGUF weights on huge pages", at / 1e6)
    return at
