"""KV bytes over torch.distributed send/recv, on a two-party group of their own.

The decode side asks over the KV server's TCP control connection for a `dist://` channel
({"op": "dist", "timeout_s"}); the server opens a fresh `TCPStore` on a free port, answers
with it, and both ends build a two-rank `ProcessGroupGloo` from it (the server's end is
rank 0, the reader's rank 1): never the engines' tensor-parallel groups, and no global
`init_process_group`. Each read's header still goes over the control connection (msgpack,
never pickle, with the length and CRC32); its bytes follow as one `send`/`recv`. Every wait
has a timeout; a failure or a timeout is a `TransferError`. gloo's `recv` accepts a message
shorter than its buffer without a word, so the reader checks the CRC like every transport.
"""

from __future__ import annotations

from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from fleetlm.kvtransfer.leases import TransferError

MAX_TIMEOUT_S = 600.0
_TAG = 0


class DistPeer:
    """One end of a two-rank gloo group over `store`; `host`: this end's address."""

    def __init__(self, store: dist.Store, rank: int, host: str, timeout_s: float) -> None:
        self.rank = rank
        options = dist.ProcessGroupGloo._Options()
        options._timeout = timedelta(seconds=timeout_s)
        options._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
        self.store = store  # kept alive as long as the group
        try:
            self.group = dist.ProcessGroupGloo(dist.PrefixStore("fleetlm-kv", store), rank, 2,
                                               options)
        except RuntimeError as e:
            raise _error(e) from None

    @classmethod
    def listen(cls, host: str, timeout_s: float) -> tuple[dist.TCPStore, int]:
        """The server's store on a free port (rank 0 builds its end with `join`)."""
        store = dist.TCPStore(host, 0, 2, True, timedelta(seconds=timeout_s),
                              wait_for_workers=False)
        return store, store.port

    @classmethod
    def connect(cls, server_host: str, port: int, host: str, timeout_s: float) -> DistPeer:
        """The reader's end (rank 1)."""
        try:
            store = dist.TCPStore(server_host, port, 2, False, timedelta(seconds=timeout_s))
        except (RuntimeError, dist.DistStoreError) as e:
            raise _error(e) from None
        return cls(store, 1, host, timeout_s)

    def send(self, data, timeout_s: float) -> None:
        """`data`: a bytes-like buffer (a writable one is sent without a copy)."""
        array = np.frombuffer(data, dtype=np.uint8)
        tensor = torch.from_numpy(array if array.flags.writeable else array.copy())
        self._wait(self.group.send([tensor], 1 - self.rank, _TAG), timeout_s)

    def recv(self, into: memoryview, timeout_s: float) -> None:
        """Fill `into` (a writable buffer) with the peer's next message."""
        self._wait(self.group.recv([torch.frombuffer(into, dtype=torch.uint8)], 1 - self.rank,
                                   _TAG), timeout_s)

    def _wait(self, work, timeout_s: float) -> None:
        if timeout_s <= 0:
            raise TransferError("timeout", "no time left for the distributed transfer")
        try:
            work.wait(timedelta(seconds=timeout_s))
        except RuntimeError as e:
            raise _error(e) from None


def _error(e: Exception) -> TransferError:
    text = str(e)
    reason = "timeout" if "imed out" in text or "imeout" in text else "unreachable"
    return TransferError(reason, f"torch.distributed: {text.splitlines()[0][:200]}")
