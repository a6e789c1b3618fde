"""Whole-change A/B in one process: `before` = the stack without its ends and the runner's
logits gather (HEAD~1's _sample), `after` = this tree."""
import sys, statistics, types; sys.path.insert(0, "benchmarks")
import step_parts as sp
from fleetlm.executor import model_runner as mr
from fleetlm.executor.sampling_metadata import SamplingMetadata
from fleetlm.executor.spec.verify import VerifiedTokens, verify_drafts

def old_sample(self, batch, hidden, grammar_bitmask=None):
    if not batch.sampling_req_ids:
        return None
    states = [self.requests[r] for r in batch.sampling_req_ids]
    rows = [(s, drafts[:j]) for s, drafts in zip(states, batch.sampling_drafts)
            for j in range(len(drafts) + 1)]
    metadata = SamplingMetadata.build(
        params=[s.sampling_params for s, _ in rows],
        prompt_token_ids=[s.token_ids[: s.num_prompt_tokens] for s, _ in rows],
        output_token_ids=[s.output_token_ids + drafts for s, drafts in rows],
        eos_token_ids=[s.eos_token_id for s, _ in rows],
        vocab_size=self.vocab_size, device=self.device)
    logits = self.model.compute_logits(hidden[batch.logits_indices]).float()
    sampled = self.sampler(logits, metadata)
    token_ids = sampled.sampled_token_ids.tolist()
    logprobs = [None] * len(token_ids)
    return VerifiedTokens([[t] for t in token_ids], logprobs)

a = sp.load("gguf", 8, "int8"); b = sp.load("gguf", 8, "int8")
ra = a.engine.executor.runner
ra.model._decode_ends = lambda: None
ra._sample = types.MethodType(old_sample, ra)
bs, inlen, rounds = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
res = {"before": [], "after": []}
for llm in (a, b): sp.decode_steps(llm, bs, 8, inlen)
assert ra.model._native_stack.ends is None and b.engine.executor.runner.model._native_stack.ends is not None
for r in range(rounds):
    order = (("before", a), ("after", b)) if r % 2 == 0 else (("after", b), ("before", a))
    for name, llm in order:
        res[name].append(sp.median(sp.decode_steps(llm, bs, 32, inlen)))
ratios = [n / p for p, n in zip(res["before"], res["after"])]
print(f"batch {bs} input {inlen}: before {statistics.median(res['before'])*1e3:.2f} ms, after {statistics.median(res['after'])*1e3:.2f} ms, paired ratio median {statistics.median(ratios):.3f}, after faster in {sum(r < 1 for r in ratios)}/{rounds}")
