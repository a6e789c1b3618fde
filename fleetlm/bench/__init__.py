"""Serving benchmark: `fleetlm bench serve` against any OpenAI-compatible server.

workloads.py / prompts.py  seeded request lists (random, shared-prefix, multi-turn)
client.py                  one streamed request -> a raw `RequestRecord`
runner.py                  arrival patterns (concurrency cap, Poisson), sweeps
metrics.py                 throughput, TTFT/TPOT/ITL/E2EL statistics, goodput, token checks
report.py / plots.py       JSON, Markdown, PNG
cli.py                     the command line (`main(argv)`)
"""
