"""Shared pytest fixtures, and the rule that a skipped test fails in CI.

Everything the tests read lives in this repository: the vocabulary ships in
``encoder/`` and the rest (the tiny checkpoint, the goldens computed with the
original tools) in ``tests/data/`` -- see ``tests/data/README.md``.
``DATA_FILES`` lists every file the suite reads; ``tests/test_repo.py``
checks that the repository holds each of them.
"""
import json
import os
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

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
    environment for subprocesses."""
    monkeypatch.setenv("GPT2JA_VOCAB", str(vocab_dir))
    return dict(os.environ)
