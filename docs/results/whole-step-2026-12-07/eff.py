import sys, time, torch, statistics; sys.path.insert(0, "benchmarks")
import step_parts as sp
from fleetlm.kernels import gguf_linear
llm = sp.load("gguf", 1, "int8")
m = llm.engine.executor.runner.model
lib = gguf_linear._library()
ws = [l.mlp.gate_up_proj.weight.quantized.whole for l in m.layers.values()]
big = gguf_linear.GGUFWeight(torch.cat([w.data for w in ws]), ws[0].qtype, 576, ws[0].packed)
f = torch.ones(big.nbytes // 4)
flush = torch.ones(32 << 20)
x = torch.randn(1, 576); y = torch.empty(1, big.shape[0])
res = {}
for r in range(12):
    for th in (1, 2):
        torch.set_num_threads(th)
        flush.sum(); t = time.perf_counter(); f.sum(); res.setdefault(("sum", th), []).append(time.perf_counter() - t)
        flush.sum(); t = time.perf_counter()
        lib.fleet_gguf_matmul_q8(x.data_ptr(), 1, 576, big.data.data_ptr(), big.shape[0], big.kernel_type, y.data_ptr(), th)
        res.setdefault(("product", th), []).append(time.perf_counter() - t)
for k, v in sorted(res.items(), key=lambda kv: kv[0][1]):
    print(k, f"{big.nbytes / statistics.median(v) / 1e9:.1f} GB/s median, {big.nbytes / min(v) / 1e9:.1f} best")
