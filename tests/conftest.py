"""Shared pytest fixtures, and the rule that a skipped test fails in CI.

Everything the tests read lives in this repository: the vocabulary ships in
``encoder/`` and the rest (the tiny checkpoint, the goldens computed with the
original tools) in ``tests/data/`` -- see ``tests/data/README.md``.
``DATA_FILES`` lists every file the suite reads; ``tests/test_repo.py``
checks that the repository holds each of them.
"""
import contextlib
import json
import os
import pathlib
import signal
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# The suite never writes into the user's model cache (kept graphs, quantized weights of
# checkpoints in read-only places): a cache of its own unless one is given.
if not os.environ.get("GPT2JA_HOME"):
    import atexit
    import shutil
    import tempfile

    _HOME = tempfile.mkdtemp(prefix="gpt2ja-tests-home-")
    os.environ["GPT2JA_HOME"] = _HOME
    atexit.register(shutil.rmtree, _HOME, True)

DATA = ROOT / "tests" / "data"
VOCAB_DIR = ROOT / "encoder"
TINY_DIR = DATA / "gpt2ja-tiny"
GOLDEN_DIR = DATA / "golden"

#: Every data file a test reads (relative to the repository root).
DATA_FILES = (
    "encoder/ja-bpe.txt",
    "encoder/emoji.json",
    "encoder/LICENSE",
    "tests/data/gpt2ja-tiny/checkpoint",
    "tests/data/gpt2ja-tiny/hparams.json",
    "tests/data/gpt2ja-tiny/model-1000.index",
    "tests/data/gpt2ja-tiny/model-1000.data-00000-of-00001",
    "tests/data/golden/contexts.txt",
    "tests/data/golden/encode.jsonl",
    "tests/data/golden/tiny/logits.npz",
    "tests/data/golden/tiny/transform.jsonl",
    "tests/data/golden/tiny/score.json",
    "tests/data/golden/tiny/generate.jsonl",
)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """In CI (``CI`` set) a skipped test is a failure: a skip there would
    hide a missing feature or missing data behind a green run."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and not hasattr(report, "wasxfail") and os.environ.get("CI"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped in CI, which counts as a failure: {reason}"


@pytest.fixture(scope="session", autouse=True)
def test_data_stays_as_it_is():
    """No test may write into tests/data (a quantized cache left beside the tiny checkpoint changed what
    later tests found there): a test that needs a writable checkpoint copies it.  Checked once, at the
    end of the session."""
    def listing():
        return sorted(str(p.relative_to(DATA)) for p in DATA.rglob("*"))

    before = listing()
    yield
    added = sorted(set(listing()) - set(before))
    assert not added, f"tests wrote into tests/data: {added[:5]}"


@pytest.fixture(scope="session")
def vocab_dir() -> pathlib.Path:
    return VOCAB_DIR


@pytest.fixture(scope="session")
def tiny_model_dir() -> pathlib.Path:
    return TINY_DIR


@pytest.fixture(scope="session")
def golden() -> pathlib.Path:
    return GOLDEN_DIR


@pytest.fixture(scope="session")
def corpus_lines(golden) -> list:
    """Text for tests that need many lines: the 3,258 texts of the encoder
    goldens that hold no line break (synthetic Japanese: vocabulary entries,
    characters outside it, URLs, dates, prices, emoji), in file order."""
    lines = []
    with open(golden / "encode.jsonl", encoding="utf-8") as f:
        for line in f:
            text = json.loads(line)["text"]
            if text.strip() and not any(c in text for c in "\r\n\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"):
                lines.append(text)
    return lines


@pytest.fixture(scope="session")
def enc(vocab_dir):
    """The encoder over the official vocabulary."""
    import encoder

    return encoder.load(vocab_dir)


@pytest.fixture(scope="session")
def tiny(tiny_model_dir):
    """The tiny fixture checkpoint, loaded once."""
    import model

    return model.load(tiny_model_dir)


@pytest.fixture
def env(vocab_dir, monkeypatch):
    """GPT2JA_VOCAB pointing at the vocabulary, in this process and as an
    environment for subprocesses.

    The log-level variables this process's own imports set (``model.import_tf`` sets
    TF_CPP_MIN_LOG_LEVEL=2, the tools' ``quiet_tensorflow`` 3) are left out, so a tool
    started with it chooses them as it does from a user's shell, whatever tests ran first."""
    monkeypatch.setenv("GPT2JA_VOCAB", str(vocab_dir))
    return user_env()


#: Set by this process's own imports (``model.import_tf``: 2, the tools' ``quiet_tensorflow``: 3).
_LOG_LEVEL_VARS = ("TF_CPP_MIN_LOG_LEVEL", "ABSL_MIN_LOG_LEVEL")


def user_env(**extra) -> dict:
    """An environment for a tool started by a test: this process's, less the log-level variables its
    own imports set -- so the tool chooses them as it does from a user's shell, whatever tests ran
    first -- plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in _LOG_LEVEL_VARS}
    env.update(extra)
    return env


#: The signals tests send to the tools they start.
SENT_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def default_signals(signums=SENT_SIGNALS):
    """Children started inside the block get each of ``signums`` at its default disposition.

    A signal this process ignores stays ignored across exec, and a suite started from a background
    job (``nohup ... &``, ``bash .ci/run &``) ignores SIGINT and SIGQUIT: a child would never see the
    Ctrl-C a test sends.  A signal with a Python handler is reset to the default by exec, so for the
    block each ignored signal gets a handler that keeps ignoring it here (SIGINT: Python's own, the
    usual Ctrl-C), and its disposition is restored afterwards.  Signal handlers can only be set in
    the main thread: elsewhere the block changes nothing."""
    import threading

    saved = {}
    if threading.current_thread() is threading.main_thread():
        for signum in signums:
            if signal.getsignal(signum) == signal.SIG_IGN:
                saved[signum] = signal.signal(
                    signum, signal.default_int_handler if signum == signal.SIGINT else (lambda *_: None))
    try:
        yield
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)


def spawn(args, **kwargs) -> subprocess.Popen:
    """``subprocess.Popen(args, **kwargs)`` for a child the test will signal: SIGINT and SIGTERM at
    their default dispositions whatever this process inherited (see ``default_signals``)."""
    with default_signals():
        return subprocess.Popen(args, **kwargs)
