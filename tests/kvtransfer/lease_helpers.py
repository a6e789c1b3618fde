"""Leases as the grants in a step's metadata make them (tests of leases and transports)."""

from __future__ import annotations

import itertools

from fleetlm.kvtransfer.leases import LeaseTable, new_transfer_id

_seq = itertools.count(1)


def next_seq() -> int:
    return next(_seq)


def grant(table: LeaseTable, request_id: str, block_ids: list[int]) -> str:
    """A lease under the next transfer id; the id."""
    transfer_id = new_transfer_id(next_seq())
    table.grant(request_id, transfer_id, block_ids)
    return transfer_id
