#!/usr/bin/env bash
# Run a command under a memory limit (cgroup v1 memory controller), from a cold page cache.
#
# Usage:  tools/bench/cgroup-run.sh LIMIT MODEL -- COMMAND [ARGS...]
#   LIMIT   bytes, with a K/M/G suffix (1100M), or a percentage of MODEL's size (50%)
#   MODEL   the model file: its pages are evicted from the page cache first
#           (posix_fadvise(DONTNEED) through `dd iflag=nocache count=0`), so that the run starts
#           cold and page-cache pages of an earlier run are not charged to nobody
# The command runs in a fresh child cgroup /sys/fs/cgroup/memory/ferroq-bench-<pid> whose
# memory.limit_in_bytes is LIMIT; page-cache pages count against it, as in a container.
# After it exits, one line goes to stderr:
#   cgroup: limit <bytes> peak <bytes> failcnt <n> oom_kill <n> rc <exit status>
# Needs root (or write access to the memory hierarchy). The cgroup is removed on exit.
set -euo pipefail

if [ $# -lt 4 ] || [ "$3" != "--" ]; then
    sed -n '2,15p' "$0" >&2
    exit 2
fi
limit="$1"
model="$2"
shift 3

root="${CGROUP_MEMORY_ROOT:-/sys/fs/cgroup/memory}"
if [ ! -w "$root" ]; then
    echo "cgroup-run: $root is not a writable cgroup v1 memory hierarchy (mount | grep cgroup)" >&2
    exit 2
fi
size=$(stat -c %s "$model")
case "$limit" in
    *%) bytes=$(( size * ${limit%\%} / 100 )) ;;
    *K|*k) bytes=$(( ${limit%?} * 1024 )) ;;
    *M|*m) bytes=$(( ${limit%?} * 1024 * 1024 )) ;;
    *G|*g) bytes=$(( ${limit%?} * 1024 * 1024 * 1024 )) ;;
    *) bytes=$limit ;;
esac

cg="$root/ferroq-bench-$$"
mkdir "$cg"
cleanup() {
    # the command has exited; move nothing, just remove the group (its page-cache charges go
    # to the parent)
    rmdir "$cg" 2>/dev/null || true
}
trap cleanup EXIT
echo "$bytes" > "$cg/memory.limit_in_bytes"
# no swap on these machines; where there is, keep the run from swapping instead of paging
echo 0 > "$cg/memory.swappiness" 2>/dev/null || true

# cold start: drop the model file's pages from the page cache
sync "$model" 2>/dev/null || true
dd if="$model" iflag=nocache count=0 status=none

rc=0
( echo "$BASHPID" > "$cg/cgroup.procs"; exec "$@" ) || rc=$?
peak=$(cat "$cg/memory.max_usage_in_bytes")
failcnt=$(cat "$cg/memory.failcnt")
oom=$(awk '/oom_kill /{print $2}' "$cg/memory.oom_control" 2>/dev/null || echo "?")
echo "cgroup: limit $bytes peak $peak failcnt $failcnt oom_kill ${oom:-0} rc $rc" >&2
# drop what the run left in the page cache, so the next run starts cold as well
dd if="$model" iflag=nocache count=0 status=none
exit "$rc"
