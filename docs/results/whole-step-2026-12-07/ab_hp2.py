import os, sys, statistics; sys.path.insert(0, "benchmarks")
import step_parts as sp
os.environ["FLEETLM_HUGE_PAGES"] = "0"; plain = sp.load("gguf", 8, "int8")
os.environ["FLEETLM_HUGE_PAGES"] = "1"; huge = sp.load("gguf", 8, "int8")
bs, inlen, rounds = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
res = {"plain": [], "huge": []}
for llm in (plain, huge): sp.decode_steps(llm, bs, 8, inlen)
for r in range(rounds):
    for name, llm in (("plain", plain), ("huge", huge)) if r % 2 == 0 else (("huge", huge), ("plain", plain)):
        res[name].append(sp.median(sp.decode_steps(llm, bs, 32, inlen)))
ratios = [h / p for p, h in zip(res["plain"], res["huge"])]
print(f"batch {bs} input {inlen}: plain {statistics.median(res['plain'])*1e3:.2f} ms, huge {statistics.median(res['huge'])*1e3:.2f} ms, paired ratio median {statistics.median(ratios):.3f}, huge faster in {sum(r < 1 for r in ratios)}/{rounds}")
