"""The engine-conformance suite: every decoder (numpy, float32 ONNX Runtime, TensorFlow) over the one
row table of model/rows.py gives each sequence the logits of its own full forward pass, whatever
the others do (different lengths, joining and leaving, cuts, restarts, the end of the context)."""
import shutil

import numpy as np
import pytest
from conftest import TINY_DIR

import model
from model.rows import RowDecoder
from tasks.generate import GenerateOptions, Generator

ATOL = 1e-4
ENGINES = ("numpy", "onnx", "tf")


@pytest.fixture(scope="module")
def small_ctx():
    """A model with a 16-token context, so that windows and full contexts come quickly."""
    hp = model.HParams(n_vocab=20573, n_ctx=16, n_embd=32, n_head=2, n_layer=2)
    return model.Model.from_weights(model.random_weights(hp, seed=3), hparams=hp)


@pytest.fixture(scope="module")
def tiny_quantizable(tmp_path_factory):
    """The tiny checkpoint from a copy of its directory: a quantized decoder caches its weights beside
    the checkpoint, and the repository's copy must stay as it is."""
    d = tmp_path_factory.mktemp("tiny") / "gpt2ja-tiny"
    shutil.copytree(TINY_DIR, d)
    return model.load(d)


def _ref(m, seq):
    return m.logits([list(seq)])[0, -1]


@pytest.mark.parametrize("engine", ENGINES)
def test_rows_join_leave_cut_and_restart(tiny, engine):
    dec = model.decoder(tiny, engine)
    assert isinstance(dec, RowDecoder) and dec.engine == engine
    rng = np.random.default_rng(0)
    seqs = {"a": list(rng.integers(0, 20573, 7)), "b": list(rng.integers(0, 20573, 3)), "c": [5] * 70}
    seqs["d"] = list(seqs["a"])  # identical sequences in one add are prefilled once
    before = dec.prefilled_tokens
    first = dec.add(list(seqs), list(seqs.values()))
    assert dec.prefilled_tokens - before == 7 + 3 + 70
    assert dec.ids == ["a", "b", "c", "d"] and dec.lengths() == [7, 3, 70, 7]
    for j, s in enumerate(seqs.values()):
        np.testing.assert_allclose(first[j], _ref(tiny, s), atol=ATOL)
    for _ in range(3):  # every row steps
        tokens = rng.integers(0, 20573, 4)
        out = dec.step(list(seqs), tokens)
        for j, (k, t) in enumerate(zip(seqs, tokens)):
            seqs[k].append(int(t))
            np.testing.assert_allclose(out[j], _ref(tiny, seqs[k]), atol=ATOL, err_msg=k)
    # a subset, in another order
    out = dec.step(["d", "b"], [11, 12])
    seqs["d"].append(11)
    seqs["b"].append(12)
    np.testing.assert_allclose(out[0], _ref(tiny, seqs["d"]), atol=ATOL)
    np.testing.assert_allclose(out[1], _ref(tiny, seqs["b"]), atol=ATOL)
    # a cut (llama.cpp's seq_rm), a sequence leaving, one joining while the others run, a restart
    dec.truncate("a", 2)
    seqs["a"] = seqs["a"][:2]
    dec.remove(["b"])
    del seqs["b"]
    joined = dec.add(["e"], [[9, 8, 7]])
    seqs["e"] = [9, 8, 7]
    np.testing.assert_allclose(joined[0], _ref(tiny, seqs["e"]), atol=ATOL)
    again = dec.replace("c", [4, 4, 4, 4])
    seqs["c"] = [4, 4, 4, 4]
    np.testing.assert_allclose(again, _ref(tiny, seqs["c"]), atol=ATOL)
    assert dec.ids == ["a", "c", "d", "e"] and dec.lengths() == [len(seqs[k]) for k in dec.ids]
    out = dec.step(dec.ids, [1, 2, 3, 4])
    for j, (k, t) in enumerate(zip(dec.ids, [1, 2, 3, 4])):
        seqs[k].append(t)
        np.testing.assert_allclose(out[j], _ref(tiny, seqs[k]), atol=ATOL, err_msg=k)
    dec.clear()
    assert dec.rows == 0 and dec.ids == []


@pytest.mark.parametrize("engine,quantize", [("numpy", None), ("onnx", None), ("onnx", "q8"), ("onnx", "q4"), ("tf", None)])
def test_a_parked_row_comes_back_exactly_as_it_was(tiny, tiny_quantizable, engine, quantize):
    """``park`` takes a row out of the steps with its cache set aside; ``unpark`` puts it back (in
    whatever slot is free then) and its logits are those of a row that never left -- bit for bit where
    the engine keeps caches (numpy, ONNX Runtime), as a prefill of the same tokens on TensorFlow."""
    rng = np.random.default_rng(1)
    seqs = {"a": list(rng.integers(0, 20573, 40)), "b": list(rng.integers(0, 20573, 9)),
            "c": list(rng.integers(0, 20573, 17))}
    m = tiny if quantize is None else tiny_quantizable
    stay, park = (model.decoder(m, engine, quantize=quantize) for _ in range(2))
    for dec in (stay, park):
        dec.add(list(seqs), list(seqs.values()))
        dec.step(list(seqs), [1, 2, 3])
    kept = park.park("a")
    assert park.ids == ["b", "c"] and "a" not in park and park.rows == 2
    assert kept.length == 41
    for dec in (stay, park):  # the others go on, one leaves and one joins: "a" comes back elsewhere
        dec.step(["b", "c"], [4, 5])
        dec.remove(["b"])
        dec.add(["d"], [[7, 7, 7]])
        dec.step(["c", "d"], [6, 8])
    park.unpark("a", kept)
    assert park.ids == ["c", "d", "a"] and park.length("a") == 41
    with pytest.raises(ValueError, match="new and distinct"):
        park.unpark("a", kept)
    out_stay = stay.step(["a", "c", "d"], [9, 10, 11])
    out_park = park.step(["a", "c", "d"], [9, 10, 11])
    if engine == "tf":
        np.testing.assert_allclose(out_park, out_stay, atol=ATOL)
    else:
        np.testing.assert_array_equal(out_park, out_stay)
    if quantize is None:  # (quantized weights: the same decoder that never parked is the reference)
        np.testing.assert_allclose(out_park[0], _ref(tiny, seqs["a"] + [1, 9]), atol=ATOL)
    assert park.parking == (engine != "tf")


@pytest.mark.parametrize("engine,quantize", [("numpy", None), ("onnx", None), ("onnx", "q8"), ("onnx", "q4"), ("tf", None)])
def test_a_row_prefilled_aside_is_the_row_add_makes(tiny, tiny_quantizable, engine, quantize):
    """``prefill_aside`` computes a new row on another thread while the table steps (ONNX Runtime: one
    session runs both calls); put in with ``unpark`` it is, bit for bit, the row ``add`` would have made.
    The other engines say they cannot."""
    import threading

    rng = np.random.default_rng(2)
    old = {k: list(rng.integers(0, 20573, n)) for k, n in (("a", 12), ("b", 30))}
    new = list(rng.integers(0, 20573, 200))
    m = tiny if quantize is None else tiny_quantizable
    inline, aside = (model.decoder(m, engine, quantize=quantize) for _ in range(2))
    for dec in (inline, aside):
        dec.add(list(old), list(old.values()))
    if not aside.aside:
        with pytest.raises(NotImplementedError, match="only in its table"):
            aside.prefill_aside(new)
        return
    first = inline.add(["c"], [new])[0]
    done = {}
    worker = threading.Thread(target=lambda: done.update(r=aside.prefill_aside(new)))
    worker.start()
    stepped = 0
    while worker.is_alive() or stepped < 3:  # the table steps meanwhile
        aside.step(["a", "b"], [stepped + 1, stepped + 2])
        inline.step(["a", "b"], [stepped + 1, stepped + 2])
        stepped += 1
    worker.join()
    kept, logits = done["r"]
    np.testing.assert_array_equal(logits, first)
    assert aside.ids == ["a", "b"] and kept.length == 200
    aside.unpark("c", kept)
    assert aside.ids == ["a", "b", "c"] and aside.lengths() == inline.lengths()
    tokens = [5, 6, 7]
    np.testing.assert_array_equal(aside.step(["a", "b", "c"], tokens), inline.step(["a", "b", "c"], tokens))
    with pytest.raises(ValueError, match="do not fit"):
        aside.prefill_aside([1] * 1025)


@pytest.mark.parametrize("engine", ENGINES)
def test_the_table_checks_every_call(tiny, engine):
    dec = model.decoder(tiny, engine)
    dec.add([1], [[1, 2, 3]])
    with pytest.raises(ValueError, match="new and distinct"):
        dec.add([1], [[4]])
    with pytest.raises(ValueError, match="new and distinct"):
        dec.add([2, 2], [[4], [5]])
    with pytest.raises(ValueError, match="at least one token"):
        dec.add([3], [[]])
    with pytest.raises(ValueError, match="token ids"):
        dec.add([3], [[20573]])
    with pytest.raises(ValueError, match="token ids"):
        dec.step([1], [-1])
    with pytest.raises(ValueError, match="do not fit"):
        dec.add([3], [[1] * 1025])
    with pytest.raises(KeyError, match="no sequence"):
        dec.step([7], [1])
    with pytest.raises(ValueError, match="tokens for"):
        dec.step([1], [1, 2])
    with pytest.raises(ValueError, match="one token per step"):
        dec.step([1, 1], [1, 2])
    with pytest.raises(ValueError, match="cannot cut"):
        dec.truncate(1, 4)
    assert dec.ids == [1] and dec.lengths() == [3]


@pytest.mark.parametrize("engine", ENGINES)
def test_the_end_of_the_context(small_ctx, engine):
    dec = model.decoder(small_ctx, engine)
    dec.add(["full", "short"], [[1] * 15, [2]])
    out = dec.step(["full", "short"], [3, 4])  # "full" now holds n_ctx tokens
    np.testing.assert_allclose(out[0], _ref(small_ctx, [1] * 15 + [3]), atol=ATOL)
    out = dec.step(["short"], [5])  # the full row waits
    np.testing.assert_allclose(out[0], _ref(small_ctx, [2, 4, 5]), atol=ATOL)
    with pytest.raises(ValueError, match="full"):
        dec.step(["full", "short"], [1, 1])


@pytest.mark.parametrize("engine", ENGINES[1:])
def test_generation_is_the_same_on_every_engine(small_ctx, enc, engine):
    """The scheduler over each engine, with min_length cuts, rows joining and leaving and sliding
    windows (a 16-token context): the samples of the numpy engine, whose logits each engine
    matches to 1e-4 above."""
    opts = GenerateOptions(top_k=5, max_length=60, seed=2, min_length=3)
    contexts = ["今日は", "江戸時代のインターネット回線は", "あ"]
    ref = [s.text for s in Generator(small_ctx, enc, engine="numpy").generate_many(contexts, 2, opts, batch_size=4)]
    got = [s.text for s in Generator(small_ctx, enc, engine=engine).generate_many(contexts, 2, opts, batch_size=4)]
    assert got == ref and all(len(t) > 16 for t in ref)  # every sample went past a window
