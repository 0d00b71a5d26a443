#!/usr/bin/env bash
# Public-domain English texts for quantization measurements (not used by the tests): Jane
# Austen's six novels from the Debian package `r-cran-janeaustenr` (Project Gutenberg texts
# shipped as R data). Writes <novel>.txt into the cache directory and prints it.
#
#   .ci/fetch-texts.sh [CACHE_DIR]      (default: ${FERROQ_CACHE:-$HOME/.cache/ferroq}/texts)
#
# We evaluate on prideprejudice.txt and calibrate (imatrix) on emma.txt. Needs apt-get (the
# .deb is only downloaded and unpacked, not installed) and the PyPI package `rdata` (installed
# if missing) to read R's lazy-load database. Idempotent.
set -euo pipefail
OUT="${1:-${FERROQ_CACHE:-$HOME/.cache/ferroq}/texts}"
if [[ -s "$OUT/prideprejudice.txt" && -s "$OUT/emma.txt" ]]; then
    echo "$OUT"
    exit 0
fi
mkdir -p "$OUT"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
( cd "$TMP" && apt-get download r-cran-janeaustenr >/dev/null 2>&1 ) || {
    apt-get update >/dev/null 2>&1 && ( cd "$TMP" && apt-get download r-cran-janeaustenr >/dev/null )
}
dpkg-deb -x "$TMP"/r-cran-janeaustenr_*.deb "$TMP/x"
python3 -c "import rdata" 2>/dev/null || pip install -q rdata >/dev/null
python3 - "$TMP/x/usr/lib/R/site-library/janeaustenr/data" "$OUT" <<'PY'
import gzip, sys, warnings, zlib
import rdata
warnings.simplefilter("ignore")
d, out = sys.argv[1], sys.argv[2]
parse = lambda b: rdata.conversion.convert(rdata.parser.parse_data(b, expand_altrep=True))
index = parse(gzip.decompress(open(f"{d}/Rdata.rdx", "rb").read()))
rdb = open(f"{d}/Rdata.rdb", "rb").read()
for name, (off, ln) in index["variables"].items():
    off, ln = int(off), int(ln)
    lines = parse(zlib.decompress(rdb[off + 4:off + ln]))
    with open(f"{out}/{name}.txt", "w") as f:
        f.write("\n".join("" if s is None else str(s) for s in list(lines)) + "\n")
PY
echo "$OUT"
