"""Single thread: the 30 layers' gate_up products in sequence against one matrix of all their
rows (the same bytes) in one call; then the same for down."""
import sys, time, torch, statistics; sys.path.insert(0, "benchmarks")
import step_parts as sp
from fleetlm.kernels import gguf_linear
th = int(sys.argv[1]); torch.set_num_threads(th)
llm = sp.load("gguf", 1, "int8")
m = llm.engine.executor.runner.model
lib = gguf_linear._library()
flush = torch.ones(32 << 20)
for name, k in (("gate_up_proj", 576), ("down_proj", 1536), ("qkv_proj", 576)):
    ws = [getattr(l.mlp if "proj" in name and name != "qkv_proj" else l.self_attn, name).weight.quantized.whole for l in m.layers.values()]
    big = gguf_linear.GGUFWeight(torch.cat([w.data for w in ws]), ws[0].qtype, k, ws[0].packed)
    x = torch.randn(1, k); y = torch.empty(1, big.shape[0])
    def seq():
        flush.sum(); t = time.perf_counter()
        for w in ws:
            lib.fleet_gguf_matmul_q8(x.data_ptr(), 1, k, w.data.data_ptr(), w.shape[0], w.kernel_type, y.data_ptr(), th)
        return time.perf_counter() - t
    def one():
        flush.sum(); t = time.perf_counter()
        lib.fleet_gguf_matmul_q8(x.data_ptr(), 1, k, big.data.data_ptr(), big.shape[0], big.kernel_type, y.data_ptr(), th)
        return time.perf_counter() - t
    a, b = [], []
    for _ in range(15): a.append(seq()); b.append(one())
    nb = big.nbytes
    print(f"{th} thr {name}: 30 products {statistics.median(a)*1e3:.2f} ms ({nb/statistics.median(a)/1e9:.1f} GB/s), one product of the same rows {statistics.median(b)*1e3:.2f} ms ({nb/statistics.median(b)/1e9:.1f} GB/s)")
