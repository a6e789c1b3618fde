"""Process groups and collectives: the rank layout, and every collective on a real gloo group
of 4 processes (TP 2 x PP 2) against what it must compute."""

from __future__ import annotations

import pytest
import torch
from dist_helpers import run_ranks

from fleetlm.parallel.group import SINGLE_PROCESS
from fleetlm.parallel.state import ParallelLayout, choose_backend, distributed_environment


def test_layout_puts_tp_ranks_of_a_stage_side_by_side():
    layout = ParallelLayout(tensor_parallel_size=3, pipeline_parallel_size=2)
    assert layout.world_size == 6
    assert [(layout.pp_rank(r), layout.tp_rank(r)) for r in range(6)] == [
        (0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    assert layout.tp_group_ranks(1) == (3, 4, 5)
    assert layout.pp_group_ranks(2) == (2, 5)
    assert layout.output_rank == 3


def test_collectives_cost_nothing_at_world_size_one():
    x = torch.arange(6.0).view(2, 3)
    for result in (SINGLE_PROCESS.all_reduce(x), SINGLE_PROCESS.all_gather(x),
                   SINGLE_PROCESS.reduce_scatter(x), SINGLE_PROCESS.broadcast(x)):
        assert result is x


def test_backend_follows_the_device_unless_configured():
    assert choose_backend("auto", torch.device("cpu")) == "gloo"
    assert choose_backend("auto", torch.device("cuda")) == "nccl"
    assert choose_backend("gloo", torch.device("cuda")) == "gloo"
    with pytest.raises(ValueError, match="backend must be one of"):
        choose_backend("mpi", torch.device("cpu"))


def _collectives(groups) -> dict:
    world, tp, pp = groups.world, groups.tp, groups.pp
    rank = world.rank
    base = torch.tensor([float(rank), 1.0])
    out = {
        "tp_ranks": tp.ranks, "pp_ranks": pp.ranks, "ep_ranks": groups.ep.ranks,
        "is_output_rank": groups.is_output_rank,
        "tp_sum": tp.all_reduce(base.clone()).tolist(),
        "tp_gather": tp.all_gather(base.clone().view(1, 2), dim=0).tolist(),
        "world_reduce_scatter": world.reduce_scatter(torch.arange(8.0) * (rank + 1)).tolist(),
        "pp_broadcast": pp.broadcast(torch.tensor([float(rank)]), src=1).tolist(),
    }
    # Stage 0 sends its rank to stage 1 of the same TP column.
    if pp.is_first_rank:
        pp.send(torch.tensor([rank * 10.0]), dst=1).wait()
    else:
        out["received"] = pp.recv(torch.empty(1), src=0).tolist()
    return out


def test_groups_and_collectives_on_four_gloo_ranks():
    results = run_ranks(_collectives, tp=2, pp=2)
    assert [r["tp_ranks"] for r in results] == [(0, 1), (0, 1), (2, 3), (2, 3)]
    assert [r["pp_ranks"] for r in results] == [(0, 2), (1, 3), (0, 2), (1, 3)]
    assert [r["ep_ranks"] for r in results] == [r["tp_ranks"] for r in results]
    assert [r["is_output_rank"] for r in results] == [False, False, True, False]
    assert [r["tp_sum"] for r in results] == [[1, 2], [1, 2], [5, 2], [5, 2]]
    assert results[2]["tp_gather"] == [[2, 1], [3, 1]]
    # sum over ranks of arange(8) * (rank + 1) is arange(8) * 10; rank r keeps elements 2r, 2r+1
    assert [r["world_reduce_scatter"] for r in results] == [
        [0, 10], [20, 30], [40, 50], [60, 70]]
    assert [r["pp_broadcast"] for r in results] == [[2], [3], [2], [3]]
    assert [r.get("received") for r in results] == [None, None, [0.0], [10.0]]


def _nested(groups) -> str:
    try:
        with distributed_environment(ParallelLayout(), 0, "tcp://127.0.0.1:1", "gloo"):
            pass
    except RuntimeError as e:
        return str(e)
    return "nested"


def test_a_process_joins_one_worker_group_only():
    assert all("already belongs to a worker group" in r for r in run_ranks(_nested, tp=2))
