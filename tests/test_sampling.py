"""The sampler chain's controls (tasks.sampling): each on small hand-computed logits, the chain's
order, neutral values giving today's outputs, loops broken on the tiny model, the flags of
gpt2-generate.py and gpt2-bulk.py generate, and their errors."""
import json
import math
import subprocess
import sys
from collections import Counter
from dataclasses import fields

import numpy as np
import pytest

from cli import generate as cli_generate
from cli.errors import UsageError, message as error_line
from tasks.errors import OptionError
from tasks.generate import GenerateOptions, Generator
from tasks.sampling import (MASKED, Rows, SamplingParams, apply_dry, apply_logit_bias, apply_ban, apply_min_p,
                            apply_no_repeat_ngram, apply_presence_frequency, apply_repetition_penalty,
                            apply_temperature, apply_top_k, apply_top_p, apply_typical, apply_xtc, breaker_ids,
                            chain, choose)
from tasks.scheduler import Job, SampleRequest, Scheduler

from conftest import ROOT


def _rows(logits, history=((),), steps=(0,), rngs=None, eos=-1, enc=None):
    logits = np.atleast_2d(np.asarray(logits, np.float32))
    rngs = rngs or [np.random.default_rng(0) for _ in range(len(logits))]
    return Rows(logits, [list(h) for h in history], list(steps), rngs, eos, enc=enc)


def _kept(rows, b=0):
    return (rows.logits[b] > MASKED).tolist()


class _Vocab:
    """An encoder of six tokens: 'a'..'e' and a line break (id 5)."""

    eos_id = 4

    def __len__(self):
        return 6

    def decode(self, ids):
        return "".join("abcde\n"[i] for i in ids)


# -- each control on hand-computed logits --------------------------------------------------------


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_once_per_token():
    # token 0 is in the context and was drawn again (history [0, 1, 0], the last one drawn)
    rows = _rows([2.0, -1.0, 0.5, 3.0, 0.0], history=[[0, 1, 0, 4]], steps=[2])
    apply_repetition_penalty(rows, SamplingParams(repetition_penalty=2.0))
    assert rows.logits[0].tolist() == [1.0, -2.0, 0.5, 3.0, 0.0]  # 0: 2/2 (once, not twice); 4: 0 stays 0


def test_repetition_penalty_below_one_favours_seen_tokens_and_respects_the_window():
    rows = _rows([2.0, -1.0, 0.5], history=[[0, 1, 2]])
    apply_repetition_penalty(rows, SamplingParams(repetition_penalty=0.5, penalty_last_n=2))
    assert rows.logits[0].tolist() == [2.0, -0.5, 1.0]  # token 0 is outside the last 2 tokens


def test_presence_and_frequency_count_the_drawn_tokens():
    # context [2, 2, 3], drawn [3, 4, 4]: counts 3 -> 1, 4 -> 2; token 2 only in the context
    rows = _rows(np.zeros(5), history=[[2, 2, 3, 3, 4, 4]], steps=[3])
    apply_presence_frequency(rows, SamplingParams(presence_penalty=0.5, frequency_penalty=0.25))
    assert rows.logits[0].tolist() == [0.0, 0.0, 0.0, -0.75, -1.0]
    rows = _rows(np.zeros(5), history=[[2, 2, 3, 3, 4, 4]], steps=[3])
    apply_presence_frequency(rows, SamplingParams(presence_penalty=0.5, frequency_penalty=0.25, penalty_last_n=2))
    assert rows.logits[0].tolist() == [0.0, 0.0, 0.0, 0.0, -1.0]  # only the last two tokens
    rows = _rows(np.zeros(5), history=[[2, 2, 3]], steps=[0])
    apply_presence_frequency(rows, SamplingParams(presence_penalty=-1.0))  # nothing drawn yet
    assert rows.logits[0].tolist() == [0.0] * 5


def test_no_repeat_ngram_bans_the_token_completing_a_seen_ngram():
    history = [[1, 2, 3, 1, 2]]
    for n, banned in ((3, {3}), (2, {3}), (1, {1, 2, 3}), (4, set()), (6, set())):
        rows = _rows(np.zeros(5), history=history)
        apply_no_repeat_ngram(rows, SamplingParams(no_repeat_ngram_size=n))
        assert set(np.flatnonzero(np.isneginf(rows.logits[0])).tolist()) == banned, n


def test_dry_penalises_the_token_that_extends_a_repetition():
    # ... a b c d ... a b c: d would repeat "a b c d" (a match of 3 >= allowed 2)
    params = SamplingParams(dry_multiplier=1.0, dry_base=2.0, dry_allowed_length=2, dry_sequence_breakers=())
    rows = _rows(np.zeros(6), history=[[5, 0, 1, 2, 3, 4, 0, 1, 2]])
    apply_dry(rows, params)
    assert rows.logits[0].tolist() == [0, 0, 0, -2.0, 0, 0]  # 1 * 2 ** (3 - 2)
    # ties between two earlier places: the longest match counts
    rows = _rows(np.zeros(6), history=[[1, 2, 3, 0, 1, 2, 4, 0, 1, 2]])
    apply_dry(rows, params)
    assert rows.logits[0].tolist() == [0, 0, 0, -1.0, -2.0, 0]  # "1 2" -> 3 (length 2), "0 1 2" -> 4 (3)
    # a match shorter than allowed_length is not penalised
    rows = _rows(np.zeros(6), history=[[0, 3, 1, 0]])
    apply_dry(rows, params)
    assert rows.logits[0].tolist() == [0.0] * 6


def test_dry_repetitions_stop_at_a_sequence_breaker():
    vocab = _Vocab()
    assert breaker_ids(vocab, ("\n",)).tolist() == [5]
    assert breaker_ids(vocab, ("\n", "b")).tolist() == [1, 5]
    params = SamplingParams(dry_multiplier=1.0, dry_base=2.0, dry_allowed_length=2, dry_sequence_breakers=("\n",))
    # 0 1 2 3 ... 0 1 \n 1 2: the match "1 2" may not reach back over the line break
    rows = _rows(np.zeros(6), history=[[0, 1, 2, 3, 0, 5, 1, 2]], enc=vocab)
    apply_dry(rows, params)
    assert rows.logits[0].tolist() == [0, 0, 0, -1.0, 0, 0]  # length 2 only (not 3 through "0")
    rows = _rows(np.zeros(6), history=[[0, 1, 2, 3, 0, 1, 2, 5]], enc=vocab)  # ends with a breaker
    apply_dry(rows, params)
    assert rows.logits[0].tolist() == [0.0] * 6
    with pytest.raises(ValueError, match="need the encoder"):
        apply_dry(_rows(np.zeros(6), history=[[0, 1, 0, 1]]), params)


def test_dry_breakers_of_the_real_vocabulary(enc):
    ids = breaker_ids(enc, SamplingParams().dry_sequence_breakers)
    assert set(enc.encode("\n:*")) <= set(ids.tolist())
    assert enc.encode("本社")[0] not in set(ids.tolist())


def test_dry_penalty_is_capped_and_window_applies():
    params = SamplingParams(dry_multiplier=1.0, dry_base=1000.0, dry_allowed_length=1, dry_sequence_breakers=())
    rows = _rows(np.zeros(3), history=[[0, 1] * 40])
    apply_dry(rows, params)
    assert np.isfinite(rows.logits).all() and rows.logits[0, 0] <= -1e29
    rows = _rows(np.zeros(3), history=[[0, 1, 2, 0, 1]])
    apply_dry(rows, SamplingParams(dry_multiplier=1.0, dry_base=2.0, dry_allowed_length=1,
                                   dry_sequence_breakers=(), dry_penalty_last_n=3))
    assert rows.logits[0].tolist() == [0.0] * 3  # in the last 3 tokens (2 0 1), 1 occurs once


def test_min_p_keeps_tokens_relative_to_the_most_likely_ties_included():
    logits = np.log([0.5, 0.3, 0.15, 0.05])
    for min_p, kept in ((0.5, [True, True, False, False]), (0.31, [True, True, False, False]),
                        (0.29, [True, True, True, False]), (1.0, [True, False, False, False])):
        rows = _rows(logits)
        apply_min_p(rows, SamplingParams(min_p=min_p))
        assert _kept(rows) == kept, min_p
    rows = _rows([1.0, 1.0, 0.0])
    apply_min_p(rows, SamplingParams(min_p=1.0))
    assert _kept(rows) == [True, True, False]


def test_typical_p_keeps_the_tokens_closest_to_the_entropy():
    # p = .4 .3 .2 .1: H = 1.2799 nats; |-log p - H| = .364 .076 .330 1.023 -> order 1, 2, 0, 3
    logits = np.log([0.4, 0.3, 0.2, 0.1])
    for mass, kept in ((0.25, [False, True, False, False]), (0.45, [False, True, True, False]),
                       (0.85, [True, True, True, False]), (0.95, [True, True, True, True])):
        rows = _rows(logits)
        apply_typical(rows, SamplingParams(typical_p=mass))
        assert _kept(rows) == kept, mass


def test_typical_p_over_a_large_vocabulary_equals_the_full_ranking():
    """Peaked rows are ranked over their 512 best tokens only, flat ones over all: same sets."""
    from tasks.sampling import _typical_drop

    rng = np.random.default_rng(0)
    for trial in range(40):
        v = rng.normal(0, (0.2, 1.0, 4.0, 8.0)[trial % 4], 3000)
        if trial % 3 == 0:
            v = np.round(v, 1)  # ties
        mass = rng.uniform(0.05, 0.99)
        logp = v - v.max() - np.log(np.exp(v - v.max()).sum())
        score = np.abs(-logp + (np.exp(logp) * logp).sum())
        order = np.argsort(score, kind="stable")
        last = min(int((np.cumsum(np.exp(logp)[order]) < mass).sum()), v.size - 1)
        assert (_typical_drop(v, mass) == (score > score[order[last]])).all(), trial


def test_xtc_removes_the_top_choices_but_the_least_likely_of_them():
    logits = np.log([0.4, 0.3, 0.2, 0.1])
    rows = _rows(logits)
    apply_xtc(rows, SamplingParams(xtc_probability=1.0, xtc_threshold=0.25))
    assert _kept(rows) == [False, True, True, True]
    rows = _rows(logits)
    apply_xtc(rows, SamplingParams(xtc_probability=1.0, xtc_threshold=0.35))  # one token above: nothing
    assert _kept(rows) == [True] * 4


def test_xtc_draws_from_the_rows_stream_only_when_enabled():
    def drawn(params, seed=5, n=20):
        rng = np.random.default_rng(seed)
        out = [choose(np.log([0.4, 0.3, 0.2, 0.1]), params, rng) for _ in range(n)]
        return out, rng.random()

    plain, after_plain = drawn(SamplingParams(top_k=0))
    off, after_off = drawn(SamplingParams(top_k=0, xtc_threshold=0.3))  # probability 0: off
    assert (off, after_off) == (plain, after_plain)
    on, after_on = drawn(SamplingParams(top_k=0, xtc_probability=0.5, xtc_threshold=0.25))
    assert after_on != after_plain
    assert chain(SamplingParams(xtc_probability=1.0, xtc_threshold=0.6)) == chain(SamplingParams())


def test_logit_bias_and_ban():
    rows = _rows([[0.0, 1.0, 2.0], [1.0, 1.0, 1.0]], history=[[], []], steps=[0, 0])
    apply_logit_bias(rows, SamplingParams(logit_bias={0: 2.5, 2: -1.0}))
    assert rows.logits.tolist() == [[2.5, 1.0, 1.0], [3.5, 1.0, 0.0]]
    apply_ban(rows, SamplingParams(ban=(0,)))
    assert np.isneginf(rows.logits[:, 0]).all()
    rng = np.random.default_rng(0)
    for params in (SamplingParams(ban=(2,)), SamplingParams(ban=(2,), temperature=0),
                   SamplingParams(ban=(2,), top_k=1), SamplingParams(logit_bias={2: -1e9})):
        assert {choose([0.0, 1.0, 9.0], params, rng) for _ in range(30)} <= {0, 1}
    assert choose([0.0, 1.0, 2.0], SamplingParams(logit_bias={0: 5.0}, temperature=0), rng) == 0


def test_an_all_masked_row_draws_uniformly_but_never_a_banned_token():
    # top_k 1 keeps <|endoftext|> (id 0) alone, min_length removes it: nothing left in play
    rng = np.random.default_rng(3)
    params = SamplingParams(top_k=1, ban=(1,), min_p=0.5, typical_p=0.5)
    drawn = {choose([9.0, 0.0, 0.0, 0.0], params, rng, forbid=0) for _ in range(60)}
    assert drawn == {2, 3}


def test_temperature_keeps_banned_tokens_banned_and_sampling():
    rows = _rows([1.0, 2.0, 3.0])
    apply_ban(rows, SamplingParams(ban=(0,)))
    apply_temperature(rows, SamplingParams(temperature=0.5))
    assert not rows.greedy[0] and rows.logits[0].tolist() == [-np.inf, 4.0, 6.0]
    rows = _rows([1.0, 2.0, 3.0])
    apply_temperature(rows, SamplingParams(temperature=1e-40))  # overflow: greedy, as before
    assert rows.greedy[0]


def test_top_k_and_top_p_together():
    logits = np.log([0.4, 0.3, 0.2, 0.1])
    assert SamplingParams().effective_top_k == 40
    assert SamplingParams(top_p=0.9).effective_top_k == 0  # the original's rule: top_p replaces it
    assert SamplingParams(top_k=2, top_p=0.9).effective_top_k == 2
    rows = _rows(logits)
    for link in chain(SamplingParams(top_k=3, top_p=0.5)):
        link(rows, SamplingParams(top_k=3, top_p=0.5))
    # top_k 3 keeps .4 .3 .2; renormalised .444 .333 .222: exclusive sums 0, .444, .778 -> two
    assert _kept(rows) == [True, True, False, False]
    rows = _rows(logits)
    apply_top_k(rows, SamplingParams(top_k=2))
    apply_top_p(rows, SamplingParams(top_p=1.0))
    assert _kept(rows) == [True, True, False, False]


def test_the_chain_order():
    names = [f.__name__ for f in chain(SamplingParams(
        top_k=40, top_p=0.9, temperature=0.7, min_length=3, repetition_penalty=1.1, presence_penalty=0.1,
        frequency_penalty=0.1, no_repeat_ngram_size=3, min_p=0.05, typical_p=0.9, dry_multiplier=0.8,
        xtc_probability=0.5, logit_bias={1: 1.0}, ban=(2,)))]
    assert names == ["apply_logit_bias", "apply_ban", "apply_repetition_penalty", "apply_presence_frequency",
                     "apply_no_repeat_ngram", "apply_dry", "apply_temperature", "apply_top_k", "apply_typical",
                     "apply_top_p", "apply_min_p", "apply_xtc", "apply_min_length"]
    # neutral values: the original's chain
    assert [f.__name__ for f in chain(SamplingParams())] == ["apply_temperature", "apply_top_k"]
    assert [f.__name__ for f in chain(SamplingParams(top_p=0.5, min_length=2))] == \
        ["apply_temperature", "apply_top_p", "apply_min_length"]
    # penalty_last_n 0 and dry_penalty_last_n 0 turn them off
    assert chain(SamplingParams(repetition_penalty=1.3, presence_penalty=1, penalty_last_n=0, dry_multiplier=1,
                                dry_penalty_last_n=0)) == chain(SamplingParams())


def test_rows_with_different_histories_in_one_group():
    rows = _rows([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]], history=[[0], [2, 2]], steps=[1, 2])
    apply_repetition_penalty(rows, SamplingParams(repetition_penalty=2.0))
    apply_presence_frequency(rows, SamplingParams(frequency_penalty=0.25))
    assert rows.logits.tolist() == [[0.25, 1.0, 1.0], [1.0, 1.0, 0.0]]


@pytest.mark.parametrize("field,value,words", [
    ("repetition_penalty", 0.0, "must be a positive number"),
    ("repetition_penalty", -1.2, "must be a positive number"),
    ("presence_penalty", math.nan, "between"),
    ("penalty_last_n", -2, "at least -1"),
    ("no_repeat_ngram_size", -1, "must not be negative"),
    ("min_p", 1.5, "between 0 and 1"),
    ("min_p", -0.1, "between 0 and 1"),
    ("typical_p", 0.0, "above 0"),
    ("dry_multiplier", -0.5, "must not be negative"),
    ("dry_base", 0.9, "at least 1"),
    ("dry_allowed_length", 0, "at least 1"),
    ("dry_sequence_breakers", "\n", "non-empty strings"),
    ("xtc_probability", 2.0, "between 0 and 1"),
    ("xtc_threshold", -0.1, "between 0 and 1"),
    ("logit_bias", {-1: 1.0}, "token ids"),
    ("logit_bias", {"x": 1.0}, "token ids"),
    ("logit_bias", {1: math.inf}, "biases must be numbers"),
    ("ban", (-3,), "token ids"),
    ("top_k", -1, "must not be negative"),
])
def test_bad_values_are_option_errors(field, value, words):
    with pytest.raises(OptionError) as e:
        SamplingParams(**{field: value})
    assert e.value.option == field and words in e.value.reason
    with pytest.raises(OptionError):
        GenerateOptions(**{field: value})


def test_unknown_token_ids_are_refused_against_the_model(tiny, enc):
    gen = Generator(tiny, enc)
    with pytest.raises(OptionError, match=r"logit_bias names token id 99999, which is not in the vocabulary"):
        gen.generate("今日は", 1, GenerateOptions(logit_bias={99999: 1.0}, max_length=5))
    with pytest.raises(OptionError, match=r"^ban names token id"):
        gen.generate("今日は", 1, GenerateOptions(ban=(tiny.hparams.n_vocab,), max_length=5))


def test_generate_options_carry_every_sampling_field():
    names = {f.name for f in fields(SamplingParams)}
    assert names <= {f.name for f in fields(GenerateOptions)}
    o = GenerateOptions(logit_bias={"7": 1, 3: -2}, ban=[5, 5, 1], dry_sequence_breakers=["。"])
    assert o.logit_bias == ((3, -2.0), (7, 1.0)) and o.ban == (1, 5) and o.dry_sequence_breakers == ("。",)
    hash(o)
    assert o.sampling() == SamplingParams(logit_bias=[(3, -2.0), (7, 1.0)], ban=(1, 5),
                                          dry_sequence_breakers=("。",))


# -- neutral values: today's outputs ---------------------------------------------------------------

# Recorded from main (eec7746) before the new controls: Generator(tiny, enc, engine="numpy"),
# generate("今日は良い天気", 2, GenerateOptions(max_length=24, seed=11, **settings)).
SEEDED_BEFORE = [
    [{}, ["エイ健在号泣第一本社吹本社予防冠爬壁紙有権常設行", "心境さと涇犠本社粉々御礼椴本社工賃樹立へへ番手聳"]],
    [{"top_k": 0, "top_p": 0.9}, ["アキ上層号泣理解本社奔本社加藤鼓工賃落語小春気量", "エヴ勘違捲府本社志向奈緒辭工夫涇見逃木材しけ態系"]],
    [{"temperature": 0.7, "top_k": 10}, ["っかズキ送時精霊本社愉本社精霊冠詳ぶる短期動禊悲", "しむーパ乳酸ちみ本社ョウろつ沿本社本社ヤカへへ動"]],
    [{"min_length": 3, "top_k": 0}, ["アキ人共文脈特別宝石崙検査本社常発案異動せつ終消", "エヴ勘違靡以刑務ハハ鉱物竿エウ嶼日比講義明後莉子"]],
    [{"temperature": 0}, ["エイ勘違勇者円筒本社愉ろつ仕打ズニ爬煎代金動動定", "エイ勘違勇者円筒本社愉ろつ仕打ズニ爬煎代金動動定"]],
]


def test_neutral_controls_give_the_outputs_of_before(tiny, enc):
    gen = Generator(tiny, enc, engine="numpy")
    neutral = dict(repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0, penalty_last_n=64,
                   no_repeat_ngram_size=0, min_p=0.0, typical_p=1.0, dry_multiplier=0.0, xtc_probability=0.0)
    for settings, texts in SEEDED_BEFORE:
        assert gen.generate("今日は良い天気", 2, GenerateOptions(max_length=24, seed=11, **settings)) == texts
    settings, texts = SEEDED_BEFORE[0]
    assert gen.generate("今日は良い天気", 2, GenerateOptions(max_length=24, seed=11, **neutral)) == texts
    # top_p with top_k left out: the default top_k 40 is not applied (as before)
    assert gen.generate("今日は良い天気", 2, GenerateOptions(max_length=24, seed=11, top_p=0.9)) == SEEDED_BEFORE[1][1]


# -- loops on the tiny model -------------------------------------------------------------------------


def _repeated_ngrams(tokens, n=3):
    counts = Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))
    return sum(c - 1 for c in counts.values())


def test_penalties_reduce_the_repetitions_of_greedy_decoding(tiny, enc):
    """Greedy decoding of the tiny model after this context loops ("本社本社本社...")."""
    gen = Generator(tiny, enc, engine="numpy")
    ids = gen.context_ids("吾輩は猫である。")

    def greedy(**controls):
        sch = Scheduler(gen.engine(1), enc, 1)
        job = Job(SampleRequest(ids, SamplingParams(temperature=0, **controls), max_tokens=300))
        sch.admit([job])
        while sch.busy:
            sch.step()
        assert len(job.tokens) == 300
        return job.tokens

    base = _repeated_ngrams(greedy())
    assert base >= 4
    for controls in (dict(repetition_penalty=1.3), dict(dry_multiplier=0.8), dict(no_repeat_ngram_size=3),
                     dict(presence_penalty=1.0, frequency_penalty=0.5)):
        tokens = greedy(**controls)
        assert _repeated_ngrams(tokens) < base, controls
        if "no_repeat_ngram_size" in controls:
            assert _repeated_ngrams(ids + tokens) == _repeated_ngrams(ids) == 0


# -- the command line --------------------------------------------------------------------------------

FLAGS = ["--seed", "3", "--num_generate", "2", "--max_length", "30", "--top_k", "30", "--top_p", "0.95",
         "--repetition_penalty", "1.3", "--presence_penalty", "0.3", "--frequency_penalty", "0.2",
         "--penalty_last_n", "64", "--no_repeat_ngram_size", "3", "--min_p", "0.02", "--typical_p", "0.98",
         "--dry_multiplier", "0.8", "--dry_sequence_breaker", "。", "--xtc_probability", "0.5",
         "--xtc_threshold", "0.2", "--logit_bias", "本社=-3", "--logit_bias", "18603=-1.5", "--ban", "<|endoftext|>",
         "--temperature", "0.9"]


def test_flags_make_the_options(tiny_model_dir, env, enc):
    args = cli_generate.parser().parse_args(["--model", str(tiny_model_dir), *FLAGS])
    o = cli_generate.options_from(args)
    assert (o.top_k, o.top_p, o.temperature) == (30, 0.95, 0.9)
    assert (o.repetition_penalty, o.presence_penalty, o.frequency_penalty, o.penalty_last_n) == (1.3, 0.3, 0.2, 64)
    assert (o.no_repeat_ngram_size, o.min_p, o.typical_p) == (3, 0.02, 0.98)
    assert (o.dry_multiplier, o.dry_base, o.dry_allowed_length, o.dry_penalty_last_n) == (0.8, 1.75, 2, -1)
    assert o.dry_sequence_breakers == ("。",) and (o.xtc_probability, o.xtc_threshold) == (0.5, 0.2)
    assert o.logit_bias == ((294, -3.0), (18603, -1.5)) and o.ban == (enc.eos_id,)
    plain = cli_generate.options_from(cli_generate.parser().parse_args(["--dry-sequence-breaker", "none"]))
    assert plain.dry_sequence_breakers == () and plain.sampling().neutral()
    assert cli_generate.options_from(cli_generate.parser().parse_args([])).sampling() == SamplingParams()


def test_cli_and_bulk_give_the_same_samples(tiny_model_dir, env, tmp_path, capsys):
    pq = pytest.importorskip("pyarrow.parquet")
    pytest.importorskip("ray")
    contexts = tmp_path / "contexts.txt"
    contexts.write_text("今日は良い天気\n吾輩は猫である。\n", encoding="utf-8")
    assert cli_generate.main(["--model", str(tiny_model_dir), "--gpu", "-1", "--contexts", str(contexts),
                              "--format", "jsonl", *FLAGS]) == 0
    expected = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    plain = cli_generate.main(["--model", str(tiny_model_dir), "--gpu", "-1", "--contexts", str(contexts),
                               "--format", "jsonl", "--seed", "3", "--num_generate", "2", "--max_length", "30"])
    assert plain == 0 and [json.loads(x) for x in capsys.readouterr().out.splitlines()] != expected
    assert all("本社本社" not in e["text"] for e in expected)
    out = tmp_path / "bulk"
    p = subprocess.run([sys.executable, str(ROOT / "gpt2-bulk.py"), "generate", "--model", str(tiny_model_dir),
                        "--gpu", "-1", "--contexts", str(contexts), "--output", str(out), *FLAGS],
                       capture_output=True, env={**env, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}, cwd=ROOT,
                       timeout=300)
    assert p.returncode == 0, p.stderr.decode()
    table = pq.read_table(str(out)).sort_by([("line", "ascending"), ("index", "ascending")]).to_pylist()
    assert [(r["context"], r["index"], r["text"]) for r in table] == \
           [(e["context"], e["index"], e["text"]) for e in expected]


@pytest.mark.parametrize("args,words", [
    (["--logit_bias", "江戸時代=2"], "--logit_bias '江戸時代': must be exactly one token, but it is 2 (江戸 時代)"),
    (["--ban", "江戸時代"], "--ban '江戸時代': must be exactly one token"),
    (["--logit_bias", "99999=1"], "--logit_bias 99999: no such token id"),
    (["--ban", "99999"], "--ban 99999: no such token id"),
    (["--logit_bias", "5"], "--logit_bias takes ID_OR_TEXT=BIAS"),
    (["--logit_bias", "5=x"], "the bias must be a number"),
    (["--repetition_penalty", "-1"], "--repetition_penalty must be a positive number"),
    (["--min_p", "2"], "--min_p must be between 0 and 1"),
    (["--dry_base", "0.5"], "--dry_base must be at least 1"),
    (["--dry_sequence_breaker", ""], "--dry_sequence_breaker needs a non-empty string"),
    (["--penalty_last_n", "-2"], "--penalty_last_n must be at least -1"),
])
def test_bad_flags_are_one_error_before_the_model_is_loaded(args, words, env):
    with pytest.raises((UsageError, OptionError)) as e:
        cli_generate.main(["--model", "/nonexistent", *args])
    assert words in error_line(e.value)


def test_bad_flag_exits_2_with_one_line(env):
    p = subprocess.run([sys.executable, str(ROOT / "gpt2-generate.py"), "--model", "/nonexistent",
                        "--logit_bias", "江戸時代=2"], capture_output=True, env=env, cwd=ROOT, timeout=120)
    assert p.returncode == 2 and p.stdout == b""
    assert p.stderr.decode().splitlines() == [
        "gpt2-generate.py: error: --logit_bias '江戸時代': must be exactly one token, but it is 2 (江戸 時代); "
        "give one token's text or id (python -m encoder shows them)"]


def test_bench_sampling_runs(tiny, enc):
    """bench/bench_sampling.py's chain measure runs with every control on."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_sampling", ROOT / "bench" / "bench_sampling.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    logits = tiny.logits([enc.encode("今日は")])[0][-1]
    history = enc.encode("今日は") * 5
    bench.chain_measure(logits, history, 6, bench.everything(), enc, 3)()
    assert len(chain(bench.everything())) == 12  # every link but min_length's
