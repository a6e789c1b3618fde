import time, statistics, torch
from fleetlm.kernels import gguf_linear, hugepages
import sys; sys.path.insert(0, "benchmarks")
import step_parts as sp
import os
os.environ["FLEETLM_HUGE_PAGES"] = "0"
llm = sp.load("gguf", 1, "int8")
m = llm.engine.executor.runner.model
lm = m.lm_head.weight.quantized.whole
stack = [(l.self_attn.qkv_proj.weight.quantized.whole, l.self_attn.o_proj.weight.quantized.whole, l.mlp.gate_up_proj.weight.quantized.whole, l.mlp.down_proj.weight.quantized.whole) for l in m.layers.values()]
lib = gguf_linear._library()
def copy_hp(w):
    d = hugepages.empty(w.data.numel()).view(w.data.shape); d.copy_(w.data)
    return gguf_linear.GGUFWeight(d, w.qtype, w.shape[1], w.packed)
lm_h = copy_hp(lm)
# layer matrices: all in one arena
arena = hugepages.Arena(hugepages.Arena.size_of(w.nbytes for ws in stack for w in ws))
def take(w):
    d = arena.take(w.nbytes).view(w.data.shape); d.copy_(w.data)
    return gguf_linear.GGUFWeight(d, w.qtype, w.shape[1], w.packed)
stack_h = [tuple(take(w) for w in ws) for ws in stack]
flush = torch.ones(32 << 20)
x = torch.randn(1, 576); xi = torch.randn(1, 1536)
def prod(w, x):
    y = torch.empty(1, w.shape[0])
    assert lib.fleet_gguf_matmul_q8(x.data_ptr(), 1, w.shape[1], w.data.data_ptr(), w.shape[0], w.kernel_type, y.data_ptr(), 2) == 0
def lmrun(w):
    flush.sum(); t = time.perf_counter(); prod(w, x); return time.perf_counter() - t
def stackrun(s):
    flush.sum(); t = time.perf_counter()
    for q, o, gu, d in s:
        prod(q, x); prod(o, x); prod(gu, x); prod(d, xi)
    return time.perf_counter() - t
res = {k: [] for k in ("lm plain", "lm huge", "stack plain", "stack huge")}
for r in range(40):
    res["lm plain"].append(lmrun(lm)); res["lm huge"].append(lmrun(lm_h))
    res["stack plain"].append(stackrun(stack)); res["stack huge"].append(stackrun(stack_h))
for k, v in res.items(): print(k, f"{statistics.median(v)*1e3:.3f} ms")
