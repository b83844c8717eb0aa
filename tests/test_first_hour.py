"""The first hour of a new user: what the tools say while they wait, and where they used to be silent.

--gpu naming a GPU TensorFlow cannot use, the download size said once a server answers, the
extraction and check announced, gpt2ja-large's suspended publication, ``python -m model list``
on an empty cache, ``python -m model quantize`` without TensorFlow once the file is cached,
the project's LICENSE.
"""
import shutil
import socket
import subprocess
import sys
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import ROOT, user_env

import model
from model import device


def _closed_address():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}/"


@pytest.fixture
def cache_env(tmp_path, vocab_dir):
    env = {k: v for k, v in user_env().items() if not k.lower().endswith("_proxy")}
    env.update(GPT2JA_HOME=str(tmp_path / "cache"), GPT2JA_VOCAB=str(vocab_dir),
               GPT2JA_MODEL_URLS=_closed_address())
    env.pop("GPT2JA_OFFLINE", None)
    return env


def _model_cli(args, env, timeout=180):
    return subprocess.run([sys.executable, "-m", "model", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=timeout)


# ---------------------------------------------------------------------------- --gpu

def test_gpu_that_tensorflow_cannot_use_is_one_warning_line(monkeypatch, capsys):
    tf = model.import_tf()
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: [])
    # an NVIDIA driver, but a TensorFlow without CUDA (plain `tensorflow` on Linux)
    monkeypatch.setattr(device, "nvidia_present", lambda: True)
    assert model.select_device("0") == "/CPU:0"
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "warning: GPU 0" in err and "tensorflow[and-cuda]" in err
    assert "running on the CPU" in err
    assert model.select_device("-1") == "/CPU:0" and capsys.readouterr().err == ""
    # no GPU at all and the default --gpu 0: nothing to say (unless --verbose)
    monkeypatch.setattr(device, "nvidia_present", lambda: False)
    assert model.select_device("0") == "/CPU:0" and capsys.readouterr().err == ""
    # a GPU number beyond the ones TensorFlow sees, named on purpose
    assert model.select_device("2") == "/CPU:0"
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "warning: GPU 2" in err


def test_gpu_beyond_the_visible_ones_names_them(monkeypatch, capsys):
    tf = model.import_tf()
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: ["GPU:0"])
    monkeypatch.setattr(tf.config, "set_visible_devices", lambda devices, kind=None: None)
    assert model.select_device("1") == "/CPU:0"
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "TensorFlow finds 1 GPU(s), numbered 0 to 0" in err


# ---------------------------------------------------------------------------- downloads

@pytest.fixture
def mirror(tmp_path):
    """A real HTTP server whose gpt2ja-small.tar.bz2 is not an archive: it answers, the install fails."""
    root = tmp_path / "mirror"
    root.mkdir()
    (root / "gpt2ja-small.tar.bz2").write_bytes(b"not a bzip2 archive\n" * 1000)

    class Quiet(SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(root), **kwargs)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()
    httpd.server_close()


def test_the_size_is_said_before_a_download_starts(cache_env, mirror):
    r = _model_cli(["download", "gpt2ja-small"], {**cache_env, "GPT2JA_MODEL_URLS": mirror})
    assert r.returncode == 2
    lines = r.stderr.splitlines()
    size = next(i for i, line in enumerate(lines) if "about 0.4 GB" in line)
    start = next(i for i, line in enumerate(lines) if "downloading model gpt2ja-small from" in line)
    assert size < start  # said once the server answered, before its first byte is written
    assert lines.count(lines[size]) == 1
    assert "suspended" not in r.stderr
    assert lines[-1].startswith("python -m model: error:") and "gpt2ja-small" in lines[-1]


def test_nothing_is_announced_when_no_server_answers(cache_env):
    r = _model_cli(["download", "gpt2ja-small"], cache_env)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr  # no size promised for a download that never starts
    assert lines[0].startswith("python -m model: error: cannot download model gpt2ja-small")


def test_a_failed_download_of_large_says_its_publication_is_suspended(cache_env):
    r = _model_cli(["download", "gpt2ja-large"], cache_env)
    assert r.returncode == 2 and "about 2.9 GB" not in r.stderr  # no server answered
    last = r.stderr.splitlines()[-1]
    assert last.startswith("python -m model: error: cannot download model gpt2ja-large")
    assert "publication of gpt2ja-large is suspended" in last and "on request" in last


def test_extraction_and_check_are_announced(tmp_path, tiny_model_dir, monkeypatch, capsys):
    import tarfile

    import hub.download as D

    monkeypatch.setenv("GPT2JA_HOME", str(tmp_path / "cache"))
    archive = tmp_path / "gpt2ja-small.tar.bz2"
    with tarfile.open(archive, "w:bz2") as tar:
        tar.add(tiny_model_dir, arcname="gpt2ja-small")
    work = D._work_dir()
    shutil.copy(archive, work / "gpt2ja-small.tar.bz2")  # as if downloaded
    path = D.download_model("gpt2ja-small", progress=False)
    assert (path / "hparams.json").is_file()
    err = capsys.readouterr().err
    extracting = err.index("extracting gpt2ja-small (")
    assert "about 2 min on one core" in err
    assert extracting < err.index("checking gpt2ja-small") < err.index("is ready in")


def test_list_says_when_the_cache_is_empty(cache_env):
    r = _model_cli(["list"], cache_env)
    assert r.returncode == 0 and r.stdout == ""
    assert r.stderr.startswith("python -m model: no models in the cache (") and r.stderr.count("\n") == 1


# ---------------------------------------------------------------------------- quantize

def test_quantize_with_the_file_cached_does_not_import_tensorflow(tmp_path, tiny_model_dir, cache_env):
    copy = tmp_path / "tiny"
    shutil.copytree(tiny_model_dir, copy)
    first = _model_cli(["quantize", str(copy), "q8"], cache_env)
    assert first.returncode == 0, first.stderr
    code = ("import runpy, sys; sys.argv = ['python -m model', 'quantize', %r, 'q8']\n"
            "try:\n    runpy.run_module('model', run_name='__main__')\nexcept SystemExit as e:\n"
            "    assert e.code in (0, None), e.code\n"
            "print('TF' if 'tensorflow' in sys.modules else 'NO TF', file=sys.stderr)" % str(copy))
    again = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cache_env, cwd=ROOT,
                           timeout=120)
    assert again.stdout == first.stdout and again.stdout.strip().endswith(".npz")
    assert again.stderr.strip().endswith("NO TF"), again.stderr


# ---------------------------------------------------------------------------- licence

def test_the_project_has_a_licence_beside_the_vocabularys():
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert text.startswith("MIT License") and "gpt2-japanese" in text
    assert (ROOT / "encoder" / "LICENSE").is_file()


# ---------------------------------------------------------------------------- extraction with lbzip2

def test_lbzip2_extracts_the_same_files_and_refuses_a_damaged_archive(tmp_path, tiny_model_dir, monkeypatch):
    """hub extracts .bz2 archives with lbzip2 when it is installed (.ci/run installs it): the same
    files as Python's bz2, and a damaged archive is an error with either."""
    import tarfile

    import hub.download as D

    assert D.bzip2_command() is not None, "lbzip2 is not installed (apt-get install lbzip2)"
    archive = tmp_path / "m.tar.bz2"
    with tarfile.open(archive, "w:bz2") as tar:
        tar.add(tiny_model_dir, arcname="m")
    trees = []
    for setting in ("1", "0"):
        monkeypatch.setenv("GPT2JA_LBZIP2", setting)
        assert (D.bzip2_command() is None) == (setting == "0")
        dest = tmp_path / f"out{setting}"
        D.extract(archive, dest, progress=False)
        trees.append({p.relative_to(dest): p.read_bytes() for p in dest.rglob("*") if p.is_file()})
    assert trees[0] == trees[1] and len(trees[0]) == 4
    data = bytearray(archive.read_bytes())
    data[len(data) // 2:len(data) // 2 + 64] = bytes(64)
    damaged = tmp_path / "bad.tar.bz2"
    damaged.write_bytes(bytes(data))
    for setting in ("1", "0"):
        monkeypatch.setenv("GPT2JA_LBZIP2", setting)
        with pytest.raises((tarfile.TarError, OSError, EOFError)):
            D.extract(damaged, tmp_path / f"bad{setting}", progress=False)


# ---------------------------------------------------------------------------- the README's Python example

def test_the_python_generation_example_runs(tiny_model_dir):
    """README's example, with the tiny checkpoint's directory in place of "gpt2ja-small"."""
    import encoder
    import hub
    from tasks.generate import GenerateOptions, Generator

    enc = encoder.load()
    m = hub.load(str(tiny_model_dir))
    gen = Generator(m, enc)
    texts = gen.generate("今日は良い天気です。", num=2, options=GenerateOptions(top_k=40, max_length=30, seed=1))
    assert len(texts) == 2 and all(0 < len(t) <= 30 for t in texts)
    again = gen.generate("今日は良い天気です。", num=2, options=GenerateOptions(top_k=40, max_length=30, seed=1))
    assert again == texts
