"""model.hub and `python -m model download`: released models and the vocabulary
fetched from a local HTTP server (never the internet), resumed, checked and
safely extracted; offline mode; the tools resolving released names."""
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import model
import hub
from hub import download as hub_download

from conftest import ROOT, user_env

NAME = "gpt2ja-small"
ARCHIVE = f"/{NAME}.tar.bz2"
PROXY_VARS = ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY")


# -- the local server ---------------------------------------------------------------


class Server:
    """Serves ``files`` (path -> bytes) on 127.0.0.1, with HTTP Range, If-Range
    and ETag.  ``drop_once[path] = n``: the next response for path sends its
    headers and only n bytes, then closes the connection; ``drop_always``: every
    response does; ``then_status[path] = code``: after a dropped response, every
    request of path gets that status.  ``delay``: seconds before answering.
    ``requests`` records [path, Range header, body bytes sent]."""

    def __init__(self):
        self.files = {}
        self.drop_once = {}
        self.drop_always = {}
        self.then_status = {}
        self.dropped = set()
        self.delay = 0.0
        self.ignore_range = False
        self.requests = []
        self.closing = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                server._handle(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def _handle(self, h):
        path = h.path
        rng = h.headers.get("Range")
        record = [path, rng, 0]
        self.requests.append(record)
        if self.delay and self.closing.wait(self.delay):
            return
        if path in self.dropped and path in self.then_status:
            return self._status(h, self.then_status[path])
        data = self.files.get(path)
        if data is None:
            return self._status(h, 404)
        etag = '"%s"' % hashlib.sha1(data).hexdigest()
        start = 0
        if rng and not self.ignore_range and h.headers.get("If-Range", etag) == etag:
            start = int(rng.split("=")[1].split("-")[0])
            if start >= len(data):
                h.send_response(416)
                h.send_header("Content-Range", f"bytes */{len(data)}")
                h.send_header("Content-Length", "0")
                h.end_headers()
                return
            h.send_response(206)
            h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            h.send_response(200)
        if not self.ignore_range:
            h.send_header("Accept-Ranges", "bytes")
        h.send_header("Content-Length", str(len(data) - start))
        h.send_header("ETag", etag)
        h.end_headers()
        body = data[start:]
        cut = self.drop_once.pop(path, self.drop_always.get(path))
        if cut is not None:
            body = body[:cut]
            h.close_connection = True
            self.dropped.add(path)
        h.wfile.write(body)
        h.wfile.flush()
        record[2] = len(body)

    def _status(self, h, code):
        body = f"status {code}\n".encode()
        h.send_response(code)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    def hits(self, path):
        return [r for r in self.requests if r[0] == path]

    def close(self):
        self.closing.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def _tar_bz2(entries):
    """A tar.bz2 archive of (TarInfo, bytes or None) entries."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:bz2", compresslevel=1) as tar:
        for info, data in entries:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _file(name, data):
    info = tarfile.TarInfo(name)
    info.mode = 0o644
    return info, data


def _model_entries(model_dir, top=NAME + "/"):
    entries = []
    if top:
        info = tarfile.TarInfo(top.rstrip("/"))
        info.type = tarfile.DIRTYPE
        info.mode = 0o755
        entries.append((info, None))
    for f in sorted(model_dir.iterdir()):
        entries.append(_file(top + f.name, f.read_bytes()))
    return entries


@pytest.fixture(scope="module")
def archive(tiny_model_dir):
    """The tiny checkpoint packed like a released model (top directory gpt2ja-small/)."""
    return _tar_bz2(_model_entries(tiny_model_dir))


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


@pytest.fixture
def home(tmp_path, server, monkeypatch):
    """GPT2JA_HOME empty, both addresses on the local server, no proxy, no waiting."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("GPT2JA_HOME", str(cache))
    monkeypatch.setenv("GPT2JA_MODEL_URLS", f"{server.url}/a/,{server.url}/b")
    for var in ("GPT2JA_OFFLINE", "GPT2JA_VOCAB", *PROXY_VARS):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(hub_download, "RETRY_DELAY", 0.0)
    monkeypatch.chdir(tmp_path)
    return cache


def _leftovers(cache):
    """What is in the cache's work directory besides lock files."""
    work = cache / ".downloads"
    return sorted(p.name for p in work.iterdir() if not p.name.endswith(".lock")) if work.is_dir() else []


def _same_files(a, b):
    names = sorted(f.name for f in a.iterdir())
    assert names == sorted(f.name for f in b.iterdir())
    for n in names:
        assert (a / n).read_bytes() == (b / n).read_bytes(), n


# -- models ---------------------------------------------------------------------------


def test_full_download(home, server, archive, tiny_model_dir):
    server.files["/a" + ARCHIVE] = archive
    d = hub.resolve_model(NAME)
    assert d == home / NAME
    _same_files(d, tiny_model_dir)
    assert _leftovers(home) == []
    assert [(r[1], r[2]) for r in server.hits("/a" + ARCHIVE)] == [(None, len(archive))]
    # the second time comes from the cache, without a request
    assert hub.resolve_model(NAME) == d
    assert len(server.requests) == 1
    assert model.load(str(d)).hparams.n_layer == 2


def test_resume_after_a_dropped_connection(home, server, archive, tiny_model_dir):
    server.files["/a" + ARCHIVE] = archive
    server.drop_once["/a" + ARCHIVE] = 100_000
    d = hub.download_model(NAME)
    _same_files(d, tiny_model_dir)
    hits = server.hits("/a" + ARCHIVE)
    assert [r[1] for r in hits] == [None, "bytes=100000-"]
    assert hits[1][2] == len(archive) - 100_000  # the rest only, not everything again
    assert _leftovers(home) == []


def test_resume_in_a_later_run(home, server, archive, tiny_model_dir):
    path = "/a" + ARCHIVE
    server.files[path] = archive
    server.drop_once[path] = 250_000
    server.then_status[path] = 503  # the first address goes down mid-file
    with pytest.raises(model.ModelError) as e:
        hub.download_model(NAME)
    msg = str(e.value)
    assert "\n" not in msg
    assert "HTTP 503" in msg and "HTTP 404" in msg and "resumes" in msg
    assert not (home / NAME).exists()
    part = home / ".downloads" / f"{NAME}.tar.bz2.part"
    assert part.stat().st_size == 250_000
    # the next run resumes where the last one stopped
    server.then_status.clear()
    server.requests.clear()
    d = hub.download_model(NAME)
    _same_files(d, tiny_model_dir)
    assert [(r[1], r[2]) for r in server.hits(path)] == [("bytes=250000-", len(archive) - 250_000)]
    assert _leftovers(home) == []


def test_restart_when_the_file_changed(home, server, archive, tiny_model_dir):
    """A partial download of another version of the file is not continued."""
    path = "/a" + ARCHIVE
    part = home / ".downloads" / f"{NAME}.tar.bz2.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(b"x" * 1000)
    (part.parent / (part.name + ".json")).write_text(json.dumps(
        {"url": f"{server.url}/a{ARCHIVE}", "total": len(archive), "validator": '"old"'}))
    server.files[path] = archive
    d = hub.download_model(NAME)
    _same_files(d, tiny_model_dir)
    assert server.hits(path)[0][1:] == ["bytes=1000-", len(archive)]  # If-Range failed: whole file


def test_404_falls_back_to_the_second_address(home, server, archive, tiny_model_dir):
    server.files["/b" + ARCHIVE] = archive
    d = hub.resolve_model(NAME)
    _same_files(d, tiny_model_dir)
    assert [r[0] for r in server.requests] == ["/a" + ARCHIVE, "/b" + ARCHIVE]


def test_every_address_failing_is_one_line(home, server, monkeypatch):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}/"
    monkeypatch.setenv("GPT2JA_MODEL_URLS", f"{server.url}/a/,{closed}")
    with pytest.raises(model.ModelError) as e:
        hub.resolve_model(NAME)
    msg = str(e.value)
    assert msg.startswith(f"cannot download model {NAME}: ")
    assert f"{server.url}/a/{NAME}.tar.bz2: HTTP 404" in msg
    assert f"{closed}{NAME}.tar.bz2: connection refused" in msg
    assert "\n" not in msg
    assert not (home / NAME).exists() and _leftovers(home) == []


def test_timeout(home, server, archive, monkeypatch):
    server.files["/a" + ARCHIVE] = archive
    server.delay = 2.0
    monkeypatch.setattr(hub_download, "TIMEOUT", 0.3)
    monkeypatch.setenv("GPT2JA_MODEL_URLS", f"{server.url}/a/")
    with pytest.raises(model.ModelError, match="timed out after 0.3 s"):
        hub.download_model(NAME)
    assert not (home / NAME).exists()


def test_server_that_cannot_resume(home, server, archive, monkeypatch):
    """A server that ignores Range and always stops early: each try starts over,
    so it is given up after MAX_STALLS tries without progress; nothing installed."""
    path = "/a" + ARCHIVE
    server.files[path] = archive
    server.ignore_range = True
    server.drop_always[path] = 20_000
    monkeypatch.setenv("GPT2JA_MODEL_URLS", f"{server.url}/a/")
    with pytest.raises(model.ModelError, match=r"connection closed after 19.5 KiB of [\d.]+ MiB") as e:
        hub.download_model(NAME)
    hits = server.hits(path)
    assert [r[1] for r in hits] == [None] + ["bytes=20000-"] * (hub_download.MAX_STALLS)
    assert not (home / NAME).exists()
    # the message says what will really happen: that server cannot resume
    assert "the server cannot resume a download: the next try starts over" in str(e.value)
    assert "resumes from there" not in str(e.value)


def test_truncated_body_without_progress(home, server, archive, monkeypatch):
    path = "/a" + ARCHIVE
    server.files[path] = archive
    server.drop_always[path] = 0
    monkeypatch.setenv("GPT2JA_MODEL_URLS", f"{server.url}/a/")
    with pytest.raises(model.ModelError, match=r"connection closed after 0 B of [\d.]+ MiB$"):
        hub.download_model(NAME)
    assert len(server.hits(path)) == hub_download.MAX_STALLS
    assert not (home / NAME).exists() and _leftovers(home) == [f"{NAME}.tar.bz2.part", f"{NAME}.tar.bz2.part.json"]


def test_corrupted_archive(home, server, archive):
    bad = bytearray(archive)
    for i in range(len(bad) // 2, len(bad) // 2 + 64):
        bad[i] ^= 0xFF
    server.files["/a" + ARCHIVE] = bytes(bad)
    with pytest.raises(model.ModelError, match="corrupted") as e:
        hub.resolve_model(NAME)
    assert "\n" not in str(e.value)
    assert not (home / NAME).exists()
    assert _leftovers(home) == []  # neither the archive nor a half-extracted directory


def test_archive_that_is_not_a_checkpoint(home, server, tiny_model_dir):
    """Valid tar.bz2, but the weights are cut short: the loader's check refuses it."""
    entries = _model_entries(tiny_model_dir)
    for i, (info, data) in enumerate(entries):
        if info.name.endswith(".data-00000-of-00001"):
            entries[i] = _file(info.name, data[: len(data) // 2])
    server.files["/a" + ARCHIVE] = _tar_bz2(entries)
    with pytest.raises(model.ModelError, match="not a loadable checkpoint"):
        hub.resolve_model(NAME)
    assert not (home / NAME).exists() and _leftovers(home) == []


def test_archive_without_a_top_directory(home, server, tiny_model_dir):
    server.files["/a" + ARCHIVE] = _tar_bz2(_model_entries(tiny_model_dir, top=""))
    _same_files(hub.resolve_model(NAME), tiny_model_dir)


def _unsafe(kind):
    if kind == "dotdot":
        return _file(f"{NAME}/../../escaped", b"x")
    if kind == "absolute":
        return _file("/tmp/gpt2ja-absolute-escape", b"x")
    info = tarfile.TarInfo(f"{NAME}/link")
    if kind == "symlink":
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
    elif kind == "hardlink":
        info.type, info.linkname = tarfile.LNKTYPE, "/etc/passwd"
    elif kind == "device":
        info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, 1, 3
    elif kind == "fifo":
        info.type = tarfile.FIFOTYPE
    return info, None


@pytest.mark.parametrize("kind,problem", [
    ("dotdot", "'..'"), ("absolute", "absolute path"), ("symlink", "a link"), ("hardlink", "a link"),
    ("device", "device"), ("fifo", "device or pipe"),
])
def test_unsafe_archive_is_refused(kind, problem, home, server, tiny_model_dir, tmp_path):
    entries = [e for e in _model_entries(tiny_model_dir) if not e[0].name.endswith(".data-00000-of-00001")]
    entries.insert(2, _unsafe(kind))  # (the weights would not be reached)
    server.files["/a" + ARCHIVE] = _tar_bz2(entries)
    with pytest.raises(model.ModelError, match="unsafe archive") as e:
        hub.resolve_model(NAME)
    assert problem in str(e.value)
    assert not (home / NAME).exists() and _leftovers(home) == []
    assert not (tmp_path / "escaped").exists() and not (home / "escaped").exists()
    assert not os.path.exists("/tmp/gpt2ja-absolute-escape")


def test_crash_during_installation_leaves_no_model_directory(home, server, archive, monkeypatch):
    server.files["/a" + ARCHIVE] = archive
    verify = hub_download.verify_checkpoint

    def crash(_):
        raise KeyboardInterrupt

    monkeypatch.setattr(hub_download, "verify_checkpoint", crash)
    with pytest.raises(KeyboardInterrupt):
        hub.resolve_model(NAME)
    assert not (home / NAME).exists()
    # the complete archive is kept (not trusted: the next run extracts and checks it again)
    assert _leftovers(home) == [f"{NAME}.tar.bz2"]
    monkeypatch.setattr(hub_download, "verify_checkpoint", verify)
    n = len(server.requests)
    assert hub.resolve_model(NAME) == home / NAME
    assert len(server.requests) == n and _leftovers(home) == []


def test_a_directory_of_that_name_wins(home, server, tiny_model_dir, tmp_path):
    shutil.copytree(tiny_model_dir, tmp_path / NAME)  # the current directory is tmp_path
    assert hub.resolve_model(NAME) == Path(NAME)
    assert server.requests == []


def test_unknown_name(home, server):
    with pytest.raises(model.ModelError, match="model directory gpt2ja-tiny does not exist; released models"):
        hub.resolve_model("gpt2ja-tiny")
    with pytest.raises(model.ModelError, match="unknown model"):
        hub.download_model("gpt2ja-tiny")
    assert server.requests == []


# -- offline ----------------------------------------------------------------------------


def test_offline_never_touches_the_network(home, server, monkeypatch):
    monkeypatch.setenv("GPT2JA_OFFLINE", "1")
    with pytest.raises(model.ModelError) as e:
        hub.resolve_model(NAME)
    msg = str(e.value)
    assert f"download {server.url}/a/{NAME}.tar.bz2 and unpack it there (tar xjf {NAME}.tar.bz2 -C {home})" in msg
    assert "GPT2JA_OFFLINE=1" in msg
    with pytest.raises(model.ModelError, match="GPT2JA_OFFLINE"):
        hub.download_model(NAME)
    assert server.requests == [] and not home.exists()


# -- the command-line tools -------------------------------------------------------------


def _env(home, server):
    env = {k: v for k, v in user_env().items() if k not in ("GPT2JA_VOCAB", "GPT2JA_OFFLINE", *PROXY_VARS)}
    env.update(GPT2JA_HOME=str(home), GPT2JA_MODEL_URLS=f"{server.url}/a/,{server.url}/b/")
    return env


def _run(args, env, cwd):
    return subprocess.run([sys.executable, *args], capture_output=True, env=env, cwd=cwd, timeout=180)


def test_generate_with_a_released_name_on_a_fresh_machine(home, server, archive, golden, tmp_path):
    """gpt2-generate.py --model gpt2ja-small: the model fetched (the vocabulary
    ships with the encoder), same output as the golden run on the fixture directory."""
    with open(golden / "tiny" / "generate.jsonl", encoding="utf-8") as f:
        record = json.loads(f.readline())
    server.files["/b" + ARCHIVE] = archive
    env = _env(home, server)
    p = _run([str(ROOT / "gpt2-generate.py"), "--model", NAME, "--gpu", "-1", *record["args"]], env, tmp_path)
    assert p.returncode == 0, p.stderr.decode()
    assert p.stdout.decode("utf-8") == record["stdout"]
    assert b"Traceback" not in p.stderr
    assert (home / NAME / "checkpoint").is_file()
    assert [r[0] for r in server.requests] == ["/a" + ARCHIVE, "/b" + ARCHIVE]  # 404, then the mirror
    # now offline, from the cache only
    n = len(server.requests)
    p = _run([str(ROOT / "gpt2-generate.py"), "--model", NAME, "--gpu", "-1", "--no-download", *record["args"]],
             env, tmp_path)
    assert p.returncode == 0, p.stderr.decode()
    assert p.stdout.decode("utf-8") == record["stdout"] and p.stderr == b""
    assert len(server.requests) == n


@pytest.mark.parametrize("how", ["--no-download", "GPT2JA_OFFLINE"])
def test_tools_offline_fail_in_one_line(how, home, server, tmp_path):
    env = _env(home, server)
    args = ["--gpu", "-1", "--context", "x"]
    if how == "GPT2JA_OFFLINE":
        env["GPT2JA_OFFLINE"] = "1"
    else:
        args.append(how)
    p = _run([str(ROOT / "gpt2-transform.py"), "--model", NAME, *args], env, tmp_path)
    err = p.stderr.decode()
    assert p.returncode == 2 and len(err.strip().splitlines()) == 1, err
    assert f"error: model {NAME} is not in the cache" in err and f"{server.url}/a/{NAME}.tar.bz2" in err
    assert server.requests == []


def test_download_failure_from_the_tool_is_one_line(home, server, tmp_path):
    env = _env(home, server)
    p = _run([str(ROOT / "gpt2-generate.py"), "--model", NAME, "--gpu", "-1"], env, tmp_path)
    err = p.stderr.decode().strip().splitlines()
    assert p.returncode == 2
    assert err[-1].startswith(f"gpt2-generate.py: error: cannot download model {NAME}: ")
    assert "HTTP 404" in err[-1] and "Traceback" not in p.stderr.decode()


def test_python_m_model_download(home, server, archive, tiny_model_dir, tmp_path):
    server.files["/a" + ARCHIVE] = archive
    env = _env(home, server)
    cmd = ["-m", "model", "download", NAME]
    p = subprocess.run([sys.executable, *cmd], capture_output=True, env=env, cwd=ROOT, timeout=180)
    assert p.returncode == 0, p.stderr.decode()
    assert p.stdout.decode().splitlines() == [str(home / NAME)]
    _same_files(home / NAME, tiny_model_dir)
    # again: found in the cache, nothing fetched
    n = len(server.requests)
    p = subprocess.run([sys.executable, *cmd], capture_output=True, env=env, cwd=ROOT, timeout=180)
    assert p.returncode == 0 and p.stdout.decode().splitlines() == [str(home / NAME)]
    assert len(server.requests) == n
    # errors are one line, exit status 2
    p = subprocess.run([sys.executable, "-m", "model", "download", "gpt2ja-huge"], capture_output=True, env=env,
                       cwd=ROOT, timeout=60)
    assert p.returncode == 2
    assert p.stderr.decode().strip() == ("python -m model: error: unknown model 'gpt2ja-huge'; released models: "
                                         "gpt2ja-small, gpt2ja-medium, gpt2ja-large")


def test_hub_does_not_import_tensorflow():
    code = "import hub, cli.common, sys; print('tensorflow' in sys.modules)"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, cwd=ROOT, timeout=60)
    assert p.stdout.strip() == b"False"


# -- addresses, cache location, list and remove ------------------------------------------------------


@pytest.mark.parametrize("bad", ["notaurl", "ftp://127.0.0.1:9/models/"])
def test_an_address_that_is_not_http_counts_as_a_failed_address(bad, home, server, archive, tiny_model_dir,
                                                                  monkeypatch):
    server.files["/b" + ARCHIVE] = archive
    monkeypatch.setenv("GPT2JA_MODEL_URLS", f"{bad},{server.url}/b/")
    _same_files(hub.download_model(NAME), tiny_model_dir)  # the next address worked
    monkeypatch.setenv("GPT2JA_MODEL_URLS", bad)
    hub.remove_model(NAME)
    with pytest.raises(model.ModelError, match=r"cannot download model gpt2ja-small: .*") as e:
        hub.download_model(NAME)
    assert "\n" not in str(e.value)


def test_xdg_cache_home(tmp_path, monkeypatch):
    monkeypatch.delenv("GPT2JA_HOME", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hub.cache_dir() == tmp_path / "xdg" / "gpt2-japanese"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/path")  # ignored, as the specification says
    assert hub.cache_dir() == Path(os.path.expanduser("~/.cache/gpt2-japanese"))
    monkeypatch.setenv("GPT2JA_HOME", str(tmp_path / "mine"))
    assert hub.cache_dir() == tmp_path / "mine"


def test_python_m_model_list_and_remove(home, server, archive, tmp_path):
    server.files["/a" + ARCHIVE] = archive
    env = _env(home, server)

    def m(*args):
        return subprocess.run([sys.executable, "-m", "model", *args], capture_output=True, env=env, cwd=ROOT,
                              timeout=180)

    assert m("list").stdout == b""
    assert m("download", NAME).returncode == 0
    p = m("list")
    name, size, path = p.stdout.decode().rstrip("\n").split("\t")
    assert (name, path) == (NAME, str(home / NAME)) and size.endswith("MiB")
    p = m("remove", NAME)
    assert p.returncode == 0 and p.stdout.decode() == f"removed {home / NAME}\n"
    assert not (home / NAME).exists() and m("list").stdout == b""
    p = m("remove", NAME)
    assert p.returncode == 2 and p.stderr.decode().startswith(f"python -m model: error: model {NAME} is not in the cache")


def test_ctrl_c_during_a_download_says_what_was_kept(home, server, archive, monkeypatch, capsys):
    path = "/a" + ARCHIVE
    server.files[path] = archive
    real_fetch = hub_download._fetch

    def interrupted(url, part, what, progress, announce):
        server.drop_once[path] = 100_000
        with pytest.raises(hub_download._Failed):
            real_fetch(url, part, what, progress, announce)  # 100 kB arrive, then the connection is cut
        raise KeyboardInterrupt

    monkeypatch.setattr(hub_download, "_fetch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        hub.download_model(NAME)
    err = capsys.readouterr().err
    assert "interrupted: 97.7 KiB kept in" in err and "the next try resumes from there" in err
