"""fleetlm beside vLLM's CPU build and llama.cpp: `benchmarks/compare/run.sh` (see README.md)."""
