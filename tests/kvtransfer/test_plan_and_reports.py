"""Who reads what when two engines split their KV differently, and how a worker group's
per-rank transfer reports add up across steps (pure bookkeeping, no engine)."""

from __future__ import annotations

from fleetlm.executor.outputs import KVConnectorOutput
from fleetlm.kvtransfer.group import RankReports
from fleetlm.kvtransfer.params import KVShard
from fleetlm.kvtransfer.plan import Piece, Release, plan_reads


def test_a_replicated_tp6_prefill_read_by_a_two_stage_decode():
    """Prefill TP=6 over 3 KV heads (each head on two ranks), 4 layers; decode PP=2 at TP=1.
    Each decode stage reads its layers of every head from the first rank holding the head;
    both stages release those, and decode rank 0 releases the unread replicas."""
    sources = tuple(KVShard((0, 4), (rank // 2, rank // 2 + 1), f"tcp://h:{rank}")
                    for rank in range(6))
    group = [KVShard((0, 2), (0, 3)), KVShard((2, 4), (0, 3))]
    first, second = plan_reads(sources, group, 0), plan_reads(sources, group, 1)
    assert first.pieces == [Piece(s, (0, 2), (s // 2, s // 2 + 1)) for s in (0, 2, 4)]
    assert second.pieces == [Piece(s, (2, 4), (s // 2, s // 2 + 1)) for s in (0, 2, 4)]
    assert first.releases == [Release(s, 0, 2) for s in (0, 2, 4)] + \
        [Release(s, 0, 1) for s in (1, 3, 5)]
    assert second.releases == [Release(s, 1, 2) for s in (0, 2, 4)]


def test_a_tp1_prefill_read_by_tp3_ranks_that_replicate_nothing():
    sources = (KVShard((0, 30), (0, 3), "tcp://h:1"),)
    group = [KVShard((0, 30), (head, head + 1)) for head in range(3)]
    plans = [plan_reads(sources, group, rank) for rank in range(3)]
    assert [plan.pieces for plan in plans] == [[Piece(0, (0, 30), (h, h + 1))] for h in range(3)]
    assert [plan.releases for plan in plans] == [[Release(0, rank, 3)] for rank in range(3)]


def report(done=(), failed=None, sent=()) -> KVConnectorOutput:
    return KVConnectorOutput(finished_sending=set(sent), finished_recving=set(done),
                             failed_recving=dict(failed or {}))


def test_a_load_is_done_once_every_rank_has_its_part_whatever_the_step():
    reports = RankReports(3)
    assert reports.merge([report(done={"a"}), None, report()]).finished_recving == set()
    assert reports.merge([report(), report(), report(done={"a"})]).finished_recving == set()
    assert reports.num_pending == 1
    assert reports.merge([report(), report(done={"a"}), report()]).finished_recving == {"a"}
    assert reports.num_pending == 0


def test_a_load_fails_once_when_any_rank_fails_and_the_others_are_cancelled():
    reports = RankReports(3)
    reports.merge([report(done={"a"}), report(), report()])
    merged = reports.merge([report(), report(failed={"a": "timeout"}), report()])
    assert (merged.failed_recving, merged.finished_recving) == ({"a": "timeout"}, set())
    assert reports.take_cancels() == ["a"] and reports.take_cancels() == []
    later = reports.merge([report(), report(), report(done={"a"}, failed={"a": "corrupt"})])
    assert later == KVConnectorOutput()  # the rest of the ranks' news of it is dropped
    assert reports.num_pending == 0


def test_a_send_is_over_when_every_ranks_lease_ended():
    reports = RankReports(2)
    assert reports.merge([report(sent={"p"}), report()]).finished_sending == set()
    assert reports.merge([report(), report(sent={"p"})]).finished_sending == {"p"}
    assert reports.num_pending == 0
