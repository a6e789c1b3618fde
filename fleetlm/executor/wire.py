"""The step messages on the wire: `SchedulerOutput` to the workers, `ModelRunnerOutput` back.

msgpack, never pickle: a message from the network can only ever build the dataclasses
registered here (each one an extension type holding its field values in order) and sets.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import msgpack

from fleetlm.executor.outputs import (
    CachedRequestData,
    KVConnectorOutput,
    ModelRunnerOutput,
    NewRequestData,
    SchedulerOutput,
)
from fleetlm.executor.sampling_params import SamplingParams, StructuredOutputsParams
from fleetlm.kvtransfer.metadata import LeaseGrant, LoadSpec, PDConnectorMetadata

_SET_CODE = 1
_CLASSES: dict[int, type] = {
    2: SchedulerOutput,
    3: NewRequestData,
    4: CachedRequestData,
    5: SamplingParams,
    6: ModelRunnerOutput,
    7: KVConnectorOutput,
    8: StructuredOutputsParams,
    9: PDConnectorMetadata,
    10: LoadSpec,
    11: LeaseGrant,
}
_CODES = {cls: code for code, cls in _CLASSES.items()}
_FIELDS = {cls: tuple(f.name for f in dataclasses.fields(cls)) for cls in _CLASSES.values()}


def encode(message: Any) -> bytes:
    """Bytes of a step message (any nesting of the registered dataclasses, sets, lists,
    dicts and scalars)."""
    return msgpack.packb(message, default=_default, use_bin_type=True)


def decode(data: bytes) -> Any:
    return msgpack.unpackb(data, ext_hook=_ext_hook, strict_map_key=False, raw=False)


def _default(obj: Any) -> msgpack.ExtType:
    code = _CODES.get(type(obj))
    if code is not None:
        values = [getattr(obj, name) for name in _FIELDS[type(obj)]]
        return msgpack.ExtType(code, encode(values))
    if isinstance(obj, (set, frozenset)):
        return msgpack.ExtType(_SET_CODE, encode(sorted(obj)))
    raise TypeError(f"{type(obj).__name__} cannot cross to the workers")


def _ext_hook(code: int, data: bytes) -> Any:
    values = decode(data)
    if code == _SET_CODE:
        return set(values)
    cls = _CLASSES.get(code)
    if cls is None:
        raise ValueError(f"unknown message type {code}")
    return cls(*values)
