#!/usr/bin/env bash
# Fine-grained alternation of ferroq and ik_llama.cpp on one test: one `ferroq bench` run, then
# one `llama-bench` run of the same test, repeated. On a shared machine the neighbours change
# within minutes; pairing each ferroq run with the ik run right after it gives a ratio per
# round that the noise between rounds does not bias. Also prints the steal time of each run
# (% of the machine's time taken by the hypervisor for other guests).
#
# Usage: bash alternate.sh pp|tg FERROQ_MODEL.fqm IK_MODEL.gguf [ROUNDS] [extra llama-bench args]
#   e.g. bash alternate.sh pp /tmp/speed-l4/l4mini-q4l.fqm /tmp/ik/l4/l4mini-Q4_0.gguf 6 -fmoe 1 -rtr 1
# Environment: FERROQ [target/release/ferroq of this checkout], IK_BENCH [/tmp/ik/build/bin/llama-bench]
#              THREADS [2]; pp = 512 prompt tokens, tg = 128 generated tokens (flash attention on
#              for ik, as in compare-ik.sh).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
FERROQ="${FERROQ:-$HERE/../../target/release/ferroq}"
IK_BENCH="${IK_BENCH:-/tmp/ik/build/bin/llama-bench}"
THREADS="${THREADS:-2}"
test="$1"; fm="$2"; im="$3"; rounds="${4:-6}"; shift $(( $# < 4 ? $# : 4 ))
case "$test" in
  pp) fa=(-p 512 -n 0); key=pp_tps ;;
  tg) fa=(-p 0 -n 128); key=tg_tps ;;
  *) echo "first argument: pp or tg" >&2; exit 2 ;;
esac
# steal and total jiffies of /proc/stat's cpu line
jiffies() { awk '/^cpu /{print $9, $2+$3+$4+$5+$6+$7+$8+$9}' /proc/stat; }
pct() { echo $(( 100 * ($3 - $1) / ($4 - $2 + 1) )); }
echo "round ferroq_t/s ik_t/s ratio steal%_ferroq steal%_ik  ($test, $THREADS threads, $(date -u +%FT%TZ))"
for i in $(seq "$rounds"); do
  read -r s0 t0 < <(jiffies)
  f=$("$FERROQ" bench -m "$fm" "${fa[@]}" -t "$THREADS" -r 1 --bw-bytes 0 --json 2>/dev/null |
      python3 -c "import json,sys; print('%.1f' % json.load(sys.stdin)['$key'])")
  read -r s1 t1 < <(jiffies)
  k=$("$IK_BENCH" -m "$im" "${fa[@]}" -t "$THREADS" -r 1 -fa 1 "$@" -o csv 2>/dev/null |
      tail -1 | awk -F, '{gsub(/"/, "", $(NF-2)); print $(NF-2)}')
  read -r s2 t2 < <(jiffies)
  echo "$i $f $(printf %.1f "$k") $(python3 -c "print('%.2f' % ($f / $k))") $(pct "$s0" "$t0" "$s1" "$t1") $(pct "$s1" "$t1" "$s2" "$t2")"
done
