#!/bin/bash
# Serve's direct ingress A/B on one server: configs/bench-cpu-gguf.yaml (routes in the engine
# replica) under `fleetlm serve`, whose engine replica listens on port 8000 itself while Serve's
# proxy, which forwards to the same replica, listens on a free port. The two ports take turns,
# three rounds: same process, same engine, same machine state. Run from the repository root.
OUT=${OUT:-/tmp/served-ab-direct-same}
ROUNDS=${ROUNDS:-3}
mkdir -p $OUT
PY=.venv/bin/python
.venv/bin/fleetlm serve configs/bench-cpu-gguf.yaml > $OUT/serve.log 2>&1 &
SERVER=$!
trap 'kill -TERM $SERVER; timeout 60 tail --pid=$SERVER -f /dev/null; pkill -9 -f "bin/fleetlm serve"; .venv/bin/ray stop --force >/dev/null 2>&1' EXIT
for i in $(seq 600); do grep -q "fleetlm is serving" $OUT/serve.log && break; sleep 0.5; done
ss -ltnp > $OUT/listeners.txt
PROXY=$(grep 'ProxyActor' $OUT/listeners.txt | grep -o '127\.0\.0\.1:[0-9]* ' | head -1 | cut -d: -f2 | tr -d ' ')
grep -q '127.0.0.1:8000 .*ServeRepli' $OUT/listeners.txt || { echo "the replica does not own 8000"; exit 1; }
echo "direct: 8000 (the replica), proxy: $PROXY"
seed=100
for round in $(seq $ROUNDS); do
  for mode in proxy direct; do
    if [ $mode = proxy ]; then port=$PROXY; else port=8000; fi
    seed=$((seed + 1))  # fresh prompts each run: no prefix-cache hits across runs
    echo "== $mode round $round $(date +%T)"
    $PY benchmarks/small_request_latency.py --base-url http://127.0.0.1:$port --num-requests 25 \
      --out $OUT/small-$mode-$round.json
    $PY -m fleetlm.bench serve --base-url http://127.0.0.1:$port --model smollm2-135m-instruct \
      --endpoint completions --workload random --num-prompts 64 --input-len 256 --output-len 128 \
      --max-concurrency 32 --seed $seed --tokenizer smollm2-135m-instruct \
      --result-dir $OUT/c32-$mode-$round --disable-tqdm --continuous-usage > $OUT/c32-$mode-$round.log 2>&1
    grep "concurrency 32 |" $OUT/c32-$mode-$round.log
  done
done
echo "== done $(date +%T)"
