"""Two engines: weights on 4 KiB pages (torch's) and the same weights copied into one 2 MiB-page
arena (MADV_HUGEPAGE), alternated; plus the 4K/2M sum bandwidth before each pair."""
import sys, statistics; sys.path.insert(0, "benchmarks"); sys.path.insert(0, "/tmp/w")
import step_parts as sp, hp
from fleetlm.kernels.gguf_linear import QuantizedMatrix
plain = sp.load("gguf", 1, "int8"); huge = sp.load("gguf", 1, "int8")
model = huge.engine.executor.runner.model
weights = []
for mod in model.modules():
    for p in mod.parameters(recurse=False):
        q = getattr(p, "quantized", None)
        if isinstance(q, QuantizedMatrix) and q.whole is not None and all(w is not q.whole for w in weights):
            weights.append(q.whole)
arena = hp.Arena(hp.Arena.size_of([w.data.numel() for w in weights]))
for w in weights:
    piece = arena.take(w.data.numel()).view(w.data.shape); piece.copy_(w.data); w.data = piece
print("huge bytes", hp.huge_page_bytes(arena.memory) / 1e6, "MB of", arena.used / 1e6)
model._is_stack_made = False
bw = sp.ReadBandwidth()
rounds = int(sys.argv[1])
res = {"plain": [], "huge": []}
for llm in (plain, huge): sp.decode_steps(llm, 1, 8)
for r in range(rounds):
    b = bw.read(3)
    for name, llm in (("plain", plain), ("huge", huge)) if r % 2 == 0 else (("huge", huge), ("plain", plain)):
        res[name].append(sp.median(sp.decode_steps(llm, 1, 24)))
    print(f"4k {b['4k']:.1f} 2m {b['2m']:.1f} GB/s: plain {res['plain'][-1]*1e3:.2f} huge {res['huge'][-1]*1e3:.2f}")
ratios = [h / p for p, h in zip(res["plain"], res["huge"])]
print(f"plain {statistics.median(res['plain'])*1e3:.2f} ms, huge {statistics.median(res['huge'])*1e3:.2f} ms, paired ratio {statistics.median(ratios):.3f}, huge faster {sum(r < 1 for r in ratios)}/{rounds}")
