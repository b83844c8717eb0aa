"""The sampling controls of a request body (/v1/completions and /v1/chat/completions alike).

Every control has the meaning it has in gpt2-generate.py (docs/sampling.md): the body's fields are read
into one ``tasks.sampling.SamplingParams``, which checks every value once; its ``OptionError`` becomes a
400 naming the request's field.  OpenAI's names where OpenAI has one (temperature, top_p,
presence_penalty, frequency_penalty, logit_bias), llama.cpp's / vLLM's for the rest.
"""
from __future__ import annotations

import math
from typing import Optional

from tasks.errors import OptionError
from tasks.sampling import SamplingParams

from . import requests as rq

#: request fields that are real numbers, read as they are into SamplingParams' field of the same name
NUMBERS = ("repetition_penalty", "presence_penalty", "frequency_penalty", "min_p", "typical_p",
           "dry_multiplier", "dry_base", "xtc_probability", "xtc_threshold")
#: request fields that are integers, likewise
INTEGERS = ("penalty_last_n", "no_repeat_ngram_size", "dry_allowed_length", "dry_penalty_last_n")
#: every field this module reads (the routes' documentation lists them)
FIELDS = ("temperature", "top_p", "top_k", "min_length", "min_tokens", *NUMBERS, *INTEGERS,
          "dry_sequence_breakers", "logit_bias", "ban", "bad_words")


def _real(body: dict, name: str) -> Optional[float]:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise rq.bad(name, f"must be a number, got {value!r}")
    return float(value)


def _single_tokens(body: dict, name: str, enc) -> list:
    """bad_words: texts that are each exactly one token of this model's encoder (as --ban TEXT)."""
    value = body.get(name)
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(t, str) and t for t in value):
        raise rq.bad(name, "must be a list of non-empty strings")
    ids = []
    for text in value:
        try:
            tokens = enc.encode(text)
        except ValueError as e:
            raise rq.bad(name, str(e)) from None
        if len(tokens) != 1:
            raise rq.bad(name, f"{text!r} is {len(tokens)} tokens {tokens}: each text must be exactly one token "
                               "(give token ids in ban instead)")
        ids.append(tokens[0])
    return ids


def sampling_params(body: dict, hparams, enc) -> SamplingParams:
    """The request's SamplingParams (400 naming the field for any bad value).

    top_p: OpenAI's meaning, 1 (the default) is no top_p filter and 0 keeps only the most likely token;
    top_k: default 40 unless top_p is below 1; an explicit top_k with top_p below 1 applies both (top_k
    first), as gpt2-generate.py.  min_tokens is min_length's other name (vLLM's): fewer than n_ctx/2."""
    temperature = rq.number(body, "temperature", 1.0, 0.0, 1e30)
    top_p = rq.number(body, "top_p", 1.0, 0.0, 1.0)
    top_k = rq.integer(body, "top_k", None, 0)
    if top_p >= 1.0:
        top_p = 0.0  # no top_p filter
    elif top_p <= 0.0:
        top_p = 1e-12  # only the most likely token (and any tied with it)
    min_length = rq.integer(body, "min_length", None, 0)
    min_tokens = rq.integer(body, "min_tokens", None, 0)
    if min_length is not None and min_tokens is not None and min_length != min_tokens:
        raise rq.bad("min_tokens", f"min_tokens ({min_tokens}) and min_length ({min_length}) are one setting: "
                                   "give one of them")
    min_name = "min_length" if min_length is not None else "min_tokens"
    min_length = min_length if min_length is not None else (min_tokens or 0)
    values = {"top_k": top_k, "top_p": top_p, "temperature": temperature, "min_length": min_length}
    for name in NUMBERS:
        v = _real(body, name)
        if v is not None:
            values[name] = v
    for name in INTEGERS:
        v = rq.integer(body, name, None)
        if v is not None:
            values[name] = v
    breakers = body.get("dry_sequence_breakers")
    if breakers is not None:
        if not isinstance(breakers, list) or not all(isinstance(b, str) and b for b in breakers):
            raise rq.bad("dry_sequence_breakers", "must be a list of non-empty strings ([] for none)")
        values["dry_sequence_breakers"] = tuple(breakers)
    bias = body.get("logit_bias")
    if bias is not None:
        if not isinstance(bias, dict):
            raise rq.bad("logit_bias", "must be an object mapping token ids (as strings) to biases")
        values["logit_bias"] = bias
    ban = body.get("ban")
    if ban is not None and (not isinstance(ban, list) or not all(isinstance(i, int) and not isinstance(i, bool)
                                                                   for i in ban)):
        raise rq.bad("ban", "must be a list of token ids")
    values["ban"] = tuple(ban or ()) + tuple(_single_tokens(body, "bad_words", enc))
    try:
        params = SamplingParams(**values)
        params.check_model(hparams)  # min_length below n_ctx/2, token ids in the vocabulary
    except OptionError as e:
        field = min_name if e.option == "min_length" else e.option
        raise rq.bad(field, e.reason) from None
    return params
