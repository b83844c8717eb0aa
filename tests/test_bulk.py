"""gpt2-bulk.py: the single-machine tools' numbers, through a Ray cluster.

One local Ray cluster (ray.cluster_utils.Cluster, listening on 127.0.0.1) is
shared by the module; jobs run in this process (``cli.bulk.main``) or as a
driver subprocess joining it with --address.  Each job starts its own actors,
which load the tiny checkpoint.
"""
import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from conftest import ROOT, spawn

# Ray must advertise 127.0.0.1, not the machine's outside address (set before Ray is imported).
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ.setdefault("RAY_DATA_LOG_LEVEL", "ERROR")
ray = pytest.importorskip("ray")
pq = pytest.importorskip("pyarrow.parquet")

from cli import bulk as cli_bulk  # noqa: E402
from cli.errors import UsageError  # noqa: E402

BULK = str(ROOT / "gpt2-bulk.py")


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 3, "include_dashboard": False,
                                                     "node_ip_address": "127.0.0.1"})
    ray.init(address=c.address, logging_level="ERROR", log_to_driver=False)
    yield c
    ray.shutdown()
    c.shutdown()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, corpus_lines):
    """Two input files: corpus lines, an empty line, a blank line, a line longer than n_ctx tokens."""
    d = tmp_path_factory.mktemp("bulk-in")
    long_line = "吾輩は猫である。名前はまだ無い。" * 120
    first = corpus_lines[:13] + ["", "   "] + corpus_lines[13:20]
    second = corpus_lines[20:31] + [long_line] + corpus_lines[31:36]
    a, b = d / "a.txt", d / "b.txt"
    a.write_text("\n".join(first) + "\n", encoding="utf-8")
    b.write_bytes(("\r\n".join(second)).encode("utf-8"))  # CRLF, no final line break
    both = d / "both.txt"
    both.write_text("\n".join(first + second) + "\n", encoding="utf-8")
    return {"paths": [str(a), str(b)], "lines": first + second, "concatenated": str(both)}


def _bulk(argv, tiny_model_dir):
    return cli_bulk.main([argv[0], "--model", str(tiny_model_dir), *argv[1:]])


def _read(directory):
    table = pq.read_table(str(directory))
    return table.sort_by([("line", "ascending")] + ([("index", "ascending")] if "index" in table.column_names else []))


def _parts(directory):
    return sorted(p for p in os.listdir(directory) if p.startswith("part-"))


# --------------------------------------------------------------------------- without a cluster


def test_single_machine_tools_do_not_import_ray(env):
    code = ("import sys; import cli.generate, cli.transform, cli.score, cli.encode, cli.finetune, cli.download, "
            "cli.encoder, tasks.generate, tasks.vectors, tasks.score, tasks.train, hub, model, encoder; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] == 'ray'); "
            "print(bad); sys.exit(1 if bad else 0)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr


def test_help_imports_neither_tensorflow_nor_ray(env):
    code = ("import runpy, sys; sys.argv = ['gpt2-bulk.py', 'transform', '--help']\n"
            "try:\n    runpy.run_path(%r, run_name='__main__')\nexcept SystemExit as e:\n    assert e.code == 0\n"
            "print(sorted(m for m in ('tensorflow', 'ray') if m in sys.modules), file=sys.stderr)" % BULK)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
    assert "--pooling" in p.stdout and "--workers" in p.stdout and "--resume" in p.stdout, p.stderr
    assert p.stderr.strip().endswith("[]"), p.stderr


def test_errors_are_one_line_before_any_cluster(tmp_path, env, tiny_model_dir):
    missing = subprocess.run([sys.executable, BULK, "transform", "--model", str(tiny_model_dir), "--input",
                              str(tmp_path / "nope.txt"), "--output", str(tmp_path / "out")],
                             capture_output=True, text=True, env=env, timeout=300)
    assert missing.returncode == 2
    assert missing.stderr.startswith("gpt2-bulk.py: error: cannot read") and missing.stderr.count("\n") == 1
    src = tmp_path / "in.txt"
    src.write_text("今日は\n", encoding="utf-8")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    unwritable = subprocess.run([sys.executable, BULK, "score", "--model", str(tiny_model_dir), "--input", str(src),
                                 "--output", str(blocker / "out")], capture_output=True, text=True, env=env,
                                timeout=300)
    assert unwritable.returncode == 2
    assert unwritable.stderr.startswith("gpt2-bulk.py: error: cannot write") and unwritable.stderr.count("\n") == 1
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok\n\xff\n")
    p = subprocess.run([sys.executable, BULK, "score", "--model", str(tiny_model_dir), "--input", str(bad),
                        "--output", str(tmp_path / "o2")], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 2 and "line 2: invalid UTF-8" in p.stderr, p.stderr


def test_shards_number_lines_across_files(inputs):
    from tasks.bulk import plan_shards, read_shard

    shards = plan_shards(inputs["paths"], shard_lines=4)
    assert [s.first_line for s in shards] == list(np.cumsum([0] + [s.lines for s in shards[:-1]]))
    assert sum(s.lines for s in shards) == len(inputs["lines"])
    assert [t for s in shards for t in read_shard(s)] == inputs["lines"]


# --------------------------------------------------------------------------- through the cluster


def test_transform_equals_gpt2_transform(cluster, inputs, tiny_model_dir, tmp_path, capsys):
    from cli import transform

    out = tmp_path / "vectors"
    assert _bulk(["transform", "--input", *inputs["paths"], "--output", str(out), "--workers", "2",
                  "--shard_lines", "7"], tiny_model_dir) == 0
    warned = capsys.readouterr().err
    npy = tmp_path / "cli.npy"
    transform.main(["--model", str(tiny_model_dir), "--input", inputs["concatenated"], "--format", "npy",
                    "--output_file", str(npy)])
    expected = np.load(npy)
    table = _read(out)
    assert table.column_names == ["line", "text", "vector"]
    assert str(table.schema.field("vector").type) == "fixed_size_list<element: float>[64]"
    assert table["line"].to_pylist() == list(range(len(inputs["lines"])))
    assert table["text"].to_pylist() == inputs["lines"]
    vectors = np.asarray(table["vector"].combine_chunks().flatten()).reshape(-1, 64)
    np.testing.assert_allclose(vectors, expected, atol=1e-5, rtol=0)
    assert "line 13: empty; its vector is that of <|endoftext|>" in warned
    assert "longer than 1024 tokens" in warned
    assert len(_parts(out)) == 4 + 3  # shards of 7 lines, per file: 22 lines and 17 lines


def test_score_equals_gpt2_score(cluster, inputs, tiny_model_dir, tmp_path):
    from cli import score

    out = tmp_path / "scores"
    assert _bulk(["score", "--input", *inputs["paths"], "--output", str(out), "--workers", "2",
                  "--shard_lines", "9", "--tokens", "--stride", "300"], tiny_model_dir) == 0
    jsonl = tmp_path / "cli.jsonl"
    score.main([inputs["concatenated"], "--model", str(tiny_model_dir), "--format", "jsonl", "--tokens",
                "--stride", "300", "--output_file", str(jsonl)])
    expected = [json.loads(line) for line in jsonl.read_text(encoding="utf-8").splitlines()]
    rows = _read(out).to_pylist()
    assert [r["line"] for r in rows] == list(range(len(inputs["lines"])))
    empty = [r for r in rows if not r["text"]]
    assert [r["line"] for r in empty] == [13, 14]
    assert all(r["logprob"] is None and r["tokens"] == 0 and r["perplexity"] is None for r in empty)
    scored = [r for r in rows if r["text"]]
    assert len(scored) == len(expected)
    for r, e in zip(scored, expected):
        assert r["text"] == e["text"]
        assert "%.5g" % r["logprob"] == "%.5g" % e["logprob"]
        assert r["tokens"] == e["tokens"]
        assert [t["id"] for t in r["token_logprobs"]] == [t["id"] for t in e["token_logprobs"]]
        # per token: float rounding of other batch shapes (the sums above are %.5g-identical)
        np.testing.assert_allclose([t["logprob"] for t in r["token_logprobs"]],
                                   [t["logprob"] for t in e["token_logprobs"]], rtol=1e-5, atol=1e-4)
    assert max(r["tokens"] for r in scored) > 1024  # the long line went through the sliding window


GENERATE = ["--num_generate", "2", "--seed", "7", "--max_length", "40", "--top_k", "20"]


def test_generate_equals_gpt2_generate(cluster, inputs, tiny_model_dir, tmp_path, capsys):
    from cli import generate

    lines = inputs["lines"][:6] + inputs["lines"][13:16]  # with the empty and the blank line
    src = tmp_path / "contexts.txt"
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "samples"
    assert _bulk(["generate", "--contexts", str(src), "--output", str(out), "--workers", "2",
                  "--shard_lines", "4", "--progress", *GENERATE], tiny_model_dir) == 0
    assert "line/s" in capsys.readouterr().err  # the progress bar
    jsonl = tmp_path / "cli.jsonl"
    generate.main(["--model", str(tiny_model_dir), "--contexts", str(src), "--format", "jsonl",
                   "--output_file", str(jsonl), *GENERATE])
    expected = [json.loads(line) for line in jsonl.read_text(encoding="utf-8").splitlines()]
    rows = _read(out).to_pylist()
    assert [(r["line"], r["index"]) for r in rows] == [(j, i) for j in range(len(lines)) for i in range(2)]
    assert [(r["context"], r["index"], r["text"]) for r in rows] == \
           [(e["context"], e["index"], e["text"]) for e in expected]


def test_model_missing_on_a_worker_is_one_error(cluster, inputs, tmp_path, tiny_model_dir):
    with pytest.raises(UsageError, match=r"on node 127\.0\.0\.1: model directory .*nowhere does not exist"):
        cli_bulk.main(["transform", "--model", str(tmp_path / "nowhere"), "--input", inputs["paths"][0],
                       "--output", str(tmp_path / "out")])
    with pytest.raises(UsageError, match=r"^--layer must be -1 \(final\) or 0\.\.1 for this model, got 5$"):
        _bulk(["transform", "--input", inputs["paths"][0], "--output", str(tmp_path / "o2"), "--layer", "5"],
              tiny_model_dir)
    # found by the first shard (the Generator's own rule), reported by its flag all the same
    with pytest.raises(UsageError, match=r"^the job failed: --min_length must be below n_ctx/2 = 512, got 600$"):
        _bulk(["generate", "--contexts", inputs["paths"][0], "--output", str(tmp_path / "o3"), "--min_length", "600"],
              tiny_model_dir)


def test_resume_refuses_another_job(cluster, inputs, tiny_model_dir, tmp_path):
    out = tmp_path / "o"
    assert _bulk(["score", "--input", inputs["paths"][1], "--output", str(out)], tiny_model_dir) == 0
    with pytest.raises(UsageError, match="holds the output of a job"):
        _bulk(["score", "--input", inputs["paths"][1], "--output", str(out)], tiny_model_dir)
    with pytest.raises(UsageError, match="holds another job"):
        _bulk(["score", "--input", inputs["paths"][1], "--output", str(out), "--resume", "--exclude-end"],
              tiny_model_dir)
    assert _bulk(["score", "--input", inputs["paths"][1], "--output", str(out), "--resume"], tiny_model_dir) == 0


def _score_rows(directory):
    return [(r["line"], r["text"], "%.5g" % r["logprob"] if r["logprob"] is not None else None)
            for r in _read(directory).to_pylist()]


def test_an_actor_killed_mid_job_loses_no_line(cluster, inputs, tiny_model_dir, tmp_path):
    import psutil

    reference = tmp_path / "reference"
    assert _bulk(["score", "--input", *inputs["paths"], "--output", str(reference), "--shard_lines", "1"],
                 tiny_model_dir) == 0
    out = tmp_path / "scores"
    killed = []

    def killer():
        deadline = time.time() + 240
        while time.time() < deadline and not killed:
            if out.exists() and _parts(out):
                for p in psutil.Process(os.getpid()).children(recursive=True):
                    try:
                        if "MapWorker" in " ".join(p.cmdline()):
                            p.send_signal(signal.SIGKILL)
                            killed.append((p.pid, len(_parts(out))))
                            return
                    except psutil.Error:
                        pass
            time.sleep(0.02)

    thread = threading.Thread(target=killer)
    thread.start()
    try:
        assert _bulk(["score", "--input", *inputs["paths"], "--output", str(out), "--workers", "2",
                      "--shard_lines", "1"], tiny_model_dir) == 0
    finally:
        thread.join()
    assert killed and killed[0][1] < len(inputs["lines"]), killed  # killed while shards were left
    assert _score_rows(out) == _score_rows(reference)


def test_resume_after_the_driver_is_killed_does_the_rest_only(cluster, inputs, tiny_model_dir, tmp_path, env):
    out = tmp_path / "samples"
    src = inputs["concatenated"]
    argv = ["generate", "--model", str(tiny_model_dir), "--contexts", src, "--output", str(out),
            "--shard_lines", "2", "--num_generate", "1", "--seed", "3", "--max_length", "60"]
    driver = subprocess.Popen([sys.executable, BULK, *argv, "--address", cluster.address],
                              env={**env, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while time.time() < deadline and driver.poll() is None and not (out.exists() and len(_parts(out)) >= 2):
        time.sleep(0.02)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    before = {name: os.stat(out / name) for name in _parts(out)}
    shards = -(-len(inputs["lines"]) // 2)
    assert 2 <= len(before) < shards, (len(before), driver.stderr.read()[-2000:])
    assert cli_bulk.main([*argv, "--resume"]) == 0
    after = {name: os.stat(out / name) for name in _parts(out)}
    assert len(after) == shards
    for name, st in before.items():  # finished shards were not written again
        assert (after[name].st_ino, after[name].st_mtime_ns) == (st.st_ino, st.st_mtime_ns), name
    rows = _read(out).to_pylist()
    assert [r["line"] for r in rows] == list(range(len(inputs["lines"])))
    fresh = tmp_path / "fresh"
    assert cli_bulk.main([*argv[:argv.index("--output") + 1], str(fresh), *argv[argv.index("--output") + 2:]]) == 0
    assert _read(fresh).to_pylist() == rows


def test_two_nodes_share_a_job(cluster, inputs, tiny_model_dir, tmp_path, capsys):
    cluster.add_node(num_cpus=2, node_ip_address="127.0.0.1")
    cluster.wait_for_nodes()
    reference = tmp_path / "reference"
    assert _bulk(["transform", "--input", *inputs["paths"], "--output", str(reference), "--shard_lines", "3"],
                 tiny_model_dir) == 0
    capsys.readouterr()
    out = tmp_path / "vectors"
    assert _bulk(["transform", "--input", *inputs["paths"], "--output", str(out), "--workers", "2",
                  "--shard_lines", "3", "--verbose"], tiny_model_dir) == 0
    err = capsys.readouterr().err
    line = [x for x in err.splitlines() if "nodes: " in x][-1]
    used = {part.split(" (")[0] for part in line.split("nodes: ", 1)[1].split(", ")}
    alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert len(alive) == 2 and used == alive, (used, alive)
    assert _read(out).equals(_read(reference))


def test_a_local_cluster_listens_on_loopback_only(inputs, tiny_model_dir, tmp_path, env):
    """Without --address the tool starts its own cluster: every socket it listens on is 127.0.0.1's."""
    import psutil

    out = tmp_path / "scores"
    env = {k: v for k, v in env.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
    driver = subprocess.Popen([sys.executable, BULK, "score", "--model", str(tiny_model_dir), "--input",
                               inputs["paths"][1], "--output", str(out), "--workers", "6"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    listening = set()
    try:
        while driver.poll() is None:
            try:
                for p in psutil.Process(driver.pid).children(recursive=True):
                    try:
                        listening.update((c.laddr.ip, p.name()) for c in p.net_connections(kind="inet")
                                         if c.status == psutil.CONN_LISTEN)
                    except psutil.Error:
                        pass
            except psutil.Error:
                pass
            time.sleep(0.2)
    finally:
        err = driver.communicate(timeout=300)[1]
    assert driver.returncode == 0, err
    import ipaddress

    def loopback(ip):
        address = ipaddress.ip_address(ip)
        return (getattr(address, "ipv4_mapped", None) or address).is_loopback

    assert listening and all(loopback(ip) for ip, _ in listening), listening
    assert _read(out).num_rows == 17
    # --workers beyond the shards is lowered with a note, and that note is all a successful job
    # says: none of Ray's own log lines (core_worker ... max_restarts) or warnings
    assert err.splitlines() == ["gpt2-bulk.py: note: --workers 6 lowered to 1: the job has 1 shard(s) to do"], err


# --------------------------------------------------------------------------- faults (issue 22, D17)


def _args(tmp_path, resume=False):
    import argparse

    return argparse.Namespace(output=str(tmp_path / "out"), resume=resume)


def test_resume_redoes_a_damaged_part_and_keeps_a_sound_one(tmp_path, inputs, capsys):
    import pyarrow as pa

    from tasks.bulk import plan_shards

    shards = plan_shards(inputs["paths"], shard_lines=10)
    job = {"job": 1}
    assert len(cli_bulk._prepare_output(_args(tmp_path), job, shards)) == len(shards)
    out = tmp_path / "out"
    for s in shards[:3]:
        pq.write_table(pa.table({"line": list(range(s.first_line, s.first_line + s.lines))}), str(out / s.name()))
    data = (out / shards[0].name()).read_bytes()
    (out / shards[0].name()).write_bytes(data[: len(data) // 2])  # truncated
    (out / shards[1].name()).write_bytes(b"garbage" * 100)
    todo = cli_bulk._prepare_output(_args(tmp_path, resume=True), job, shards)
    assert [s.number for s in todo] == [0, 1] + [s.number for s in shards[3:]]
    notes = capsys.readouterr().err.splitlines()
    assert len(notes) == 2 and all(n.startswith("gpt2-bulk.py: note: part-0000") and "made again" in n
                                   for n in notes), notes
    assert sorted(os.listdir(out)) == ["_job.json", shards[2].name()]
    # a part with the wrong rows is not the shard's either
    pq.write_table(pa.table({"line": [0]}), str(out / shards[0].name()))
    assert shards[0] in cli_bulk._prepare_output(_args(tmp_path, resume=True), job, shards)


def test_a_job_file_without_parts_is_replaced_by_the_corrected_job(tmp_path, inputs):
    """A job that failed before its first shard was written (a user error found on the cluster) leaves
    only _job.json: the corrected command runs, with --resume or without."""
    from tasks.bulk import plan_shards

    shards = plan_shards(inputs["paths"], shard_lines=10)
    cli_bulk._prepare_output(_args(tmp_path), {"job": "wrong"}, shards)
    for resume in (False, True):
        assert len(cli_bulk._prepare_output(_args(tmp_path, resume), {"job": resume}, shards)) == len(shards)
        assert json.loads((tmp_path / "out" / "_job.json").read_text()) == {"job": resume}


def test_workers_are_capped_by_shards_cpus_and_memory():
    assert cli_bulk.cap_workers(6, 1, 8, 16, None) == (6, [])
    assert cli_bulk.cap_workers(6, 1, 3, 16, None)[0] == 3
    w, notes = cli_bulk.cap_workers(6, 1, 100, 2, None)
    assert w == 2 and notes == ["--workers 6 lowered to 2: 2 CPU(s) for actors of --threads 1"]
    assert cli_bulk.cap_workers(6, 4, 100, 2, None)[0] == 1
    w, notes = cli_bulk.cap_workers(6, 1, 100, 64, 4 * 2 ** 30, model_bytes=2 ** 30)
    assert w == 1 and "GiB per actor" in notes[0]


def test_an_unreachable_address_is_one_line(tmp_path, env, tiny_model_dir):
    import socket

    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    src = tmp_path / "in.txt"
    src.write_text("今日は\n", encoding="utf-8")
    p = subprocess.run([sys.executable, BULK, "score", "--model", str(tiny_model_dir), "--input", str(src),
                        "--output", str(tmp_path / "out"), "--address", f"127.0.0.1:{port}"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 2, p.stderr
    assert p.stderr.splitlines() == [f"gpt2-bulk.py: error: cannot reach the Ray cluster 127.0.0.1:{port}: "
                                     f"Connection refused (tried for up to 10 s)"], p.stderr


def test_planning_reads_long_lines_across_blocks(tmp_path, monkeypatch):
    """Lines longer than the read block (joined once, at their end: linear time) keep their offsets."""
    from tasks import bulk

    monkeypatch.setattr(bulk, "_READ_BLOCK", 5)
    lines = ["a" * 23, "", "bb\r", "c" * 11, "d" * 5, "e" * 4]
    path = tmp_path / "in.txt"
    path.write_bytes("\n".join(lines).encode())
    shards = bulk.plan_shards([str(path)], shard_lines=1)
    assert [bulk.read_shard(s) for s in shards] == [[t.rstrip("\r")] for t in lines]
    assert shards[-1].end == path.stat().st_size


def test_sigterm_to_the_driver_exits_143_quietly(cluster, inputs, tiny_model_dir, tmp_path, env):
    out = tmp_path / "samples"
    driver = spawn([sys.executable, BULK, "generate", "--model", str(tiny_model_dir), "--contexts",
                    inputs["concatenated"], "--output", str(out), "--shard_lines", "1", "--num_generate", "1",
                    "--seed", "3", "--max_length", "60", "--address", cluster.address],
                   env={**env, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}, stdout=subprocess.DEVNULL,
                   stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and driver.poll() is None and not (out.exists() and _parts(out)):
            time.sleep(0.02)
        assert driver.poll() is None and _parts(out), driver.stderr.read()[-2000:]
        driver.send_signal(signal.SIGTERM)
        err = driver.communicate(timeout=120)[1].decode("utf-8", "replace")
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 143, err[-3000:]
    assert err == "", err[-3000:]
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]


def test_a_sigterm_during_ray_shutdown_waits_for_it(monkeypatch):
    """A SIGTERM that arrives while Ray shuts down does not cut the shutdown short (a half-done
    shutdown once ended the driver with status 1 and nothing said); it is taken up after it."""
    import ray

    from cli import bulk as cli_bulk
    from cli.errors import Terminated, _on_sigterm

    finished = []

    def shutdown():
        os.kill(os.getpid(), signal.SIGTERM)  # delivered to the main thread's handler right here
        time.sleep(0)  # let the interpreter run pending handlers before the shutdown "finishes"
        finished.append(True)

    monkeypatch.setattr(ray, "shutdown", shutdown)
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        with pytest.raises(Terminated):
            cli_bulk._shutdown_ray()
        assert finished == [True]
        assert signal.getsignal(signal.SIGTERM) is _on_sigterm  # the tool's handler is back
    finally:
        signal.signal(signal.SIGTERM, previous)
