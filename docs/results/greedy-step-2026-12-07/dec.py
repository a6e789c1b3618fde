"""Median decode step of one sequence (4-token prompt), `rounds` runs of 24 steps, printed."""
import sys, statistics; sys.path.insert(0, "benchmarks")
import step_parts as sp
llm = sp.load("gguf", 1, "int8")
sp.decode_steps(llm, 1, 8)
runs = [sp.median(sp.decode_steps(llm, 1, 24)) * 1e3 for _ in range(int(sys.argv[1]))]
print(f"{statistics.median(runs):.3f}")
