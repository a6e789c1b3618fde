"""merge_streams: latest output per stream (deltas concatenated), errors surface, early close
cancels the streams."""

from __future__ import annotations

import asyncio

import pytest

from fleetlm.cluster.streams import merge_streams
from fleetlm.executor.outputs import CompletionOutput, RequestOutput


def _output(rid: str, num_tokens: int, finished: bool = False) -> RequestOutput:
    completion = CompletionOutput(0, "x" * num_tokens, [0] * num_tokens)
    return RequestOutput(rid, None, [1], [completion], finished)


async def _burst(rid: str, num: int, closed: list[str]):
    """Yields `num` outputs without awaiting in between: a consumer sees only the last."""
    try:
        for i in range(1, num + 1):
            yield _output(rid, i, finished=i == num)
    finally:
        closed.append(rid)


async def _forever(rid: str, closed: list[str]):
    try:
        i = 0
        while True:
            i += 1
            yield _output(rid, i)
            await asyncio.sleep(0)
    finally:
        closed.append(rid)


async def _failing():
    yield _output("bad", 1)
    raise ValueError("boom")


def test_outputs_that_arrive_together_are_coalesced():
    closed: list[str] = []

    async def run():
        return [s async for s in merge_streams([_burst("a", 5, closed), _burst("b", 3, closed)])]

    snapshots = asyncio.run(run())
    merged: dict[int, RequestOutput] = {}
    for snapshot in snapshots:
        merged.update(snapshot)
    assert len(merged[0].outputs[0].token_ids) == 5 and merged[0].finished
    assert len(merged[1].outputs[0].token_ids) == 3 and merged[1].finished
    assert len(snapshots) < 8
    assert sorted(closed) == ["a", "b"]


def test_an_error_in_one_stream_is_raised_and_the_others_closed():
    closed: list[str] = []

    async def run():
        async for _ in merge_streams([_forever("a", closed), _failing()]):
            pass

    with pytest.raises(ValueError, match="boom"):
        asyncio.run(run())
    assert closed == ["a"]


def test_closing_early_closes_every_stream():
    closed: list[str] = []

    async def run():
        merged = merge_streams([_forever("a", closed), _forever("b", closed)])
        first = await merged.__anext__()
        await merged.aclose()
        return first

    assert asyncio.run(run())
    assert sorted(closed) == ["a", "b"]


def _first_then_nine_more(released: asyncio.Event, fail_at_end: bool = False):
    async def stream():
        yield _output("a", 1)
        await released.wait()
        for i in range(2, 11):
            await asyncio.sleep(0)  # many loop turns, none of them an hour
            yield _output("a", i, finished=i == 10)
        if fail_at_end:
            raise ValueError("boom")

    return stream()


async def _token_counts(interval_s: float, fail_at_end: bool = False) -> list[int]:
    released = asyncio.Event()
    counts = []
    merged = merge_streams([_first_then_nine_more(released, fail_at_end)], interval_s)
    async for snapshot in merged:
        counts.append(len(snapshot[0].outputs[0].token_ids))
        released.set()
    return counts


def test_interval_sends_the_first_output_at_once_and_batches_the_rest():
    # An hour's interval: everything after the first output waits for the stream's end,
    # which ends the wait (the test would otherwise take an hour).
    assert asyncio.run(_token_counts(3600.0)) == [1, 10]


def test_without_an_interval_outputs_go_out_as_they_come():
    assert asyncio.run(_token_counts(0.0)) == list(range(1, 11))


def test_a_failure_during_the_interval_is_raised_at_once():
    with pytest.raises(ValueError, match="boom"):
        asyncio.run(_token_counts(3600.0, fail_at_end=True))


def _delta(rid: str, first: int, num: int, finished: bool = False) -> RequestOutput:
    """Tokens first .. first + num - 1 and their text, as a delta."""
    tokens = list(range(first, first + num))
    completion = CompletionOutput(0, "".join(f"<{t}>" for t in tokens), tokens)
    return RequestOutput(rid, None, [1], [completion], finished, is_delta=True)


async def _delta_burst(rid: str, num: int):
    for i in range(num):
        yield _delta(rid, i, 1, finished=i == num - 1)


def test_deltas_that_arrive_together_are_concatenated():
    async def run():
        return [s async for s in merge_streams([_delta_burst("a", 6), _delta_burst("b", 3)])]

    items = asyncio.run(run())
    assert len(items) < 9  # coalesced
    tokens: dict[int, list[int]] = {0: [], 1: []}
    text = {0: "", 1: ""}
    finished = {}
    for item in items:
        for index, output in item.items():
            assert output.is_delta
            tokens[index] += output.outputs[0].token_ids
            text[index] += output.outputs[0].text
            finished[index] = output.finished
    assert tokens == {0: list(range(6)), 1: list(range(3))}  # nothing lost, nothing twice
    assert text[0] == "".join(f"<{t}>" for t in range(6))
    assert finished == {0: True, 1: True}
