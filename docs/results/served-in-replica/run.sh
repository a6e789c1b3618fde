#!/bin/bash
# Served path A/B on configs/bench-cpu-gguf.yaml, the two modes alternated over two rounds, each
# on a fresh server; then the offline floors of the same settings. Run from the repository root.
#   run.sh                   http.ingress: separate against in_replica
#   run.sh user-code-thread  (routes in the replica) Serve's user code in its own thread (the
#                            default) against on the replica's main loop
#                            (RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0)
#   run.sh direct-ingress    (routes in the replica) through Serve's proxy
#                            (RAY_SERVE_ENABLE_DIRECT_INGRESS=0) against the replica listening
#                            on the port itself (Serve's direct ingress, the default)
AB=${1:-ingress}
OUT=${OUT:-/tmp/served-ab-$AB}
mkdir -p $OUT
PY=.venv/bin/python
case $AB in
  user-code-thread) MODES="thread main" ;;
  direct-ingress) MODES="proxy direct" ;;
  *) MODES="separate in_replica" ;;
esac
start() {  # $1 mode, $2 round
  local flags=()
  case $1 in
    separate|in_replica) flags=(--ingress $1) ;;
    main) export RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0 ;;
    thread) unset RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD ;;
    proxy) export RAY_SERVE_ENABLE_DIRECT_INGRESS=0 ;;
    direct) unset RAY_SERVE_ENABLE_DIRECT_INGRESS ;;
  esac
  .venv/bin/fleetlm serve configs/bench-cpu-gguf.yaml "${flags[@]}" > $OUT/serve-$1-$2.log 2>&1 &
  SERVER=$!
  for i in $(seq 600); do
    curl -sf http://127.0.0.1:8000/v1/models >/dev/null 2>&1 && return 0
    sleep 0.5
  done
  echo "server did not start"; return 1
}
stop() {  # a background job ignores SIGINT: TERM, then make sure
  kill -TERM $SERVER; timeout 60 tail --pid=$SERVER -f /dev/null
  pkill -9 -f "bin/fleetlm serve"; .venv/bin/ray stop --force >/dev/null 2>&1
}
for round in 1 2; do
  for mode in $MODES; do
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
