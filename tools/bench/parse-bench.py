#!/usr/bin/env python3
"""Turn $WORK/logs/bench.log (written by compare-ik.sh) into one markdown table row per result.

Usage: python3 parse-bench.py /tmp/ik/logs/bench.log
Columns: run tag, engine, model file, flags, pp512 t/s, tg128 t/s, load avg (1 min) at start,
CPU share (from /usr/bin/time when present, or ferroq's own line).
"""
import re
import sys

rows = []
cur = None
for line in open(sys.argv[1]):
    line = line.rstrip("\n")
    if line.startswith("=== "):
        if cur:
            rows.append(cur)
        cur = {"tag": line[4:].split("  ")[0], "res": {}, "load": "", "cpu": "", "cmd": ""}
    elif cur is None:
        continue
    elif line.startswith("load:"):
        m = re.search(r"load average: ([\d.]+)", line)
        cur["load"] = m.group(1) if m else ""
    elif line.startswith("cmd:"):
        cur["cmd"] = line[5:].strip()
    elif line.startswith("time:"):
        m = re.search(r"CPU (\d+)%", line)
        cur["cpu"] = (m.group(1) + " %") if m else ""
        m = re.search(r"max RSS (\d+) KiB", line)
        if m:
            cur["rss"] = f"{int(m.group(1)) / 1024:.1f} MiB"
    elif line.startswith("CPU time / (wall x threads)"):
        cur["ferroq_share"] = line.split(":", 1)[1].split("(")[0].strip()
    elif line.startswith("|") and "---" not in line:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if "t/s" in cells:  # header row: remember the column names
            cur["hdr"] = cells
            continue
        hdr = cur.get("hdr", [])
        if len(cells) == 2:  # ferroq: | test | t/s |
            cur["res"].setdefault("", {})[cells[0]] = cells[1]
        elif len(cells) == len(hdr):  # llama-bench md table
            d = dict(zip(hdr, cells))
            key = " ".join(f"{k}={d[k]}" for k in ("fa", "rtr", "fmoe") if k in d) or "(defaults)"
            cur["res"].setdefault(key, {})[d["test"]] = d["t/s"]
if cur:
    rows.append(cur)

print("| run | flags | pp512 t/s | tg128 t/s | load (1 min) | CPU share | max RSS (whole bench) |")
print("|---|---|---|---|---|---|---|")
for r in rows:
    for key, res in r["res"].items():
        share = r["cpu"] or ""
        if r.get("ferroq_share"):
            share = (share + " / ferroq: " + r["ferroq_share"]).strip(" /")
        print(f"| {r['tag']} | {key} | {res.get('pp512', '')} | {res.get('tg128', '')} | {r['load']} | {share} | {r.get('rss', '')} |")
