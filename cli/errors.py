"""Error reporting and pipeline behaviour shared by every command.

A command's ``main(argv)`` raises ``UsageError`` (or the library errors
``encoder.VocabError`` / ``model.ModelError``) for anything a user can cause;
``run`` turns those into one line on stderr and exit status 2.  A closed pipe
(``| head``) and Ctrl-C end quietly.
"""
from __future__ import annotations

import argparse
import os
import sys


class UsageError(Exception):
    """A problem with what the user asked for: bad flag value, unreadable input..."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the tools' error format: a bad flag is one line,
    ``prog: error: ... (see --help)``, and exit status 2 -- no usage block."""

    def error(self, message):
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        sys.exit(2)


def _user_errors() -> tuple:
    errors = [UsageError]
    from encoder import VocabError  # light: no TensorFlow

    errors.append(VocabError)
    from model.errors import ModelError  # light: no TensorFlow

    errors.append(ModelError)
    return tuple(errors)


def _silence_stdout() -> None:
    # Python flushes stdout at exit; once the reader is gone that flush
    # would raise again, so point the descriptor at /dev/null.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def run(main, argv=None, prog: str | None = None) -> None:
    """Run ``main(argv)`` and exit with its status, reporting user errors."""
    prog = prog or os.path.basename(sys.argv[0]) or "gpt2-japanese"
    if prog == "__main__.py":
        prog = os.path.basename(os.path.dirname(os.path.abspath(sys.argv[0])))
    errors = _user_errors()
    for stream in (sys.stdout, sys.stderr):
        # Results are UTF-8 whatever the locale says (Japanese text).
        if (getattr(stream, "encoding", None) or "").lower().replace("-", "") != "utf8":
            try:
                stream.reconfigure(encoding="utf-8")
            except (AttributeError, ValueError):
                pass
    try:
        status = main(argv)
        sys.stdout.flush()
    except BrokenPipeError:
        _silence_stdout()
        sys.exit(141)  # as if killed by SIGPIPE, like other Unix tools
    except KeyboardInterrupt:
        try:
            sys.stdout.flush()
        except BrokenPipeError:
            _silence_stdout()
        sys.stderr.write("\n")
        sys.exit(130)
    except errors as e:
        try:
            sys.stdout.flush()  # everything computed before the error is kept
        except BrokenPipeError:
            _silence_stdout()
        sys.stderr.write(f"{prog}: error: {e}\n")
        sys.exit(2)
    sys.exit(status or 0)
