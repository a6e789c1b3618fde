import sys, time, statistics
sys.path.insert(0, "benchmarks")
import step_parts as sp
from fleetlm.executor import model_runner as mr
from fleetlm.executor.sampling_metadata import SamplingMetadata
from fleetlm.executor.spec.verify import VerifiedTokens
T = {k: [] for k in "meta index lmhead sampler tolist total".split()}
def _sample(self, batch, hidden, grammar_bitmask=None):
    c = time.perf_counter; t0 = c()
    states = [self.requests[r] for r in batch.sampling_req_ids]
    rows = [(s, drafts[:j]) for s, drafts in zip(states, batch.sampling_drafts) for j in range(len(drafts) + 1)]
    metadata = SamplingMetadata.build(params=[s.sampling_params for s, _ in rows],
        prompt_token_ids=[s.token_ids[: s.num_prompt_tokens] for s, _ in rows],
        output_token_ids=[s.output_token_ids + drafts for s, drafts in rows],
        eos_token_ids=[s.eos_token_id for s, _ in rows], vocab_size=self.vocab_size, device=self.device)
    t1 = c()
    h = hidden[batch.logits_indices]
    t2 = c()
    logits = self.model.compute_logits(h).float()
    t3 = c()
    sampled = self.sampler(logits, metadata)
    t4 = c()
    token_ids = sampled.sampled_token_ids.tolist()
    logprobs = [None] * len(token_ids)
    r = VerifiedTokens([[t] for t in token_ids], logprobs)
    t5 = c()
    for k, v in zip("meta index lmhead sampler tolist total".split(), (t1-t0, t2-t1, t3-t2, t4-t3, t5-t4, t5-t0)):
        T[k].append(v * 1e6)
    return r
mr.ModelRunner._sample = _sample
llm = sp.load("gguf", 1, "int8")
sp.decode_steps(llm, 1, 16)
for k in T: T[k].clear()
for _ in range(4):
    sp.decode_steps(llm, 1, 100)
for k, v in T.items():
    print(f"{k:8s} median {statistics.median(v):8.1f} us  mean {statistics.mean(v):8.1f}")
llm.shutdown()
