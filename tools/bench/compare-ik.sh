#!/usr/bin/env bash
# Side-by-side CPU benchmark: ik_llama.cpp (from the ik-llama-cpp-python 0.1.5 sdist) vs ferroq.
#
# Usage:  IK_SDIST=/path/ik_llama_cpp_python-0.1.5.tar.gz bash compare-ik.sh [build] [smol] [l4] [rss]
#         (no step arguments = all steps)
# Environment (defaults in brackets):
#   IK_SDIST      the sdist tarball (required for the build step)
#   WORK          scratch dir for the ik source, build and GGUFs          [/tmp/ik]
#   FERROQ_DIR    ferroq checkout (built with cargo build --release -j2)  [this checkout]
#   SMOL_GGUF     SmolLM2-135M-Instruct Q4_1 GGUF (source for both engines)
#                 [~/.cache/ferroq/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf]
#   SMOL_FQM_Q4 / SMOL_FQM_Q4L / SMOL_FQM_Q8   ferroq conversions of SMOL_GGUF (made if missing)
#                 [/tmp/speed-smol-q4.fqm, /tmp/speed-smol-q4l.fqm, /tmp/speed-smol-q8.fqm]
#   L4_HF         Llama4ForCausalLM HF checkpoint dir (bf16 safetensors)  [/tmp/ferroq-l4-mini-seed1]
#   L4_TOKENIZER  a Llama 4 tokenizer.json (the synthetic checkpoint has none)
#                 [none: required for the l4 step]
#   FERROQ        ferroq binary [$FERROQ_DIR/target/release/ferroq] (pin a copy: the tree may be rebuilt by others)
#   L4_FQM / L4_FQM_Q4L   ferroq q4 / q4l conversions of L4_HF (made if missing)
#                 [/tmp/speed-l4/l4mini-q4.fqm, /tmp/speed-l4/l4mini-q4l.fqm]
#   THREADS       [2]     REPS_SMOL [3]     REPS_L4 [2]
#   JOBS          compile jobs [2]; the build runs under nice -n 10
# Every benchmark line is logged to $WORK/logs/bench.log together with `uptime`.
# Needs: cmake, g++, python3 with numpy (the l4 converter uses ik's vendored gguf-py; no torch).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
WORK="${WORK:-/tmp/ik}"
FERROQ_DIR="${FERROQ_DIR:-$(cd "$HERE/../.." && pwd)}"
SMOL_GGUF="${SMOL_GGUF:-$HOME/.cache/ferroq/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf}"
SMOL_FQM_Q4="${SMOL_FQM_Q4:-/tmp/speed-smol-q4.fqm}"
SMOL_FQM_Q8="${SMOL_FQM_Q8:-/tmp/speed-smol-q8.fqm}"
SMOL_FQM_Q4L="${SMOL_FQM_Q4L:-/tmp/speed-smol-q4l.fqm}"
L4_HF="${L4_HF:-/tmp/ferroq-l4-mini-seed1}"
L4_TOKENIZER="${L4_TOKENIZER:-}"   # required for the l4 step
L4_FQM="${L4_FQM:-/tmp/speed-l4/l4mini-q4.fqm}"
L4_FQM_Q4L="${L4_FQM_Q4L:-/tmp/speed-l4/l4mini-q4l.fqm}"
THREADS="${THREADS:-2}"
REPS_SMOL="${REPS_SMOL:-3}"
REPS_L4="${REPS_L4:-2}"
JOBS="${JOBS:-2}"

SRC="$WORK/ik_llama_cpp_python-0.1.5/vendor/ik_llama.cpp"
BUILD="$WORK/build"
BIN="$BUILD/bin"
LOGS="$WORK/logs"
FERROQ="${FERROQ:-$FERROQ_DIR/target/release/ferroq}"   # override to pin one binary
mkdir -p "$WORK" "$LOGS"

STEPS="${*:-build smol l4 rss}"
want() { [[ " $STEPS " == *" $1 "* ]]; }

# log a command, the load average before it, and its output
bench() {
  local tag="$1"; shift
  {
    echo "=== $tag  $(date -u +%FT%TZ)"
    echo "load: $(uptime)"
    echo "cmd:  $*"
    echo "ferroq: HEAD $(git -C "$FERROQ_DIR" log --oneline -1 | cut -c1-60), binary $(stat -c %y "$FERROQ" | cut -c1-19), sha256 $(sha256sum "$FERROQ" | cut -c1-12)"
  } | tee -a "$LOGS/bench.log"
  # /usr/bin/time gives both engines the same CPU-share measure: %P = (user+sys)/wall;
  # with THREADS=2 on a quiet machine it approaches 200 %.
  /usr/bin/time -o "$LOGS/.time" -f "time: wall %e s, CPU %P, max RSS %M KiB" "$@" 2>>"$LOGS/bench.stderr" \
    | tee -a "$LOGS/bench.log"
  { echo; cat "$LOGS/.time"; } | tee -a "$LOGS/bench.log"
}

# ---------------------------------------------------------------- 1. build ik
if want build; then
  : "${IK_SDIST:?set IK_SDIST to the ik-llama-cpp-python 0.1.5 sdist tarball}"
  tar -xzf "$IK_SDIST" -C "$WORK"
  # The sdist omits common/cmake/build-info-gen-cpp.cmake (the custom command that
  # writes common/build-info.cpp), so the build fails at "Generating build details".
  # Recreate it the way upstream llama.cpp has it.
  mkdir -p "$SRC/common/cmake"
  cat > "$SRC/common/cmake/build-info-gen-cpp.cmake" <<'EOF'
include(${CMAKE_CURRENT_SOURCE_DIR}/cmake/build-info.cmake)
set(TEMPLATE_FILE "${CMAKE_CURRENT_SOURCE_DIR}/common/build-info.cpp.in")
set(OUTPUT_FILE "${CMAKE_CURRENT_SOURCE_DIR}/common/build-info.cpp")
configure_file(${TEMPLATE_FILE} ${OUTPUT_FILE})
EOF
  cmake -S "$SRC" -B "$BUILD" \
    -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=ON -DLLAMA_BUILD_SERVER=OFF \
    -DGGML_CUDA=OFF -DGGML_IQK_FA_ALL_QUANTS=OFF -DGGML_CCACHE=OFF 2>&1 | tee "$LOGS/cmake-config.log"
  nice -n 10 cmake --build "$BUILD" --config Release -j"$JOBS" \
    --target llama-bench llama-quantize llama-cli 2>&1 | tee "$LOGS/build.log" | grep -E "error|Built target" || true
  test -x "$BIN/llama-bench" && test -x "$BIN/llama-quantize"
  (cd "$FERROQ_DIR" && nice -n 10 cargo build --release -j"$JOBS")
fi

echo "ferroq commit: $(git -C "$FERROQ_DIR" log --oneline -1)" | tee -a "$LOGS/bench.log"

# ------------------------------------------------------- 2./3. SmolLM2-135M
SMOL_TYPES="${SMOL_TYPES:-Q4_0 IQ4_NL Q8_0 Q4_0_R8 IQ4_NL_R4 Q8_0_R8}"
if want smol; then
  mkdir -p "$WORK/smol"
  for t in $SMOL_TYPES; do
    out="$WORK/smol/smol-$t.gguf"
    [ -f "$out" ] || "$BIN/llama-quantize" --allow-requantize "$SMOL_GGUF" "$out" "$t" "$THREADS" \
      > "$LOGS/quantize-smol-$t.log" 2>&1
  done
  [ -f "$SMOL_FQM_Q4" ] || "$FERROQ" convert "$SMOL_GGUF" -o "$SMOL_FQM_Q4" --quant q4
  [ -f "$SMOL_FQM_Q8" ] || "$FERROQ" convert "$SMOL_GGUF" -o "$SMOL_FQM_Q8" --quant q8
  [ -f "$SMOL_FQM_Q4L" ] || "$FERROQ" convert "$SMOL_GGUF" -o "$SMOL_FQM_Q4L" --quant q4l
  # alternate the engines so both see the same machine load
  for round in 1 2; do
    bench "ferroq smol q4 r$round" "$FERROQ" bench -m "$SMOL_FQM_Q4" -p 512 -n 128 -t "$THREADS" -r "$REPS_SMOL"
    bench "ferroq smol q4l r$round" "$FERROQ" bench -m "$SMOL_FQM_Q4L" -p 512 -n 128 -t "$THREADS" -r "$REPS_SMOL"
    # note: ik's llama-bench takes ONE value for -rtr (and -fmoe); -fa accepts a list
    for t in Q4_0 IQ4_NL; do
      for rtr in 0 1; do
        bench "ik smol $t rtr=$rtr r$round" "$BIN/llama-bench" -m "$WORK/smol/smol-$t.gguf" -p 512 -n 128 \
          -t "$THREADS" -r "$REPS_SMOL" -fa 0,1 -rtr $rtr
      done
    done
    bench "ferroq smol q8 r$round" "$FERROQ" bench -m "$SMOL_FQM_Q8" -p 512 -n 128 -t "$THREADS" -r "$REPS_SMOL"
    for rtr in 0 1; do
      bench "ik smol Q8_0 rtr=$rtr r$round" "$BIN/llama-bench" -m "$WORK/smol/smol-Q8_0.gguf" -p 512 -n 128 \
        -t "$THREADS" -r "$REPS_SMOL" -fa 0,1 -rtr $rtr
    done
    for t in Q4_0_R8 IQ4_NL_R4 Q8_0_R8; do
      [ -f "$WORK/smol/smol-$t.gguf" ] || continue
      bench "ik smol $t r$round" "$BIN/llama-bench" -m "$WORK/smol/smol-$t.gguf" -p 512 -n 128 \
        -t "$THREADS" -r "$REPS_SMOL" -fa 0,1
    done
  done
fi

# ------------------------------------------------------- 4. l4-mini (Llama 4 MoE)
if want l4; then
  if [ -z "$L4_TOKENIZER" ]; then
    echo "compare-ik.sh: the l4 step needs L4_TOKENIZER=path/to/a Llama 4 tokenizer.json" \
      "(e.g. gunzip -c tests/fixtures/tokenizers/llama4/tokenizer.json.gz > /tmp/l4-tokenizer.json)" >&2
    exit 2
  fi
  mkdir -p "$WORK/l4"
  BF16="$WORK/l4/l4mini-bf16.gguf"
  if [ ! -f "$WORK/l4/l4mini-Q4_0.gguf" ] || [ ! -f "$WORK/l4/l4mini-Q8_0.gguf" ]; then
    [ -f "$BF16" ] || PYTHONPATH="$SRC/gguf-py" nice -n 10 python3 "$HERE/l4_hf_to_gguf.py" \
      "$L4_HF" "$L4_TOKENIZER" "$BF16" 2>&1 | tee "$LOGS/l4-convert.log"
    for t in Q4_0 Q8_0; do
      [ -f "$WORK/l4/l4mini-$t.gguf" ] || nice -n 10 "$BIN/llama-quantize" "$BF16" "$WORK/l4/l4mini-$t.gguf" "$t" "$THREADS" \
        > "$LOGS/quantize-l4-$t.log" 2>&1
    done
    rm -f "$BF16"   # 7 GB, not needed any more
  fi
  if [ ! -f "$L4_FQM" ]; then
    mkdir -p "$(dirname "$L4_FQM")"
    "$FERROQ" convert "$L4_HF" -o "$L4_FQM" --quant q4
  fi
  if [ ! -f "$L4_FQM_Q4L" ]; then
    mkdir -p "$(dirname "$L4_FQM_Q4L")"
    "$FERROQ" convert "$L4_HF" -o "$L4_FQM_Q4L" --quant q4l
  fi
  bench "ferroq l4 q4" "$FERROQ" bench -m "$L4_FQM" -p 512 -n 128 -t "$THREADS" -r "$REPS_L4"
  bench "ferroq l4 q4l" "$FERROQ" bench -m "$L4_FQM_Q4L" -p 512 -n 128 -t "$THREADS" -r "$REPS_L4"
  for rtr in 0 1; do
    bench "ik l4 Q4_0 rtr=$rtr" "$BIN/llama-bench" -m "$WORK/l4/l4mini-Q4_0.gguf" -p 512 -n 128 -t "$THREADS" \
      -r "$REPS_L4" -fmoe 1 -rtr $rtr -fa 1
  done
  bench "ferroq l4 q4 (again)" "$FERROQ" bench -m "$L4_FQM" -p 512 -n 128 -t "$THREADS" -r "$REPS_L4"
  bench "ferroq l4 q4l (again)" "$FERROQ" bench -m "$L4_FQM_Q4L" -p 512 -n 128 -t "$THREADS" -r "$REPS_L4"
  for rtr in 0 1; do
    bench "ik l4 Q8_0 rtr=$rtr" "$BIN/llama-bench" -m "$WORK/l4/l4mini-Q8_0.gguf" -p 512 -n 128 -t "$THREADS" \
      -r "$REPS_L4" -fmoe 1 -rtr $rtr -fa 1
  done
fi

# ------------------------------------------------------- peak RSS (64 tokens at ctx 512)
if want rss; then
  cd "$LOGS"   # llama-cli writes main.log into the current directory
  PROMPT="${RSS_PROMPT:-Write a short story about a robot who learns to paint.}"
  for t in Q4_0 Q4_0_R8 IQ4_NL_R4 Q8_0; do
    for rtr in "" "--run-time-repack"; do
      case "$t" in *_R*) [ -z "$rtr" ] || continue ;; esac   # already repacked
      bench "rss ik smol $t $rtr" "$BIN/llama-cli" -m "$WORK/smol/smol-$t.gguf" \
        -c 512 -n 64 -t "$THREADS" -p "$PROMPT" --temp 0 --ignore-eos $rtr < /dev/null
    done
  done
  for q in "$SMOL_FQM_Q4" "$SMOL_FQM_Q4L" "$SMOL_FQM_Q8"; do
    bench "rss ferroq $q" "$FERROQ" run -m "$q" -c 512 -n 64 -t "$THREADS" \
      -p "$PROMPT" --temp 0
  done
fi
