"""Scheduling policies as waiting queues: first come first served, or by priority.

A policy also orders the running requests: they get the step's token budget in list
order, and the scheduler preempts from the end of the list.
"""

from __future__ import annotations

import heapq
import itertools
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Iterator

from fleetlm.executor.request import Request


class RequestQueue(ABC):
    """The waiting requests, in the order the scheduler should admit them."""

    @abstractmethod
    def add(self, request: Request) -> None:
        """A newly arrived request."""

    @abstractmethod
    def prepend(self, request: Request) -> None:
        """A request that was already admitted once (preempted, or put back): it goes first
        among equals."""

    @abstractmethod
    def peek(self) -> Request:
        """The next request to admit (the queue must not be empty)."""

    @abstractmethod
    def pop(self) -> Request:
        """Remove and return `peek()`."""

    @abstractmethod
    def remove(self, request: Request) -> None:
        """Remove a request from anywhere in the queue (an abort)."""

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def __iter__(self) -> Iterator[Request]: ...

    @abstractmethod
    def order_running(self, running: list[Request]) -> None:
        """Reorder `running` in place: budget goes to the front, preemption takes the back."""


class FCFSQueue(RequestQueue):
    """Arrival order; running requests keep admission order, so the newest is preempted."""

    def __init__(self) -> None:
        self._queue: deque[Request] = deque()

    def add(self, request: Request) -> None:
        self._queue.append(request)

    def prepend(self, request: Request) -> None:
        self._queue.appendleft(request)

    def peek(self) -> Request:
        return self._queue[0]

    def pop(self) -> Request:
        return self._queue.popleft()

    def remove(self, request: Request) -> None:
        self._queue.remove(request)

    def __len__(self) -> int:
        return len(self._queue)

    def __iter__(self) -> Iterator[Request]:
        return iter(self._queue)

    def order_running(self, running: list[Request]) -> None:
        pass


class PriorityQueue(RequestQueue):
    """Lower `priority` first, then earlier arrival; the same order ranks running requests,
    so the lowest-priority, newest one is preempted first."""

    def __init__(self) -> None:
        self._heap: list[tuple[int, float, int, Request]] = []
        self._counter = itertools.count()  # ties keep insertion order

    def add(self, request: Request) -> None:
        entry = (request.priority, request.arrival_time, next(self._counter), request)
        heapq.heappush(self._heap, entry)

    def prepend(self, request: Request) -> None:
        # Its (priority, arrival) already ranks it; an earlier tie-break number would only
        # matter against a request with the very same arrival time.
        entry = (request.priority, request.arrival_time, -next(self._counter), request)
        heapq.heappush(self._heap, entry)

    def peek(self) -> Request:
        return self._heap[0][-1]

    def pop(self) -> Request:
        return heapq.heappop(self._heap)[-1]

    def remove(self, request: Request) -> None:
        self._heap = [entry for entry in self._heap if entry[-1] is not request]
        heapq.heapify(self._heap)

    def __len__(self) -> int:
        return len(self._heap)

    def __iter__(self) -> Iterator[Request]:
        return (entry[-1] for entry in sorted(self._heap))

    def order_running(self, running: list[Request]) -> None:
        running.sort(key=lambda request: (request.priority, request.arrival_time))


def create_request_queue(policy: str) -> RequestQueue:
    queues = {"fcfs": FCFSQueue, "priority": PriorityQueue}
    if policy not in queues:
        raise ValueError(f"policy must be one of {sorted(queues)}, got {policy!r}")
    return queues[policy]()
