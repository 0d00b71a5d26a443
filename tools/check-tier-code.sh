#!/usr/bin/env bash
# Checks the built kernels for tier code compiled outside its tier's `#[target_feature]`
# context (issue 16: the AVX-512 tier's fused gate/up epilogue once ran as baseline x86-64 code,
# calling libm `fmaf`/`rintf` per element, 30 % of its prefill).
#
# It builds `ferroq-kernels` (release by default), disassembles its object code and fails if any
# function of a SIMD tier (a symbol under `ferroq_kernels::x86_64::` or `ferroq_kernels::aarch64::`,
# which includes the drivers instantiated by `driver::tier_entries!`):
#   * calls a libm function (fmaf, rintf, expf, ...; a tier's float math must be instructions), or
#   * calls a generic helper that was left out of line, so runs without the tier's features
#     (anything under `ferroq_kernels::driver::`, `ferroq_kernels::scalar::`,
#     `ferroq_kernels::portable::`), or
#   * exists as an out-of-line copy of the shared driver instantiated for a tier
#     (`ferroq_kernels::driver::...<..x86_64..>`): such a copy has no target features.
#
# Usage: tools/check-tier-code.sh [--target aarch64-unknown-linux-gnu] [--profile test]
# Needs objdump (binutils; aarch64-linux-gnu-objdump for the aarch64 target).
set -euo pipefail
cd "$(dirname "$0")/.."

target="" profile="release"
while [ $# -gt 0 ]; do
    case "$1" in
        --target) target="$2"; shift 2 ;;
        --profile) profile="$2"; shift 2 ;;
        *) echo "usage: $0 [--target TRIPLE] [--profile PROFILE]" >&2; exit 2 ;;
    esac
done

objdump=objdump
args=(-p ferroq-kernels --lib --profile "$profile" --message-format=json-render-diagnostics)
if [ -n "$target" ]; then
    args+=(--target "$target")
    case "$target" in
        aarch64-*) objdump=aarch64-linux-gnu-objdump ;;
    esac
fi
command -v "$objdump" >/dev/null || { echo "check-tier-code: $objdump not found" >&2; exit 2; }

# v0 symbol mangling keeps the generic arguments in the names (driver::run::<B, Avx2>), in a
# target directory of its own so the normal builds keep their artifacts.
export RUSTFLAGS="${RUSTFLAGS:-} -C symbol-mangling-version=v0"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target}/tier-check"
rlib=$(cargo build "${args[@]}" \
    | grep -o '"filenames":\["[^"]*libferroq_kernels[^"]*\.rlib"' | tail -1 \
    | sed 's/.*\["//; s/"$//')
[ -f "$rlib" ] || { echo "check-tier-code: built rlib not found" >&2; exit 2; }

# One line per offending (function, reason). Functions start at "<addr> <name>:" lines; calls
# show as "call ... <name>" / "bl ... <name>" (resolved) or as PLT32 / CALL26 / JUMP26
# relocations (external and cross-unit), tail calls as "jmp"/"b" with a relocation.
dump=$(mktemp)
trap 'rm -f "$dump"' EXIT
# (the rlib's metadata member is not an object file: objdump complains about it and goes on)
"$objdump" -dr -C --no-show-raw-insn "$rlib" >"$dump" 2>/dev/null || true
grep -q 'ferroq_kernels' "$dump" || { echo "check-tier-code: no code found in $rlib" >&2; exit 2; }
report=$(awk '
    function tier(f) { return f ~ /ferroq_kernels::(x86_64|aarch64)::/ }
    function flag(why) { if (!(fn SUBSEP why in seen)) { seen[fn, why] = 1; print fn "\n    " why } }
    function target_ok(t) {
        if (t ~ /^(fmaf?|rintf?|expf?|exp2f?|logf?|log2f?|powf?|sinf?|cosf?|tanhf?|roundf?|floorf?|ceilf?|truncf?|sqrtf?|nearbyintf?|roundevenf?)(@plt)?$/)
            return "calls libm " t
        if (t ~ /^ferroq_kernels::(driver|scalar|portable)::/ || t ~ /^<ferroq_kernels::(driver|scalar|portable)::/)
            return "calls out-of-line " t
        return ""
    }
    # allowed out-of-line calls: caller (suffix) and callee, with the reason
    #   avx2::attn_scores_kt -> scalar::attn_scores_kt: the empty-shape case (d or n = 0)
    function allowed(f, t) {
        return f ~ /x86_64::avx2::(attention::)?attn_scores_kt$/ && t ~ /^ferroq_kernels::scalar::attn_scores_kt$/
    }
    /^[0-9a-f]+ <.*>:$/ {
        fn = $0; sub(/^[0-9a-f]+ </, "", fn); sub(/>:$/, "", fn)
        if (fn ~ /^ferroq_kernels::driver::/ && fn ~ /ferroq_kernels::(x86_64|aarch64)::/)
            { intier = 1; flag("out-of-line driver code instantiated for a tier (no target features)") }
        else intier = tier(fn)
        next
    }
    !intier { next }
    /R_(X86_64_(PLT32|PC32|GOTPCREL|GOTPCRELX|REX_GOTPCRELX)|AARCH64_(CALL26|JUMP26))/ {
        t = $NF; sub(/[-+]0x[0-9a-f]+$/, "", t)
        why = target_ok(t); if (why != "" && !allowed(fn, t)) flag(why)
        next
    }
    /\t(call|callq|jmp|bl|b)[ \t]/ && /<[^>]*>$/ {
        t = $0; sub(/.*</, "", t); sub(/>$/, "", t); sub(/[-+]0x[0-9a-f]+$/, "", t)
        why = target_ok(t); if (why != "" && !allowed(fn, t)) flag(why)
    }
' "$dump")

n_fn=$(grep -c -E '^[0-9a-f]+ <[^>]*ferroq_kernels::(x86_64|aarch64)::' "$dump" || true)
if [ -n "$report" ]; then
    echo "check-tier-code: tier code outside its feature context in $rlib:"
    echo "$report"
    exit 1
fi
echo "check-tier-code: OK ($n_fn tier functions in $(basename "$rlib"), profile $profile${target:+, $target})"
