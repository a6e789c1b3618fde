#!/bin/bash
# Issue 12, item 6: what HTTP adds to a minimal request's time to first text. One server of
# CFG (`fleetlm serve`, the engine replica owning the port), and the same engine offline in
# the client's process; offline, plain and streamed requests take turns (PAUSE seconds
# between them), ROUNDS rounds of N each. Run from the repository root:
#     PAUSE=0.05 OUT=docs/results/served-interleaved-2026-12-07/pause-50ms \
#         docs/results/served-interleaved-2026-12-07/run.sh
OUT=${OUT:-/tmp/item6}
mkdir -p $OUT
CFG=${CFG:-configs/bench-cpu-gguf.yaml}
.venv/bin/fleetlm serve $CFG > $OUT/serve.log 2>&1 &
SERVER=$!
trap 'kill -TERM $SERVER; timeout 60 tail --pid=$SERVER -f /dev/null; .venv/bin/ray stop --force >/dev/null 2>&1' EXIT
for i in $(seq 600); do grep -q "fleetlm is serving" $OUT/serve.log && break; sleep 0.5; done
for r in $(seq ${ROUNDS:-2}); do
  .venv/bin/python benchmarks/small_request_latency.py --interleaved --config $CFG \
     --num-requests ${N:-60} --pause ${PAUSE:-0.05} --out $OUT/interleaved-$r.json 2>&1 | grep -v "it/s\|tensors/s\|INFO"
done
