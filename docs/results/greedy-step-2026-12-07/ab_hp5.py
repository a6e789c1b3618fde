"""Two engines: FLEETLM_HUGE_PAGES=0 (weights where loaded) and the default (weights gathered
onto 2 MiB pages), alternated run by run; batch and prompt length from argv."""
import os, sys, statistics; sys.path.insert(0, "benchmarks")
import step_parts as sp
from fleetlm.kernels import huge_pages
bs, inlen, rounds = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
os.environ[huge_pages.ENV] = "0"; plain = sp.load("gguf", bs, "int8")
os.environ[huge_pages.ENV] = "1"; huge = sp.load("gguf", bs, "int8")
w = huge.engine.executor.runner.model.embed_tokens.weight.quantized.whole
print("huge-page bytes in the weights' mapping:", huge_pages.huge_page_bytes(w.data) / 1e6, "MB")
res = {"plain": [], "huge": []}
for llm in (plain, huge): sp.decode_steps(llm, bs, 8, inlen)
for r in range(rounds):
    for name, llm in (("plain", plain), ("huge", huge)) if r % 2 == 0 else (("huge", huge), ("plain", plain)):
        res[name].append(sp.median(sp.decode_steps(llm, bs, 24, inlen)))
ratios = [h / p for p, h in zip(res["plain"], res["huge"])]
print(f"batch {bs} input {inlen}: plain {statistics.median(res['plain'])*1e3:.2f} ms, huge {statistics.median(res['huge'])*1e3:.2f} ms, paired ratio median {statistics.median(ratios):.3f}, huge faster in {sum(r < 1 for r in ratios)}/{rounds}")
