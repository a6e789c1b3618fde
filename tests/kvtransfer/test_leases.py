"""The prefill side's leases: reads renew them, release or expiry ends them exactly once, and
every read of a transfer that is not live is refused with its reason."""

from __future__ import annotations

import threading

import pytest
from lease_helpers import grant, next_seq

from fleetlm.kvtransfer.leases import LeaseTable, TransferError, new_transfer_id


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def leases(clock):
    table = LeaseTable(10.0, notify=lambda: None, clock=clock)
    yield table
    table.close()


def gather(block_ids):
    return bytes(block_ids)


def refusal(fn, *args) -> str:
    with pytest.raises(TransferError) as info:
        fn(*args)
    return info.value.reason


def test_reads_renew_and_release_consumes_once(leases, clock):
    transfer_id = grant(leases, "r", [7, 8, 9])
    clock.now += 9
    assert leases.read(transfer_id, 1, 2, gather) == bytes([8, 9])
    clock.now += 9  # 18 s after the grant, 9 after the read that renewed it
    assert leases.read(transfer_id, 0, 1, gather) == bytes([7])
    assert leases.drain_finished() == set()
    leases.release(transfer_id)
    assert leases.drain_finished() == {"r"}
    assert refusal(leases.read, transfer_id, 0, 1, gather) == "consumed"
    assert refusal(leases.release, transfer_id) == "consumed"  # no double consume
    assert leases.drain_finished() == set()  # and the blocks are freed only once
    assert leases.num_active == 0


def test_unknown_and_out_of_range_reads_are_refused(leases):
    transfer_id = grant(leases, "r", [7, 8, 9])
    assert refusal(leases.read, "nope", 0, 1, gather) == "unknown"
    for first, count in ((2, 2), (-1, 1), (0, 0), (3, 1)):
        assert refusal(leases.read, transfer_id, first, count, gather) == "out_of_range"
    assert leases.num_active == 1  # a bad read does not end the lease


def test_reaping_scans_every_lease_not_just_the_oldest(leases, clock):
    oldest = grant(leases, "a", [1])
    second = grant(leases, "b", [2])
    third = grant(leases, "c", [3])
    clock.now += 5
    leases.read(oldest, 0, 1, gather)  # the oldest lease is renewed to 115
    clock.now += 6  # 111: the two younger ones (deadline 110) have expired
    leases.reap()
    assert leases.drain_finished() == {"b", "c"}
    assert refusal(leases.read, second, 0, 1, gather) == "expired"
    assert refusal(leases.release, third) == "expired"
    assert leases.num_active == 1
    clock.now += 10
    assert refusal(leases.read, oldest, 0, 1, gather) == "expired"  # a read finds it ended
    assert leases.drain_finished() == {"a"}


def test_the_reaper_thread_ends_an_unread_lease_on_time():
    ended = threading.Event()
    table = LeaseTable(0.05, notify=ended.set)
    try:
        transfer_id = grant(table, "r", [1, 2])
        assert ended.wait(10)
        assert table.drain_finished() == {"r"}
        assert table.num_active == 0
        assert refusal(table.read, transfer_id, 0, 1, gather) == "expired"
    finally:
        table.close()


def test_a_lease_read_by_several_ranks_ends_when_every_reader_released(leases):
    transfer_id = grant(leases, "r", [1, 2])
    leases.release(transfer_id, reader=2, num_readers=3)
    leases.release(transfer_id, reader=2, num_readers=3)  # the same reader twice counts once
    leases.release(transfer_id, reader=0, num_readers=3)
    assert leases.drain_finished() == set()
    assert leases.read(transfer_id, 0, 2, gather) == bytes([1, 2])  # still live
    leases.release(transfer_id, reader=1, num_readers=3)
    assert leases.drain_finished() == {"r"}
    assert refusal(leases.release, transfer_id, 3, 3) == "bad_request"


def test_a_read_that_comes_before_its_grant_waits_for_it(leases):
    """The transfer params reach the decode side before the next step carries the grant to
    the prefill ranks: the read waits for the grant (an id numbered after the last grant),
    while an id numbered before it that was never granted is refused at once."""
    early = new_transfer_id(next_seq() + 1000)
    result = []
    reader = threading.Thread(target=lambda: result.append(leases.read(early, 0, 1, gather)))
    reader.start()
    leases.grant("r", early, [4])
    reader.join(30)
    assert result == [bytes([4])]
    assert refusal(leases.read, new_transfer_id(1), 0, 1, gather) == "unknown"
    leases.release(early)
