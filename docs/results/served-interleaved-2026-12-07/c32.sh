#!/bin/bash
# Issue 12, item 6: served throughput at concurrency 32 against the offline engine, taking
# turns on one server of CFG (offline first, then HTTP, ROUNDS rounds, fresh prompts each).
# Run from the repository root: OUT=docs/results/served-interleaved-2026-12-07/c32 CMD
OUT=${OUT:-/tmp/item6-c32}
mkdir -p $OUT
CFG=${CFG:-configs/bench-cpu-gguf.yaml}
.venv/bin/fleetlm serve $CFG > $OUT/serve.log 2>&1 &
SERVER=$!
trap 'kill -TERM $SERVER; timeout 60 tail --pid=$SERVER -f /dev/null; .venv/bin/ray stop --force >/dev/null 2>&1' EXIT
for i in $(seq 600); do grep -q "fleetlm is serving" $OUT/serve.log && break; sleep 0.5; done
seed=200
for r in $(seq ${ROUNDS:-2}); do
  seed=$((seed + 1))
  .venv/bin/python benchmarks/offline.py --quantization gguf --kv-cache-dtype int8 \
    --batch-sizes 32 --num-prompts 64 --input-len 256 --output-len 128 --skip-transformers \
    --seed $seed --out $OUT/offline-$r.json > $OUT/offline-$r.log 2>&1
  grep -i "batch 32\|tok/s" $OUT/offline-$r.log | tail -2
  .venv/bin/python -m fleetlm.bench serve --base-url http://127.0.0.1:8000 \
    --model smollm2-135m-instruct --endpoint completions --workload random --num-prompts 64 \
    --input-len 256 --output-len 128 --max-concurrency 32 --seed $((seed + 50)) \
    --tokenizer smollm2-135m-instruct --result-dir $OUT/served-$r --disable-tqdm \
    > $OUT/served-$r.log 2>&1
  grep "concurrency 32 |" $OUT/served-$r.log
done
