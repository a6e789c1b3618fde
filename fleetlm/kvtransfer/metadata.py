"""The P/D connector's step metadata (no torch: it crosses to workers as msgpack, `wire.py`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fleetlm.kvtransfer.base import KVConnectorMetadata


@dataclass
class LoadSpec:
    """Read blocks [first_block, first_block + len(block_ids)) of a transfer into the local
    `block_ids`. No blocks: nothing to read (the local prefix cache had it all), only
    release the lease so the prefill side frees its blocks now."""

    req_id: str
    transfer_params: dict[str, Any]
    first_block: int
    block_ids: list[int]


@dataclass
class LeaseGrant:
    """Keep the finished request's blocks for a reader, under `transfer_id`."""

    req_id: str
    transfer_id: str
    block_ids: list[int]


@dataclass
class PDConnectorMetadata(KVConnectorMetadata):
    """One step's instructions, the same for every rank: leases to grant, loads to start,
    and loads to cancel (their request is gone, or another rank's part failed) before the
    step's forward pass may write into their blocks."""

    loads: list[LoadSpec] = field(default_factory=list)
    grants: list[LeaseGrant] = field(default_factory=list)
    cancels: list[str] = field(default_factory=list)
