"""Expert parallelism on real gloo groups: each rank holds only its experts, and the layer's
output equals the single-process one for both dispatch backends, also when every token goes
to one rank's experts and when ranks get no tokens at all."""

from __future__ import annotations

import torch
from dist_helpers import run_ranks

from fleetlm.executor.config import ParallelConfig
from fleetlm.executor.models.moe import FusedMoE
from fleetlm.kernels.moe import fused_experts_reference, select_experts
from fleetlm.parallel.experts import ExpertPlacement

NUM_EXPERTS, TOP_K, HIDDEN, INTERMEDIATE = 7, 2, 16, 12


def _checkpoint(seed: int = 0) -> dict[str, torch.Tensor]:
    """Per-expert tensors in the Hugging Face layout: gate/up [I, H], down [H, I]."""
    gen = torch.Generator().manual_seed(seed)
    return {f"{e}.{name}": torch.randn(shape, generator=gen) / 4
            for e in range(NUM_EXPERTS)
            for name, shape in (("gate", (INTERMEDIATE, HIDDEN)), ("up", (INTERMEDIATE, HIDDEN)),
                                ("down", (HIDDEN, INTERMEDIATE)))}


def _stacked(checkpoint) -> tuple[torch.Tensor, torch.Tensor]:
    w13 = torch.stack([torch.cat((checkpoint[f"{e}.gate"], checkpoint[f"{e}.up"]))
                       for e in range(NUM_EXPERTS)])
    w2 = torch.stack([checkpoint[f"{e}.down"] for e in range(NUM_EXPERTS)])
    return w13, w2


def _layer(groups, parallel: ParallelConfig) -> FusedMoE:
    layer = FusedMoE(NUM_EXPERTS, TOP_K, HIDDEN, INTERMEDIATE, True, groups.tp, parallel)
    for key, tensor in _checkpoint().items():
        expert, name = key.split(".")
        param = layer.w2 if name == "down" else layer.w13
        layer.weight_loader(param, tensor, (int(expert), {"gate": 0, "up": 1}.get(name)))
    return layer


def _run_layers(groups, configs: list[ParallelConfig], cases):
    """Each configuration's layer on this rank: its experts, weights and outputs."""
    results = []
    for parallel in configs:
        layer = _layer(groups, parallel)
        with torch.no_grad():
            outputs = [layer(x, logits) for x, logits in cases]
        results.append({"outputs": outputs, "experts": layer.global_ids,
                        "w13": layer.w13.clone(), "w2": layer.w2.clone()})
    return results


def _cases() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    cases = [(torch.randn(n, HIDDEN, generator=gen), torch.randn(n, NUM_EXPERTS, generator=gen))
             for n in (1, 2, 13)]  # 1 and 2 tokens over 3 ranks: some ranks get none
    x = torch.randn(9, HIDDEN, generator=gen)
    to_rank0 = torch.randn(9, NUM_EXPERTS, generator=gen)
    to_rank0[:, :3] += 50.0  # experts 0-2: rank 0's under the linear placement
    return [*cases, (x, to_rank0)]


def _expected(cases):
    w13, w2 = _stacked(_checkpoint())
    return [fused_experts_reference(x, w13, w2, *select_experts(logits, TOP_K, True))
            for x, logits in cases]


def _check_expert_parallel(ranks, index: int, placement: ExpertPlacement, cases) -> None:
    w13, w2 = _stacked(_checkpoint())
    expected = _expected(cases)
    for rank, results in enumerate(ranks):
        result = results[index]
        mine = placement.local_experts(rank)
        assert result["experts"] == mine
        # Only its own experts, whole.
        assert torch.equal(result["w13"], w13[mine]) and torch.equal(result["w2"], w2[mine])
        for out, want in zip(result["outputs"], expected):
            torch.testing.assert_close(out, want)
    assert sorted(e for r in ranks for e in r[index]["experts"]) == list(range(NUM_EXPERTS))


def test_expert_parallel_over_three_ranks_both_backends():
    """7 experts over 3 ranks (linear: 3, 2, 2)."""
    configs = [ParallelConfig(tensor_parallel_size=3, enable_expert_parallel=True,
                              all2all_backend=backend)
               for backend in ("allgather_reducescatter", "all_to_all")]
    cases = _cases()
    ranks = run_ranks(_run_layers, configs, cases, tp=3)
    for index in range(len(configs)):
        _check_expert_parallel(ranks, index, ExpertPlacement(NUM_EXPERTS, 3, "linear"), cases)


def test_round_robin_experts_and_tensor_parallel_experts_over_two_ranks():
    configs = [ParallelConfig(tensor_parallel_size=2, enable_expert_parallel=True,
                              expert_placement_strategy="round_robin",
                              all2all_backend="all_to_all"),
               ParallelConfig(tensor_parallel_size=2)]  # no EP: every expert split in two
    cases = _cases()
    ranks = run_ranks(_run_layers, configs, cases, tp=2)
    _check_expert_parallel(ranks, 0, ExpertPlacement(NUM_EXPERTS, 2, "round_robin"), cases)
    expected = _expected(cases)
    for results in ranks:
        tp_result = results[1]
        assert tp_result["experts"] == list(range(NUM_EXPERTS))
        assert tp_result["w13"].shape == (NUM_EXPERTS, INTERMEDIATE, HIDDEN)  # half the rows
        for out, want in zip(tp_result["outputs"], expected):
            torch.testing.assert_close(out, want)
