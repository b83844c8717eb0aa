"""Hostile input, full disks, closed streams and signals: every failure is one
line and status 2, nothing a user had is clobbered, nothing computed is lost."""
import json
import os
import signal
import stat
import subprocess
import sys
import threading

import numpy as np
import pytest

from conftest import ROOT, spawn

GENERATE = str(ROOT / "gpt2-generate.py")
TRANSFORM = str(ROOT / "gpt2-transform.py")
SCORE = str(ROOT / "gpt2-score.py")
FINETUNE = str(ROOT / "gpt2-finetune.py")
ENCODE = str(ROOT / "gpt2-encode.py")


def _run(args, env, stdin=None, timeout=180, **kwargs):
    return subprocess.run([sys.executable, *map(str, args)], input=stdin, capture_output=True, env=env,
                          cwd=ROOT, timeout=timeout, **kwargs)


def _one_line_error(p, tool, message):
    err = p.stderr.decode("utf-8", "replace")
    assert p.returncode == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"{tool}: error: ") and message in err, err


def _vector_args(tiny_model_dir, *extra):
    return [TRANSFORM, "--model", tiny_model_dir, "--gpu", "-1", "--context", "今日は", *extra]


# -- A: output files: devices, FIFOs and symlinks are never replaced ------------------------------


def test_output_to_a_character_device_writes_it(tiny_model_dir, env):
    p = _run(_vector_args(tiny_model_dir, "--output_file", "/dev/null"), env)
    assert p.returncode == 0, p.stderr
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


def test_output_to_a_full_device_is_one_line_and_the_device_stays(tiny_model_dir, env):
    p = _run(_vector_args(tiny_model_dir, "--output_file", "/dev/full"), env)
    _one_line_error(p, "gpt2-transform.py", "cannot write /dev/full: No space left on device")
    assert stat.S_ISCHR(os.stat("/dev/full").st_mode)


def test_output_to_a_fifo_writes_into_it(tiny_model_dir, env, tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(open(fifo, "rb").read()))
    reader.start()
    p = _run(_vector_args(tiny_model_dir, "--output_file", fifo), env)
    reader.join(timeout=60)
    assert p.returncode == 0, p.stderr
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert json.loads(got[0].decode())  # the vector arrived through the FIFO


def test_output_through_a_symlink_replaces_the_target(tiny_model_dir, env, tmp_path):
    (tmp_path / "real").mkdir()
    target = tmp_path / "real" / "vectors.json"
    target.write_text("old\n")
    os.chmod(target, 0o640)
    link = tmp_path / "link.json"
    link.symlink_to(target)
    p = _run(_vector_args(tiny_model_dir, "--output_file", link), env)
    assert p.returncode == 0, p.stderr
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert json.loads(target.read_text())
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o640  # the file keeps its permissions
    assert sorted(os.listdir(tmp_path / "real")) == ["vectors.json"]  # no temporary file left


# -- B, C: stdout that cannot be written ---------------------------------------------------------------


def test_stdout_on_a_full_device(tiny_model_dir, env):
    with open("/dev/full", "wb") as full:
        p = subprocess.run([sys.executable, *_vector_args(tiny_model_dir)], stdout=full, stderr=subprocess.PIPE,
                           env=env, cwd=ROOT, timeout=180)
    p.stdout = b""
    _one_line_error(p, "gpt2-transform.py", "cannot write standard output: No space left on device")


def test_encoder_stdout_on_a_full_device(env):
    with open("/dev/full", "wb") as full:
        p = subprocess.run([sys.executable, "-m", "encoder", "encode"], input="今日は\n".encode() * 100000,
                           stdout=full, stderr=subprocess.PIPE, env=env, cwd=ROOT, timeout=180)
    _one_line_error(p, "python -m encoder", "cannot write standard output: No space left on device")


def test_closed_stdout(tiny_model_dir, env):
    p = _run(_vector_args(tiny_model_dir), env, preexec_fn=lambda: os.close(1))
    _one_line_error(p, "gpt2-transform.py", "cannot write standard output")


def test_closed_stderr_still_exits_2(env):
    p = _run([GENERATE, "--model", "/nonexistent"], env, preexec_fn=lambda: os.close(2))
    assert p.returncode == 2


# -- D, E, F: values that used to escape as tracebacks -----------------------------------------------


@pytest.mark.parametrize("tool", [GENERATE, TRANSFORM])
def test_lone_surrogate_in_the_context(tool, tiny_model_dir, env):
    # argv bytes that are not UTF-8 reach Python as lone surrogates
    p = subprocess.run([sys.executable, tool, "--model", str(tiny_model_dir), "--gpu", "-1", "--context",
                        b"abc\xffdef"], capture_output=True, env=env, cwd=ROOT, timeout=180)
    _one_line_error(p, os.path.basename(tool), "lone surrogate")


@pytest.mark.parametrize("args,message", [
    (["--seed", "-1"], "argument --seed: must not be negative"),
    (["--seed", "18446744073709551616"], "must be below 2**64"),
    (["--temperature", "1e-46"], "--temperature 1e-46 is 0 in float32"),
    (["--temperature", "1e308"], "--temperature must be positive, or 0 for greedy decoding, got 1e+308"),
    (["--temperature", "nan"], "must be a finite number"),
    (["--top_k", "abc"], "argument --top_k: invalid int value: 'abc'"),
    (["--top_k", "-1"], "--top_k must not be negative"),
])
def test_bad_sampling_values(args, message, tiny_model_dir, env):
    p = _run([GENERATE, "--model", tiny_model_dir, "--gpu", "-1", *args], env)
    _one_line_error(p, "gpt2-generate.py", message)


def test_tiny_temperature_is_greedy_without_warnings(tiny_model_dir, env):
    base = [GENERATE, "--model", tiny_model_dir, "--gpu", "-1", "--num_generate", "1", "--max_length", "30",
            "--seed", "1", "--context", "今日は"]
    tiny_t = _run(base + ["--temperature", "1e-45"], env)
    greedy = _run(base + ["--temperature", "0"], env)
    assert tiny_t.returncode == 0 and tiny_t.stderr == b"", tiny_t.stderr
    assert tiny_t.stdout == greedy.stdout and tiny_t.stdout.strip()


# -- G, P: the encoder ---------------------------------------------------------------------------------


def test_deeply_nested_json_is_not_an_array_of_ids(env):
    deep = b"[" * 100000 + b"]" * 100000
    p = _run(["-m", "encoder", "decode"], env, stdin=b"[1,2]\n" + deep + b"\n")
    _one_line_error(p, "python -m encoder", "line 2: not a JSON array of token ids")
    assert p.stdout.count(b"\n") == 1


def test_emoji_table_with_values_that_are_not_strings(tmp_path, vocab_dir):
    import shutil

    import encoder

    shutil.copy(vocab_dir / "ja-bpe.txt", tmp_path)
    data = json.loads((vocab_dir / "emoji.json").read_text(encoding="utf-8"))
    key = next(iter(data["emoji_inv"]))
    data["emoji_inv"][key] = 12
    (tmp_path / "emoji.json").write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(encoder.VocabError, match="malformed"):
        encoder.load(tmp_path)


# -- H: a model directory that cannot be read ------------------------------------------------------------


def test_unreadable_model_directory(tmp_path, monkeypatch):
    import pathlib

    import model

    (tmp_path / "m").mkdir()

    def denied(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(pathlib.Path, "is_file", denied)
    with pytest.raises(model.ModelError, match="cannot read model directory .*m: Permission denied"):
        model.find_checkpoint(tmp_path / "m")


# -- J, K, M: fine-tuning input that cannot work -----------------------------------------------------------


@pytest.fixture
def npz(tmp_path, enc):
    from tasks import dataset as D

    path = tmp_path / "data.npz"
    D.save_npz(path, [np.asarray(enc.encode("吾輩は猫である。名前はまだ無い。") * 4 + [enc.eos_id], np.int32)])
    return path


def test_dataset_with_negative_ids(tmp_path, tiny_model_dir, env):
    from tasks import dataset as D

    bad = tmp_path / "bad.npz"
    D.save_npz(bad, [np.array([5, 6, -3, 7], np.int32)])
    p = _run([FINETUNE, "--model", tiny_model_dir, "--dataset", bad, "--max_steps", "1",
              "--checkpoint_dir", tmp_path / "ck"], env)
    _one_line_error(p, "gpt2-finetune.py", "the dataset has token id -3, outside the model's vocabulary")


def test_checkpoint_dir_that_is_a_file(tmp_path, tiny_model_dir, npz, env):
    afile = tmp_path / "afile"
    afile.write_text("x")
    p = _run([FINETUNE, "--model", tiny_model_dir, "--dataset", npz, "--checkpoint_dir", afile], env)
    _one_line_error(p, "gpt2-finetune.py", f"cannot write checkpoints into {afile}: it is not a directory")
    assert "training chunks" not in p.stderr.decode()  # refused before anything was loaded


@pytest.mark.parametrize("args,tool,message", [
    ([FINETUNE, "--dataset", "{npz}", "--batch_size", "100000", "--checkpoint_dir", "{tmp}"], "gpt2-finetune.py",
     "--batch_size 100000 needs about"),
    ([SCORE, "--batch_tokens", "1000000000", "-"], "gpt2-score.py", "--batch_tokens 1000000000 needs about"),
    ([GENERATE, "--num_generate", "100000", "--batch_size", "100000"], "gpt2-generate.py",
     "--batch_size 100000 needs about"),
])
def test_work_that_cannot_fit_in_memory_is_refused(args, tool, message, tiny_model_dir, npz, tmp_path, env):
    args = [a.format(npz=npz, tmp=tmp_path) if isinstance(a, str) else a for a in args]
    long_lines = ("吾輩は猫である。名前はまだ無い。" * 60 + "\n").encode() * 300  # 300 texts of ~1,000 tokens
    p = _run([args[0], "--model", tiny_model_dir, "--gpu", "-1", *args[1:]], env, stdin=long_lines)
    _one_line_error(p, tool, message)
    assert "use a smaller" in p.stderr.decode()


# -- N, O: signals ------------------------------------------------------------------------------------------


def test_sigterm_removes_the_temporary_output_and_keeps_the_old_file(tiny_model_dir, tmp_path, env):
    out = tmp_path / "out.txt"
    out.write_text("precious\n")
    p = spawn([sys.executable, GENERATE, "--model", str(tiny_model_dir), "--gpu", "-1",
               "--num_generate", "1", "--max_length", "100000", "--min_length", "500", "--seed", "1",
               "--output_file", str(out)], stderr=subprocess.PIPE, env=env, cwd=ROOT)
    # wait until the temporary file exists: generation is under way
    import time

    deadline = time.monotonic() + 120
    while not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")] and time.monotonic() < deadline:
        assert p.poll() is None, p.stderr.read()
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    err = p.communicate(timeout=60)[1]
    assert p.returncode == 143, err
    assert err == b""
    assert sorted(os.listdir(tmp_path)) == ["out.txt"] and out.read_text() == "precious\n"


def test_ctrl_c_during_parallel_encoding_is_quiet(tmp_path, env):
    import time

    src = tmp_path / "src"
    src.mkdir()
    for i in range(3000):
        (src / f"{i:04d}.txt").write_text("吾輩は猫である。名前はまだ無い。\n" * 400, encoding="utf-8")
    import select

    for _ in range(2):
        p = spawn([sys.executable, ENCODE, "--src_dir", str(src), "--dst_file", str(tmp_path / "o.npz"),
                   "--num_process", "2", "--progress"], stderr=subprocess.PIPE, env=env, cwd=ROOT,
                  start_new_session=True)
        seen = b""
        deadline = time.monotonic() + 120
        while b"/3000" not in seen:  # the progress bar shows that encoding is under way
            assert time.monotonic() < deadline and p.poll() is None, seen[-500:]
            if select.select([p.stderr], [], [], 1.0)[0]:
                seen += os.read(p.stderr.fileno(), 65536)
        os.killpg(p.pid, signal.SIGINT)  # as Ctrl-C does: the whole process group
        err = seen + p.communicate(timeout=60)[1]
        assert p.returncode == 130, err[-2000:]
        assert b"Traceback" not in err and b"KeyboardInterrupt" not in err, err[-2000:]
        assert not (tmp_path / "o.npz").exists()


# -- nothing read is lost; what a terminal shows -------------------------------------------------------------


def test_samples_of_lines_before_a_bad_line_are_printed(tiny_model_dir, env):
    stdin = "今日は\n明日は\n".encode() + b"\xff\xfe\n" + "もう一行\n".encode()
    p = _run([GENERATE, "--model", tiny_model_dir, "--gpu", "-1", "--contexts", "-", "--num_generate", "2",
              "--max_length", "20", "--seed", "1", "--format", "jsonl"], env, stdin=stdin)
    _one_line_error(p, "gpt2-generate.py", "standard input, line 3: invalid UTF-8")
    rows = [json.loads(line) for line in p.stdout.decode().splitlines()]
    assert [(r["context"], r["index"]) for r in rows] == [("今日は", 0), ("今日は", 1), ("明日は", 0), ("明日は", 1)]


def test_verbose_reports_timings_and_memory(tiny_model_dir, env):
    p = _run([GENERATE, "--model", tiny_model_dir, "--gpu", "-1", "--num_generate", "2", "--max_length", "20",
              "--seed", "1", "--verbose"], env)
    err = p.stderr.decode()
    assert p.returncode == 0, err
    for part in ("loaded in", "thread(s)", "engine: onnx", "prefill:", "decoding:", "tokens/s", "peak memory:"):
        assert part in err, (part, err)


def _on_a_terminal(args, env, timeout=240):
    """Run with stdout and stderr on one pseudo-terminal (as a person sees it); all it printed."""
    import pty
    import select

    main, sub = pty.openpty()
    import fcntl
    import struct
    import termios

    fcntl.ioctl(sub, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a terminal 100 columns wide
    p = subprocess.Popen([sys.executable, *map(str, args)], stdin=subprocess.DEVNULL, stdout=sub, stderr=sub,
                         env=env, cwd=ROOT)
    os.close(sub)
    out = b""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([main], [], [], 1.0)
        if ready:
            try:
                chunk = os.read(main, 65536)
            except OSError:  # the terminal closed: the process ended
                break
            if not chunk:
                break
            out += chunk
        elif p.poll() is not None:
            break
    p.wait(timeout=60)
    os.close(main)
    return p.returncode, out.decode("utf-8", "replace")


def test_generation_shows_tokens_per_second_on_a_terminal(tiny_model_dir, env):
    code, out = _on_a_terminal([GENERATE, "--model", tiny_model_dir, "--gpu", "-1", "--num_generate", "3",
                                "--max_length", "200", "--seed", "1"], env)
    assert code == 0, out
    assert "tok/s" in out and "samples=" in out
    import re

    glued = re.search(r"tok/s[^\]\r\n]*\][^\r\n\x1b]", out)  # text written after the bar, on its line
    assert glued is None, repr(out[max(0, glued.start() - 60):glued.end() + 20])


def test_finetune_losses_never_share_a_line_with_the_bar(tiny_model_dir, npz, tmp_path, env):
    import re

    code, out = _on_a_terminal([FINETUNE, "--model", tiny_model_dir, "--dataset", npz, "--chunk", "16",
                                "--max_steps", "6", "--eval_every", "2", "--save_every", "3", "--val_fraction",
                                "0.3", "--seed", "1", "--checkpoint_dir", tmp_path / "ck"], env)
    assert code == 0, out
    starts = [m.start() for m in re.finditer(r"step \d+: (val_)?loss", out)]
    assert len(starts) >= 3, out
    for i in starts:  # each report begins a line of its own
        assert i == 0 or out[i - 1] in "\r\n", repr(out[max(0, i - 40):i + 20])


def test_a_signalled_child_gets_the_default_disposition_in_a_backgrounded_suite():
    """The suite may run from ``nohup ... &`` (SIGINT ignored, and inherited across exec): the children
    tests signal are started with ``conftest.spawn``, which gives them SIGINT and SIGTERM at their
    defaults, where a plain Popen would pass the ignored SIGINT on."""
    probe = [sys.executable, "-c", "import signal; print(signal.getsignal(signal.SIGINT) is signal.default_int_handler,"
                                   " signal.getsignal(signal.SIGTERM) == signal.SIG_DFL)"]
    old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
    old_term = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        plain = subprocess.run(probe, capture_output=True, text=True, timeout=60)
        p = spawn(probe, stdout=subprocess.PIPE, text=True)
        out = p.communicate(timeout=60)[0]
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN  # this process is left as it was
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGTERM, old_term)
    assert plain.stdout.split() == ["False", "False"]
    assert out.split() == ["True", "True"]


# -- D14: --threads is bounded; SIGTERM is prompt whatever the threads do -------------------------------------


def test_threads_beyond_the_cpus_are_lowered_with_one_note(tiny_model_dir, env):
    import model
    from model.threads import fixed_threads, thread_cap

    cap = thread_cap()
    try:
        assert model.configure_threads(10 ** 6, tensorflow=False) == cap and fixed_threads() == cap
    finally:
        model.configure_threads(None, tensorflow=False)
    p = _run([GENERATE, "--model", tiny_model_dir, "--gpu", "-1", "--threads", "10000", "--num_generate", "1",
              "--max_length", "5", "--seed", "1"], env)
    err = p.stderr.decode()
    assert p.returncode == 0, err
    assert err.splitlines() == [f"gpt2-generate.py: note: --threads 10000 is more than the {cap} CPU(s) this "
                                f"process may run on; using {cap}"]
    assert p.stdout.strip()


_STUCK = r"""
import ctypes, os, signal, sys, threading
sys.path.insert(0, sys.argv[1])
from cli.errors import run
from util.files import atomic_file

def main(argv):
    r, w = os.pipe()
    libc = ctypes.CDLL(None, use_errno=True)

    def native_wait():  # a native call that never returns, signals or not (the read restarts)
        libc.read(r, ctypes.create_string_buffer(1), 1)

    for _ in range(int(sys.argv[3])):
        threading.Thread(target=native_wait, daemon=True).start()
    signal.siginterrupt(signal.SIGTERM, False)
    with atomic_file(sys.argv[2], "w") as f:
        f.write("partial")
        print("ready", flush=True)
        native_wait()

run(main, prog="stuck")
"""


def test_sigterm_ends_a_tool_whose_threads_are_all_in_native_code(tmp_path):
    """The main thread and 300 others inside native calls that a signal does not interrupt (as a long
    TensorFlow / OpenBLAS / ONNX Runtime call is): SIGTERM still ends the tool within the grace period,
    status 143, its temporary output file removed, nothing on stderr."""
    import time

    from cli.errors import TERM_GRACE

    out = tmp_path / "out.txt"
    p = spawn([sys.executable, "-c", _STUCK, str(ROOT), str(out), "300"], stdout=subprocess.PIPE,
              stderr=subprocess.PIPE)
    try:
        assert p.stdout.readline() == b"ready\n", p.stderr.read()
        assert [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
        deadline = time.monotonic() + 60
        while not open(f"/proc/{p.pid}/wchan").read().endswith("pipe_read"):  # the main thread is in read(2)
            assert time.monotonic() < deadline and p.poll() is None
            time.sleep(0.01)
        t0 = time.monotonic()
        p.send_signal(signal.SIGTERM)
        err = p.communicate(timeout=60)[1]
        took = time.monotonic() - t0
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 143, err
    assert err == b""
    assert took >= TERM_GRACE * 0.9  # the main thread had its chance first
    assert os.listdir(tmp_path) == []


def test_a_huge_batch_size_is_not_refused_for_memory_a_few_samples_never_need(tiny_model_dir, env):
    """--batch_size is an upper bound: with one --context and 3 samples, 3 rows are decoded together,
    and memory is checked for those (10**7 rows would need terabytes)."""
    p = _run([GENERATE, "--model", tiny_model_dir, "--gpu", "-1", "--batch_size", "10000000", "--num_generate", "3",
              "--max_length", "5", "--seed", "1", "--format", "jsonl"], env)
    assert p.returncode == 0, p.stderr
    assert [json.loads(line)["index"] for line in p.stdout.decode().splitlines()] == [0, 1, 2]
    # a run that would really decode that many rows is still refused
    p = _run([GENERATE, "--model", tiny_model_dir, "--gpu", "-1", "--batch_size", "10000000",
              "--num_generate", "10000000", "--max_length", "5"], env)
    _one_line_error(p, "gpt2-generate.py", "--batch_size 10000000 needs about")


@pytest.mark.parametrize("mirror", ["not-a-url", "/no/such/dir", "http://127.0.0.1:1"])
def test_a_download_from_an_unusable_mirror_is_one_line(mirror, tmp_path, env):
    """Nothing is announced before the address is known to be usable: only the error line."""
    env = {**env, "GPT2JA_HOME": str(tmp_path), "GPT2JA_MODEL_URLS": mirror}
    env.pop("GPT2JA_OFFLINE", None)
    p = _run(["-m", "model", "download", "gpt2ja-small"], env, timeout=120)
    _one_line_error(p, "python -m model", f"cannot download model gpt2ja-small: {mirror.rstrip('/')}/gpt2ja-small")


_FORKS = r"""
import os, signal, sys, time
sys.path.insert(0, sys.argv[1])
from cli.errors import TERM_GRACE, run

def main(argv):
    r, w = os.pipe()
    pid = os.fork()  # as a multiprocessing worker is made
    if pid == 0:
        os.write(w, b"x")
        time.sleep(60)
        os._exit(0)
    os.read(r, 1)  # the child runs
    os.kill(pid, signal.SIGTERM)
    os.waitpid(pid, 0)
    time.sleep(TERM_GRACE + 1)  # the watchdog's whole grace period: it must not fire
    print("still here")

run(main, prog="forks")
"""


def test_a_sigterm_to_a_forked_child_does_not_end_the_parent():
    """The watchdog listens on Python's wakeup fd: a forked child (a pool worker) must not write its own
    signals there, or the parent would take the child's SIGTERM for its own and exit."""
    p = subprocess.run([sys.executable, "-c", _FORKS, str(ROOT)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout == "still here\n", (p.returncode, p.stderr)
