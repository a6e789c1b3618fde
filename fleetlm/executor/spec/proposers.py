"""Proposers: after a step, suggest draft tokens for each request that will speculate.

A proposer is a collaborator of the model runner (`ModelRunner(..., proposer=...)`); the
scheduler says how many drafts each request gets (`SchedulerOutput.num_draft_tokens`) and
verifies them in the request's next step. Seam for EAGLE-style heads: `DraftRequest` carries
what a proposer may look at; a head that reads the target's hidden states gets them there.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import numpy as np

from fleetlm.executor.config import SpeculativeConfig


@dataclass
class DraftRequest:
    """One request to propose for, right after the step that sampled its newest tokens."""

    req_id: str
    token_ids: list[int]  # prompt and outputs, the tokens sampled this step included
    num_drafts: int
    block_ids: list[int]  # its block table (a draft model keeps its own KV in these blocks)
    hidden_state: Any = None  # the target's last hidden state for the request (EAGLE)


class Proposer(ABC):
    """Contract: `propose` returns at most `num_drafts` tokens per request (fewer or none
    when it has no good guess); it never changes the target model's state."""

    kv_bytes_per_block: int = 0  # memory a proposer's own KV cache needs per block

    def allocate_kv_cache(self, num_blocks: int) -> None:
        """Called once the target's cache size is agreed (draft models keep their own)."""

    def forget(self, req_ids) -> None:
        """These requests finished or were preempted: drop what is kept for them."""

    @abstractmethod
    def propose(self, requests: list[DraftRequest]) -> dict[str, list[int]]: ...


class NgramProposer(Proposer):
    """Prompt lookup: find the request's last n tokens earlier in its own tokens (the most
    recent occurrence, longest n first) and propose what followed them there. Costs no model
    pass; pays when the output copies the input (summaries, edits, code)."""

    def __init__(self, min_n: int, max_n: int) -> None:
        self.min_n, self.max_n = min_n, max_n

    def propose(self, requests: list[DraftRequest]) -> dict[str, list[int]]:
        proposals = {}
        for request in requests:
            drafts = ngram_lookup(np.asarray(request.token_ids, dtype=np.int64),
                                  self.min_n, self.max_n, request.num_drafts)
            if drafts:
                proposals[request.req_id] = drafts
        return proposals


def ngram_lookup(tokens: np.ndarray, min_n: int, max_n: int, k: int) -> list[int]:
    """Up to `k` tokens that followed the latest earlier occurrence of the last n tokens."""
    length = len(tokens)
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        # Windows over tokens[:-1] start at 0 .. length-1-n: each is followed by a token,
        # and none is the suffix itself.
        windows = np.lib.stride_tricks.sliding_window_view(tokens[:-1], n)
        matches = np.flatnonzero((windows == tokens[length - n:]).all(axis=1))
        if len(matches):
            start = matches[-1] + n
            return tokens[start:start + k].tolist()
    return []


def make_proposer(config: SpeculativeConfig | None, **runner_context) -> Proposer | None:
    """The proposer a speculative config names (None: speculation is off)."""
    if config is None:
        return None
    if config.method == "ngram":
        return NgramProposer(config.prompt_lookup_min, config.prompt_lookup_max)
    from fleetlm.executor.spec.draft_model import DraftModelProposer

    return DraftModelProposer(config, **runner_context)
