#!/bin/bash
# Served path A/B: user code in Serve's own thread (default) or on the replica's main loop.
cd /work/main
OUT=${OUT:-/tmp/thread-ab}
mkdir -p $OUT
PY=.venv/bin/python
start() {  # $1 mode
  if [ $1 = main ]; then export RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0; else unset RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD; fi
  .venv/bin/fleetlm serve configs/bench-cpu-gguf.yaml > $OUT/serve-$1-$2.log 2>&1 &
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
  for mode in thread main; do
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
echo "== done $(date +%T)"
