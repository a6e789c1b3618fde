"""One engine; the tied embedding / LM head in tiles or in GGUF's rows, alternated run by run
(runs of 24 one-sequence decode steps, each run's median step)."""
import statistics, sys; sys.path.insert(0, "benchmarks")
import step_parts as sp
llm = sp.load("gguf", 1, "int8")
model = llm.engine.executor.runner.model
sp.decode_steps(llm, 1, 4)
matrix = model.lm_head.weight.quantized
packed = matrix.whole
rows = packed.unpacked()
layouts = {}
for name, w in (("rows", rows), ("tiles", packed)):
    matrix.parts, matrix._single = [(0, w)], w
    layouts[name] = (w, model._make_decode_stack())
def use(name):
    w, stack = layouts[name]
    matrix.parts, matrix._single = [(0, w)], w
    model._native_stack, model._is_stack_made = stack, True
times = {"rows": [], "tiles": []}
n = int(sys.argv[1])
for i in range(n):
    for name in (("rows", "tiles") if i % 2 == 0 else ("tiles", "rows")):
        use(name)
        times[name].append(sp.median(sp.decode_steps(llm, 1, 24)) * 1e3)
ratios = [t / r for t, r in zip(times["tiles"], times["rows"])]
print(f"rows {statistics.median(times['rows']):.3f} ms, tiles {statistics.median(times['tiles']):.3f} ms, "
      f"paired ratio {statistics.median(ratios):.3f}, tiles faster in {sum(r < 1 for r in ratios)}/{n}")
