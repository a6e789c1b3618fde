"""What lets a request outlive the replica serving it.

    replica ──StreamChunk(SSE text, progress of the choices in it)──> ingress ──text──> client
    replica fails (engine or worker died, replica died)
    ingress ──chat/completions(body, request id, Resume(progress so far))──> another replica

A replica reports with every chunk how far each choice has got (`ChoiceProgress`: the token
ids behind the text, how much text, whether it finished); the ingress folds that into what
its client has received. When the replica fails, the ingress starts the request on another
replica (the replacement, if there is no other) with that record: the engine goes on after
those tokens with the same seed, and the formatter after that text, so the client sees one
uninterrupted stream. Choices that had finished are not run again.

A failure is an `OpenAIError` with code "engine_dead": the replica says so as an item of
its stream, or the ingress makes one when the replica's actor is gone.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field
from typing import Any

from ray.exceptions import RayActorError
from ray.serve.exceptions import ReplicaUnavailableError, RequestCancelledError

from fleetlm.cluster import errors
from fleetlm.cluster.errors import OpenAIError
from fleetlm.cluster.openai_format import ChoiceProgress
from fleetlm.cluster.serve_router import send

logger = logging.getLogger(__name__)

DONE_EVENT = "data: [DONE]\n\n"
# Retries of a request no replica takes yet (a dead one, a replacement starting) wait this
# long first, then twice as long each time, at most RETRY_MAX_DELAY_S.
RETRY_FIRST_DELAY_S = 0.1
RETRY_MAX_DELAY_S = 2.0
# What a replica's stream raises when the replica is gone (died, killed, being replaced).
REPLICA_ERRORS = (RayActorError, ReplicaUnavailableError)


@dataclass
class StreamChunk:
    """One item of a replica's stream: SSE events for the client, and the progress of the
    choices they carry (token ids: only those new in this chunk)."""

    text: str
    progress: dict[int, ChoiceProgress] = field(default_factory=dict)
    is_last: bool = False  # the text ends the stream ([DONE])
    # The replica's KV event batches the router had not seen (a `kv_events_since` reply,
    # for the ingress's index; only on a first chunk, see `RoutingRequest.kv_cursors`).
    kv_events: dict | None = None


@dataclass
class Resume:
    """What another replica had sent of a request before it failed."""

    progress: dict[int, ChoiceProgress]  # choice index -> all the client has of it
    num_migrations: int  # replicas the request has left so far (1 on its first resume)


def merge_progress(progress: dict[int, ChoiceProgress], chunk: StreamChunk) -> None:
    """Fold a chunk's updates into the record of what the client has received."""
    for index, update in chunk.progress.items():
        progress.setdefault(index, ChoiceProgress()).merge(update)


def is_replica_failure(error: OpenAIError) -> bool:
    """Whether another replica could serve what this one could not."""
    return error.code == errors.engine_dead().code


def sse_error(error: OpenAIError) -> str:
    """An error after the stream started: an error event in OpenAI's shape, then [DONE]."""
    return f"data: {json.dumps(error.to_dict())}\n\n{DONE_EVENT}"


def retry_delays():
    """RETRY_FIRST_DELAY_S, doubling up to RETRY_MAX_DELAY_S, forever."""
    delay = RETRY_FIRST_DELAY_S
    while True:
        yield delay
        delay = min(2 * delay, RETRY_MAX_DELAY_S)


class ReplicaStream:
    """One replica's stream of one request. Serve's router picked the replica (and counts
    the request there while it runs); `table` says which it was."""

    def __init__(self, table, request_id: str, stream) -> None:
        self.table, self.request_id, self.stream = table, request_id, stream
        self.is_open, self.is_done = True, False

    @property
    def replica(self) -> str | None:
        """The replica serving it (None if it never reached one)."""
        return self.table.replica_of(self.request_id)

    async def next(self) -> Any:
        """The next item (server.py's contract). A replica that vanished, or was stopped
        (Serve cancels what a replica it shuts down still runs), gives an engine_dead error,
        like a replica whose engine died; anything else unexpected, an internal error."""
        try:
            item = await self.stream.__anext__()
        except (*REPLICA_ERRORS, RequestCancelledError, StopAsyncIteration) as e:
            logger.warning("%s is gone: %s", self.replica, type(e).__name__)
            item = errors.engine_dead()
        except Exception as e:  # noqa: BLE001 - the client gets an error, never a broken body
            logger.error("%s failed", self.replica, exc_info=e)
            item = errors.internal_error(e)
        self.is_done = not isinstance(item, StreamChunk) or item.is_last
        return item

    def close(self) -> None:
        """Cancel the replica's request unless it ended (idempotent)."""
        if self.is_open:
            self.is_open = False
            if not self.is_done:
                self.stream.cancel()


async def call_replica(handle, method: str, timeout_s: float, *args, **kwargs) -> Any:
    """Call a plain (non-streaming) method of a replica; TimeoutError after `timeout_s`. On a
    timeout, or when the caller is cancelled, the replica's request is cancelled too."""
    response = send(getattr(handle, method), *args, **kwargs)
    try:
        return await asyncio.wait_for(_result(response), timeout_s)
    except (TimeoutError, asyncio.CancelledError):
        response.cancel()
        raise


async def _result(response) -> Any:
    return await response
