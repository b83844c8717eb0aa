"""Well-behaved clients' latency on gpt2-server.py, alone and among misbehaving clients (issue 22).

    python bench/bench_server_hostile.py [MODEL] [--seconds 8] [--rounds 2] [--clients 4]

One server (--batch_size 16 --timeout 5 --read_timeout 2); rounds alternate a phase of well-behaved
clients alone and a phase with every kind of misbehaving client beside them, so that both see the same
machine load.  A well-behaved client sends non-streaming completions (max_tokens 16) one after another;
its latency is the request's whole time.  The misbehaving clients, one thread each, over and over:

  hang-up     a non-streaming request of 2 endless samples, the connection closed after 0.2 s
  no-reading  a stream of 2 endless samples echoing a 300,000-character prompt, never read
  huge-body   4,000 prompts x n 128 (never fits: 400)
  slowloris   10 connections sending nothing, 10 sending headers a byte a second
  embed-drop  400 texts of ~1,000 tokens to embed, the connection closed after 0.5 s
  garbage     JSON nested 100,000 deep, a text/plain body, a foreign Host header

each pausing 0.25 s between its misdeeds (--pause), in a process of their own.

Prints p50 and p99 of each phase, the ratio with / without (target <= 2), and the load average.
Default model: the tiny test checkpoint (the HTTP layer is what is measured).
"""
from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENDLESS = {"prompt": "終わらない", "max_tokens": 10 ** 6, "max_length": 10 ** 6, "temperature": 0, "n": 2}


class Client:
    def __init__(self, port):
        self.port = port

    def post(self, path, body, headers=None, raw=None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            conn.request("POST", path, raw if raw is not None else json.dumps(body),
                         {"Content-Type": "application/json", **(headers or {})})
            r = conn.getresponse()
            r.read()
            return r.status
        finally:
            conn.close()

    def send(self, path, body: bytes, rcvbuf=None):
        sock = socket.socket()
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.connect(("127.0.0.1", self.port))
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        return sock


class Server(Client):
    def __init__(self, model):
        env = dict(os.environ, GPT2JA_VOCAB=str(ROOT / "encoder"), CUDA_VISIBLE_DEVICES="-1")
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "gpt2-server.py"), "--model", model, "--gpu", "-1",
                                      "--port", "0", "--batch_size", "16", "--max_queue", "64", "--timeout", "5",
                                      "--read_timeout", "2", "--max_body", str(4 << 20)],
                                     stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=ROOT, env=env)
        for line in self.proc.stderr:
            if "http://127.0.0.1:" in line:
                self.port = int(line.split("http://127.0.0.1:")[1].split("/")[0])
                break
        else:
            raise SystemExit("the server did not start")
        self.log = []
        threading.Thread(target=lambda: [self.log.append(x) for x in self.proc.stderr], daemon=True).start()

    def stop(self):
        self.proc.terminate()
        return self.proc.wait(60)


def misbehaving(server, stop: threading.Event, only=None, pause=0.25):
    long_texts = [f"{k} " + "the quick brown fox jumps over the lazy dog. " * 22 for k in range(400)]
    unread = json.dumps({**ENDLESS, "prompt": "あ" * 300_000, "echo": True, "stream": True},
                        ensure_ascii=False).encode()
    huge = json.dumps({"prompt": ["a"] * 4000, "n": 128, "max_tokens": 1})
    embed = json.dumps({"input": long_texts}).encode()
    counts = {}

    def loop(name, once):
        def run():
            while not stop.is_set():
                try:
                    once()
                except OSError:
                    pass
                counts[name] = counts.get(name, 0) + 1
                stop.wait(pause)
        return threading.Thread(target=run, name=name, daemon=True)

    def hang_up():
        sock = server.send("/v1/completions", json.dumps(ENDLESS).encode())
        stop.wait(0.2)
        sock.close()

    def no_reading():
        sock = server.send("/v1/completions", unread, rcvbuf=4096)
        stop.wait(6)  # past the server's --timeout 5: it has closed the connection by now
        sock.close()

    def huge_body():
        server.post("/v1/completions", None, raw=huge)

    def slowloris():
        socks = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(20)]
        for sock in socks[10:]:
            sock.sendall(b"GET /health HTTP/1.1\r\n")
        for _ in range(3):
            if stop.wait(1):
                break
            for sock in socks[10:]:
                try:
                    sock.sendall(b"X")
                except OSError:
                    pass
        for sock in socks:
            sock.close()

    def embed_drop():
        sock = server.send("/v1/embeddings", embed)
        stop.wait(0.5)
        sock.close()

    def garbage():
        server.post("/v1/completions", None, raw=b"[" * 100_000)
        server.post("/v1/completions", None, raw=b'{"prompt": "a"}', headers={"Content-Type": "text/plain"})
        server.post("/v1/completions", {"prompt": "a"}, headers={"Host": "rebound.example"})
        stop.wait(0.05)

    threads = [loop(name, fn) for name, fn in (("hang-up", hang_up), ("no-reading", no_reading),
                                                ("huge-body", huge_body), ("slowloris", slowloris),
                                                ("embed-drop", embed_drop), ("garbage", garbage))
               if only is None or name in only]
    for t in threads:
        t.start()
    return threads, counts


def misbehaving_process(port, stop, only, pause, out):
    """The misbehaving clients in a process of their own: their work (and GIL) is not the measuring
    process's."""
    threads, counts = misbehaving(Client(port), stop, only, pause)
    stop.wait()
    for t in threads:
        t.join(30)
    cpu = os.times()
    out.put({**counts, "cpu_s": round(cpu.user + cpu.system, 2)})


def phase(server, seconds, clients, hostile, only=None, pause=0.25):
    stop = multiprocessing.Event()
    out = multiprocessing.Queue()
    latencies, failures = [], []
    bad = None
    if hostile:
        bad = multiprocessing.Process(target=misbehaving_process, args=(server.port, stop, only, pause, out))
        bad.start()
    t_end = time.monotonic() + seconds

    def client(k):
        r = 0
        while time.monotonic() < t_end:
            t0 = time.perf_counter()
            status = server.post("/v1/completions", {"prompt": f"テスト{k}の{r}回目", "max_tokens": 16, "seed": r})
            (latencies if status == 200 else failures).append(time.perf_counter() - t0)
            r += 1

    good = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in good:
        t.start()
    for t in good:
        t.join()
    stop.set()
    counts = {}
    if bad is not None:
        counts = out.get(timeout=60)
        bad.join(30)
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, int(round(0.99 * (len(latencies) - 1))))]
    return statistics.median(latencies), p99, len(latencies), len(failures), counts


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", default=str(ROOT / "tests" / "data" / "gpt2ja-tiny"))
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--pause", type=float, default=0.25, help="seconds each misbehaving client waits between misdeeds")
    p.add_argument("--only", action="append", default=None, metavar="NAME",
                   help="only this kind of misbehaving client (repeatable; default: every kind)")
    args = p.parse_args()
    server = Server(args.model)
    ratios = []
    try:
        server.post("/v1/completions", {"prompt": "warm", "max_tokens": 4})
        for rnd in range(args.rounds):
            alone = phase(server, args.seconds, args.clients, False)
            among = phase(server, args.seconds, args.clients, True, args.only, args.pause)
            ratio = among[1] / alone[1]
            ratios.append(ratio)
            print(f"round {rnd}: alone p50 {alone[0] * 1000:.0f} ms p99 {alone[1] * 1000:.0f} ms ({alone[2]} requests, "
                  f"{alone[3]} failed); among misbehaving clients p50 {among[0] * 1000:.0f} ms p99 "
                  f"{among[1] * 1000:.0f} ms ({among[2]} requests, {among[3]} failed; misbehaving requests "
                  f"{among[4]}) -> p99 {ratio:.2f}x (load {os.getloadavg()[0]:.1f})", flush=True)
    finally:
        rc = server.stop()
    tracebacks = sum("Traceback" in line for line in server.log)
    print(f"{args.model}, {os.cpu_count()} CPUs, {args.clients} well-behaved clients, {args.seconds:g} s phases: "
          f"p99 with / without misbehaving clients, median of {args.rounds} rounds: "
          f"{statistics.median(ratios):.2f}x (target <= 2); server exit {rc}, {tracebacks} tracebacks on stderr")


if __name__ == "__main__":
    main()
