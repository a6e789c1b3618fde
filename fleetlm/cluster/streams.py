"""Merge several engine streams into one stream of coalesced outputs.

Every item `merge_streams` yields holds, per stream, one output that says everything that
arrived since the previous item: the newest, if outputs are cumulative, or the deltas
concatenated (`coalesce`), so a consumer that falls behind loses nothing. Each item costs
one message through Ray Serve, so under load many engine steps (and many `n` choices) share
one message.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

from fleetlm.executor.outputs import RequestOutput, coalesce

_DONE = object()


async def merge_streams(
    streams: list[AsyncIterator[RequestOutput]], interval_s: float | Callable[[], float] = 0.0
) -> AsyncIterator[dict[int, RequestOutput]]:
    """Yield `{stream index: output since the previous item}` until every stream has
    finished. Delta outputs are appended to in place: they must be this reader's own.

    An exception in any stream is raised here; closing this iterator early cancels the
    streams (each engine stream then aborts its request). With `interval_s > 0`, items are
    at least that far apart: the first goes out at once (time to first token is untouched),
    later outputs that come sooner wait and share the next item, unless the last stream
    finishes or one fails meanwhile (nothing more is coming: no reason to wait). A callable
    `interval_s` is asked again after each item (an interval that follows the load).
    """
    spacing = interval_s if callable(interval_s) else lambda: interval_s
    queue: asyncio.Queue = asyncio.Queue()
    ended = _Countdown(len(streams))
    tasks = [asyncio.create_task(_pump(i, s, queue, ended)) for i, s in enumerate(streams)]
    num_open = len(tasks)
    loop = asyncio.get_running_loop()
    next_time = loop.time()
    try:
        while num_open:
            items = [await queue.get()]
            if loop.time() < next_time:
                await ended.wait(next_time - loop.time())
            while not queue.empty():
                items.append(queue.get_nowait())
            latest, num_done = _collect(items)
            num_open -= num_done
            if latest:
                next_time = loop.time() + spacing()
                yield latest
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class _Countdown:
    """Set once every stream has ended, or at once when one fails."""

    def __init__(self, num_streams: int):
        self.num_left = num_streams
        self.event = asyncio.Event()

    def on_end(self, is_failure: bool) -> None:
        self.num_left -= 1
        if is_failure or self.num_left == 0:
            self.event.set()

    async def wait(self, timeout_s: float) -> None:
        """Until set, or `timeout_s` at most."""
        try:
            await asyncio.wait_for(self.event.wait(), timeout_s)
        except TimeoutError:
            pass


def _collect(items: list[tuple[int, object]]) -> tuple[dict[int, RequestOutput], int]:
    latest: dict[int, RequestOutput] = {}
    num_done = 0
    for index, item in items:
        if isinstance(item, BaseException):
            raise item
        if item is _DONE:
            num_done += 1
        else:
            latest[index] = coalesce(latest.get(index), item)
    return latest, num_done


async def _pump(index: int, stream: AsyncIterator[RequestOutput], queue: asyncio.Queue,
                ended: _Countdown) -> None:
    try:
        async for output in stream:
            queue.put_nowait((index, output))
        queue.put_nowait((index, _DONE))
        ended.on_end(is_failure=False)
    except asyncio.CancelledError:
        raise
    except Exception as e:  # handed to the consumer, which raises it
        queue.put_nowait((index, e))
        ended.on_end(is_failure=True)
    finally:
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            await aclose()
