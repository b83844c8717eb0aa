"""Released models, fetched on first use and cached.

    import hub
    d = hub.resolve_model("gpt2ja-small")   # a directory: as given, or the cache
                                            # directory (downloaded when missing)

(The vocabulary ships with the ``encoder`` package and is never downloaded.)

Cache layout (``$GPT2JA_HOME``, default ``~/.cache/gpt2-japanese``)::

    gpt2ja-small/              verified model directories (an unpacked archive)
    .downloads/                partial downloads (*.part, resumed with HTTP Range),
                               locks and extraction directories

Nothing appears under a final name before it is complete and checked: an
archive is downloaded to ``.downloads/NAME.tar.bz2.part``, renamed when all of
it is there, extracted into a temporary directory inside ``.downloads``,
checked to be a loadable checkpoint (every variable read, so that the
checkpoint's own checksums are verified), and only then renamed to
``gpt2ja-NAME``.  A crash at any point leaves either nothing, or a partial
download that the next run resumes.

Addresses: ``$GPT2JA_MODEL_URLS`` (comma-separated base addresses, tried in
order; ``NAME.tar.bz2`` is appended).  ``GPT2JA_OFFLINE=1`` turns
every download off: what is missing is then an error saying what to fetch and
where to put it.

Only the standard library (urllib) and tqdm are used; TensorFlow is imported
only to check an extracted checkpoint.  Problems raise ``ModelError`` with a
one-line message.
"""
from __future__ import annotations

import contextlib
import http.client
import json
import math
import os
import re
import shutil
import socket
import sys
import tarfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, List, Optional, Sequence

from model.errors import ModelError
from util.files import atomic_write, fsync_directory

#: The names under which the models are released.
RELEASED_MODELS = ("gpt2ja-small", "gpt2ja-medium", "gpt2ja-large")
#: Official addresses of the model archives, tried in order.
MODEL_URLS = ("https://www.nama.ne.jp/models/", "http://ailab.nama.ne.jp/models/")
#: Approximate sizes of the archives, said before a download starts.
ARCHIVE_SIZES = {"gpt2ja-small": "0.4 GB", "gpt2ja-medium": "1.2 GB", "gpt2ja-large": "2.9 GB"}
#: The original's model page (report/models.md) on gpt2ja-large: publication suspended, sent on request.
LARGE_SUSPENDED = ("the original's model page says the publication of gpt2ja-large is suspended "
                   "(公開一時停止中: the author sends its address by e-mail on request, as a base for fine-tuning); "
                   "use gpt2ja-medium or gpt2ja-small, or put a copy you obtained in the cache or give its directory")
#: Minutes bzip2 takes to unpack each archive on one core (124 s measured for small; medium and large 3x, 7x).
EXTRACT_MINUTES = {"gpt2ja-small": 2, "gpt2ja-medium": 6, "gpt2ja-large": 15}
DEFAULT_HOME = "~/.cache/gpt2-japanese"
WORK_SUBDIR = ".downloads"

#: Seconds to wait for a connection or for the next bytes of a response.
TIMEOUT = 30.0
#: Seconds before the first retry of an interrupted download (doubling, at most 30).
RETRY_DELAY = 1.0
#: Retries of one address in a row that bring no new bytes before giving up on it.
MAX_STALLS = 3
CHUNK = 1 << 20
USER_AGENT = "gpt2-japanese (python urllib)"

_TRUE = ("1", "true", "yes", "on")


# --------------------------------------------------------------------------- configuration

def cache_dir() -> Path:
    """``$GPT2JA_HOME``; else ``$XDG_CACHE_HOME/gpt2-japanese`` when XDG_CACHE_HOME is set
    (to an absolute path, as the XDG base directory specification asks); else
    ``~/.cache/gpt2-japanese``."""
    home = os.environ.get("GPT2JA_HOME")
    if home:
        return Path(os.path.expanduser(home))
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    if os.path.isabs(xdg):
        return Path(xdg) / "gpt2-japanese"
    return Path(os.path.expanduser(DEFAULT_HOME))


def offline() -> bool:
    """True when ``GPT2JA_OFFLINE`` is set to 1/true/yes/on."""
    return os.environ.get("GPT2JA_OFFLINE", "").strip().lower() in _TRUE


def _base(url: str) -> str:
    return url if url.endswith("/") else url + "/"


def model_urls(name: str) -> List[str]:
    """The addresses of ``name``'s archive, in the order they are tried."""
    env = os.environ.get("GPT2JA_MODEL_URLS", "")
    bases = [b.strip() for b in env.split(",") if b.strip()] or list(MODEL_URLS)
    return [_base(b) + f"{name}.tar.bz2" for b in bases]


def _home_text(path: Path) -> str:
    """A path as a user would type it (``~/...`` under the home directory)."""
    home = os.path.expanduser("~")
    s = str(path)
    if home not in ("", "/", "~") and (s == home or s.startswith(home + os.sep)):
        return "~" + s[len(home):]
    return s


def _downloads_off(download: bool) -> Optional[str]:
    """Why downloading is not allowed, or None."""
    if offline():
        return "downloads are off (GPT2JA_OFFLINE=%s)" % os.environ.get("GPT2JA_OFFLINE", "").strip()
    if not download:
        return "downloads are off (--no-download)"
    return None


# --------------------------------------------------------------------------- models

def is_released(name: str) -> bool:
    return str(name) in RELEASED_MODELS


def cached_model_dir(name: str) -> Path:
    """Where the released model ``name`` lives in the cache (it may not exist yet)."""
    return cache_dir() / name


def model_path(model: str | os.PathLike) -> Path:
    """Where ``--model`` points, without downloading: an existing path as given,
    a released name's cache directory, or the path as given."""
    p = Path(model)
    if p.exists() or not is_released(str(model)):
        return p
    return cached_model_dir(str(model))


def resolve_model(model: str | os.PathLike, download: bool = True, progress: Optional[bool] = None) -> Path:
    """The model directory ``--model`` names, downloading a released model when needed.

    An existing path is used as it is (a directory ``gpt2ja-small`` in the current
    directory wins over the cache).  A released name that is not a path resolves
    to the cache directory and is downloaded unless it is there already, or
    ``download`` is false / ``GPT2JA_OFFLINE`` is set (then ModelError saying
    what to fetch and where).  Anything else is a ModelError "does not exist".
    """
    p = Path(model)
    if p.exists():
        return p
    name = str(model)
    if not is_released(name):
        hint = ""
        if os.sep not in name and "/" not in name:
            hint = "; released models, downloaded by name: " + ", ".join(RELEASED_MODELS)
        raise ModelError(f"model directory {name} does not exist{hint}")
    target = cached_model_dir(name)
    if target.is_dir():
        return target
    why = _downloads_off(download)
    if why is not None:
        raise ModelError(_model_offline_message(name, why) + ", or give a model directory instead")
    return download_model(name, progress=progress)


def _model_offline_message(name: str, why: str) -> str:
    url = model_urls(name)[0]
    home = _home_text(cache_dir())
    return (f"model {name} is not in the cache ({home}/{name}) and {why}: download {url} and unpack it "
            f"there (tar xjf {name}.tar.bz2 -C {home})")


def download_model(name: str, progress: Optional[bool] = None) -> Path:
    """Download, extract and check the released model ``name`` into the cache;
    return its directory (at once when it is there already).  Raises ModelError
    (also when GPT2JA_OFFLINE is set and the model is missing)."""
    if not is_released(name):
        raise ModelError(f"unknown model {name!r}; released models: {', '.join(RELEASED_MODELS)}")
    target = cached_model_dir(name)
    if target.is_dir():
        return target
    why = _downloads_off(True)
    if why is not None:
        raise ModelError(_model_offline_message(name, why))
    work = _work_dir()
    with _lock(work / f"{name}.lock", name):
        if target.is_dir():  # another process finished it meanwhile
            return target
        _remove_stale(work, f"{name}.extract-")
        archive = work / f"{name}.tar.bz2"
        if not archive.is_file():
            size = ARCHIVE_SIZES.get(name)
            first = None
            if size and not _size(archive.with_name(archive.name + ".part")):
                # said once a server has answered, before the first byte is written
                first = (f"model {name} is not in the cache: downloading about {size} into "
                         f"{_home_text(cache_dir())} (once; later runs start from there)")
            try:
                _download(model_urls(name), archive, f"model {name}", progress, first)
            except ModelError as e:
                if name == "gpt2ja-large":
                    raise ModelError(f"{e}; {LARGE_SUSPENDED}") from None
                raise
        _install_archive(archive, target, name, progress)
    _note(f"model {name} is ready in {_home_text(target)}")
    return target


def cached_models() -> List[dict]:
    """The released models in the cache: name, path, size in bytes, and ``partial``
    (bytes of an unfinished download of it, 0 when none)."""
    out = []
    work = cache_dir() / WORK_SUBDIR
    for name in RELEASED_MODELS:
        path = cached_model_dir(name)
        partial = _size(work / f"{name}.tar.bz2.part") + _size(work / f"{name}.tar.bz2")
        if path.is_dir() or partial:
            out.append({"name": name, "path": str(path), "size": _tree_size(path) if path.is_dir() else 0,
                        "partial": partial})
    return out


def remove_model(name: str) -> List[Path]:
    """Remove the released model ``name`` from the cache, with any unfinished download
    of it; returns what was removed (ModelError when there is nothing)."""
    if not is_released(name):
        raise ModelError(f"unknown model {name!r}; released models: {', '.join(RELEASED_MODELS)}")
    work = cache_dir() / WORK_SUBDIR
    removed = []
    with _lock(_work_dir() / f"{name}.lock", name):
        for path in (cached_model_dir(name), work / f"{name}.tar.bz2.part", work / f"{name}.tar.bz2.part.json",
                     work / f"{name}.tar.bz2"):
            try:
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()
                else:
                    continue
            except OSError as e:
                raise ModelError(f"cannot remove {path}: {e.strerror or e}") from None
            removed.append(path)
    if not removed:
        raise ModelError(f"model {name} is not in the cache ({_home_text(cache_dir())})")
    return removed


def _tree_size(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            total += _size(Path(root) / f)
    return total


def _install_archive(archive: Path, target: Path, name: str, progress: Optional[bool]) -> None:
    """Extract ``archive`` next to ``target``, check it, rename it into place.

    The archive is removed once installed, or when it proved bad (corrupted,
    unsafe, not a checkpoint: downloading it again is the fix); it is kept when
    installing stopped for another reason (Ctrl-C, disk full), so that the next
    run extracts it again without downloading it."""
    tmp = archive.parent / f"{name}.extract-{os.getpid()}"
    bad = False
    try:
        minutes = EXTRACT_MINUTES.get(name)
        _note(f"extracting {name} ({_human(_size(archive))} of bzip2" +
              (f"; about {minutes} min on one core)" if minutes else ")"))
        try:
            extract(archive, tmp, progress=progress, desc=f"extracting {name}")
        except ModelError:
            bad = True
            raise
        except OSError as e:
            if e.errno is not None:
                raise ModelError(f"cannot extract {archive}: {e.strerror or e}") from None
            bad = True
            raise ModelError(f"the downloaded archive of {name} is corrupted ({e}); it was removed, "
                             f"run again to download it anew") from None
        except (tarfile.TarError, EOFError, ValueError) as e:
            bad = True
            raise ModelError(f"the downloaded archive of {name} is corrupted ({e}); it was removed, "
                             f"run again to download it anew") from None
        model_dir = _model_root(tmp)
        if model_dir is None:
            bad = True
            raise ModelError(f"the archive of {name} holds no checkpoint (no 'checkpoint' state file or "
                             f"model-N.index at its top or in its one top-level directory)")
        _note(f"checking {name}: reading every weight once (its checksums)")
        try:
            verify_checkpoint(model_dir)
        except ModelError as e:
            bad = True
            raise ModelError(f"the archive of {name} is not a loadable checkpoint: {e}") from None
        try:
            os.rename(model_dir, target)
        except OSError as e:
            if not target.is_dir():
                raise ModelError(f"cannot move the model into {target}: {e.strerror or e}") from None
            # else someone put one there meanwhile: keep theirs
        fsync_directory(target.parent)
        bad = True  # installed: the archive is no longer needed
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if bad:
            with contextlib.suppress(OSError):
                archive.unlink()


def _model_root(directory: Path) -> Optional[Path]:
    """The directory holding the checkpoint: the extraction directory itself,
    or its only entry when that is a directory (``gpt2ja-small/...``)."""
    def has_checkpoint(d: Path) -> bool:
        return (d / "checkpoint").is_file() or any(f.name.endswith(".index") for f in d.iterdir())

    if not directory.is_dir():
        return None
    if has_checkpoint(directory):
        return directory
    entries = list(directory.iterdir())
    if len(entries) == 1 and entries[0].is_dir() and has_checkpoint(entries[0]):
        return entries[0]
    return None


def verify_checkpoint(model_dir: str | os.PathLike, progress: Optional[bool] = None) -> None:
    """Open the checkpoint with the model loader (shapes checked) and read every
    variable once, which verifies the checkpoint's own checksums.  Imports
    TensorFlow.  Raises ModelError.  A bar of the bytes read (as ``_bar``)."""
    from model.checkpoint import open_checkpoint
    from model.hparams import variable_shapes

    reader, hp = open_checkpoint(model_dir)
    shapes = variable_shapes(hp)
    total = 4 * sum(int(math.prod(shape)) for shape in shapes.values())
    with _bar(total, "checking", progress) as bar:
        for var, shape in shapes.items():
            reader.get(var)
            bar.update(4 * int(math.prod(shape)))


# --------------------------------------------------------------------------- safe extraction

def _member_problem(member: tarfile.TarInfo) -> Optional[str]:
    name = member.name
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        return "an absolute path"
    if ".." in re.split(r"[/\\]", name):
        return "a '..' component"
    if member.issym() or member.islnk():
        return "a link"
    if member.ischr() or member.isblk() or member.isfifo():
        return "a device or pipe"
    if not (member.isfile() or member.isdir()):
        return "not a regular file or directory"
    return None


def extract(archive: str | os.PathLike, dest: str | os.PathLike, progress: Optional[bool] = None,
            desc: str = "extracting") -> None:
    """Extract a tar archive (any compression tarfile reads) into ``dest``, a new
    directory, refusing members with absolute paths, '..', links, devices, or
    that would land outside ``dest``.  Files get ordinary permissions (no
    set-id bits, no owners).  Raises ModelError for a refused member; tarfile,
    EOF and OS errors for a damaged archive or a failing disk."""
    dest = Path(dest)
    dest.mkdir(parents=True)
    root = os.path.realpath(dest)
    size = os.path.getsize(archive)
    with open(archive, "rb") as raw, _bar(size, desc, progress) as bar:
        counted = _CountingReader(raw, bar.update)
        with _decompressed(counted, archive) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
            for member in tar:
                problem = _member_problem(member)
                if problem is None:
                    path = os.path.realpath(os.path.join(root, member.name))
                    if os.path.commonpath([root, path]) != root:
                        problem = "a path outside the target directory"
                if problem is not None:
                    raise ModelError(f"unsafe archive {Path(archive).name}: member {member.name!r} is {problem}; "
                                     f"nothing was installed")
                if member.isdir():
                    os.makedirs(path, exist_ok=True)
                    continue
                os.makedirs(os.path.dirname(path), exist_ok=True)
                source = tar.extractfile(member)
                with open(path, "wb") as out:
                    shutil.copyfileobj(source, out, CHUNK)
                    out.flush()
                    os.fsync(out.fileno())


def bzip2_command() -> Optional[List[str]]:
    """lbzip2 when it is installed (and ``GPT2JA_LBZIP2`` is not 0): it decompresses any bzip2 file
    on all the cores (libbz2, which Python's bz2 and bzip2 use, on one); on one core it costs about
    the same CPU time as libbz2.  None: Python's bz2."""
    if os.environ.get("GPT2JA_LBZIP2", "").strip().lower() in ("0", "false", "no", "off"):
        return None
    path = shutil.which("lbzip2")
    return [path, "-d", "-c"] if path else None


@contextlib.contextmanager
def _decompressed(source, archive):
    """``source`` itself (tarfile then decompresses), or, for a .bz2 archive when lbzip2 is there,
    lbzip2's output: a thread feeds it ``source``.  A damaged archive raises tarfile.ReadError."""
    import subprocess
    import threading

    command = bzip2_command() if str(archive).endswith(".bz2") else None
    if command is None:
        yield source
        return
    proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    failed: list = []

    def feed():
        try:
            while True:
                data = source.read(CHUNK)
                if not data:
                    break
                proc.stdin.write(data)
        except BrokenPipeError:
            pass  # lbzip2 stopped (a damaged archive): its status says why
        except BaseException as e:  # a read error of the archive: reported after the join
            failed.append(e)
        finally:
            with contextlib.suppress(OSError):
                proc.stdin.close()

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    ok = False
    try:
        yield proc.stdout
        ok = True
    finally:
        if ok:  # the tar end padding tarfile leaves unread
            while proc.stdout.read(CHUNK):
                pass
        else:
            proc.kill()
        proc.stdout.close()
        feeder.join()
        err = proc.stderr.read().decode("utf-8", "replace").strip()
        proc.stderr.close()
        code = proc.wait()
    if failed:
        raise failed[0]
    if code != 0:
        raise tarfile.ReadError(f"lbzip2: {err.splitlines()[-1] if err else f'exit status {code}'}")


class _CountingReader:
    """A read-only file wrapper reporting how many bytes were read."""

    def __init__(self, raw, report: Callable[[int], object]):
        self.raw = raw
        self.report = report

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.report(len(data))
        return data


# --------------------------------------------------------------------------- HTTP

class _Failed(Exception):
    """One address failed; ``transient`` when retrying it may help."""

    def __init__(self, reason: str, transient: bool = False):
        super().__init__(reason)
        self.transient = transient


def _download(urls: Sequence[str], dest: Path, what: str, progress: Optional[bool],
              first: Optional[str] = None) -> None:
    """Fetch the first address that works into ``dest``: written as ``dest.part``
    (resumed with HTTP Range when it exists), renamed when complete.  ``first``, when
    given, is said once, as soon as a server answers (nothing is said before an
    address is known to be usable).  Raises ModelError with one line naming every
    address tried and why it failed."""
    part = dest.with_name(dest.name + ".part")
    failures = []
    try:
        if _try_addresses(urls, dest, part, what, progress, failures, first):
            return
    except KeyboardInterrupt:
        if _size(part):
            _note(f"interrupted: {_kept(part)}")
        raise
    kept = f" ({_kept(part)})" if _size(part) else ""
    raise ModelError(f"cannot download {what}: " + "; ".join(failures) + kept)


def _kept(part: Path) -> str:
    """What happens to a partial download: resumed, or started over where the server cannot resume."""
    size = _human(_size(part))
    if _read_meta(part).get("ranges") is False:
        return (f"{size} kept in {_home_text(part)}, but the server cannot resume a download: "
                f"the next try starts over")
    return f"{size} kept in {_home_text(part)}; the next try resumes from there"


def _try_addresses(urls, dest: Path, part: Path, what: str, progress: Optional[bool], failures: list,
                   first: Optional[str] = None) -> bool:
    """True when ``dest`` is complete; False when every address failed (each named in ``failures``)."""
    said = [] if first else [True]
    for url in urls:
        stalls, delay = 0, RETRY_DELAY
        kept = _size(part)
        told = []

        def announce(url=url, kept=kept, told=told):
            # said once the server has answered: nothing before an address is known to be usable
            if not said:
                said.append(True)
                _note(first)
            if not told:
                told.append(True)
                _note(f"downloading {what} from {url}" + (f", resuming at {_human(kept)}" if kept else ""))

        while True:
            before = _size(part)
            try:
                _fetch(url, part, what, progress, announce)
                os.replace(part, dest)
                _meta_path(part).unlink(missing_ok=True)
                return True
            except _Failed as e:
                reason = str(e)
                if not e.transient:
                    break
                stalls = 0 if _size(part) > before else stalls + 1
                if stalls >= MAX_STALLS:
                    break
                again = "resuming" if _read_meta(part).get("ranges") is not False else "starting over"
                _note(f"{what}: {reason}; {again} in {delay:g} s")
                time.sleep(delay)
                delay = min(delay * 2, 30.0)
            except OSError as e:
                raise ModelError(f"cannot write {part}: {e.strerror or e}") from None
        failures.append(f"{url}: {reason}")
        if url != urls[-1]:
            _note(f"{url}: {reason}; trying the next address")
    return False


def _fetch(url: str, part: Path, what: str, progress: Optional[bool],
           announce: Callable[[], object] = lambda: None) -> None:
    """One attempt: append the rest of ``url`` to ``part`` (or start over when the
    server cannot resume); ``announce()`` once the server has answered with the file.
    Returns only when the file is complete."""
    offset = _size(part)
    meta = _read_meta(part)
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
        if meta.get("url") == url and meta.get("validator"):
            headers["If-Range"] = meta["validator"]
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=TIMEOUT)
    except urllib.error.HTTPError as e:
        e.close()
        if e.code == 416 and offset:  # the partial file is not a prefix of this one
            _truncate(part)
            raise _Failed("the partial download did not fit; starting over", transient=True) from None
        raise _Failed(f"HTTP {e.code} {e.reason}".strip()) from None
    except urllib.error.URLError as e:
        raise _Failed(_reason(e.reason)) from None
    except ValueError as e:  # "unknown url type": not an http(s) address
        raise _Failed(f"not a usable address ({e})") from None
    except (socket.timeout, TimeoutError):
        raise _Failed(f"timed out after {TIMEOUT:g} s") from None
    except (http.client.HTTPException, OSError) as e:
        raise _Failed(_reason(e), transient=True) from None
    with response:
        total = None
        if response.status == 206:
            start, total = _content_range(response.headers.get("Content-Range", ""))
            if start != offset or (meta.get("total") and total and meta["total"] != total):
                _truncate(part)  # not the file we had begun: start over
                raise _Failed("the server sent a different part of the file; starting over", transient=True)
        else:
            offset = 0
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
        validator = response.headers.get("ETag") or response.headers.get("Last-Modified")
        if validator and validator.startswith("W/"):
            validator = None  # weak validators cannot guard a byte range
        # Can a later try continue this file?  Yes after a 206; no when a range was asked for and
        # the whole file came back, or when the server says "Accept-Ranges: none"; else unknown (None).
        accepts = response.headers.get("Accept-Ranges", "").strip().lower()
        if response.status == 206 or accepts == "bytes":
            ranges = True
        elif "Range" in headers or accepts == "none":
            ranges = False
        else:
            ranges = meta.get("ranges") if meta.get("url") == url else None
        announce()
        _write_meta(part, {"url": url, "total": total, "validator": validator, "ranges": ranges})
        with open(part, "r+b" if offset else "wb") as f, _bar(total, what, progress, initial=offset) as bar:
            f.seek(offset)
            f.truncate()
            written = offset
            lost = None
            while True:
                try:
                    chunk = response.read(CHUNK)
                except (socket.timeout, TimeoutError):
                    lost = f"timed out after {TIMEOUT:g} s without data"
                    break
                except (http.client.HTTPException, OSError) as e:
                    lost = f"connection lost ({_reason(e)})"
                    break
                if not chunk:
                    break
                f.write(chunk)  # a local write error (disk full) propagates as OSError
                written += len(chunk)
                bar.update(len(chunk))
            f.flush()
            os.fsync(f.fileno())
    of_total = f" of {_human(total)}" if total else ""
    if lost is not None:
        raise _Failed(f"{lost} after {_human(written)}{of_total}", transient=True)
    if total is not None and written != total:
        if written > total:
            _truncate(part)
        raise _Failed(f"connection closed after {_human(written)}{of_total}", transient=True)


def _content_range(value: str):
    m = re.fullmatch(r"\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*", value)
    if not m:
        raise _Failed(f"bad Content-Range {value!r}")
    total = None if m.group(3) == "*" else int(m.group(3))
    return int(m.group(1)), total


def _reason(e) -> str:
    if isinstance(e, (socket.timeout, TimeoutError)):
        return f"timed out after {TIMEOUT:g} s"
    if isinstance(e, socket.gaierror):
        return f"cannot resolve the host name ({e.strerror or e})"
    if isinstance(e, ConnectionRefusedError):
        return "connection refused"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    text = str(e).strip()
    return text or type(e).__name__


# --------------------------------------------------------------------------- files, locks, progress

def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _truncate(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()
    with contextlib.suppress(OSError):
        _meta_path(path).unlink()


def _meta_path(part: Path) -> Path:
    return part.with_name(part.name + ".json")


def _read_meta(part: Path) -> dict:
    try:
        data = json.loads(_meta_path(part).read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_meta(part: Path, meta: dict) -> None:
    atomic_write(_meta_path(part), lambda f: f.write(json.dumps(meta)), mode="w")


def _work_dir() -> Path:
    work = cache_dir() / WORK_SUBDIR
    try:
        work.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ModelError(f"cannot create the cache directory {work}: {e.strerror or e} (set GPT2JA_HOME)") from None
    return work


def _remove_stale(work: Path, prefix: str) -> None:
    """Extraction directories left by a crashed run (we hold the lock)."""
    for entry in work.iterdir():
        if entry.name.startswith(prefix) and entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)


@contextlib.contextmanager
def _lock(path: Path, what: str):
    """An exclusive lock between processes sharing the cache (POSIX; elsewhere none)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path, "a+b") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _note(f"waiting for another process downloading {what}")
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _note(message: str) -> None:
    argv0 = sys.argv[0] if sys.argv and sys.argv[0] else ""
    prog = os.path.basename(argv0)
    if prog == "__main__.py":
        prog = "python -m " + os.path.basename(os.path.dirname(os.path.abspath(argv0)))
    elif prog in ("-c", ""):
        prog = "gpt2-japanese"
    sys.stderr.write(f"{prog}: {message}\n")
    sys.stderr.flush()


def _bar(total: Optional[int], desc: str, progress: Optional[bool], initial: int = 0):
    """A byte-counting tqdm bar on stderr (bytes, rate, time left); shown when
    stderr is a terminal, or when ``progress`` is true."""
    from tqdm import tqdm

    show = sys.stderr.isatty() if progress is None else progress
    return tqdm(total=total, initial=initial, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                file=sys.stderr, disable=not show, leave=False, dynamic_ncols=True)


def _human(n: Optional[int]) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
