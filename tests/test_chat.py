"""The server's sampling controls, top log-probabilities (streaming too, and for an echoed prompt) and
/v1/chat/completions, end to end with the official openai client against one tiny-model server."""
import json
import subprocess
import sys

import pytest

from conftest import ROOT, TINY_DIR, VOCAB_DIR, user_env
from test_server import MODEL, Server, stream_events

openai = pytest.importorskip("openai")

PROMPT = "吾輩は猫である"
#: every control at a non-neutral value, as /v1/completions fields and as gpt2-generate.py flags
CONTROLS = {"top_k": 30, "top_p": 0.95, "temperature": 0.9, "min_tokens": 6, "repetition_penalty": 1.3,
            "presence_penalty": 0.4, "frequency_penalty": 0.5, "penalty_last_n": 64, "no_repeat_ngram_size": 3,
            "min_p": 0.01, "typical_p": 0.98, "dry_multiplier": 0.8, "dry_base": 1.5, "dry_allowed_length": 2,
            "dry_penalty_last_n": 128, "dry_sequence_breakers": ["。", "「"], "logit_bias": {"5": -3, "18943": 2},
            "xtc_probability": 0.3, "xtc_threshold": 0.05, "ban": [7, 11]}
FLAGS = ["--top_k", "30", "--top_p", "0.95", "--temperature", "0.9", "--min_length", "6",
         "--repetition_penalty", "1.3", "--presence_penalty", "0.4", "--frequency_penalty", "0.5",
         "--penalty_last_n", "64", "--no_repeat_ngram_size", "3", "--min_p", "0.01", "--typical_p", "0.98",
         "--dry_multiplier", "0.8", "--dry_base", "1.5", "--dry_allowed_length", "2", "--dry_penalty_last_n", "128",
         "--dry_sequence_breaker", "。", "--dry_sequence_breaker", "「", "--logit_bias", "5=-3",
         "--logit_bias", "18943=2", "--xtc_probability", "0.3", "--xtc_threshold", "0.05", "--ban", "7",
         "--ban", "11"]
STOPS = ["\nユーザー", "\nアシスタント"]


@pytest.fixture(scope="module")
def server():
    s = Server("--batch_size", "8", "--max_queue", "64", "--timeout", "120")
    yield s
    assert s.stop() == 0


def test_every_control_seeded_equals_gpt2_generate(server, env):
    client = server.client()
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=1000, n=2, seed=17,
                                  presence_penalty=0.4, frequency_penalty=0.5, logit_bias={"5": -3, "18943": 2},
                                  temperature=0.9, top_p=0.95,
                                  extra_body={k: v for k, v in CONTROLS.items()
                                              if k not in ("presence_penalty", "frequency_penalty", "logit_bias",
                                                           "temperature", "top_p")} | {"max_length": 60})
    cli = subprocess.run([sys.executable, str(ROOT / "gpt2-generate.py"), "--model", str(TINY_DIR), "--gpu", "-1",
                          "--context", PROMPT, "--num_generate", "2", "--seed", "17", "--max_length", "60", *FLAGS,
                          "--format", "jsonl"], capture_output=True, env=env, cwd=ROOT, timeout=180)
    assert cli.returncode == 0, cli.stderr
    expected = [json.loads(line)["text"] for line in cli.stdout.decode().splitlines()]
    assert [c.text for c in r.choices] == expected
    # the controls change the sample (the test compares something)
    plain = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=1000, n=2, seed=17,
                                      extra_body={"max_length": 60})
    assert [c.text for c in plain.choices] != expected
    # min_length's two names are one setting
    same = server.request("POST", "/v1/completions", {"prompt": PROMPT, "max_tokens": 1000, "n": 2, "seed": 17,
                                                       "max_length": 60, **CONTROLS, "min_tokens": None,
                                                       "min_length": 6})[2]
    assert [c["text"] for c in same["choices"]] == expected


def _lp_lists(choice_logprobs):
    lp = choice_logprobs
    return lp["tokens"], lp["token_logprobs"], lp["top_logprobs"], lp["text_offset"]


def test_top_logprobs_stream_equals_collected(server):
    body = {"prompt": PROMPT, "max_tokens": 25, "n": 2, "seed": 4, "logprobs": 3, "stop": ["の"],
            "repetition_penalty": 1.2}
    collected = server.request("POST", "/v1/completions", body)[2]
    events = stream_events(server.port, body)
    assert events[-1] == "[DONE]"
    for choice in collected["choices"]:
        k = choice["index"]
        tokens, values, tops, offsets = _lp_lists(choice["logprobs"])
        assert tokens and len(tokens) == len(values) == len(tops) == len(offsets)
        if "\ufffd" not in "".join(tokens):
            assert "".join(tokens) == choice["text"]
            assert all(choice["text"][o:o + len(t)] == t for t, o in zip(tokens, offsets))
        for token, value, top in zip(tokens, values, tops):
            assert len(top) == 3
            ranked = list(top.values())
            assert ranked == sorted(ranked, reverse=True) and all(v <= 0 for v in ranked)
            assert value <= ranked[0] + 1e-6  # raw model log-probabilities: nothing beats the most likely
            if token in top:
                assert top[token] == pytest.approx(value, abs=1e-9)
        streamed = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        text = ""
        for e in events[:-1]:
            for c in e["choices"]:
                if c["index"] == k:
                    text += c["text"]
                    if c["logprobs"]:
                        for key in streamed:
                            streamed[key] += c["logprobs"][key]
        assert text == choice["text"]
        assert streamed == choice["logprobs"]


def test_echo_with_top_logprobs_of_the_prompt(server):
    client = server.client()
    plain = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=0, echo=True, logprobs=0)
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=0, echo=True, logprobs=4)
    lp, lp0 = r.choices[0].logprobs, plain.choices[0].logprobs
    assert r.choices[0].text == PROMPT
    assert lp.tokens == lp0.tokens and lp.token_logprobs == lp0.token_logprobs  # gpt2-score.py's numbers
    assert lp0.top_logprobs == [None] * len(lp0.tokens)
    assert len(lp.top_logprobs) == len(lp.tokens) == 5  # 吾輩|は|猫|であ|る
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert len(top) == 4
        best = max(top.values())
        assert value <= best + 1e-4
        if token in top:
            assert top[token] == pytest.approx(value, abs=1e-3)
    # echo + logprobs + a sample, streamed: the prompt's entries first, then the sample's
    body = {"prompt": PROMPT, "max_tokens": 5, "seed": 2, "echo": True, "logprobs": 2}
    collected = server.request("POST", "/v1/completions", body)[2]["choices"][0]
    events = stream_events(server.port, body)
    tokens = [t for e in events[:-1] for c in e["choices"] if c["logprobs"] for t in c["logprobs"]["tokens"]]
    assert tokens == collected["logprobs"]["tokens"] and tokens[:5] == lp.tokens
    assert collected["text"].startswith(PROMPT)
    assert collected["logprobs"]["text_offset"][5] == len(PROMPT)


def test_chat_with_the_openai_client(server):
    client = server.client()
    messages = [{"role": "system", "content": "丁寧に答えてください。"},
                {"role": "user", "content": "こんにちは"},
                {"role": "assistant", "content": "こんにちは。"},
                {"role": "user", "content": [{"type": "text", "text": "猫の名前は？"}]}]
    kwargs = dict(model=MODEL, messages=messages, seed=9, n=2, max_completion_tokens=20, frequency_penalty=0.3,
                  extra_body={"min_p": 0.02, "repetition_penalty": 1.2})
    r = client.chat.completions.create(**kwargs, logprobs=True, top_logprobs=2)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert [c.index for c in r.choices] == [0, 1]
    rendered = ("丁寧に答えてください。\n\nユーザー: こんにちは\nアシスタント: こんにちは。\nユーザー: 猫の名前は？\n"
                "アシスタント:")
    # the same sample as a completion of the rendered text, cut at the turn markers
    same = server.request("POST", "/v1/completions", {"prompt": rendered, "stop": STOPS, "seed": 9, "n": 2,
                                                       "max_tokens": 20, "frequency_penalty": 0.3, "min_p": 0.02,
                                                       "repetition_penalty": 1.2})[2]
    assert [c.message.content for c in r.choices] == [c["text"] for c in same["choices"]]
    assert [c.finish_reason for c in r.choices] == [c["finish_reason"] for c in same["choices"]]
    assert r.usage.prompt_tokens == same["usage"]["prompt_tokens"]
    assert r.usage.completion_tokens == same["usage"]["completion_tokens"]
    for c in r.choices:
        assert c.message.role == "assistant"
        entries = c.logprobs.content
        assert entries and all(len(e.top_logprobs) == 2 for e in entries)
        if "\ufffd" not in "".join(e.token for e in entries):
            assert "".join(e.token for e in entries) == c.message.content
        assert all(bytes(e.bytes).decode("utf-8") == e.token for e in entries)
    # streamed: a role delta first, then content deltas, then finish_reason, then usage
    chunks = list(client.chat.completions.create(**kwargs, logprobs=True, top_logprobs=2, stream=True,
                                                 stream_options={"include_usage": True}))
    assert all(ch.object == "chat.completion.chunk" for ch in chunks)
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens and not chunks[-1].choices
    for c in r.choices:
        mine = [ch.choices[0] for ch in chunks[:-1] if ch.choices[0].index == c.index]
        assert mine[0].delta.role == "assistant" and mine[0].delta.content == ""
        assert all(m.delta.role is None for m in mine[1:])
        assert "".join(m.delta.content or "" for m in mine) == c.message.content
        assert [m.finish_reason for m in mine if m.finish_reason] == [c.finish_reason]
        streamed = [e for m in mine if m.logprobs for e in m.logprobs.content]
        assert [e.model_dump() for e in streamed] == [e.model_dump() for e in c.logprobs.content]


def test_chat_stops_at_the_next_turn(server):
    # the newline and the two tokens of ユーザー pushed far above the rest: the turn marker comes soon
    body = {"messages": [{"role": "user", "content": "こんにちは"}], "seed": 1, "max_tokens": 400,
            "logit_bias": {"20297": 40, "883": 40, "885": 40}}
    status, _, r = server.request("POST", "/v1/chat/completions", body)
    assert status == 200, r
    choice = r["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert "\nユーザー" not in choice["message"]["content"]
    long = server.request("POST", "/v1/completions", {"prompt": "ユーザー: こんにちは\nアシスタント:", "seed": 1,
                                                       "max_tokens": 400, "logit_bias": body["logit_bias"]})[2]
    text = long["choices"][0]["text"]
    assert text.startswith(choice["message"]["content"] + "\nユーザー")


BAD = [
    ({"min_p": 1.5}, "min_p"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"presence_penalty": "much"}, "presence_penalty"),
    ({"frequency_penalty": 101}, "frequency_penalty"),
    ({"typical_p": 0}, "typical_p"),
    ({"dry_base": 0.5}, "dry_base"),
    ({"dry_sequence_breakers": "。"}, "dry_sequence_breakers"),
    ({"xtc_probability": -0.1}, "xtc_probability"),
    ({"no_repeat_ngram_size": -1}, "no_repeat_ngram_size"),
    ({"logit_bias": {"abc": 1}}, "logit_bias"),
    ({"logit_bias": {"999999": 1}}, "logit_bias"),
    ({"logit_bias": [1, 2]}, "logit_bias"),
    ({"ban": [99999999]}, "ban"),
    ({"bad_words": ["吾輩は猫"]}, "bad_words"),
    ({"min_tokens": 512}, "min_tokens"),
    ({"min_length": 3, "min_tokens": 4}, "min_tokens"),
    ({"top_k": 1.5}, "top_k"),
]


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("fields,param", BAD, ids=[str(b) for b, _ in BAD])
def test_bad_controls_are_400_naming_the_field(server, route, fields, param):
    body = {"prompt": "a"} if route == "/v1/completions" else {"messages": [{"role": "user", "content": "a"}]}
    status, _, answer = server.request("POST", route, {**body, **fields})
    assert status == 400, answer
    assert set(answer["error"]) == {"message", "type", "param", "code"}
    assert answer["error"]["param"] == param and answer["error"]["type"] == "invalid_request_error"


CHAT_BAD = [
    ({}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "messages"),
    ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": -1}, "max_completion_tokens"),
]


@pytest.mark.parametrize("body,param", CHAT_BAD, ids=[str(b) for b, _ in CHAT_BAD])
def test_bad_chat_requests(server, body, param):
    status, _, answer = server.request("POST", "/v1/chat/completions", body)
    assert status == 400, answer
    assert answer["error"]["param"] == param


def test_chat_template_file(tmp_path):
    from server.chat import ChatTemplate, load_template

    path = tmp_path / "t.json"
    path.write_text(json.dumps({"user": "Q: {content}\n", "generation": "A:", "stop": ["\nQ:"]}), encoding="utf-8")
    t = load_template(str(path))
    assert t.assistant == ChatTemplate().assistant and t.stop == ("\nQ:",)
    assert t.render([("system", "S"), ("user", "u"), ("assistant", "a"), ("user", "v")]) == \
        "S\n\nQ: u\nアシスタント: a\nQ: v\nA:"
    for bad in ({"user": "{name}"}, {"usr": "x"}, {"stop": "x"}, [1]):
        path.write_text(json.dumps(bad), encoding="utf-8")
        with pytest.raises(ValueError):
            load_template(str(path))
    # gpt2-server.py: one line, exit 2, before the model is loaded
    path.write_text(json.dumps({"user": "{oops}"}), encoding="utf-8")
    p = subprocess.run([sys.executable, str(ROOT / "gpt2-server.py"), "--model", str(TINY_DIR), "--gpu", "-1",
                        "--chat_template", str(path)], capture_output=True, text=True, timeout=120,
                       env=user_env(GPT2JA_VOCAB=str(VOCAB_DIR)), cwd=ROOT)
    assert p.returncode == 2
    assert p.stderr.startswith("gpt2-server.py: error: --chat_template:") and len(p.stderr.splitlines()) == 1


def test_chat_latency_is_counted_once(server):
    def count():
        text = server.request("GET", "/metrics")[2]
        lines = [l for l in text.splitlines()
                 if l.startswith('gpt2ja_request_latency_seconds_count{route="/v1/chat/completions"}')]
        return float(lines[0].split()[-1]) if lines else 0.0

    before = count()
    status, _, r = server.request("POST", "/v1/chat/completions",
                                  {"messages": [{"role": "user", "content": "やあ"}], "max_tokens": 3})
    assert status == 200, r
    assert count() == before + 1


def test_logprobs_of_byte_tokens_cover_every_token(server):
    # byte tokens pushed up (the three of 猫's UTF-8 and more): characters made of several tokens, and
    # incomplete ones; every token drawn still has its entry, streamed or not, at the offset of its character
    bias = {str(i): 9 for i in (20548, 20457, 20488, 20317, 20400, 20500)}
    body = {"prompt": "猫", "max_tokens": 30, "seed": 3, "n": 2, "logprobs": 1, "logit_bias": bias}
    collected = server.request("POST", "/v1/completions", body)[2]
    events = stream_events(server.port, body)
    tokens = server.request("POST", "/v1/completions", {**body, "logprobs": None})[2]  # same samples
    assert [c["text"] for c in tokens["choices"]] == [c["text"] for c in collected["choices"]]
    pieces = sum(c["logprobs"]["tokens"].count("\ufffd") for c in collected["choices"])
    assert pieces >= 5  # byte tokens were drawn
    assert sum(len(c["logprobs"]["tokens"]) for c in collected["choices"]) == collected["usage"]["completion_tokens"]
    for choice in collected["choices"]:
        offsets = choice["logprobs"]["text_offset"]
        assert offsets == sorted(offsets) and offsets[-1] < len(choice["text"])
        streamed = [t for e in events[:-1] for c in e["choices"] if c["index"] == choice["index"] and c["logprobs"]
                    for t in zip(c["logprobs"]["tokens"], c["logprobs"]["text_offset"])]
        assert streamed == list(zip(choice["logprobs"]["tokens"], offsets))
