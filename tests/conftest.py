"""Shared pytest fixtures.

Every test reaches ../shared (vocabulary, corpus, goldens, the tiny checkpoint)
through the ``shared`` fixture.  ``GPT2JA_SHARED`` may point elsewhere.  When
the data is missing the tests fail (in CI) or are skipped with a clear reason
(on a developer machine without it) -- in CI a missing ../shared must never
turn into a green run.
"""
import os
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _shared_dir() -> pathlib.Path:
    env = os.environ.get("GPT2JA_SHARED")
    return pathlib.Path(env) if env else ROOT.parent / "shared"


@pytest.fixture(scope="session")
def shared() -> pathlib.Path:
    path = _shared_dir()
    if not (path / "vocab" / "ja-bpe.txt").is_file():
        msg = f"shared test data not found at {path} (set GPT2JA_SHARED)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return path


@pytest.fixture(scope="session")
def vocab_dir(shared) -> pathlib.Path:
    return shared / "vocab"


@pytest.fixture(scope="session")
def tiny_model_dir(shared) -> pathlib.Path:
    return shared / "fixtures" / "gpt2ja-tiny"


@pytest.fixture(scope="session")
def golden(shared) -> pathlib.Path:
    return shared / "golden"


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
