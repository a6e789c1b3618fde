"""Verify draft tokens against the target model's distribution, in one pass over the rows.

Layout: a request with k drafts has k + 1 logits rows, row j predicting the token after its
j-th draft (row 0: after its last real token); a request without drafts has one row. Row j's
sampling metadata treats the request's first j drafts as outputs, so min_tokens, penalties
and the per-position seeds are those of that position.

Per row j < k with draft d = drafts[j]:
    greedy   accept d if it is the argmax
    random   accept d with probability p_j(d) (the drafts are deterministic: q is one-hot,
             so min(1, p/q) = p(d)); otherwise the emitted token is drawn from p_j with d
             removed (the normalised residual max(p - q, 0)). This is rejection sampling:
             every emitted token has exactly the target's distribution.
The last row draws the bonus token after k accepted drafts. A request emits its accepted
drafts and then the first non-accepted row's token: between 1 and k + 1 tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fleetlm.executor.outputs import PositionLogprobs
from fleetlm.executor.sampler import Sampler, exponential_race, logprobs_per_row
from fleetlm.executor.sampling_metadata import SamplingMetadata

NO_DRAFT = -1


@dataclass
class VerifiedTokens:
    token_ids: list[list[int]]  # per request: accepted drafts, then one token of the target's
    logprobs: list[list[PositionLogprobs] | None]  # per request, per emitted token


def verify_drafts(sampler: Sampler, logits: torch.Tensor, metadata: SamplingMetadata,
                  drafts: list[list[int]]) -> VerifiedTokens:
    """`logits`: [rows, vocab] fp32 as laid out above (modified); `drafts`: per request."""
    row_drafts = [d for request_drafts in drafts for d in (*request_drafts, NO_DRAFT)]
    draft = torch.tensor(row_drafts, dtype=torch.int64, device=logits.device)
    has_draft = draft != NO_DRAFT
    raw_logprobs = sampler.raw_logprobs(logits, metadata)
    logits = sampler.preprocess(logits, metadata)
    greedy = logits.argmax(dim=-1)
    if metadata.is_all_greedy:
        is_accepted, emitted_if_rejected = has_draft & (greedy == draft), greedy
    else:
        is_accepted, emitted_if_rejected = _verify_random(
            sampler, logits, metadata, draft, has_draft, greedy)
    emitted = torch.where(is_accepted, draft, emitted_if_rejected)
    row_logprobs = None if raw_logprobs is None else \
        logprobs_per_row(raw_logprobs, emitted, metadata)
    return _per_request(drafts, is_accepted.tolist(), emitted.tolist(), row_logprobs)


def _verify_random(sampler: Sampler, logits: torch.Tensor, metadata: SamplingMetadata,
                   draft: torch.Tensor, has_draft: torch.Tensor, greedy: torch.Tensor):
    probs = sampler.random_probs(logits, metadata)
    index = draft.clamp(min=0).unsqueeze(1)
    draft_prob = probs.gather(1, index).squeeze(1)
    # One uniform per row for the accept test: a seeded row draws it from its own generator
    # (then its residual draw continues from there), so the same seed gives the same text.
    uniform = torch.rand(probs.shape[0], device=probs.device, generator=sampler.generator)
    for row, generator in metadata.generators.items():
        uniform[row] = torch.rand((), device=probs.device, generator=generator)
    accepted_random = has_draft & (uniform < draft_prob)
    residual = probs.scatter_(1, index, torch.where(has_draft.unsqueeze(1), 0.0,
                                                    draft_prob.unsqueeze(1)))
    drawn = exponential_race(residual, metadata.generators, sampler.generator)
    if metadata.is_all_random:
        return accepted_random, drawn
    accepted_greedy = has_draft & (greedy == draft)
    is_greedy = metadata.is_greedy
    return (torch.where(is_greedy, accepted_greedy, accepted_random),
            torch.where(is_greedy, greedy, drawn))


def _per_request(drafts: list[list[int]], is_accepted: list[bool], emitted: list[int],
                 row_logprobs: list | None) -> VerifiedTokens:
    token_ids, logprobs = [], []
    row = 0
    for request_drafts in drafts:
        num_rows = len(request_drafts) + 1
        num_emitted = next((j + 1 for j in range(num_rows) if not is_accepted[row + j]),
                           num_rows)
        token_ids.append(emitted[row:row + num_emitted])
        if row_logprobs is None or row_logprobs[row] is None:
            logprobs.append(None)
        else:
            logprobs.append(row_logprobs[row:row + num_emitted])
        row += num_rows
    return VerifiedTokens(token_ids, logprobs)
