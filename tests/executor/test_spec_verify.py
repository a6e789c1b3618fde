"""Verification of draft tokens: greedy takes the longest matching prefix; rejection sampling
emits exactly the target distribution at every position (chi-square on a small-vocabulary
"model": fixed logits over 8 tokens); seeds reproduce."""

from __future__ import annotations

import torch
from test_sampler import LOGITS_8, _assert_matches, _build

from fleetlm.executor.sampler import Sampler
from fleetlm.executor.sampling_params import SamplingParams
from fleetlm.executor.spec.verify import verify_drafts

NUM_TRIALS = 20_000
SECOND_LOGITS = torch.tensor([0.0, 1.0, 2.0, -1.0, 0.5, 0.0, 0.3, -2.0])


def _rows_for(params: list[SamplingParams], drafts: list[list[int]]):
    """Metadata for one row per (request, position), drafts seen as outputs (as the runner)."""
    rows = [(p, d[:j]) for p, d in zip(params, drafts) for j in range(len(d) + 1)]
    return _build([p for p, _ in rows], outputs=[o for _, o in rows])


def test_greedy_accepts_the_longest_matching_prefix_then_the_targets_token():
    logits = torch.full((7, 8), -5.0)
    # request 0: drafts [3, 1, 4], target argmax per row [3, 1, 6, 2] -> 3, 1 taken, then 6
    for row, best in enumerate([3, 1, 6, 2]):
        logits[row, best] = 5.0
    # request 1: drafts [2, 2], target argmax [2, 2, 7] -> everything taken plus the bonus 7
    for row, best in enumerate([2, 2, 7], start=4):
        logits[row, best] = 5.0
    params = [SamplingParams(temperature=0.0, logprobs=0)] * 2
    drafts = [[3, 1, 4], [2, 2]]
    verified = verify_drafts(Sampler(), logits, _rows_for(params, drafts), drafts)
    assert verified.token_ids == [[3, 1, 6], [2, 2, 7]]
    assert [[entry[0][0] for entry in lp] for lp in verified.logprobs] == [[3, 1, 6], [2, 2, 7]]


def _trials(drafts: list[int], seed: int = 1234, temperature: float = 1.0):
    params = [SamplingParams(temperature=temperature)] * NUM_TRIALS
    all_drafts = [drafts] * NUM_TRIALS
    rows = [LOGITS_8, SECOND_LOGITS, LOGITS_8][: len(drafts) + 1]  # one per position
    logits = torch.stack(rows).repeat(NUM_TRIALS, 1)
    sampler = Sampler(torch.Generator().manual_seed(seed))
    return verify_drafts(sampler, logits, _rows_for(params, all_drafts), all_drafts).token_ids


def test_rejection_sampling_emits_the_target_distribution_at_each_position():
    # A likely draft (token 0, p = 0.41) and an unlikely one (token 6, p = 0.02): the first
    # emitted token must follow softmax(LOGITS_8) either way.
    for draft in (0, 6):
        emitted = _trials([draft, 2])
        first = torch.bincount(torch.tensor([t[0] for t in emitted]), minlength=8).double()
        _assert_matches(first, LOGITS_8.softmax(-1))
        # Given the first draft was taken, the second token follows the second position's
        # distribution (the second draft, token 2, is tested the same way).
        second = torch.tensor([t[1] for t in emitted if t[0] == draft and len(t) > 1])
        assert len(second) > 100
        _assert_matches(torch.bincount(second, minlength=8).double(), SECOND_LOGITS.softmax(-1))


def test_acceptance_rate_is_the_drafts_target_probability():
    emitted = _trials([0])
    rate = sum(len(t) == 2 for t in emitted) / NUM_TRIALS
    p = LOGITS_8.softmax(-1)[0].item()
    assert abs(rate - p) < 4 * (p * (1 - p) / NUM_TRIALS) ** 0.5


def test_seeded_requests_repeat_whatever_the_sampler_draws():
    params = [SamplingParams(temperature=1.0, seed=s) for s in range(64)]
    drafts = [[0, 2]] * 64
    logits = torch.stack([LOGITS_8, SECOND_LOGITS, LOGITS_8]).repeat(64, 1)
    runs = [verify_drafts(Sampler(torch.Generator().manual_seed(g)), logits.clone(),
                          _rows_for(params, drafts), drafts).token_ids for g in (1, 2)]
    assert runs[0] == runs[1]
    assert len({tuple(t) for t in runs[0]}) > 5  # the seeds do differ from one another
