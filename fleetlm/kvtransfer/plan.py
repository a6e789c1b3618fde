"""Who reads what: a decode rank's share of a transfer when the two engines split their KV
differently (heterogeneous tensor or pipeline parallelism).

Each prefill rank holds a rectangle of (layers, KV heads); ranks that replicate heads hold
the same rectangle, and only the first of them is read. Each decode rank reads, from every
prefill rank whose rectangle meets its own, the intersection. A prefill rank's lease ends
when all its readers have released it, so every reader names itself and how many there
are; the replicas nobody reads are released by decode rank 0. Every decode rank computes
the same plan from the transfer params and its group's shards. No torch here.
"""

from __future__ import annotations

from dataclasses import dataclass

from fleetlm.kvtransfer.params import KVShard

Range = tuple[int, int]


@dataclass(frozen=True)
class Piece:
    """Layers x heads (engine-wide indices) to read from the prefill rank `source`."""

    source: int
    layers: Range
    heads: Range


@dataclass(frozen=True)
class Release:
    source: int
    reader: int
    num_readers: int


@dataclass(frozen=True)
class ReadPlan:
    pieces: list[Piece]
    releases: list[Release]


def _meet(a: Range, b: Range) -> Range | None:
    start, end = max(a[0], b[0]), min(a[1], b[1])
    return (start, end) if start < end else None


def plan_reads(sources: tuple[KVShard, ...], group: list[KVShard], rank: int) -> ReadPlan:
    """What decode rank `rank` of `group` reads and releases of a transfer from `sources`."""
    holders: dict[tuple[Range, Range], int] = {}
    for index, shard in enumerate(sources):
        holders.setdefault((shard.layers, shard.heads), index)
    readers: dict[int, list[int]] = {index: [] for index in holders.values()}
    pieces = []
    for reader, mine in enumerate(group):
        for index in holders.values():
            source = sources[index]
            layers, heads = _meet(mine.layers, source.layers), _meet(mine.heads, source.heads)
            if layers is None or heads is None:
                continue
            readers[index].append(reader)
            if reader == rank:
                pieces.append(Piece(index, layers, heads))
    releases = [Release(index, names.index(rank), len(names))
                for index, names in readers.items() if rank in names]
    if rank == 0:  # the replicas nobody reads (and a holder nobody needs)
        releases += [Release(index, 0, 1) for index in range(len(sources))
                     if not readers.get(index)]
    return ReadPlan(pieces, releases)
