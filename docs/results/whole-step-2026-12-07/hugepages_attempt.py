"""CPU memory on transparent huge pages, for what a decode step streams: the GGUF weights and
the KV cache.

A one-sequence decode step reads every weight once, about 100 MB for the built-in model, far
more than the L3. On 4 KiB pages that is one TLB miss every 4 KiB, and inside a virtual
machine each miss is a two-level page walk. On the 2-vCPU EPYC of docs/benchmarks.md a sum
over 256 MiB read 22-24 GB/s on 4 KiB pages and 25-26 GB/s on 2 MiB pages, and the LM head's
product (30 MB of Q8_0) took 1.4-1.7 ms instead of 2.1 ("Weights on huge pages").

torch's CPU allocator asks for huge pages only when `THP_MEM_ALLOC_ENABLE=1` is set before its
first allocation. Here the memory is an anonymous mapping advised `MADV_HUGEPAGE` before it is
touched, so the kernel backs each aligned 2 MiB with one page at the first write, wherever the
system's THP mode is `madvise` or `always`. Where it is `never`, or `FLEETLM_HUGE_PAGES=0`, the
memory is plain torch memory.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import torch

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
    """`nbytes` of uninitialised (zero-filled, where huge pages are available) uint8 memory
    starting on a 2 MiB boundary, advised for huge pages; plain `torch.empty` where they are
    not. The memory lives as long as the tensor or a view of it."""
    if not available():
        return torch.empty(nbytes, dtype=torch.uint8)
    size = -(-nbytes // HUGE_PAGE) * HUGE_PAGE + HUGE_PAGE  # room to start on a boundary
    mapping = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    mapping.madvise(mmap.MADV_HUGEPAGE)  # before the first touch: faults then take 2 MiB
    memory = torch.frombuffer(mapping, dtype=torch.uint8)  # holds the mapping
    start = -memory.data_ptr() % HUGE_PAGE
    return memory[start:start + nbytes]


def huge_page_bytes(tensor: torch.Tensor) -> int:
    """Bytes of huge pages backing the mapping that holds `tensor` (this process's smaps);
    0 where none or unknown. For tests and benchmarks."""
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


class Arena:
    """One allocation carved into consecutive, 64-byte aligned pieces (`take`), so that
    weights read one after another lie one after another."""

    ALIGN = 64

    def __init__(self, nbytes: int) -> None:
        self.memory = empty(nbytes)
        self.used = 0

    @classmethod
    def size_of(cls, sizes) -> int:
        """Bytes an arena needs for pieces of `sizes`."""
        return sum(-(-size // cls.ALIGN) * cls.ALIGN for size in sizes)

    def take(self, nbytes: int) -> torch.Tensor:
        if self.used + nbytes > self.memory.numel():
            raise ValueError(f"arena of {self.memory.numel()} bytes has {self.used} taken; "
                             f"{nbytes} more do not fit")
        piece = self.memory[self.used:self.used + nbytes]
        self.used += -(-nbytes // self.ALIGN) * self.ALIGN
        return piece
