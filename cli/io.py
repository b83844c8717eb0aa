"""Input and output of the command-line tools: lines in, records out.

    for number, text in read_lines(path): ...          # strict UTF-8, lazily
    text = read_context(args.context)                   # '-' = all of stdin
    for chunk in chunks(read_lines(path), 512): ...     # a partial chunk before an input error
    with output(args.output_file) as out:               # stdout, or a file written atomically
        writer = Writer(out, render_line)               # one record per line, flushed

Nothing here imports TensorFlow.
"""
from __future__ import annotations

import contextlib
import sys
from typing import Callable, Iterable, Iterator, List, Optional

from util.files import atomic_file, check_writable

from .errors import UsageError


def read_stdin_text() -> str:
    """All of stdin as text (strict UTF-8), or a UsageError."""
    try:
        data = sys.stdin.buffer.read()
    except (OSError, ValueError, AttributeError) as e:
        raise UsageError(f"cannot read standard input: {e}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"standard input is not UTF-8 (invalid byte 0x{data[e.start]:02x} at offset {e.start})") from None


def read_context(value: Optional[str], default: Optional[str] = None) -> Optional[str]:
    """A --context value: '-' is all of stdin less one trailing line break; None gives ``default``."""
    if value != "-":
        return default if value is None else value
    text = read_stdin_text()
    if text.endswith("\n"):
        text = text[:-2] if text.endswith("\r\n") else text[:-1]
    return text


def read_lines(path: str):
    """(line number, text) for each line of a file or '-' (stdin), strict
    UTF-8, line terminators removed; read lazily so pipelines stream."""
    if path == "-":
        stream = sys.stdin.buffer
        name = "standard input"
    else:
        try:
            stream = open(path, "rb")
        except OSError as e:
            raise UsageError(f"cannot read {path}: {e.strerror or e}") from None
        name = path
    try:
        for number, raw in enumerate(stream, 1):
            if raw.endswith(b"\n"):
                raw = raw[:-2] if raw.endswith(b"\r\n") else raw[:-1]
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UsageError(f"{name}, line {number}: invalid UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start})") from None
    except OSError as e:
        raise UsageError(f"cannot read {name}: {e.strerror or e}") from None
    finally:
        if stream is not sys.stdin.buffer:
            stream.close()


def lines_per_batch(path: str, default: int) -> int:
    """How many input lines to gather before computing: one at a time when a
    person types them (stdin is a terminal), else ``default``."""
    if path == "-":
        try:
            if sys.stdin.isatty():
                return 1
        except (AttributeError, ValueError):
            pass
    return default


def chunks(items: Iterable, size: int) -> Iterator[List]:
    """Lists of up to ``size`` items.  When reading the items raises a
    UsageError (a bad input line), the items read before it are yielded
    first, then the error is raised: nothing read is lost."""
    chunk: List = []
    try:
        for item in items:
            chunk.append(item)
            if len(chunk) >= size:
                yield chunk
                chunk = []
    except UsageError:
        if chunk:
            yield chunk
        raise
    if chunk:
        yield chunk


@contextlib.contextmanager
def output(path: str, binary: bool = False):
    """stdout, or ``path`` written atomically when a path is given (``util.files``:
    a regular file is replaced only when everything was written; a device or
    FIFO is written directly; a symlink's target is replaced)."""
    if not path:
        yield sys.stdout.buffer if binary else sys.stdout
        return
    try:
        check_writable(path)
    except OSError as e:
        raise UsageError(f"cannot write {path}: {e.strerror or e}") from None
    try:
        with atomic_file(path, "wb" if binary else "w") as f:
            yield f
    except OSError as e:
        raise UsageError(f"cannot write {path}: {e.strerror or e}") from None



class Writer:
    """Writes records to a text stream in one format: ``render(record)`` gives
    the record's text (ending with a line break), ``between`` goes between two
    records; the stream is flushed after every record so that pipelines see
    each result as soon as it exists.  With a progress ``bar`` shown on the
    same terminal, the bar is cleared before a record is written and drawn
    again after it, so that the two never share a line."""

    def __init__(self, out, render: Callable[[object], str], between: str = "", bar=None):
        self.out = out
        self.render = render
        self.between = between
        self.count = 0
        self.bar = bar if bar is not None and not bar.disable and _is_terminal(out) else None

    def write(self, record) -> None:
        if self.bar is not None:
            self.bar.clear()
        if self.count and self.between:
            self.out.write(self.between)
        self.out.write(self.render(record))
        self.out.flush()
        self.count += 1
        if self.bar is not None:
            self.bar.refresh()

    def close(self) -> None:
        """Called once when every record was written."""


def _is_terminal(out) -> bool:
    try:
        return out.isatty()
    except (AttributeError, ValueError):
        return False


class NpyWriter(Writer):
    """Collects float32 vectors and writes one [N, width] .npy array at the end."""

    def __init__(self, out, width: int):
        super().__init__(out, render=None)
        self.width = width
        self.rows = []

    def write(self, vector) -> None:
        self.rows.append(vector)
        self.count += 1

    def close(self) -> None:
        import numpy as np

        rows = np.stack(self.rows) if self.rows else np.zeros((0, self.width), np.float32)
        np.save(self.out, rows.astype(np.float32))


def progress(iterable=None, total=None, desc=None, unit="it", force=False):
    """A tqdm bar on stderr, shown only when stderr is a terminal (or forced)."""
    from tqdm import tqdm

    disable = not (force or sys.stderr.isatty())
    return tqdm(iterable, total=total, desc=desc, unit=unit, file=sys.stderr, disable=disable, leave=False)
