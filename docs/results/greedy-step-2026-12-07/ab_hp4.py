import sys, os, statistics; sys.path.insert(0, "benchmarks"); sys.path.insert(0, "/tmp/w")
import step_parts as sp, hp
from fleetlm.kernels.gguf_linear import QuantizedMatrix
def arena_copy(llm, huge):
    model = llm.engine.executor.runner.model
    weights = []
    for mod in model.modules():
        for p in mod.parameters(recurse=False):
            q = getattr(p, "quantized", None)
            if isinstance(q, QuantizedMatrix) and q.whole is not None and all(w is not q.whole for w in weights):
                weights.append(q.whole)
    os.environ["FLEETLM_HUGE_PAGES"] = "1" if huge else "0"
    arena = hp.Arena(hp.Arena.size_of([w.data.numel() for w in weights]))
    for w in weights:
        piece = arena.take(w.data.numel()).view(w.data.shape); piece.copy_(w.data); w.data = piece
    print("huge" if huge else "4k arena", hp.huge_page_bytes(arena.memory) / 1e6, "MB huge")
    model._is_stack_made = False
    return arena
engines = {"plain": sp.load("gguf", 1, "int8"), "arena4k": sp.load("gguf", 1, "int8"), "huge": sp.load("gguf", 1, "int8")}
keep = [arena_copy(engines["arena4k"], False), arena_copy(engines["huge"], True)]
rounds = int(sys.argv[1])
res = {k: [] for k in engines}
for llm in engines.values(): sp.decode_steps(llm, 1, 8)
names = list(engines)
for r in range(rounds):
    order = names[r % 3:] + names[:r % 3]
    for name in order:
        res[name].append(sp.median(sp.decode_steps(engines[name], 1, 24)))
for k, v in res.items():
    ratios = [a / b for a, b in zip(v, res["plain"])]
    print(f"{k:8s} {statistics.median(v)*1e3:.2f} ms, paired ratio to plain {statistics.median(ratios):.3f}, faster {sum(x < 1 for x in ratios)}/{rounds}")
