#!/usr/bin/env bash
# Run ferroq's coverage-guided fuzz targets (fuzz/, cargo fuzz, nightly Rust).
#
#   tools/fuzz.sh                 # every target for 60 s each
#   tools/fuzz.sh 600             # every target for 10 minutes each
#   tools/fuzz.sh 300 fqm gguf    # some targets
#
# Needs a nightly toolchain (`rustup toolchain install nightly`) and cargo-fuzz
# (`cargo install cargo-fuzz`). Seeds come from the test fixtures (fuzz/corpus/<target>,
# created on first use); crashes land in fuzz/artifacts/<target> and are minimised with
# `cargo +nightly fuzz tmin <target> <file>`. Add a fixed crasher to cli/tests/crashers.rs.
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-60}"
shift || true
all=(fqm safetensors config_json gguf tokenizer_json tokenizer_model chat_template engine_args)
targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=("${all[@]}")

command -v cargo-fuzz >/dev/null || { echo "cargo-fuzz missing: cargo install cargo-fuzz" >&2; exit 1; }
rustup run nightly rustc --version >/dev/null || { echo "nightly missing: rustup toolchain install nightly" >&2; exit 1; }

# seeds: small real inputs of each kind, made by the stable build from the fixtures
fx=tests/fixtures
seed() { # target, files...
    local d="fuzz/corpus/$1"; shift
    mkdir -p "$d"
    for f in "$@"; do [ -f "$f" ] && cp -n "$f" "$d/" || true; done
}
mkdir -p fuzz/seeds
if [ ! -f fuzz/seeds/tiny.fqm ]; then
    cargo run -q --release -- convert "$fx/models/llama3-tiny" -o fuzz/seeds/tiny.fqm --quant q8
    cargo run -q --release -- convert "$fx/models/llama4-scout-tiny" -o fuzz/seeds/moe.fqm --quant q4
fi
# a tiny model with a tokenizer for engine_args: llama3-tiny with the SmolLM2 tokenizer cut
# to its 384 ids
if [ ! -f fuzz/seeds/tok.fqm ]; then
    t=$(mktemp -d)
    cp "$fx/models/llama3-tiny/config.json" "$fx/models/llama3-tiny/model.safetensors" "$t/"
    python3 - "$t/tokenizer.json" <<'PY'
import gzip, json, sys
j = json.load(gzip.open("tests/fixtures/smollm2-tokenizer.json.gz"))
v = {k: i for k, i in j["model"]["vocab"].items() if i < 384}
def parts(m): return m.split(" ", 1) if isinstance(m, str) else m
j["model"]["vocab"] = v
j["model"]["merges"] = [m for m in j["model"]["merges"] if (lambda a, b: a in v and b in v and a + b in v)(*parts(m))]
j["added_tokens"] = [t for t in j["added_tokens"] if t["id"] < 384]
json.dump(j, open(sys.argv[1], "w"))
PY
    cp "$fx/smollm2-tokenizer_config.json" "$t/tokenizer_config.json"
    cargo run -q --release -- convert "$t" -o fuzz/seeds/tok.fqm --quant f32
    cp "$t/tokenizer.json" fuzz/seeds/tokenizer.json
    rm -rf "$t"
fi
seed fqm fuzz/seeds/tiny.fqm fuzz/seeds/moe.fqm
seed safetensors "$fx/models/llama3-tiny/model.safetensors" "$fx/models/llama4-topk2-ref/model.safetensors"
seed config_json "$fx"/models/*/config.json
seed tokenizer_json fuzz/seeds/tokenizer.json
seed chat_template "$fx/smollm2-chat_template.jinja"
python3 -c "import json; print(json.load(open('$fx/tokenizers/llama3/tokenizer_config.json'))['chat_template'], end='')" \
    > fuzz/corpus/chat_template/llama3.jinja
mkdir -p fuzz/corpus/gguf fuzz/corpus/tokenizer_model fuzz/corpus/engine_args
export FERROQ_FUZZ_MODEL="$PWD/fuzz/seeds/tok.fqm"

for t in "${targets[@]}"; do
    echo "== $t: $secs s"
    ( cd fuzz && cargo +nightly fuzz run "$t" "corpus/$t" -- \
        -max_total_time="$secs" -rss_limit_mb=4096 -timeout=20 -max_len=1048576 ) 2>&1 \
        | grep -E "^#[0-9]+.*(DONE|pulse)|Done [0-9]+ runs|ERROR|SUMMARY|panicked|crash-" || true
done
