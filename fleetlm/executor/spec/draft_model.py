"""A draft model proposer: a smaller model with the target's tokenizer, run greedily.

It keeps its own KV cache, addressed through the target's block tables (same block ids, same
block size, same `kv_cache_dtype`; the scheduler allocates `num_speculative_tokens` look-ahead slots for it). Per
request it remembers how many leading positions of its cache hold the request's real tokens;
after each step it first catches up on the tokens it has not seen (the whole prompt at
first, then the last step's accepted drafts and sampled token), which yields the first draft,
then extends greedily one token at a time. Draft positions are never counted as cached: the
next catch-up recomputes any that were accepted.
"""

from __future__ import annotations

import torch

from fleetlm.executor.config import CacheConfig, ModelConfig, SpeculativeConfig
from fleetlm.executor.input_batch import CachedRequestState, prepare_batch
from fleetlm.executor.sampling_params import SamplingParams
from fleetlm.executor.spec.proposers import DraftRequest, Proposer

_PARAMS = SamplingParams(temperature=0.0)  # drafts are greedy


class DraftModelProposer(Proposer):
    def __init__(self, config: SpeculativeConfig, model_config: ModelConfig,
                 cache_config: CacheConfig, device: torch.device,
                 target_vocab_size: int) -> None:
        from fleetlm.executor.model_runner import ModelRunner

        draft_config = ModelConfig(model=config.model, dtype=model_config.dtype,
                                   device=device.type, seed=model_config.seed,
                                   random_weights=config.random_weights)
        block_size = cache_config.block_size
        self.runner = ModelRunner(draft_config, CacheConfig(
            block_size=block_size, kv_cache_dtype=cache_config.kv_cache_dtype))
        if self.runner.vocab_size != target_vocab_size:
            raise ValueError(f"draft model {config.model} has a vocabulary of "
                             f"{self.runner.vocab_size} tokens, the target {target_vocab_size}: "
                             f"a draft model must share the target's tokenizer")
        self.block_size = block_size
        self.kv_bytes_per_block = self.runner.kv_bytes_per_block
        self.num_cached: dict[str, int] = {}  # req -> leading positions holding real tokens

    def allocate_kv_cache(self, num_blocks: int) -> None:
        self.runner.allocate_kv_cache(num_blocks)

    def forget(self, req_ids) -> None:
        for req_id in req_ids:
            self.num_cached.pop(req_id, None)

    @torch.inference_mode()
    def propose(self, requests: list[DraftRequest]) -> dict[str, list[int]]:
        states, num_drafts = {}, {}
        for request in requests:
            length = len(request.token_ids)
            # Position length-1+j is the input of draft j+1: it needs a slot.
            num = min(request.num_drafts, len(request.block_ids) * self.block_size - length + 1)
            if num < 1:
                continue
            start = min(self.num_cached.get(request.req_id, 0), length - 1)
            states[request.req_id] = CachedRequestState(
                request.req_id, list(request.token_ids), length, _PARAMS, None,
                request.block_ids, start)
            num_drafts[request.req_id] = num
            self.num_cached[request.req_id] = length
        drafts: dict[str, list[int]] = {r: [] for r in states}
        scheduled = {r: len(s.token_ids) - s.num_computed_tokens for r, s in states.items()}
        while scheduled:
            for req_id, token in self._forward(states, scheduled).items():
                drafts[req_id].append(token)
                state = states[req_id]
                state.num_computed_tokens += scheduled[req_id]
                state.token_ids.append(token)
            scheduled = {r: 1 for r in scheduled if len(drafts[r]) < num_drafts[r]}
        return drafts

    def _forward(self, states: dict[str, CachedRequestState],
                 num_scheduled: dict[str, int]) -> dict[str, int]:
        """One draft-model pass; the greedy next token of each scheduled request."""
        runner = self.runner
        batch = prepare_batch(states, num_scheduled, self.block_size, runner.device)
        hidden = runner.model(batch.input_ids, batch.positions, runner.kv_caches,
                              batch.attn_metadata)
        logits = runner.model.compute_logits(hidden[batch.logits_indices])
        return dict(zip(batch.sampling_req_ids, logits.argmax(dim=-1).tolist()))
