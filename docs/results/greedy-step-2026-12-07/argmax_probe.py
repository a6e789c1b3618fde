import sys, time; sys.path.insert(0, "benchmarks")
import step_parts as sp
from collections import defaultdict
from fleetlm import SamplingParams
from fleetlm.executor import model_runner
from fleetlm.kernels import fused_ops, gguf_linear
from fleetlm.executor.spec.verify import VerifiedTokens
import torch
llm = sp.load("gguf", 1, "int8")
engine = llm.engine
T = defaultdict(float)
pc = time.perf_counter
orig_mm = gguf_linear.matmul
def mm(*a, **k):
    t = pc(); r = orig_mm(*a, **k); T["matmul(all)"] += pc() - t; return r
gguf_linear.matmul = mm
def _argmax_tokens(self, batch, hidden):
    t0 = pc()
    rows = hidden if len(batch.sampling_req_ids) == hidden.shape[0] else hidden[batch.logits_indices]
    t1 = pc(); T["rows"] += t1 - t0
    logits = self.model.compute_logits(rows)
    t2 = pc(); T["compute_logits"] += t2 - t1
    if logits.dtype != torch.float32: logits = logits.float()
    a = fused_ops.argmax(logits)
    t3 = pc(); T["argmax"] += t3 - t2
    token_ids = a.tolist()
    r = VerifiedTokens([[t] for t in token_ids], [None] * len(token_ids))
    T["tolist"] += pc() - t3
    return r
model_runner.ModelRunner._argmax_tokens = _argmax_tokens
orig_s = model_runner.ModelRunner._sample
def s(*a, **k):
    t = pc(); r = orig_s(*a, **k); T["_sample"] += pc() - t; return r
model_runner.ModelRunner._sample = s
sp.add_prompts(engine, 1, 4, SamplingParams(temperature=0, max_tokens=1100, ignore_eos=True))
for _ in range(20): engine.step()
T.clear()
for _ in range(1000): engine.step()
for k, v in T.items(): print(f"{k:20s} {v*1e3:.1f} us/step")
