import sys, time; sys.path.insert(0, "benchmarks")
import step_parts as sp
from collections import defaultdict
from fleetlm import SamplingParams
from fleetlm.executor import model_runner
from fleetlm.executor.sampling_metadata import SamplingMetadata
from fleetlm.executor.spec.verify import VerifiedTokens
llm = sp.load("gguf", 1, "int8")
engine = llm.engine
T = defaultdict(float)
pc = time.perf_counter
def _sample(self, batch, hidden, grammar_bitmask=None):
    t0 = pc()
    states = [self.requests[r] for r in batch.sampling_req_ids]
    rows = [(s, drafts[:j]) for s, drafts in zip(states, batch.sampling_drafts) for j in range(len(drafts) + 1)]
    t1 = pc(); T["lists"] += t1 - t0
    metadata = SamplingMetadata.build(params=[s.sampling_params for s, _ in rows],
        prompt_token_ids=[s.token_ids[: s.num_prompt_tokens] for s, _ in rows],
        output_token_ids=[s.output_token_ids + drafts for s, drafts in rows],
        eos_token_ids=[s.eos_token_id for s, _ in rows], vocab_size=self.vocab_size, device=self.device)
    t2 = pc(); T["meta"] += t2 - t1
    rows = hidden if len(batch.logits_indices) == hidden.shape[0] else hidden[batch.logits_indices]
    t3 = pc(); T["rows"] += t3 - t2
    logits = self.model.compute_logits(rows)
    t4 = pc(); T["compute_logits"] += t4 - t3
    logits = logits.float()
    t5 = pc(); T["float"] += t5 - t4
    sampled = self.sampler(logits, metadata)
    t6 = pc(); T["sampler"] += t6 - t5
    token_ids = sampled.sampled_token_ids.tolist()
    logprobs = [None] * len(token_ids) if sampled.logprobs is None else [None if lp is None else [lp] for lp in sampled.logprobs]
    r = VerifiedTokens([[t] for t in token_ids], logprobs)
    t7 = pc(); T["tolist+wrap"] += t7 - t6
    return r
model_runner.ModelRunner._sample = _sample
sp.add_prompts(engine, 1, 4, SamplingParams(temperature=0, max_tokens=1100, ignore_eos=True))
for _ in range(20): engine.step()
T.clear()
for _ in range(1000): engine.step()
for k, v in T.items(): print(f"{k:20s} {v:.4f} ms/step")
