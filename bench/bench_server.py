"""gpt2-server.py against the command-line tools, measured in the same run on the same checkpoint.

    python bench/bench_server.py [/tmp/gpt2ja-small-rand] [--tokens 200] [--text FILE]

1. aggregate tokens/s of 8 concurrent streaming clients (one sample each, max_tokens N) vs
   gpt2-generate.py --num_generate 8 --max_tokens N (its --verbose prefill + decoding time);
2. time to first token of one client on an idle server vs the CLI's prefill + first step
   (gpt2-generate.py --num_generate 1 --max_tokens 1, its --verbose prefill + decoding time);
3. p50 / p99 time to first token with 8 clients each sending requests one after another;
4. embeddings/s for 1,000 lines sent as 10 requests of 100 vs gpt2-transform.py --input
   (its --verbose vectors/s).

One server runs for the whole benchmark; rounds interleave the CLI and the server (the server idle while
a CLI runs), each round's ratios are printed with the load average, and the summary gives the best of
each (on a shared machine the load comes and goes; compare rounds at similar load).
The checkpoint: python bench/make_checkpoint.py small /tmp/gpt2ja-small-rand
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from texts import add_text_flag, read_texts  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CONTEXT = "江戸時代のインターネット回線について、"


def cli(tool, *args):
    p = subprocess.run([sys.executable, str(ROOT / tool), "--gpu", "-1", "--verbose", *args], capture_output=True,
                       text=True, cwd=ROOT, timeout=1800)
    if p.returncode != 0:
        raise SystemExit(f"{tool} failed: {p.stderr[-2000:]}")
    return p.stderr


def cli_generate(model, num, tokens):
    err = cli("gpt2-generate.py", "--model", model, "--context", CONTEXT, "--num_generate", str(num), "--seed", "1",
              "--max_tokens", str(tokens), "--max_length", "1000000", "--batch_size", str(num))
    m = re.search(r"prefill: (\d+) tokens in ([\d.]+) s .*decoding: (\d+) tokens in ([\d.]+) s", err)
    if not m:
        raise SystemExit("no timing line from gpt2-generate.py --verbose:\n" + err)
    return float(m.group(2)), int(m.group(3)), float(m.group(4))


class Server:
    def __init__(self, model, batch_size):
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "gpt2-server.py"), "--model", model, "--gpu", "-1",
                                      "--port", "0", "--batch_size", str(batch_size), "--max_body", str(64 << 20)],
                                     stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=ROOT)
        for line in self.proc.stderr:
            if "http://127.0.0.1:" in line:
                self.port = int(line.split("http://127.0.0.1:")[1].split("/")[0])
                break
        else:
            raise SystemExit("the server did not start")
        threading.Thread(target=lambda: [None for _ in self.proc.stderr], daemon=True).start()

    def post(self, path, body):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=1800)
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        r = conn.getresponse()
        data = json.loads(r.read())
        conn.close()
        return data

    def stream(self, body):
        """(seconds to the first text, seconds to the end, completion tokens)."""
        t0 = time.perf_counter()
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=1800)
        conn.request("POST", "/v1/completions", json.dumps({**body, "stream": True,
                                                            "stream_options": {"include_usage": True}}),
                     {"Content-Type": "application/json"})
        r = conn.getresponse()
        first, usage, buf = None, None, b""
        while True:
            chunk = r.read1(65536)
            if not chunk:
                break
            buf += chunk
            while b"\n\n" in buf:
                event, buf = buf.split(b"\n\n", 1)
                data = event[len(b"data: "):]
                if data == b"[DONE]":
                    continue
                obj = json.loads(data)
                if first is None and any(c["text"] for c in obj["choices"]):
                    first = time.perf_counter() - t0
                if obj.get("usage"):
                    usage = obj["usage"]
        conn.close()
        return first, time.perf_counter() - t0, usage["completion_tokens"]

    def stop(self):
        self.proc.terminate()
        self.proc.wait(60)


def concurrently(fn, count):
    out = [None] * count
    threads = [threading.Thread(target=lambda k=k: out.__setitem__(k, fn(k))) for k in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", default="/tmp/gpt2ja-small-rand")
    p.add_argument("--tokens", type=int, default=200, help="tokens per sample for the throughput runs")
    p.add_argument("--repeat", type=int, default=2, help="repetitions (the best is reported)")
    add_text_flag(p)
    args = p.parse_args()
    if not os.path.isdir(args.model):
        raise SystemExit(f"no checkpoint at {args.model}: python bench/make_checkpoint.py small {args.model}")
    lines = [t if t.strip() else "。" for t in read_texts(args.text, limit=1000)]

    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False, encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    # One server for the whole run, idle (its threads asleep) while a CLI runs; rounds interleave
    # CLI and server so that both see the same load, and each round's ratio is printed with the load.
    server = Server(args.model, 8)
    best = {"cli_rate": 0.0, "srv_rate": 0.0, "cli_ttft": float("inf"), "srv_ttft": float("inf"),
            "cli_vec": 0.0, "srv_vec": 0.0}
    ttfts = []
    ratios = {"streams": [], "ttft": [], "embeddings": []}

    def load():
        return f"load {os.getloadavg()[0]:.1f}"

    try:
        server.stream({"prompt": CONTEXT, "max_tokens": 4})  # warm up
        server.post("/v1/embeddings", {"input": lines[:4]})
        for rnd in range(args.repeat):
            prefill, tokens, decode = cli_generate(args.model, 8, args.tokens)
            cli_rate = tokens / (prefill + decode)
            t0 = time.perf_counter()
            res = concurrently(lambda k: server.stream({"prompt": CONTEXT, "max_tokens": args.tokens, "seed": k}), 8)
            srv_rate = sum(r[2] for r in res) / (time.perf_counter() - t0)
            print(f"round {rnd}: 8 streams {srv_rate:.1f} tok/s, CLI {cli_rate:.1f} -> {srv_rate / cli_rate:.2f}x "
                  f"({load()})", flush=True)

            prefill, tokens, decode = cli_generate(args.model, 1, 1)
            cli_ttft = prefill + decode
            srv_ttft = min(server.stream({"prompt": CONTEXT, "max_tokens": 1})[0] for _ in range(3))
            print(f"round {rnd}: TTFT idle {srv_ttft * 1000:.0f} ms, CLI prefill + first step {cli_ttft * 1000:.0f} ms "
                  f"-> {srv_ttft / cli_ttft:.2f}x ({load()})", flush=True)

            def client(k):
                return [server.stream({"prompt": CONTEXT + str(k * 10 + r), "max_tokens": 20 + 10 * (r % 3)})[0]
                        for r in range(6)]

            ttfts += [x for r in concurrently(client, 8) for x in r]

            err = cli("gpt2-transform.py", "--model", args.model, "--input", f.name, "--format", "npy",
                      "--output_file", os.devnull)
            m = re.search(r"vectors: (\d+) in ([\d.]+) s", err)
            cli_vec = int(m.group(1)) / float(m.group(2))
            t0 = time.perf_counter()
            for i in range(0, len(lines), 100):
                server.post("/v1/embeddings", {"input": lines[i:i + 100]})
            srv_vec = len(lines) / (time.perf_counter() - t0)
            print(f"round {rnd}: embeddings {srv_vec:.1f}/s, CLI {cli_vec:.1f}/s -> {srv_vec / cli_vec:.2f}x "
                  f"({load()})", flush=True)
            ratios["streams"].append(srv_rate / cli_rate)
            ratios["ttft"].append(srv_ttft / cli_ttft)
            ratios["embeddings"].append(srv_vec / cli_vec)
            for key, value in (("cli_rate", cli_rate), ("srv_rate", srv_rate), ("cli_vec", cli_vec),
                               ("srv_vec", srv_vec)):
                best[key] = max(best[key], value)
            best["cli_ttft"] = min(best["cli_ttft"], cli_ttft)
            best["srv_ttft"] = min(best["srv_ttft"], srv_ttft)
    finally:
        server.stop()
        os.unlink(f.name)
    srv_rate, cli_rate, srv_ttft, cli_ttft, srv_vec, cli_vec = (
        best[k] for k in ("srv_rate", "cli_rate", "srv_ttft", "cli_ttft", "srv_vec", "cli_vec"))
    ttfts.sort()
    p50 = statistics.median(ttfts)
    p99 = ttfts[min(len(ttfts) - 1, int(round(0.99 * (len(ttfts) - 1))))]
    print(f"checkpoint {args.model}, {os.cpu_count()} CPUs, best of {args.repeat}; median of the rounds' ratios: "
          + ", ".join(f"{k} {statistics.median(v):.2f}x" for k, v in ratios.items()))
    print(f"aggregate tokens/s, 8 streams x {args.tokens} tokens: server {srv_rate:.1f}, "
          f"gpt2-generate.py --num_generate 8 {cli_rate:.1f}  -> {srv_rate / cli_rate:.2f}x (target >= 0.9)")
    print(f"time to first token, idle, 1 client: server {srv_ttft * 1000:.0f} ms (HTTP included), "
          f"CLI prefill + first step {cli_ttft * 1000:.0f} ms  -> {srv_ttft / cli_ttft:.2f}x (target <= 1.5)")
    print(f"time to first token, 8 clients x 6 requests: p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms")
    print(f"embeddings/s, {len(lines)} lines as 10 requests of 100: server {srv_vec:.1f}, gpt2-transform.py "
          f"--input {cli_vec:.1f}  -> {srv_vec / cli_vec:.2f}x (target >= 0.9)")


if __name__ == "__main__":
    main()
