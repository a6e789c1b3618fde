"""A worker group's transfer news, put together across steps.

Each rank reports its own part of a transfer in whatever step it ends there, so the ranks'
reports of one request may come in different steps. A load is done once every rank has
reported it done, and failed as soon as one rank reports it failed (reported once; the
other ranks' parts are then cancelled through the next step's metadata, before anything
may write into the request's blocks). A send is over, and its blocks may be freed, once
every rank's lease has ended. No torch here.
"""

from __future__ import annotations

from collections import OrderedDict

from fleetlm.executor.outputs import KVConnectorOutput

_NUM_TOMBSTONES = 4096  # ended loads remembered, so a rank's late report is dropped


class RankReports:
    """Used from the engine thread only (the executor merges, the scheduler half takes
    cancels and forgets)."""

    def __init__(self, num_ranks: int) -> None:
        self.num_ranks = num_ranks
        self._sent: dict[str, set[int]] = {}  # request id -> ranks whose lease ended
        self._received: dict[str, set[int]] = {}  # request id -> ranks whose part is in
        self._ended: OrderedDict[str, None] = OrderedDict()
        self._cancels: list[str] = []

    def merge(self, reports: list[KVConnectorOutput | None]) -> KVConnectorOutput:
        """One step's reports of every rank (in rank order) -> what is now over for all."""
        merged = KVConnectorOutput()
        reports = [r or KVConnectorOutput() for r in reports]
        for report in reports:
            for req_id, reason in report.failed_recving.items():
                if req_id not in self._ended:
                    self.forget(req_id)
                    self._cancels.append(req_id)
                    merged.failed_recving[req_id] = reason
        for rank, report in enumerate(reports):
            for req_id in report.finished_recving:
                if req_id not in self._ended and self._count(self._received, req_id, rank):
                    merged.finished_recving.add(req_id)
            for req_id in report.finished_sending:
                if self._count(self._sent, req_id, rank):
                    merged.finished_sending.add(req_id)
        return merged

    def take_cancels(self) -> list[str]:
        """Loads whose other ranks' parts must stop (one rank's part failed)."""
        cancels, self._cancels = self._cancels, []
        return cancels

    def forget(self, req_id: str) -> None:
        """The request's load is over (failed, or cancelled with its request): later
        reports of it are dropped."""
        self._received.pop(req_id, None)
        self._ended[req_id] = None
        while len(self._ended) > _NUM_TOMBSTONES:
            self._ended.popitem(last=False)

    @property
    def num_pending(self) -> int:
        """Transfers some but not all ranks have reported."""
        return len(self._sent) + len(self._received)

    def _count(self, table: dict[str, set[int]], req_id: str, rank: int) -> bool:
        """Count the rank's report; True when every rank has reported."""
        ranks = table.setdefault(req_id, set())
        ranks.add(rank)
        if len(ranks) < self.num_ranks:
            return False
        del table[req_id]
        return True
