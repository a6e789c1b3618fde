"""One engine, decode runs alternated between the runner's fast host paths off and on."""
import sys, statistics, json; sys.path.insert(0, "benchmarks")
import step_parts as sp
from fleetlm.executor import model_runner
llm = sp.load("gguf", 1, "int8")
runner = llm.engine.core.executor.runner
buffers = runner.decode_buffers
plain = model_runner._is_argmax_only
sp.decode_steps(llm, 1, 8)
res = {"off": [], "on": []}
for r in range(int(sys.argv[1])):
    for mode in (("off", "on") if r % 2 == 0 else ("on", "off")):
        runner.decode_buffers = buffers if mode == "on" else None
        model_runner._is_argmax_only = plain if mode == "on" else (lambda s: False)
        res[mode].append(sp.median(sp.decode_steps(llm, 1, int(sys.argv[2]))) * 1e3)
for m, v in res.items(): print(m, f"median of runs {statistics.median(v):.3f} ms", " ".join(f"{x:.2f}" for x in v))
print("pairs faster on:", sum(a < b for a, b in zip(res["on"], res["off"])), "of", len(res["on"]))
