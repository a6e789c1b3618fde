import sys, statistics; sys.path.insert(0, "benchmarks")
import step_parts as sp
a = sp.load("gguf", 8, "int8"); b = sp.load("gguf", 8, "int8")
m = a.engine.executor.runner.model
m._decode_ends = lambda: None
bs, inlen, rounds = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
res = {"python ends": [], "native ends": []}
for llm in (a, b): sp.decode_steps(llm, bs, 8, inlen)
assert a.engine.executor.runner.model._native_stack.ends is None and b.engine.executor.runner.model._native_stack.ends is not None
for r in range(rounds):
    order = (("python ends", a), ("native ends", b)) if r % 2 == 0 else (("native ends", b), ("python ends", a))
    for name, llm in order:
        res[name].append(sp.median(sp.decode_steps(llm, bs, 32, inlen)))
ratios = [n / p for p, n in zip(res["python ends"], res["native ends"])]
print(f"batch {bs} input {inlen}: python ends {statistics.median(res['python ends'])*1e3:.2f} ms, native ends {statistics.median(res['native ends'])*1e3:.2f} ms, paired ratio median {statistics.median(ratios):.3f}, native faster in {sum(r < 1 for r in ratios)}/{rounds}")
