#!/usr/bin/env bash
# Paired rounds: `ferroq serve` vs an OpenAI-compatible peer (llama.cpp's llama-server), 1 and 4
# concurrent greedy streams, one server alive at a time, rounds alternating.
#
# Usage: tools/bench/serve-vs-peer.sh FERROQ_MODEL.fqm PEER_SERVER_BIN PEER_MODEL.gguf [ROUNDS] [TOKENS]
#   e.g. tools/bench/serve-vs-peer.sh smol-q4l.fqm llama.cpp/build/bin/llama-server smol-q4_0.gguf 5 128
# Env: FERROQ (default target/release/ferroq), THREADS (2), PEER=0 to time ferroq alone,
# PEER_ARGS extra peer arguments (--no-repack where a CPU reports AMX the kernel does not enable).
# Prints one line per (round, server, streams): the aggregate decode rate of serve_load.py.
set -euo pipefail
cd "$(dirname "$0")/../.."
[ $# -ge 3 ] || { sed -n '2,8p' "$0" >&2; exit 2; }
fm=$1 peer=$2 pm=$3 rounds=${4:-3} tok=${5:-128}
F=${FERROQ:-target/release/ferroq} T=${THREADS:-2} LB=tools/bench/serve_load.py
one() { # name port command...
    local name=$1 port=$2; shift 2
    "$@" >"/tmp/serve-vs-peer-$name.log" 2>&1 &
    local pid=$!
    for _ in $(seq 120); do curl -sf "localhost:$port/health" >/dev/null && break; sleep 0.5; done
    python3 $LB throughput --port "$port" --streams 4 --tokens 16 --rounds 1 >/dev/null  # warm-up
    for s in 1 4; do
        echo "round $r $name streams $s: $(python3 $LB throughput --port "$port" --streams $s \
            --tokens "$tok" --rounds 1 --pid $pid | tail -1 | sed 's/median //')"
    done
    kill $pid; wait $pid 2>/dev/null || true
}
for r in $(seq "$rounds"); do
    echo "== round $r, load $(cut -d' ' -f1 /proc/loadavg)"
    one ferroq 18181 "$F" serve -m "$fm" -a m --port 18181 --parallel 4 -t "$T" -c 2048
    # shellcheck disable=SC2086 # PEER_ARGS: extra words for the peer (e.g. --no-repack)
    [ "${PEER:-1}" = 0 ] || one peer 18182 "$peer" -m "$pm" --port 18182 -np 4 -c 8192 -t "$T" --no-webui ${PEER_ARGS:-}
done
