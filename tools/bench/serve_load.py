#!/usr/bin/env python3
"""A small, bounded load client for `ferroq serve` (or any OpenAI-compatible server such as
`llama-server`), loopback only. Standard library only.

  serve_load.py throughput --port P --streams N --tokens M [--rounds R]
      N concurrent greedy streaming /v1/completions of M tokens each (a different prompt per
      stream); prints per round the aggregate decode rate: tokens after each stream's first,
      summed, over the time from the first stream's first token to the last stream's end.
  serve_load.py ttft --port P --prompt-tokens T [--rounds R]
      time to first token (streaming, max_tokens 1) for a prompt of about T tokens, a fresh
      prefix each round (no prompt-cache hit).
  serve_load.py cache --port P [--rounds R]
      a ~500-token system prompt: TTFT cold (new prefix) then hit (same prefix, new question).

Each run is bounded: at most 16 streams, 1024 tokens per stream and 20 rounds; every request has
a timeout.
"""

import argparse
import http.client
import json
import os
import statistics
import sys
import threading
import time

WORDS = ("the quick brown fox jumps over a lazy dog while seven small birds sing "
         "about rivers mountains cities and the long history of distant kingdoms").split()


def text_of(n_words, seed):
    return " ".join(WORDS[(seed * 7 + i * 3 + (i * i) % 5) % len(WORDS)] for i in range(n_words))


def stream(port, prompt, max_tokens, model, timeout=300):
    """One streaming completion: returns (t_sent, t_first, t_end, n_tokens)."""
    body = json.dumps({
        "model": model, "prompt": prompt, "max_tokens": max_tokens,
        "temperature": 0, "stream": True,
    })
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    t0 = time.perf_counter()
    c.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    r = c.getresponse()
    if r.status != 200:
        raise RuntimeError(f"HTTP {r.status}: {r.read()[:300]!r}")
    first, n = None, 0
    while True:
        line = r.readline()
        if not line:
            break
        line = line.strip()
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            break
        ev = json.loads(data)
        ch = ev.get("choices") or []
        if ch and (ch[0].get("text") or ch[0].get("finish_reason") is None):
            if first is None:
                first = time.perf_counter()
            n += 1
    t_end = time.perf_counter()
    c.close()
    return t0, first or t_end, t_end, n


def cpu_seconds(pid):
    """User + system CPU time of process `pid` (all its threads), from /proc (Linux)."""
    if not pid:
        return 0.0
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def throughput(a):
    rates = []
    for rd in range(a.rounds):
        res = [None] * a.streams
        cpu0 = cpu_seconds(a.pid)

        def go(i):
            res[i] = stream(a.port, text_of(12, rd * 31 + i), a.tokens, a.model)

        th = [threading.Thread(target=go, args=(i,)) for i in range(a.streams)]
        for t in th:
            t.start()
        for t in th:
            t.join()
        first = min(r[1] for r in res)
        end = max(r[2] for r in res)
        toks = sum(max(r[3] - 1, 0) for r in res)
        rate = toks / (end - first)
        rates.append(rate)
        cpu = cpu_seconds(a.pid) - cpu0
        per_cpu = f", {sum(r[3] for r in res) / cpu:.1f} tok per server CPU-s" if cpu else ""
        print(f"round {rd}: {a.streams} streams, {toks} tokens after the first, "
              f"{end - first:.3f} s: {rate:.1f} tok/s aggregate{per_cpu}", flush=True)
    print(f"median {statistics.median(rates):.1f} tok/s aggregate ({a.streams} streams)")


def ttft(a):
    ts = []
    for rd in range(a.rounds):
        # about one token per word of this text with SmolLM2's tokenizer: aim at T tokens
        k = rd + a.offset
        p = f"{k} " + text_of(max(1, a.prompt_tokens - 2), k)
        t0, first, _, _ = stream(a.port, p, 1, a.model)
        ts.append(first - t0)
        print(f"round {rd}: ttft {1000 * (first - t0):.1f} ms", flush=True)
    print(f"median ttft {1000 * statistics.median(ts):.1f} ms")


def cache(a):
    cold, hit = [], []
    for rd in range(a.rounds):
        k = rd + a.offset
        system = f"Session {k * 7919}. " + text_of(490, k)  # ~500 tokens
        t0, f, _, _ = stream(a.port, system + " Question: what is one?", 1, a.model)
        cold.append(f - t0)
        t0, f, _, _ = stream(a.port, system + " Question: and two?", 1, a.model)
        hit.append(f - t0)
        print(f"round {rd}: cold {1000 * cold[-1]:.1f} ms, hit {1000 * hit[-1]:.1f} ms",
              flush=True)
    c, h = statistics.median(cold), statistics.median(hit)
    print(f"median cold {1000 * c:.1f} ms, hit {1000 * h:.1f} ms ({100 * h / c:.1f} %)")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["throughput", "ttft", "cache"])
    ap.add_argument("--port", type=int, default=8080)
    ap.add_argument("--model", default="m")
    ap.add_argument("--streams", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--pid", type=int, default=0,
                    help="the server's process id: also report tokens per CPU-second it used")
    ap.add_argument("--offset", type=int, default=0,
                    help="first round's prompt variant (fresh prompts across runs)")
    a = ap.parse_args()
    if not (1 <= a.streams <= 16 and 1 <= a.tokens <= 1024 and 1 <= a.rounds <= 20):
        sys.exit("bounded runs only: streams 1..16, tokens 1..1024, rounds 1..20")
    {"throughput": throughput, "ttft": ttft, "cache": cache}[a.mode](a)


if __name__ == "__main__":
    main()
