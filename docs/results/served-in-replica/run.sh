#!/bin/bash
# Served path A/B: http.ingress separate vs in_replica, alternated; then the offline floors.
cd /work/main
OUT=${OUT:-/tmp/served-ab}
mkdir -p $OUT
PY=.venv/bin/python
start() {  # $1 mode
  .venv/bin/fleetlm serve configs/bench-cpu-gguf.yaml --ingress $1 > $OUT/serve-$1-$2.log 2>&1 &
  SERVER=$!
  for i in $(seq 600); do
    curl -sf http://127.0.0.1:8000/v1/models >/dev/null 2>&1 && return 0
    sleep 0.5
  done
  echo "server did not start"; return 1
}
stop() {
  kill -TERM $SERVER; timeout 60 tail --pid=$SERVER -f /dev/null
  pkill -9 -f "bin/fleetlm serve"; .venv/bin/ray stop --force >/dev/null 2>&1
}
for round in 1 2; do
  for mode in separate in_replica; do
    echo "== $mode round $round $(date +%T)"
    start $mode $round || exit 1
    $PY benchmarks/small_request_latency.py --num-requests 25 --out $OUT/small-$mode-$round.json
    $PY -m fleetlm.bench serve --base-url http://127.0.0.1:8000 --model smollm2-135m-instruct \
      --endpoint completions --workload random --num-prompts 64 --input-len 256 --output-len 128 \
      --max-concurrency 32 --seed $round --tokenizer smollm2-135m-instruct \
      --result-dir $OUT/c32-$mode-$round --disable-tqdm --continuous-usage > $OUT/c32-$mode-$round.log 2>&1
    grep "concurrency 32 |" $OUT/c32-$mode-$round.log
    stop
  done
done
echo "== offline $(date +%T)"
$PY benchmarks/small_request_latency.py --offline --config configs/bench-cpu-gguf.yaml --num-requests 25 --out $OUT/small-offline.json
$PY benchmarks/offline.py --quantization gguf --kv-cache-dtype int8 --batch-sizes 32 --num-prompts 64 --skip-transformers --prefix-len 0 --out $OUT/offline-c32.json
echo "== done $(date +%T)"
