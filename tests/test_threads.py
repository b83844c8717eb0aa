"""Threads: --threads everywhere, decoding steps tuned by timing, results independent of both."""
import numpy as np
import pytest

import model
from model.threads import StepTuner


def test_tuner_keeps_the_faster_count_and_probes_again():
    tuner = StepTuner(2, period=4, probe=2)
    seen = []
    for _ in range(4):  # the first probe: 2 1 2 1, one thread twice as fast
        count = tuner.before(1)
        seen.append(count)
        tuner.after(1, 0.010 if count == 1 else 0.020)
    assert seen == [2, 1, 2, 1] and tuner.best(1) == 1
    for _ in range(4):  # the period: the best count only
        assert tuner.before(1) == 1
        tuner.after(1, 0.010)
    seen = []
    for _ in range(4):  # the next probe: now two threads win
        count = tuner.before(1)
        seen.append(count)
        tuner.after(1, 0.005 if count == 2 else 0.010)
    assert seen == [2, 1, 2, 1] and tuner.best(1) == 2
    assert tuner.best(8) == 2  # matrix products are tuned on their own
    assert StepTuner(1).before(1) == 1


def _steps(tiny, enc, threads):
    model.configure_threads(threads)
    try:
        dec = model.NumpyDecoder.from_model(tiny)
        ids = enc.encode("今日は良い天気です。明日も晴れるかな")
        out = [dec.add(range(6), [ids, ids[:3], ids[:5], ids[1:], ids[2:6], ids[:4]])]
        for t in range(40):  # long enough for the tuner to probe both counts, with 6, 2 and 1 rows
            out.append(dec.step(range(6), [t + 5, t + 9, t + 1, t + 2, t + 3, t + 4]))
            out.append(dec.step([0, 1], [t + 5, t + 9]))
            out.append(dec.step([0], [t + 7]))
        return np.concatenate(out)
    finally:
        model.configure_threads(None)


def test_logits_do_not_depend_on_threads(tiny, enc):
    tuned = _steps(tiny, enc, None)
    np.testing.assert_array_equal(tuned, _steps(tiny, enc, 1))
    if model.cpu_count() > 1:
        np.testing.assert_array_equal(tuned, _steps(tiny, enc, model.cpu_count()))


def test_threads_flag_is_checked():
    with pytest.raises(ValueError):
        model.configure_threads(0)


def test_onnx_logits_do_not_depend_on_threads(tiny, enc):
    """--engine auto decodes float32 with ONNX Runtime on a CPU: its logits, one row or several, are
    bit-identical whatever its thread count (so the tokens drawn never depend on --threads)."""
    from model.ortdecode import OnnxDecoder

    ids = enc.encode("今日は良い天気です。明日も晴れるかな")
    outs = []
    for threads in (1, 2, 3):
        dec = OnnxDecoder.from_model(tiny, threads=threads)
        out = [dec.add(range(4), [ids, ids[:3], ids[:5], ids[2:]])]
        for t in range(12):
            out.append(dec.step([0], [t + 5]))
            out.append(dec.step(range(4), [t + 5, t + 9, t + 1, t + 2]))
        outs.append(np.concatenate(out))
    np.testing.assert_array_equal(outs[0], outs[1])
    np.testing.assert_array_equal(outs[0], outs[2])
