"""Sampler: distributions, truncation, seeds, penalties, min_tokens and logprobs."""

from __future__ import annotations

import pytest
import torch

from fleetlm.executor.sampler import (
    Sampler,
    apply_penalties,
    apply_top_k_top_p,
    compute_prompt_logprobs,
)
from fleetlm.executor.sampling_metadata import SamplingMetadata
from fleetlm.executor.sampling_params import SamplingParams

LOGITS_8 = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -2.0])
NUM_DRAWS = 20_000
# Chi-square critical values at p = 0.001 by degrees of freedom: a correct sampler fails a
# test 1 time in 1000 seeds; the draws use fixed seeds, so each test is deterministic.
CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32}


def _build(params, outputs=None, prompts=None, eos=None, vocab_size=8):
    num = len(params)
    return SamplingMetadata.build(
        params,
        prompts or [[] for _ in range(num)],
        outputs or [[] for _ in range(num)],
        eos or [None] * num,
        vocab_size,
        "cpu",
    )


def _sample_counts(params: SamplingParams, logits=LOGITS_8, num_draws=NUM_DRAWS) -> torch.Tensor:
    """Token counts from `num_draws` independent rows (unseeded, or seeds seed+row)."""
    if params.seed is None:
        row_params = [params] * num_draws
    else:
        row_params = [SamplingParams(**{**vars(params), "seed": params.seed + i})
                      for i in range(num_draws)]
    sampler = Sampler(torch.Generator().manual_seed(1234))
    batch = logits.repeat(num_draws, 1)
    tokens = sampler(batch, _build(row_params, vocab_size=logits.numel())).sampled_token_ids
    return torch.bincount(tokens, minlength=logits.numel()).double()


def _assert_matches(counts: torch.Tensor, probs: torch.Tensor) -> None:
    """Chi-square goodness of fit over the kept tokens; dropped tokens must never appear."""
    is_kept = probs > 0
    assert counts[~is_kept].sum() == 0, f"dropped tokens sampled: {counts}"
    expected = probs[is_kept].double() * counts.sum()
    chi2 = ((counts[is_kept] - expected) ** 2 / expected).sum().item()
    assert chi2 < CHI2_999[int(is_kept.sum()) - 1], (chi2, counts, expected)


def _renormalised(logits: torch.Tensor, keep: list[int]) -> torch.Tensor:
    probs = torch.zeros_like(logits)
    probs[keep] = logits[keep].softmax(dim=-1)
    return probs


@pytest.mark.parametrize("seed", [None, 0])
@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_temperature_frequencies_match_softmax(seed, temperature):
    counts = _sample_counts(SamplingParams(temperature=temperature, seed=seed))
    _assert_matches(counts, (LOGITS_8 / temperature).softmax(dim=-1))


@pytest.mark.parametrize("seed", [None, 7])
def test_top_k_keeps_the_k_best_renormalised(seed):
    counts = _sample_counts(SamplingParams(temperature=1.0, top_k=3, seed=seed))
    _assert_matches(counts, _renormalised(LOGITS_8, [0, 1, 2]))


def test_top_p_keeps_smallest_set_reaching_p():
    probs = torch.tensor([0.4, 0.3, 0.15, 0.08, 0.04, 0.02, 0.008, 0.002])
    # 0.4 + 0.3 = 0.7 < 0.75, so the 0.15 token is still needed; the rest is not.
    counts = _sample_counts(SamplingParams(temperature=1.0, top_p=0.75), logits=probs.log())
    _assert_matches(counts, _renormalised(probs.log(), [0, 1, 2]))


def test_min_p_drops_tokens_below_fraction_of_best():
    probs = LOGITS_8.softmax(dim=-1)
    min_p = 0.3  # keeps tokens with p >= 0.3 * p_max: exp(-1) = 0.37 passes, exp(-1.5) not
    counts = _sample_counts(SamplingParams(temperature=1.0, min_p=min_p))
    _assert_matches(counts, _renormalised(LOGITS_8, [0, 1, 2]))
    assert (probs[2] / probs[0]) > min_p > (probs[3] / probs[0])


def test_top_k_and_top_p_combine():
    # Top-k 4 renormalises to [0.46, 0.28, 0.17, 0.10]; top-p 0.6 then keeps 2 tokens.
    counts = _sample_counts(SamplingParams(temperature=1.0, top_k=4, top_p=0.6))
    _assert_matches(counts, _renormalised(LOGITS_8, [0, 1]))


def _reference_top_k_top_p(logits, top_k, top_p):
    """vLLM's sort-based masking: cut ascending-sorted tokens whose cumulative mass <= 1 - p."""
    sorted_logits, order = logits.sort(dim=-1)
    kth = sorted_logits.gather(1, (logits.shape[1] - top_k).unsqueeze(1))
    sorted_logits.masked_fill_(sorted_logits < kth, float("-inf"))
    is_cut = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= 1 - top_p
    is_cut[:, -1] = False
    sorted_logits.masked_fill_(is_cut, float("-inf"))
    return logits.clone().scatter_(1, order, sorted_logits)


@pytest.mark.parametrize("scale", [0.3, 6.0])  # flat rows overflow the CPU candidates
def test_top_k_top_p_masks_like_full_sort_reference(scale):
    vocab_size = 3000
    logits = torch.randn(6, vocab_size, generator=torch.Generator().manual_seed(0)) * scale
    top_k = torch.tensor([vocab_size, 5, vocab_size, 1500, vocab_size, 40])
    top_p = torch.tensor([0.9, 1.0, 1.0, 0.95, 0.5, 0.3]).unsqueeze(1)
    expected = _reference_top_k_top_p(logits, top_k, top_p)
    got = apply_top_k_top_p(logits.clone(), top_k, 1500, top_p)
    assert torch.equal(got.isinf(), expected.isinf())
    assert torch.equal(got[~got.isinf()], logits[~got.isinf()])


def test_greedy_is_argmax_and_fast_path_builds_nothing():
    logits = torch.randn(5, 100, generator=torch.Generator().manual_seed(3))
    meta = _build([SamplingParams(temperature=0.0)] * 5, vocab_size=100)
    assert meta.is_all_greedy and meta.temperature is None and meta.penalties is None
    assert meta.min_tokens_mask is None and meta.num_logprobs is None and not meta.generators
    out = Sampler()(logits.clone(), meta)
    assert out.sampled_token_ids.tolist() == logits.argmax(dim=-1).tolist()
    assert out.logprobs is None


def test_greedy_rows_stay_argmax_in_a_mixed_batch():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(4))
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=5.0, top_p=0.5)] * 2
    tokens = Sampler()(logits.clone(), _build(params, vocab_size=50)).sampled_token_ids
    assert tokens[0::2].tolist() == logits[0::2].argmax(dim=-1).tolist()


def test_truncation_applies_only_to_the_rows_that_ask():
    params = [SamplingParams(temperature=1.0), SamplingParams(temperature=1.0, top_k=1),
              SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, top_p=0.1)]
    meta = _build(params * 50)
    assert meta.truncated_rows.tolist() == [row for row in range(200) if row % 4 in (1, 3)]
    tokens = Sampler(torch.Generator().manual_seed(9))(LOGITS_8.repeat(200, 1), meta)
    by_kind = tokens.sampled_token_ids.view(50, 4)
    assert by_kind[:, 1:].unique().tolist() == [0]  # top-k 1, greedy, top-p 0.1 (p0 = 0.4)
    assert len(by_kind[:, 0].unique()) > 3


def _seeded_sequence(seed, row, batch_params, logits, num_steps=40):
    """Tokens a request with `seed` at `row` draws over `num_steps` output positions."""
    params = list(batch_params)
    params[row] = SamplingParams(temperature=1.0, seed=seed)
    tokens = []
    for step in range(num_steps):
        outputs = [[0] * step for _ in params]
        batch = logits.repeat(len(params), 1)
        out = Sampler(torch.Generator().manual_seed(step))(batch, _build(params, outputs))
        tokens.append(out.sampled_token_ids[row].item())
    return tokens


def test_same_seed_same_tokens_whatever_the_batch():
    flat = torch.zeros(8)  # uniform: every draw is pure noise
    alone = _seeded_sequence(42, 0, [None], flat)
    others = [SamplingParams(temperature=0.7), SamplingParams(temperature=0.0),
              SamplingParams(temperature=1.0, seed=5, top_k=2), None]
    assert _seeded_sequence(42, 3, others, flat) == alone
    assert _seeded_sequence(42, 1, others[:2], flat) == alone
    assert _seeded_sequence(43, 0, [None], flat) != alone
    assert len(set(alone)) > 1


def test_repetition_presence_frequency_penalties():
    logits = torch.tensor([[2.0, -1.0, 0.5, -3.0, 1.0, 0.0]] * 2)
    penalised = SamplingParams(temperature=0.0, repetition_penalty=2.0,
                               presence_penalty=0.5, frequency_penalty=0.25)
    meta = _build([penalised, SamplingParams(temperature=0.0)],
                  outputs=[[2, 2, 4], [0, 0]], prompts=[[0, 3], [1]], vocab_size=6)
    got = apply_penalties(logits.clone(), meta.penalties)
    # token 0: prompt, 2 / 2; 1: unseen; 2: 0.5 / 2 - 2 * 0.25 - 0.5; 3: prompt, -3 * 2;
    # token 4: 1 / 2 - 0.25 - 0.5; 5: unseen.
    assert got[0].tolist() == [1.0, -1.0, -0.75, -6.0, -0.25, 0.0]
    assert torch.equal(got[1], logits[1])
    assert Sampler()(logits.clone(), meta).sampled_token_ids.tolist() == [0, 0]


def test_min_tokens_masks_eos_and_stop_tokens():
    logits = torch.tensor([[0.0, 5.0, 1.0, 4.0, 2.0]] * 3)  # EOS 1 best, then stop id 3
    params = [
        SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[3]),
        SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[3], ignore_eos=True),
        SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[3]),
    ]
    meta = _build(params, outputs=[[4], [4], [4, 4]], eos=[1, 1, 1], vocab_size=5)
    assert Sampler()(logits.clone(), meta).sampled_token_ids.tolist() == [4, 1, 1]
    assert _build(params[2:], outputs=[[4, 4]], eos=[1], vocab_size=5).min_tokens_mask is None


def test_logprobs_are_raw_log_softmax_with_sorted_top_n():
    logits = torch.randn(3, 30, generator=torch.Generator().manual_seed(5))
    params = [SamplingParams(temperature=0.0, logprobs=3, repetition_penalty=1.5),
              SamplingParams(temperature=2.0, logprobs=0, seed=1),
              SamplingParams(temperature=0.0)]
    meta = _build(params, outputs=[[1, 2], [], []], vocab_size=30)
    out = Sampler()(logits.clone(), meta)
    reference = logits.log_softmax(dim=-1)
    tokens = out.sampled_token_ids.tolist()
    first, second, third = out.logprobs
    assert first[0] == (tokens[0], pytest.approx(reference[0, tokens[0]].item(), abs=1e-6))
    top_ids = reference[0].topk(3).indices.tolist()
    assert [t for t, _ in first[1:]] == top_ids
    assert [lp for _, lp in first[1:]] == pytest.approx(reference[0, top_ids].tolist(), abs=1e-6)
    assert second == [(tokens[1], pytest.approx(reference[1, tokens[1]].item(), abs=1e-6))]
    assert third is None


def test_prompt_logprobs_match_reference():
    logits = torch.randn(4, 20, generator=torch.Generator().manual_seed(6))
    targets = [3, 0, 19, 7]
    got = compute_prompt_logprobs(logits, targets, num_top=2)
    reference = logits.log_softmax(dim=-1)
    for pos, position_logprobs in enumerate(got):
        token, logprob = position_logprobs[0]
        assert token == targets[pos]
        assert logprob == pytest.approx(reference[pos, token].item(), abs=1e-6)
        assert [t for t, _ in position_logprobs[1:]] == reference[pos].topk(2).indices.tolist()
