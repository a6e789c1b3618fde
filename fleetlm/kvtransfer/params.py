"""What a prefill engine hands back for a decode engine to read a request's KV from it.

Plain msgpack-serialisable dicts on the way (they travel through the caller, later the
serving layer); parsed and checked here on both ends, so a malformed or foreign dict is a
`ValueError` naming the key, never a read of the wrong bytes. No torch here.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from typing import Any

import msgpack

# A request asking its (prefill) engine to keep its KV for a decode engine: its
# `kv_transfer_params`. The finished request's output carries `TransferParams` instead.
DO_REMOTE_DECODE = "do_remote_decode"

_ELEMENT_SIZES = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1}
# Bytes after each (slot, head) row's values: an int8 cache's float32 scale
# (`fleetlm.kernels.kv_quant`), which travels with its block.
_ROW_EXTRA_BYTES = {"int8": 4}


@dataclass(frozen=True)
class KVLayout:
    """How a whole engine's KV cache is laid out (every layer, every KV head, over all its
    ranks): both ends must agree on all of it (an int8 cache and a float one do not); how each
    end splits it may differ."""

    dtype: str
    block_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int

    def bytes_per_block(self, num_layers: int, num_kv_heads: int) -> int:
        """K and V of one block over `num_layers` layers and `num_kv_heads` heads."""
        row_bytes = self.head_dim * _ELEMENT_SIZES[self.dtype] + _ROW_EXTRA_BYTES.get(
            self.dtype, 0)
        return 2 * num_layers * self.block_size * num_kv_heads * row_bytes


@dataclass(frozen=True)
class KVShard:
    """The part of an engine's KV one rank holds: layers [layers[0], layers[1]) (its pipeline
    stage) and KV heads [heads[0], heads[1]) (its tensor-parallel share; ranks that
    replicate a head hold the same range). On a prefill engine also its KV server."""

    layers: tuple[int, int]
    heads: tuple[int, int]
    address: str = ""

    @property
    def num_layers(self) -> int:
        return self.layers[1] - self.layers[0]

    @property
    def num_heads(self) -> int:
        return self.heads[1] - self.heads[0]

    def to_dict(self) -> dict[str, Any]:
        return {"address": self.address, "layers": list(self.layers), "heads": list(self.heads)}

    @classmethod
    def from_dict(cls, shard: Any, layout: KVLayout) -> KVShard:
        _check(isinstance(shard, dict) and isinstance(shard.get("address"), str), "ranks")
        ranges = []
        for key, limit in (("layers", layout.num_layers), ("heads", layout.num_kv_heads)):
            bounds = shard.get(key)
            _check(isinstance(bounds, list) and len(bounds) == 2
                   and all(isinstance(b, int) for b in bounds)
                   and 0 <= bounds[0] < bounds[1] <= limit, f"ranks.{key}")
            ranges.append((bounds[0], bounds[1]))
        return cls(ranges[0], ranges[1], shard["address"])


@dataclass(frozen=True)
class TransferParams:
    """One finished prefill request's KV, held on its engine under a lease."""

    transfer_id: str
    engine_id: str
    ranks: tuple[KVShard, ...]  # the prefill engine's ranks: what each holds, its KV server
    block_ids: tuple[int, ...]  # on the prefill engine, in token order
    num_tokens: int  # tokens whose KV the blocks hold
    lease_deadline: float  # Unix time; renewed by each read
    layout: KVLayout
    tokens_hash: str  # of the first num_tokens token ids: the decode prompt must match

    def to_dict(self) -> dict[str, Any]:
        params = asdict(self)
        params["block_ids"] = list(self.block_ids)
        params["ranks"] = [shard.to_dict() for shard in self.ranks]
        return params

    @classmethod
    def from_dict(cls, params: Any) -> TransferParams:
        """Raises ValueError naming the first bad key."""
        if not isinstance(params, dict):
            raise ValueError("kv_transfer_params must be a mapping")  # noqa: TRY004 - a 400
        layout = params.get("layout")
        if not isinstance(layout, dict) or set(layout) != set(KVLayout.__dataclass_fields__):
            raise ValueError("kv_transfer_params.layout must name dtype, block_size, "
                             "num_layers, num_kv_heads and head_dim")
        if layout["dtype"] not in _ELEMENT_SIZES:
            raise ValueError(f"kv_transfer_params.layout.dtype {layout['dtype']!r} is unknown")
        for key in ("block_size", "num_layers", "num_kv_heads", "head_dim"):
            _check(isinstance(layout[key], int) and layout[key] > 0, f"layout.{key}")
        for key in ("transfer_id", "engine_id", "tokens_hash"):
            _check(isinstance(params.get(key), str), key)
        kv_layout = KVLayout(**layout)
        ranks = params.get("ranks")
        _check(isinstance(ranks, list) and ranks, "ranks")
        shards = tuple(KVShard.from_dict(shard, kv_layout) for shard in ranks)
        _check(covers(shards, kv_layout), "ranks (they do not hold every layer and head)")
        block_ids = params.get("block_ids")
        _check(isinstance(block_ids, list) and all(isinstance(b, int) for b in block_ids),
               "block_ids")
        num_tokens = params.get("num_tokens")
        _check(isinstance(num_tokens, int) and
               0 < num_tokens <= len(block_ids) * layout["block_size"], "num_tokens")
        _check(isinstance(params.get("lease_deadline"), (int, float)), "lease_deadline")
        return cls(params["transfer_id"], params["engine_id"], shards,
                   tuple(block_ids), num_tokens, float(params["lease_deadline"]),
                   kv_layout, params["tokens_hash"])


def _check(is_valid: bool, key: str) -> None:
    if not is_valid:
        raise ValueError(f"kv_transfer_params.{key} is missing or invalid")


def covers(shards: tuple[KVShard, ...], layout: KVLayout) -> bool:
    return all(any(s.layers[0] <= layer < s.layers[1] and s.heads[0] <= head < s.heads[1]
                   for s in shards)
               for layer in range(layout.num_layers) for head in range(layout.num_kv_heads))


def tokens_hash(token_ids: list[int]) -> str:
    return hashlib.sha256(msgpack.packb(list(token_ids))).hexdigest()[:32]


def check_request_params(params: Any) -> None:
    """A request's `kv_transfer_params`: {"do_remote_decode": True} or a prefill engine's
    transfer params; ValueError otherwise (the caller's mistake, answered with a 400)."""
    if params != {DO_REMOTE_DECODE: True}:
        TransferParams.from_dict(params)
