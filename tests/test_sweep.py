"""gpt2-sweep.py and tasks/sweep: metrics on hand-computed examples and against code this project did not
write (sacrebleu, mauve-text, numpy.polyfit, an independent re-implementation of Su & Collier's
definitions), properties on a briefly fine-tuned tiny model, the grid's errors, and an end-to-end sweep."""
import dataclasses
import json
import math
import re
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest

from conftest import GOLDEN_DIR, ROOT, TINY_DIR

from tasks.sweep import metrics as M
from tasks.sweep.grid import parse_axis, settings
from tasks.errors import OptionError
from tasks.generate import GenerateOptions

SWEEP = str(ROOT / "gpt2-sweep.py")


def _contexts():
    return [line for line in (GOLDEN_DIR / "contexts.txt").read_text(encoding="utf-8").splitlines() if line]


# -- metrics on hand-computed examples ------------------------------------------------------------


def test_rep_n_by_hand():
    # bigrams (1,2) (2,1) (1,2) (2,1): 2 unique of 4
    assert M.rep_n([1, 2, 1, 2, 1], 2) == 0.5
    assert M.rep_n([1, 2, 3, 4], 2) == 0.0
    assert M.rep_n([7] * 5, 3) == 1 - 1 / 3
    assert math.isnan(M.rep_n([1, 2], 3))  # no trigram
    # pooled: (1,1) (1,1) -> 1 unique of 2; (2,3) -> 1 of 1; together 1 - 2/3
    assert M.rep_n_pooled([[1, 1, 1], [2, 3]], 2) == pytest.approx(1 / 3)


def test_diversity_by_hand():
    assert M.diversity([[1, 2, 3, 4, 5, 6]]) == 1.0
    # ten equal tokens: 1 unique of 9 bigrams, of 8 trigrams, of 7 4-grams
    assert M.diversity([[7] * 10]) == pytest.approx((1 / 9) * (1 / 8) * (1 / 7))


def test_distinct_n_by_hand():
    # (1,2) (2,3) (1,2) (2,4): 3 unique of 4
    assert M.distinct_n([[1, 2, 3], [1, 2, 4]], 2) == 0.75
    assert M.distinct_n([[5], [5]], 1) == 0.5
    assert math.isnan(M.distinct_n([[1]], 2))


def test_loops_by_hand():
    assert M.loop_period([3, 4] + [9] * 8) == 1
    assert M.loop_period([5] + [1, 2, 3] * 3) == 3          # 9 tokens, 3 repeats of a 3-block
    assert M.loop_period([1, 2] * 3) == 0                   # 6 tokens: below 8
    assert M.loop_period([1, 2] * 4) == 2
    assert not M.ends_in_loop(list(range(40)))
    assert not M.ends_in_loop([9] * 8 + [1, 2, 3])           # the loop is not at the end


def test_zipf_by_hand():
    # counts exactly 60/r for ranks 1..6: log count = log 60 - log r, s = 1
    tokens = [t for r, n in enumerate([60, 30, 20, 15, 12, 10], 1) for t in [r] * n]
    assert M.zipf_coefficient([tokens]) == pytest.approx(1.0)
    assert math.isnan(M.zipf_coefficient([[4, 4, 4]]))


def test_cosine_and_bootstrap_by_hand():
    assert M.cosine(np.array([[1.0, 0.0], [1.0, 1.0]]), np.array([[0.0, 2.0], [2.0, 2.0]])) == pytest.approx([0, 1])
    assert M.bootstrap_ci([2.0, 2.0, 2.0]) == (2.0, 2.0, 2.0)
    est, low, high = M.bootstrap_ci([1.0, 2.0, 3.0, 4.0, float("nan")], resamples=500)
    assert est == 2.5 and 1.0 <= low < 2.5 < high <= 4.0
    assert M.bootstrap_ci([1.0, 2.0, 3.0], seed=3) == M.bootstrap_ci([1.0, 2.0, 3.0], seed=3)


def test_buckets():
    from tasks.sweep.run import bucket_names, bucket_of

    assert bucket_names((16, 64)) == ["1-15", "16-63", "64+"]
    assert [bucket_of(n, (16, 64)) for n in (1, 15, 16, 63, 64, 900)] == ["1-15", "1-15", "16-63", "16-63",
                                                                        "64+", "64+"]


# -- cross-checks against code this project did not write ------------------------------------------


def _simctg_style(texts, n):
    """Su & Collier's rep-n as their paper defines it, written independently here: each text is a
    whitespace-separated string of tokens; its n-grams are the strings of n consecutive tokens; the unique
    and total n-gram counts of all texts are summed, rep-n = 1 - unique/total (their code prints it x100;
    note that their released evaluation script stops its window one n-gram short of the end: the paper's
    definition, every n-gram, is the one used here and in tasks.sweep.metrics)."""
    unique = total = 0
    for text in texts:
        words = text.split()
        seen = set()
        count = 0
        for start in range(0, len(words) - n + 1):
            seen.add(" ".join(words[start:start + n]))
            count += 1
        unique += len(seen)
        total += count
    return 1 - unique / total


def test_rep_n_and_diversity_match_su_and_collier():
    rng = np.random.default_rng(0)
    for trial in range(20):
        samples = [list(rng.integers(0, 6, size=rng.integers(5, 40))) for _ in range(rng.integers(1, 5))]
        texts = [" ".join(str(t) for t in s) for s in samples]
        reps = {n: _simctg_style(texts, n) for n in (2, 3, 4)}
        for n in (2, 3, 4):
            assert M.rep_n_pooled(samples, n) == pytest.approx(reps[n], abs=1e-12)
        assert M.diversity(samples) == pytest.approx((1 - reps[2]) * (1 - reps[3]) * (1 - reps[4]), abs=1e-12)


def test_self_bleu_matches_sacrebleu():
    import sacrebleu

    texts = _contexts()[:5]
    expected = np.mean([sacrebleu.sentence_bleu(t, texts[:i] + texts[i + 1:], tokenize="char",
                                                use_effective_order=True).score for i, t in enumerate(texts)])
    assert M.self_bleu(texts) == pytest.approx(expected, abs=1e-9)
    assert M.self_bleu(["同じ文です。", "同じ文です。"]) == pytest.approx(100.0)
    assert 0 < M.self_bleu(texts) < 100
    assert math.isnan(M.self_bleu(["ひとつ"]))


def test_mauve_matches_mauve_text_and_known_answers():
    import mauve

    rng = np.random.default_rng(1)
    p = rng.normal(size=(60, 8)).astype(np.float32)
    q = rng.normal(size=(60, 8)).astype(np.float32) + 0.5
    quick = dict(kmeans_num_redo=2, kmeans_max_iter=100)
    direct = mauve.compute_mauve(p_features=p, q_features=q, seed=7, verbose=False, **quick).mauve
    between = M.mauve(p, q, seed=7, **quick)
    assert between == pytest.approx(direct, abs=1e-12)
    assert M.mauve(p, p, **quick) == pytest.approx(1.0, abs=1e-9)  # the same distribution
    apart = M.mauve(p, p + 20.0, **quick)                            # two sets far apart
    assert apart < 0.05 and apart < between < 1.0


def test_zipf_matches_a_least_squares_fit_on_a_zipfian_sample():
    rng = np.random.default_rng(0)
    ranks = np.arange(1, 201)
    p = ranks ** -1.0
    tokens = rng.choice(200, size=100_000, p=p / p.sum())
    counts = np.sort(np.array(list(Counter(tokens.tolist()).values())))[::-1]
    slope = np.polyfit(np.log(np.arange(1, len(counts) + 1)), np.log(counts), 1)[0]
    assert M.zipf_coefficient([tokens[:50_000], tokens[50_000:]]) == pytest.approx(-slope, abs=1e-9)
    assert M.zipf_coefficient([tokens]) == pytest.approx(1.0, abs=0.05)


# -- the grid ---------------------------------------------------------------------------------


def test_axes_take_the_types_of_generate_options():
    assert parse_axis("top_k=1,5,40").values == (1, 5, 40)
    assert parse_axis("temperature=0, 0.7,1").values == (0.0, 0.7, 1.0)
    assert parse_axis("max_tokens=none,8").values == (None, 8)
    axes = [parse_axis("top_k=1,40"), parse_axis("top_p=0.9")]
    base = GenerateOptions(seed=1, max_tokens=8)
    got = settings(axes, False, base)
    assert [s.label for s in got] == ["top_k=1", "top_k=40", "top_p=0.9"]
    assert got[0].options == dataclasses.replace(base, top_k=1) and got[0].options.seed == 1
    crossed = settings(axes, True, base)
    assert [s.label for s in crossed] == ["top_k=1 top_p=0.9", "top_k=40 top_p=0.9"]
    assert {s.family for s in crossed} == {"top_k×top_p"}


def test_every_field_of_generate_options_is_a_control():
    """New controls are sweepable with no change: the names come from GenerateOptions at run time."""
    for f in dataclasses.fields(GenerateOptions):
        if f.name == "seed":
            with pytest.raises(OptionError, match="same for every setting"):
                parse_axis(f"{f.name}=1")
            continue
        default = f.default
        text = "none" if default is None else ("a|b" if isinstance(default, tuple) else str(default))
        axis = parse_axis(f"{f.name}={text}")
        assert axis.name == f.name and len(axis.values) == 1


@pytest.mark.parametrize("spec, message", [
    ("top_k=abc", "top_k=abc: expected an integer"),
    ("temperature=hot", "expected a number"),
    ("top_q=1,2", "unknown control 'top_q'"),
    ("top_k=", "empty value"),
    ("top_k=1,,2", "empty value"),
    ("top_k", "expected NAME=V1,V2"),
])
def test_bad_axes(spec, message):
    with pytest.raises(OptionError, match=re.escape(message)) as e:
        parse_axis(spec)
    assert e.value.option == "grid"


def test_values_are_checked_by_generate_options():
    with pytest.raises(OptionError, match=re.escape("top_p=2.0: top_p must be between 0 and 1")):
        settings([parse_axis("top_p=0.5,2")], False, GenerateOptions())
    with pytest.raises(OptionError, match="more than one axis"):
        settings([parse_axis("top_k=1"), parse_axis("top_k=2")], False, GenerateOptions())


# -- properties on a model that has learned something -------------------------------------------------


@pytest.fixture(scope="session")
def trained_tiny(enc):
    """The tiny checkpoint fine-tuned for 80 steps (batches of 8 chunks of 64 tokens, Adam 5e-3) on the
    encoder goldens' texts, as bench/bench_quantize.py does; about 25 s on two idle cores."""
    import model
    from tasks.dataset import Chunks, Sampler
    from tasks.train import Trainer

    texts = [json.loads(line)["text"] for line in (GOLDEN_DIR / "encode.jsonl").open(encoding="utf-8")]
    arrays = [np.asarray(enc.encode(t) + [enc.eos_id], np.int32) for t in texts if t.strip()]
    m = model.load(TINY_DIR)
    chunks = Chunks.from_arrays(arrays, 64, enc.eos_id)
    trainer = Trainer(m, optim="adam", learning_rate=5e-3)
    sampler = Sampler(len(chunks), seed=0)
    losses = []
    for _ in range(80):
        ids, lengths = chunks.batch(sampler.next(8))
        losses.append(trainer.train_step(ids, lengths))
    assert np.mean(losses[-10:]) < np.mean(losses[:10]) - 2  # it learned something
    return m


@pytest.fixture(scope="session")
def property_rows(trained_tiny, enc):
    from tasks.sweep.run import Sweep, SweepConfig

    sweep = Sweep(trained_tiny, enc, _contexts(), SweepConfig(num=6, seed=1, max_tokens=48, resamples=100))
    base = dataclasses.replace(sweep.base, top_k=0)  # the whole distribution: temperature alone decides
    out = {}
    for s in settings([parse_axis("top_k=1"), parse_axis("temperature=0.5,1.0,2.0")], False, base):
        state = sweep.measure_setting(s)
        out[s.label] = sweep.rows(state, s.family)[0]
        out[s.label]["texts"] = [x["text"] for c in state["contexts"] for x in c["samples"]]
    return out


def test_greedy_repeats_most_and_is_least_diverse(property_rows):
    greedy = property_rows["top_k=1"]
    others = [r for k, r in property_rows.items() if k != "top_k=1"]
    for n in (2, 3, 4):
        assert all(greedy[f"rep{n}"] >= r[f"rep{n}"] for r in others), n
    assert greedy["rep2"] > max(r["rep2"] for r in others)
    assert all(greedy["diversity"] < r["diversity"] for r in others)
    assert all(greedy["self_bleu"] > r["self_bleu"] for r in others)  # every sample of a context is the same


def test_higher_temperature_raises_diversity_and_perplexity(property_rows):
    rows = [property_rows[f"temperature={t}"] for t in ("0.5", "1.0", "2.0")]
    for low, high in zip(rows, rows[1:]):
        assert high["diversity"] > low["diversity"]
        assert high["perplexity"] > low["perplexity"]
        assert high["distinct2"] > low["distinct2"]


def test_greedy_by_temperature_zero_and_by_top_k_one_are_the_same(trained_tiny, enc):
    from tasks.sweep.run import Sweep, SweepConfig

    sweep = Sweep(trained_tiny, enc, _contexts()[:4], SweepConfig(num=2, seed=3, max_tokens=24))
    by_k, by_t = settings([parse_axis("top_k=1"), parse_axis("temperature=0")], False, sweep.base)
    assert sweep.generate(by_k.options) == sweep.generate(by_t.options)


# -- the sweep end to end ------------------------------------------------------------------------------


def test_interrupted_sweep_keeps_finished_settings_and_resumes(tiny, enc, tmp_path):
    from tasks.sweep.run import Sweep, SweepConfig

    contexts = _contexts()[:3]
    sweep = Sweep(tiny, enc, contexts, SweepConfig(num=2, seed=1, max_tokens=8, resamples=50))
    chosen = settings([parse_axis("top_k=1,40")], False, sweep.base)
    per_setting = len(contexts) * 2
    made = []

    def interrupt_in_second(n):
        made.append(n)
        if sum(made) > per_setting:  # a sample of the second setting: Ctrl-C
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sweep.run(chosen, str(tmp_path), progress=interrupt_in_second)
    leftovers = [p.name for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text(encoding="utf-8").splitlines()]
    assert {r["setting"] for r in rows} == {"top_k=1"}  # the finished setting, whole
    assert len(list((tmp_path / "settings").glob("*.json"))) == 1

    with pytest.raises(OptionError, match="already holds a sweep"):
        sweep.run(chosen, str(tmp_path))
    made.clear()
    rows = sweep.run(chosen, str(tmp_path), resume=True, progress=made.append)
    assert sum(made) == per_setting  # only the second setting was generated
    assert {r["setting"] for r in rows} == {"top_k=1", "top_k=40"}
    other = Sweep(tiny, enc, contexts[:2], SweepConfig(num=2, seed=1, max_tokens=8))
    with pytest.raises(OptionError, match="other contexts"):
        other.run(chosen, str(tmp_path), resume=True)


def _sweep_cli(args, env, timeout=300):
    return subprocess.run([sys.executable, SWEEP, *args], capture_output=True, env=env, cwd=ROOT, timeout=timeout)


def test_two_setting_sweep_end_to_end(env, tmp_path):
    import matplotlib.image

    contexts = tmp_path / "contexts.txt"
    contexts.write_text("\n".join(_contexts()[:4]) + "\n", encoding="utf-8")
    reference = tmp_path / "human.txt"
    reference.write_text("\n".join(_contexts()[4:]) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    args = ["--model", str(TINY_DIR), "--contexts", str(contexts), "--reference", str(reference),
            "--grid", "top_k=1,40", "--num_generate", "2", "--max_tokens", "12", "--output", str(out),
            "--resamples", "50", "--buckets", "12", "--judge", str(TINY_DIR)]
    p = _sweep_cli(args, env)
    assert p.returncode == 0, p.stderr.decode()
    assert p.stdout == b""  # results go to files, logs to stderr
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text(encoding="utf-8").splitlines()]
    assert {(r["setting"], r["bucket"]) for r in rows} >= {("top_k=1", "all"), ("top_k=40", "all"),
                                                            ("reference", "all")}
    greedy = next(r for r in rows if r["setting"] == "top_k=1" and r["bucket"] == "all")
    assert greedy["contexts"] == 4 and greedy["samples"] == 8 and greedy["self_bleu"] == pytest.approx(100.0)
    assert greedy["mauve"] is not None and greedy["rep2_low"] <= greedy["rep2"] <= greedy["rep2_high"]
    ref = next(r for r in rows if r["setting"] == "reference")
    assert ref["rep2"] is not None and ref["zipf"] is not None and ref["pmi"] is None
    header = (out / "results.csv").read_text(encoding="utf-8").splitlines()[0].split(",")
    assert header[:5] == ["setting", "family", "top_k", "bucket", "contexts"] and "mauve_high" in header
    pngs = sorted((out / "plots").glob("*.png"))
    assert {p.stem for p in pngs} >= {"axis-top_k", "plane"}
    for png in pngs:
        assert matplotlib.image.imread(png).ndim == 3
        assert png.with_suffix(".svg").read_text(encoding="utf-8").lstrip().startswith("<?xml")
    report = (out / "report.html").read_text(encoding="utf-8")
    links = re.findall(r'(?:src|href)="([^"]+)"', report)
    assert "plots/plane.png" in links and "results.csv" in links
    for link in links:
        assert (out / link).is_file(), link
    assert "Closest to the reference" in report

    settings_files = {f.name: f.read_bytes() for f in (out / "settings").glob("*.json")}
    again = _sweep_cli(args, env)
    assert again.returncode == 2 and b"--resume" in again.stderr
    resumed = _sweep_cli(args + ["--resume"], env)
    assert resumed.returncode == 0, resumed.stderr.decode()
    assert b"2 of 2 settings already finished, skipped" in resumed.stderr
    assert {f.name: f.read_bytes() for f in (out / "settings").glob("*.json")} == settings_files


@pytest.mark.parametrize("extra, message", [
    (["--grid", "top_k=abc"], "--grid top_k=abc: expected an integer"),
    (["--grid", "top_q=1"], "unknown control 'top_q'"),
    (["--grid", "top_k="], "empty value"),
    (["--grid", "top_k=1", "--reference", "/nonexistent/human.txt"], "cannot read /nonexistent/human.txt"),
])
def test_user_errors_are_one_line(env, tmp_path, extra, message):
    contexts = tmp_path / "contexts.txt"
    contexts.write_text("今日は\n", encoding="utf-8")
    p = _sweep_cli(["--model", str(TINY_DIR), "--contexts", str(contexts), "--output", str(tmp_path / "o"),
                    *extra], env, timeout=120)
    lines = p.stderr.decode().strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1, p.stderr.decode()
    assert lines[0].startswith("gpt2-sweep.py: error: ") and message in lines[0]
    assert not (tmp_path / "o").exists()


def test_fixed_controls_apply_to_every_setting():
    from tasks.sweep.grid import with_fixed

    base = with_fixed(GenerateOptions(seed=1), ["min_length=4", "top_k=20"])
    assert base.min_length == 4 and base.top_k == 20
    got = settings([parse_axis("temperature=0.5,1")], False, base)
    assert all(s.options.min_length == 4 and s.options.top_k == 20 for s in got)
    with pytest.raises(OptionError, match="give one value"):
        with_fixed(GenerateOptions(), ["top_k=1,2"])
    with pytest.raises(OptionError, match="top_p must be between") as e:
        with_fixed(GenerateOptions(), ["top_p=3"])
    assert e.value.option == "set"


def test_sweep_flags_take_both_spellings():
    import cli.sweep

    parser = cli.sweep.parser()
    for action in parser._actions:
        longs = [s for s in action.option_strings if s.startswith("--") and s != "--help"]
        for s in longs:
            body = s[2:]
            assert "--" + body.replace("_", "-") in longs and "--" + body.replace("-", "_") in longs, s
    a = parser.parse_args(["--contexts", "c.txt", "--output", "o", "--grid", "top_k=1", "--grid", "top_p=0.9",
                           "--num-generate", "3", "--max-tokens", "16", "--set", "min_length=2", "--cross"])
    assert (a.num_generate, a.max_tokens, a.grid, a.fixed, a.cross) == (3, 16, ["top_k=1", "top_p=0.9"],
                                                                         ["min_length=2"], True)


# -- the metrics' cost: numbers taken from generation, one plan of forward passes -----------------------


def _read_after_eos(m, eos, ids, pooling="mean"):
    """A text's sentence vector as the sweep defines it, from the model's hidden states one text at a time:
    the final hidden states of its tokens read after <|endoftext|> (the <|endoftext|> position left out)."""
    hidden = m.hidden([[eos] + list(ids)], layer=-1)[0, 1:]
    return hidden.mean(axis=0) if pooling == "mean" else hidden[-1]


def _hand_metrics(m, enc, context_ids, ids, relation=None):
    """perplexity (every sample), pmi and cosine (the first ``relation`` samples that hold a token; None:
    all) of one context's samples (token id lists) by their definitions, with tasks.score and the model's
    hidden states one sequence at a time."""
    from tasks.score import score_sequences

    ctx_vector = _read_after_eos(m, enc.eos_id, context_ids)
    lps, pmis, coss = [], [], []
    for x in ids:
        if not x:
            continue
        (_, given), = score_sequences(m, [context_ids + x])
        lp = float(given[len(context_ids) - 1:].sum())
        lps.append((lp, len(x)))
        if relation is None or len(pmis) < relation:
            (_, alone), = score_sequences(m, [[enc.eos_id] + x])
            pmis.append((lp - float(alone.sum())) / len(x))
            coss.append(float(M.cosine(_read_after_eos(m, enc.eos_id, x)[None], ctx_vector[None])[0]))
    return {"perplexity": math.exp(-sum(lp for lp, _ in lps) / sum(n for _, n in lps)),
            "pmi": float(np.mean(pmis)), "cosine": float(np.mean(coss))}


def test_generate_many_details_gives_the_drawn_tokens_and_their_log_probability(tiny, enc):
    from tasks.generate import Generator
    from tasks.score import score_sequences

    gen = Generator(tiny, enc)
    contexts = _contexts()[:3]
    options = GenerateOptions(top_k=40, seed=1, max_tokens=12)
    plain = list(gen.generate_many(contexts, 2, options))
    detailed = list(gen.generate_many(contexts, 2, options, details=True))
    assert [s.text for s in detailed] == [s.text for s in plain]  # the same samples
    assert all(s.tokens == () and s.logprob is None for s in plain)  # nothing new without details
    assert any(s.tokens for s in detailed)
    for s in detailed:
        assert 0 < len(s.tokens) <= 12 and enc.decode(s.tokens) == s.text
        ctx = gen.context_ids(s.context)
        (_, lp), = score_sequences(tiny, [ctx + list(s.tokens)])
        assert s.logprob == pytest.approx(float(lp[len(ctx) - 1:].sum()), rel=1e-4, abs=1e-3)


@pytest.mark.parametrize("relation", [None, 1, 2])
def test_sweep_metrics_from_generation_match_their_definitions(tiny, enc, relation):
    from tasks.sweep.run import Sweep, SweepConfig

    sweep = Sweep(tiny, enc, _contexts()[:4], SweepConfig(num=3, seed=2, max_tokens=16, relation_samples=relation))
    setting = settings([parse_axis("top_k=40")], False, sweep.base)[0]
    samples = sweep.generate_samples(setting.options)
    drawn = sweep.drawn(samples, setting.options)
    assert all(d is not None for group in drawn for d in group)  # nothing cut, no min_length: all usable
    texts = [[s.text for s in group] for group in samples]
    for state in (sweep.measure(texts, drawn), sweep.measure(texts)):  # from generation; re-encoded and scored
        for c, item in enumerate(state["contexts"]):
            ids = [x["ids"] for x in item["samples"]]
            expected = _hand_metrics(tiny, enc, sweep.context_ids[c], ids, relation)
            for k, v in expected.items():
                assert item["values"][k] == pytest.approx(v, rel=1e-4), (c, k)
    first = sweep.measure(texts, drawn)["contexts"]
    assert [[x["ids"] for x in item["samples"]] for item in first] == \
        [[list(s.tokens) for s in group] for group in samples]  # the tokens drawn


def test_generation_numbers_are_used_only_where_they_are_the_definitions(tiny, enc):
    from tasks.generate import Sample
    from tasks.sweep.run import Sweep, SweepConfig

    contexts = _contexts()[:1]
    sweep = Sweep(tiny, enc, contexts, SweepConfig(num=1, seed=1, max_tokens=16))
    tokens = tuple(enc.encode("今日は良い天気です。"))
    whole = Sample(0, contexts[0], 0, enc.decode(tokens), tokens, -12.5)
    cut = Sample(0, contexts[0], 0, enc.decode(tokens)[:3], tokens, -12.5)  # max_length or a stop string
    assert sweep.drawn([[whole, cut]], sweep.base) == [[(list(tokens), -12.5), None]]
    rewound = dataclasses.replace(sweep.base, min_length=2)  # the original's rewind hides tokens
    assert sweep.drawn([[whole]], rewound) == [[None]]
    judged = Sweep(tiny, enc, contexts, SweepConfig(num=1, seed=1, max_tokens=16), judge=object())
    assert judged.drawn([[whole]], judged.base) == [[None]]  # another judge scores for itself


def test_forward_rows_match_score_ids_and_the_vectorizer(tiny, enc):
    from tasks.score import score_ids
    from tasks.sweep.passes import forward_rows
    from tasks.vectors import Vectorizer

    rows = [enc.encode(t) for t in _contexts()[:5]] + [[enc.eos_id]]
    score_rows = [([enc.eos_id] + x, 1) for x in rows[:4]] + [(rows[4], 2)]
    for pooling in ("mean", "last"):
        scores, vectors = forward_rows(tiny, score_rows, rows, pooling=pooling, max_tokens=32)
        assert vectors.shape == (len(score_rows) + len(rows), tiny.hparams.n_embd)
        for (ids, first), lp, vector in zip(score_rows, scores, vectors):
            expected = score_ids(tiny, [ids], first=[first])[0][first - 1:]
            np.testing.assert_allclose(lp, expected, rtol=1e-4, atol=1e-5)
            hidden = tiny.hidden([ids], layer=-1)[0, first:]  # pooled over the positions it scores
            np.testing.assert_allclose(vector, hidden.mean(axis=0) if pooling == "mean" else hidden[-1],
                                       rtol=1e-4, atol=1e-5)
        expected = Vectorizer(tiny, enc, pooling=pooling).vectors_of_ids(rows)
        np.testing.assert_allclose(vectors[len(score_rows):], expected, rtol=1e-4, atol=1e-5)
        after = [[enc.eos_id] + x for x in rows]  # read after <|endoftext|>: pooled from position 1
        _, read = forward_rows(tiny, (), after, pooling=pooling, vector_from=[1] * len(after))
        for ids, vector in zip(after, read):
            np.testing.assert_allclose(vector, _read_after_eos(tiny, enc.eos_id, ids[1:], pooling),
                                       rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError):
        forward_rows(tiny, (), [[1, 2]], vector_from=[2])  # pools nothing


def test_zipf_bootstrap_is_bootstrap_items_of_zipf_coefficient():
    rng = np.random.default_rng(7)
    for seed in range(6):
        items = [[list(rng.zipf(1.4, int(rng.integers(0, 60))) % 500) for _ in range(int(rng.integers(1, 4)))]
                 for _ in range(int(rng.integers(1, 10)))]
        slow = M.bootstrap_items(items, lambda t: M.zipf_coefficient(x for g in t for x in g), resamples=60,
                                 seed=seed)
        assert np.array_equal(M.zipf_bootstrap(items, resamples=60, seed=seed), slow, equal_nan=True)
