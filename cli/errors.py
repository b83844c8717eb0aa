"""Error reporting and pipeline behaviour shared by every command.

A command's ``main(argv)`` raises ``UsageError`` (or the library errors
``encoder.VocabError`` / ``model.ModelError``) for anything a user can cause;
``run`` turns those into one line on stderr and exit status 2.  A closed pipe
(``| head``) and Ctrl-C end quietly.
"""
from __future__ import annotations

import argparse
import os
import re
import sys


class UsageError(Exception):
    """A problem with what the user asked for: bad flag value, unreadable input..."""


class _HelpFormatter(argparse.HelpFormatter):
    """--help lists each flag under its first spelling only."""

    def _format_action_invocation(self, action):
        if action.option_strings and action.option_strings[0].startswith("--"):
            action = argparse.Namespace(**{**vars(action), "option_strings": action.option_strings[:1]})
        return super()._format_action_invocation(action)


def _spellings(option: str) -> list:
    """``--num_generate`` -> [``--num_generate``, ``--num-generate``]: both separators."""
    if not option.startswith("--"):
        return [option]
    body = option[2:]
    return list(dict.fromkeys([option, "--" + body.replace("_", "-"), "--" + body.replace("-", "_")]))


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the tools' conventions: every long flag is accepted with
    ``_`` and ``-`` spelled either way (the original mixes them:
    ``--num_generate``, ``--exclude-end``), --help shows the first spelling,
    and a bad flag is one line, ``prog: error: ... (see --help)``, exit 2."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def add_argument(self, *strings, **kwargs):
        spelled = [s for option in strings for s in _spellings(option)]
        return super().add_argument(*dict.fromkeys(spelled), **kwargs)

    def _get_option_tuples(self, option_string):
        # An abbreviation matching both spellings of one flag is not ambiguous.
        seen, unique = set(), []
        for found in super()._get_option_tuples(option_string):
            if id(found[0]) not in seen:
                seen.add(id(found[0]))
                unique.append(found)
        return unique

    def error(self, message):
        message = re.sub(r"(--[\w-]+)(?:/--[\w-]+)+", r"\1", message)  # a flag by its first spelling
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        sys.exit(2)


class Terminated(BaseException):
    """SIGTERM arrived: unwind like Ctrl-C (temporary files are removed on the way out)."""


def _user_errors() -> tuple:
    """The library errors a user can cause (all light to import: no TensorFlow)."""
    from encoder import EncodeError, VocabError
    from model.errors import ModelError
    from tasks.errors import DatasetError, OptionError

    return UsageError, VocabError, EncodeError, ModelError, OptionError, DatasetError


def message(error: BaseException) -> str:
    """The one line that reports a user error: an OptionError names the flag."""
    from tasks.errors import OptionError

    if isinstance(error, OptionError):
        return f"--{error.option} {error.reason}"
    return " ".join(str(error).split())


class _Output:
    """sys.stdout for a tool: a failed write (a full disk, /dev/full) becomes a
    UsageError naming standard output; a closed pipe stays a BrokenPipeError."""

    def __init__(self, stream):
        self._stream = stream

    def _guard(self, call, *args):
        if self._stream is None:
            raise UsageError("cannot write standard output: it is closed")
        try:
            return call(*args)
        except BrokenPipeError:
            raise
        except OSError as e:
            raise UsageError(f"cannot write standard output: {e.strerror or e}") from None

    def write(self, text):
        return self._guard(lambda t: self._stream.write(t), text)

    def flush(self):
        if self._stream is not None:
            self._guard(self._stream.flush)

    @property
    def buffer(self):
        return _Output(getattr(self._stream, "buffer", None)) if self._stream is not None else _Output(None)

    def isatty(self) -> bool:
        return self._stream is not None and self._stream.isatty()

    def fileno(self):
        if self._stream is None:
            raise OSError("standard output is closed")
        return self._stream.fileno()

    def __getattr__(self, name):
        return getattr(self._stream, name)


def _say(text: str) -> None:
    """A line on stderr, unless stderr is closed."""
    try:
        if sys.stderr is not None:
            sys.stderr.write(text)
            sys.stderr.flush()
    except (OSError, ValueError):
        pass


def _silence_stdout() -> None:
    # Python flushes stdout at exit; once the reader is gone that flush
    # would raise again, so point the descriptor at /dev/null.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.__stdout__.fileno())
    except (OSError, ValueError, AttributeError):
        pass


#: How long the main thread has to take up a SIGTERM before the process ends without it.
TERM_GRACE = 2.0
_TERM = {"handled": False}


def _on_sigterm(signum, frame):
    _TERM["handled"] = True
    raise Terminated()


def _hard_exit() -> None:
    from util.files import remove_temporary_files

    remove_temporary_files()
    os._exit(143)


def _watch_sigterm(fd: int) -> None:
    """SIGTERM must end a tool promptly whatever its threads are doing.  Python runs a handler
    only in the main thread, between bytecodes: a main thread inside one long native call (a
    TensorFlow, OpenBLAS or ONNX Runtime call with many threads, the teardown of their pools)
    would take the signal only when it returns.  The signal's byte arrives on the wakeup fd at
    once; this thread gives the main thread ``TERM_GRACE`` seconds to take it up (then the tool
    unwinds as usual: temporary files removed, a checkpoint saved by gpt2-finetune.py), and
    otherwise removes the temporary files and exits 143 itself.  A second SIGTERM exits at once.
    When the SIGTERM handler is no longer this module's (the server installs its own graceful
    shutdown) the signal is left to that handler."""
    import signal
    import time

    term = bytes([signal.SIGTERM])
    seen = 0
    while True:
        try:
            data = os.read(fd, 256)
        except InterruptedError:
            continue
        except OSError:
            return
        if not data:
            return
        if term not in data or signal.getsignal(signal.SIGTERM) is not _on_sigterm:
            continue
        seen += data.count(term)
        if seen >= 2:
            _hard_exit()
        deadline = time.monotonic() + TERM_GRACE
        while not _TERM["handled"] and time.monotonic() < deadline:
            time.sleep(0.02)
        if not _TERM["handled"]:
            _hard_exit()


def _start_sigterm_watch() -> None:
    """Install the SIGTERM handler (main thread only) and its watchdog (see ``_watch_sigterm``)."""
    import signal
    import threading

    try:
        signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread
        return
    try:
        r, w = os.pipe()
        os.set_blocking(w, False)
        signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    except (OSError, ValueError):
        return
    threading.Thread(target=_watch_sigterm, args=(r,), name="sigterm-watch", daemon=True).start()
    # A forked child (a multiprocessing worker) would write its own signals into this pipe, where the
    # parent's watchdog would take them for its own: the child gets no wakeup fd.
    os.register_at_fork(after_in_child=_no_wakeup_fd)


def _no_wakeup_fd() -> None:
    import signal

    try:
        signal.set_wakeup_fd(-1)
    except ValueError:  # forked from a thread other than the main one: nothing was inherited there
        pass


def _finish_stdout() -> None:
    """Flush what was printed so far (nothing computed is lost), quietly when the reader is gone."""
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        _silence_stdout()
    except UsageError:
        pass


def run(main, argv=None, prog: str | None = None) -> None:
    """Run ``main(argv)`` and exit with its status.

    User errors: one line ``prog: error: ...`` on stderr, status 2.  A closed
    pipe (``| head``): quiet, status 141; Ctrl-C: status 130; SIGTERM: status
    143 -- each after removing unfinished output files; SIGTERM within
    ``TERM_GRACE`` seconds whatever the threads are doing (see ``_watch_sigterm``).  Results are UTF-8
    whatever the locale says.
    """
    import signal

    from util.files import remove_temporary_files

    prog = prog or os.path.basename(sys.argv[0]) or "gpt2-japanese"
    errors = _user_errors()
    for stream in (sys.stdout, sys.stderr):
        if stream is not None and (getattr(stream, "encoding", None) or "").lower().replace("-", "") != "utf8":
            try:
                stream.reconfigure(encoding="utf-8")
            except (AttributeError, ValueError):
                pass
    sys.stdout = _Output(sys.stdout)
    _start_sigterm_watch()
    status = 0
    try:
        status = main(argv) or 0
        sys.stdout.flush()
    except BrokenPipeError:
        _silence_stdout()
        status = 141  # as if killed by SIGPIPE, like other Unix tools
    except KeyboardInterrupt:
        _finish_stdout()
        _say("\n")
        status = 130
    except Terminated:
        _finish_stdout()
        status = 143
    except errors as e:
        _finish_stdout()  # everything computed before the error is kept
        _say(f"{prog}: error: {message(e)}\n")
        status = 2
    finally:
        remove_temporary_files()
        # Everything is written: a SIGTERM while the interpreter and the engines' thread pools shut
        # down ends the process at once (a Python handler would only run after that teardown).
        try:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
        except ValueError:
            pass
    sys.exit(status)
