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
class PDConnectorMetadata(KVConnectorMetadata):
    loads: list[LoadSpec] = field(default_factory=list)
