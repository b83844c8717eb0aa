"""gpt2-server.py end to end: servers on 127.0.0.1 (subprocesses, tiny checkpoint), the official
openai client, raw HTTP for what a client library hides, and a real headless browser for the page."""
import base64
import http.client
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from conftest import GOLDEN_DIR, ROOT, TINY_DIR, VOCAB_DIR, user_env

openai = pytest.importorskip("openai")

MODEL = "gpt2ja-tiny"


class Server:
    """gpt2-server.py in a subprocess, listening on a free port of 127.0.0.1."""

    def __init__(self, *args, env_extra=None, timeout=180):
        env = user_env(GPT2JA_VOCAB=str(VOCAB_DIR), CUDA_VISIBLE_DEVICES="-1")
        env.pop("GPT2JA_API_KEY", None)
        env.update(env_extra or {})
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "gpt2-server.py"), "--model", str(TINY_DIR), "--gpu", "-1",
             "--host", "127.0.0.1", "--port", "0", *args],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=ROOT, text=True)
        self.lines = queue.Queue()
        self.stderr = []
        threading.Thread(target=self._drain, daemon=True).start()
        end = time.monotonic() + timeout
        self.port = None
        while self.port is None:
            try:
                line = self.lines.get(timeout=max(0.1, end - time.monotonic()))
            except queue.Empty:
                self.stop()
                raise AssertionError("server did not start: " + "".join(self.stderr))
            if line is None:
                raise AssertionError("server exited: " + "".join(self.stderr))
            if "serving" in line and "http://127.0.0.1:" in line:
                self.port = int(line.split("http://127.0.0.1:")[1].split("/")[0])
        self.base = f"http://127.0.0.1:{self.port}"

    def _drain(self):
        for line in self.proc.stderr:
            self.stderr.append(line)
            self.lines.put(line)
        self.lines.put(None)

    def request(self, method, path, body=None, headers=None, raw=None, timeout=120):
        """(status, headers, parsed JSON or text)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
            conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
            r = conn.getresponse()
            text = r.read().decode("utf-8")
            try:
                parsed = json.loads(text)
            except ValueError:
                parsed = text
            return r.status, {k.lower(): v for k, v in r.getheaders()}, parsed
        finally:
            conn.close()

    def client(self, **kw):
        return openai.OpenAI(base_url=self.base + "/v1", api_key=kw.pop("api_key", "unused"), max_retries=0,
                             timeout=120, **kw)

    def stop(self, sig=signal.SIGTERM, timeout=60):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)


def stream_events(port, body, headers=None, stop_after=None, timeout=120, cut_ok=False):
    """POST a streaming completion; the decoded JSON events (``[DONE]`` as the string).
    ``cut_ok``: a connection closed mid-stream (a server shutting down) ends the list."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    conn.request("POST", "/v1/completions", body=json.dumps({**body, "stream": True}),
                 headers={"Content-Type": "application/json", **(headers or {})})
    r = conn.getresponse()
    assert r.status == 200, r.read()
    events = []
    buf = b""
    try:
        while True:
            try:
                chunk = r.read1(65536)
            except (http.client.IncompleteRead, ConnectionError):
                if cut_ok:
                    break
                raise
            if not chunk:
                break
            buf += chunk
            while b"\n\n" in buf:
                event, buf = buf.split(b"\n\n", 1)
                data = event.decode("utf-8")[len("data: "):]
                events.append(data if data == "[DONE]" else json.loads(data))
                if stop_after is not None and len(events) >= stop_after:
                    return events
    finally:
        conn.close()
    return events


def streamed_texts(events):
    texts, reasons, usage = {}, {}, None
    for e in events:
        if e == "[DONE]":
            continue
        if e.get("usage"):
            usage = e["usage"]
        for c in e["choices"]:
            texts[c["index"]] = texts.get(c["index"], "") + c["text"]
            if c["finish_reason"]:
                reasons[c["index"]] = c["finish_reason"]
    return texts, reasons, usage


@pytest.fixture(scope="module")
def server():
    s = Server("--batch_size", "8", "--max_queue", "512", "--max_body", "65536", "--timeout", "120")
    yield s
    assert s.stop() == 0


# -- the openai client ---------------------------------------------------------------------

def test_models_and_a_plain_completion(server):
    client = server.client()
    assert [m.id for m in client.models.list().data] == [MODEL]
    r = client.completions.create(model=MODEL, prompt="今日は良い天気です。", max_tokens=12)
    assert r.object == "text_completion" and len(r.choices) == 1
    c = r.choices[0]
    assert isinstance(c.text, str) and c.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens == len(server.request("POST", "/tokenize", {"prompt": "今日は良い天気です。"})[2]["tokens"])
    assert 0 < r.usage.completion_tokens <= 12 if c.finish_reason == "length" else r.usage.completion_tokens <= 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_n_samples_and_seed_equal_gpt2_generate(server, env):
    client = server.client()
    r = client.completions.create(model=MODEL, prompt="吾輩は猫である", max_tokens=1000, n=3, seed=11,
                                  extra_body={"max_length": 40, "top_k": 20})
    assert [c.index for c in r.choices] == [0, 1, 2]
    cli = subprocess.run([sys.executable, str(ROOT / "gpt2-generate.py"), "--model", str(TINY_DIR), "--gpu", "-1",
                          "--context", "吾輩は猫である", "--num_generate", "3", "--seed", "11", "--top_k", "20",
                          "--max_length", "40", "--format", "jsonl"],
                         capture_output=True, env=env, cwd=ROOT, timeout=180)
    assert cli.returncode == 0, cli.stderr
    expected = [json.loads(line)["text"] for line in cli.stdout.decode().splitlines()]
    assert [c.text for c in r.choices] == expected
    again = client.completions.create(model=MODEL, prompt="吾輩は猫である", max_tokens=1000, n=3, seed=11,
                                      extra_body={"max_length": 40, "top_k": 20})
    assert [c.text for c in again.choices] == expected


def test_max_tokens_and_stop_equal_gpt2_generate(server, env):
    full = server.request("POST", "/v1/completions", {"prompt": "吾輩は", "max_tokens": 30, "seed": 5, "n": 2})[2]
    stop = full["choices"][0]["text"][3:5]
    r = server.request("POST", "/v1/completions", {"prompt": "吾輩は", "max_tokens": 30, "seed": 5, "n": 2,
                                                   "stop": stop})[2]
    cli = subprocess.run([sys.executable, str(ROOT / "gpt2-generate.py"), "--model", str(TINY_DIR), "--gpu", "-1",
                          "--context", "吾輩は", "--num_generate", "2", "--seed", "5", "--max_tokens", "30",
                          "--max_length", "1000000", "--stop", stop, "--format", "jsonl"],
                         capture_output=True, env=env, cwd=ROOT, timeout=180)
    assert cli.returncode == 0, cli.stderr
    assert [json.loads(line)["text"] for line in cli.stdout.decode().splitlines()] == \
        [c["text"] for c in r["choices"]]
    assert r["choices"][0]["finish_reason"] == "stop"


def test_stream_gives_the_same_text(server):
    client = server.client()
    kwargs = dict(model=MODEL, prompt="明日も晴れるかな", max_tokens=30, seed=3, n=2)
    whole = client.completions.create(**kwargs)
    texts, reasons = {}, {}
    for chunk in client.completions.create(stream=True, **kwargs):
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            if c.finish_reason:
                reasons[c.index] = c.finish_reason
    assert texts == {c.index: c.text for c in whole.choices}
    assert reasons == {c.index: c.finish_reason for c in whole.choices}


def test_stop_cuts_before_the_stop_string(server):
    client = server.client()
    full = client.completions.create(model=MODEL, prompt="今日は", max_tokens=30, temperature=0).choices[0].text
    stop = full[6:8]
    cut = full[:full.index(stop)]
    r = client.completions.create(model=MODEL, prompt="今日は", max_tokens=30, temperature=0, stop=[stop, "不在"])
    assert r.choices[0].text == cut and r.choices[0].finish_reason == "stop"
    texts, reasons, _ = streamed_texts(stream_events(server.port, {"prompt": "今日は", "max_tokens": 30,
                                                                   "temperature": 0, "stop": stop}))
    assert texts == {0: cut} and reasons == {0: "stop"}


def test_greedy_equals_the_golden_output(server):
    client = server.client()
    for line in (GOLDEN_DIR / "tiny" / "generate.jsonl").read_text(encoding="utf-8").splitlines():
        case = json.loads(line)
        args = dict(zip(case["args"][::2], case["args"][1::2]))
        if "--min_length" in args:
            continue
        expected = case["stdout"].split("\n========\n")[0].rstrip("\n")
        r = client.completions.create(model=MODEL, prompt=args.get("--context", ""), temperature=0, max_tokens=2000,
                                      extra_body={"max_length": int(args["--max_length"])})
        assert r.choices[0].text == expected, args


def test_echo_logprobs_equal_gpt2_score(server):
    client = server.client()
    golden = (GOLDEN_DIR / "tiny" / "score.json").read_text(encoding="utf-8")
    sums = dict(line.rsplit("\t", 1) for line in json.loads(golden)["--exclude-end"].splitlines() if line)
    texts = list(sums)[:4]
    r = client.completions.create(model=MODEL, prompt=texts, max_tokens=0, echo=True, logprobs=0)
    assert len(r.choices) == len(texts)
    for text, c in zip(texts, r.choices):
        assert c.text == text
        assert "%.5g" % sum(c.logprobs.token_logprobs) == sums[text]


def test_embeddings_equal_gpt2_transform(server):
    client = server.client()
    golden = [json.loads(line) for line in (GOLDEN_DIR / "tiny" / "transform.jsonl").read_text("utf-8").splitlines()]
    texts = [g["context"] for g in golden[:5]]
    expected = np.array([g["vector"] for g in golden[:5]], np.float32)
    r = client.embeddings.create(model=MODEL, input=texts, encoding_format="float")
    got = np.array([d.embedding for d in r.data], np.float32)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    r64 = client.embeddings.create(model=MODEL, input=texts, encoding_format="base64")
    vectors = [d.embedding for d in r64.data]
    decoded = np.array([np.frombuffer(base64.b64decode(v), "<f4") if isinstance(v, str) else v for v in vectors],
                       np.float32)
    np.testing.assert_array_equal(decoded, got)
    assert r.usage.prompt_tokens > 0


def test_tokenize_detokenize_health_metrics(server):
    status, _, body = server.request("POST", "/tokenize", {"prompt": "今日は良い天気です。"})
    assert status == 200 and body["count"] == len(body["tokens"])
    status, _, back = server.request("POST", "/detokenize", {"tokens": body["tokens"]})
    assert status == 200 and back["prompt"] == "今日は良い天気です。"
    assert server.request("GET", "/health")[2]["status"] == "ok"
    status, headers, text = server.request("GET", "/metrics")
    assert status == 200
    for name in ("gpt2ja_requests_total", "gpt2ja_tokens_generated_total", "gpt2ja_queue_length",
                 "gpt2ja_tokens_per_second", "gpt2ja_request_latency_seconds_bucket",
                 "gpt2ja_time_to_first_token_seconds_bucket"):
        assert name in text


# -- bad input -----------------------------------------------------------------------------

BAD = [
    ({"prompt": 3}, 400, "prompt"),
    ({}, 400, "prompt"),
    ({"prompt": "a", "temperature": -1}, 400, "temperature"),
    ({"prompt": "a", "temperature": "hot"}, 400, "temperature"),
    ({"prompt": "a", "top_p": 1.5}, 400, "top_p"),
    ({"prompt": "a", "top_k": -1}, 400, "top_k"),
    ({"prompt": "a", "n": 0}, 400, "n"),
    ({"prompt": "a", "max_tokens": -1}, 400, "max_tokens"),
    ({"prompt": "a", "max_tokens": "many"}, 400, "max_tokens"),
    ({"prompt": "a", "seed": -5}, 400, "seed"),
    ({"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"prompt": "a", "stop": [""]}, 400, "stop"),
    ({"prompt": "a", "stream": "yes"}, 400, "stream"),
    ({"prompt": "a", "logprobs": 9}, 400, "logprobs"),
    ({"prompt": [1, 99999999]}, 400, "prompt"),
    ({"prompt": "a", "model": "gpt-4"}, 404, "model"),
]


@pytest.mark.parametrize("body,status,param", BAD, ids=[str(b) for b, _, _ in BAD])
def test_bad_completion_requests(server, body, status, param):
    got, _, answer = server.request("POST", "/v1/completions", body)
    assert got == status, answer
    assert set(answer["error"]) == {"message", "type", "param", "code"}
    assert answer["error"]["param"] == param and answer["error"]["message"]


def test_malformed_bodies_routes_and_sizes(server):
    for raw in (b"{not json", b"[1, 2]", b"\xff\xfe", b""):
        status, _, answer = server.request("POST", "/v1/completions", raw=raw)
        assert status == 400 and answer["error"]["type"] == "invalid_request_error", raw
    status, _, answer = server.request("GET", "/v1/nothing")
    assert status == 404 and answer["error"]["code"] == "not_found"
    status, _, answer = server.request("GET", "/v1/completions")
    assert status == 405 and "error" in answer
    status, _, answer = server.request("POST", "/v1/completions", {"prompt": "あ" * 40000})
    assert status == 413 and answer["error"]["code"] == "request_too_large"
    for path, body, param in (("/v1/embeddings", {"input": 5}, "input"),
                              ("/v1/embeddings", {"input": "a", "encoding_format": "hex"}, "encoding_format"),
                              ("/v1/embeddings", {"input": "a", "layer": 99}, "layer"),
                              ("/v1/embeddings", {"input": "a", "pooling": "max"}, "pooling"),
                              ("/tokenize", {"prompt": 5}, "prompt"),
                              ("/detokenize", {"tokens": [-1]}, "tokens")):
        status, _, answer = server.request("POST", path, body)
        assert status == 400 and answer["error"]["param"] == param, (path, body, answer)
    assert server.client().completions.create(model=MODEL, prompt="まだ", max_tokens=2).choices


def test_a_prompt_longer_than_the_context_keeps_its_end(server):
    long = "今日は良い天気です。" * 300  # far past n_ctx/2 tokens
    r = server.client().completions.create(model=MODEL, prompt=long, max_tokens=5, temperature=0)
    ids = server.request("POST", "/tokenize", {"prompt": long})[2]["tokens"]
    tail = server.client().completions.create(model=MODEL, prompt=ids[-512:], max_tokens=5, temperature=0)
    assert r.choices[0].text == tail.choices[0].text and r.usage.prompt_tokens == len(ids)


# -- load ----------------------------------------------------------------------------------

def test_32_concurrent_streaming_clients(server):
    results, errors = [], []
    lengths = [3, 8, 17, 29]

    def client(k):
        try:
            for r in range(3):
                body = {"prompt": f"テスト{k}の{r}回目", "max_tokens": lengths[(k + r) % 4], "seed": k * 10 + r,
                        "stream_options": {"include_usage": True}}
                events = stream_events(server.port, body, timeout=300)
                results.append((body, events))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert not errors and len(results) == 96
    for body, events in results:
        assert events[-1] == "[DONE]"
        texts, reasons, usage = streamed_texts(events)
        assert set(reasons) == {0} and reasons[0] in ("stop", "length")
        assert usage["completion_tokens"] <= body["max_tokens"]
        if reasons[0] == "length":
            assert usage["completion_tokens"] == body["max_tokens"]
    # batching does not change a seeded sample
    for body, events in results[:6]:
        whole = server.request("POST", "/v1/completions", {k: v for k, v in body.items() if k != "stream_options"})[2]
        assert whole["choices"][0]["text"] == streamed_texts(events)[0][0]
        assert whole["usage"]["completion_tokens"] == streamed_texts(events)[2]["completion_tokens"]


def test_a_client_dropping_mid_stream_frees_its_row(server):
    done = []
    other = threading.Thread(target=lambda: done.append(stream_events(
        server.port, {"prompt": "他の人", "max_tokens": 40, "seed": 1})))
    dropped = stream_events(server.port, {"prompt": "途中で", "max_tokens": 100000, "seed": 2}, stop_after=3)
    other.start()
    other.join(300)
    assert len(dropped) == 3
    texts, reasons, _ = streamed_texts(done[0])
    assert done[0][-1] == "[DONE]" and reasons[0] in ("stop", "length")
    expected = server.request("POST", "/v1/completions", {"prompt": "他の人", "max_tokens": 40, "seed": 1})[2]
    assert texts[0] == expected["choices"][0]["text"]
    end = time.monotonic() + 60
    while server.request("GET", "/health")[2]["rows"] != 0:
        assert time.monotonic() < end, "the dropped client's row was never freed"
        time.sleep(0.2)


# -- a small server: the API key, a full queue, SIGTERM under load --------------------------

def test_api_key_queue_overflow_and_sigterm():
    s = Server("--batch_size", "1", "--max_queue", "1", "--grace", "3", env_extra={"GPT2JA_API_KEY": "sekrit"})
    try:
        auth = {"Authorization": "Bearer sekrit"}
        assert s.request("GET", "/health")[0] == 200
        status, _, answer = s.request("GET", "/v1/models")
        assert status == 401 and answer["error"]["code"] == "invalid_api_key"
        assert s.request("GET", "/v1/models", headers={"Authorization": "Bearer wrong"})[0] == 401
        assert s.client(api_key="sekrit").models.list().data[0].id == MODEL
        # one long sample decoding, one waiting: the next gets 429
        long_events = []
        long = threading.Thread(target=lambda: long_events.extend(stream_events(
            s.port, {"prompt": "長い", "max_tokens": 100000, "max_length": 100000}, headers=auth, timeout=120,
            cut_ok=True)))
        long.start()
        end = time.monotonic() + 60
        while s.request("GET", "/health")[2]["rows"] != 1:
            assert time.monotonic() < end
            time.sleep(0.05)
        short_events = []
        short = threading.Thread(target=lambda: short_events.extend(stream_events(
            s.port, {"prompt": "短い", "max_tokens": 5}, headers=auth, timeout=120, cut_ok=True)))
        short.start()
        while s.request("GET", "/health")[2]["queue"] != 1:
            assert time.monotonic() < end
            time.sleep(0.05)
        status, headers, answer = s.request("POST", "/v1/completions", {"prompt": "溢れる", "max_tokens": 5},
                                            headers=auth)
        assert status == 429 and headers.get("retry-after") == "1"
        assert answer["error"]["code"] == "rate_limit_exceeded"
        assert s.request("GET", "/health")[2]["status"] == "ok"
        # SIGTERM under load: the long sample is cut after the grace period, the server exits 0
        t0 = time.monotonic()
        assert s.stop(signal.SIGTERM, timeout=60) == 0
        assert time.monotonic() - t0 < 30
        long.join(30)
        short.join(30)
        assert not long.is_alive() and not short.is_alive()
        assert long_events, "the long stream sent nothing"
        with pytest.raises(OSError):
            s.request("GET", "/health", timeout=5)
    finally:
        if s.proc.poll() is None:
            s.proc.kill()
            s.proc.wait()


def test_a_request_past_the_timeout_is_cancelled():
    s = Server("--batch_size", "2", "--timeout", "1.5")
    try:
        # greedy: deterministic, and this prompt's greedy continuation never draws <|endoftext|>
        body = {"prompt": "終わらない", "max_tokens": 10 ** 6, "max_length": 10 ** 6, "temperature": 0}
        status, _, answer = s.request("POST", "/v1/completions", body)
        assert status == 504 and answer["error"]["code"] == "timeout"
        events = stream_events(s.port, body)
        assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "timeout"
        end = time.monotonic() + 30
        while s.request("GET", "/health")[2]["rows"] != 0:
            assert time.monotonic() < end, "the timed-out samples kept their rows"
            time.sleep(0.1)
        assert s.request("POST", "/v1/completions", {"prompt": "次", "max_tokens": 3})[0] == 200
        assert s.stop() == 0
    finally:
        if s.proc.poll() is None:
            s.proc.kill()
            s.proc.wait()


def test_sigterm_lets_requests_in_flight_finish():
    s = Server("--batch_size", "4", "--grace", "20")
    try:
        results = []
        threads = [threading.Thread(target=lambda k=k: results.append(stream_events(
            s.port, {"prompt": f"終わり{k}", "max_tokens": 60, "seed": k}, timeout=120))) for k in range(6)]
        for t in threads:
            t.start()
        end = time.monotonic() + 60
        while s.request("GET", "/health")[2]["rows"] == 0:
            assert time.monotonic() < end
            time.sleep(0.02)
        assert s.stop(signal.SIGTERM, timeout=60) == 0
        for t in threads:
            t.join(30)
        assert len(results) == 6 and all(r[-1] == "[DONE]" for r in results)
        assert all(streamed_texts(r)[1][0] in ("stop", "length") for r in results)
    finally:
        if s.proc.poll() is None:
            s.proc.kill()
            s.proc.wait()


# -- the page, in a real browser -------------------------------------------------------------

def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def test_the_page_streams_text_in_a_browser(server, tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser, driver_path = _chromium(), shutil.which("chromedriver")
    if not browser or not driver_path:
        pytest.skip("chromium and chromedriver are needed (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=900,1000", "--lang=ja"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    try:
        driver.set_page_load_timeout(60)
        driver.get(server.base + "/")
        assert "文章生成" in driver.title
        box = driver.find_element(By.ID, "context")
        box.clear()
        box.send_keys("江戸時代のインターネット回線")
        driver.find_element(By.ID, "max_tokens").clear()
        driver.find_element(By.ID, "max_tokens").send_keys("60")
        driver.find_element(By.ID, "seed").send_keys("7")
        driver.find_element(By.ID, "generate").click()
        wait = WebDriverWait(driver, 120, poll_frequency=0.05)
        wait.until(lambda d: d.find_element(By.ID, "generated").text != "")
        wait.until(lambda d: "完了" in d.find_element(By.ID, "status").text)
        shown = driver.find_element(By.ID, "generated").text
        expected = server.request("POST", "/v1/completions", {"model": MODEL, "prompt": "江戸時代のインターネット回線",
                                                              "max_tokens": 60, "seed": 7, "top_k": 40})[2]
        assert "".join(shown.split()) == "".join(expected["choices"][0]["text"].split())
        shot = tmp_path / "server.png"
        driver.save_screenshot(str(shot))
        assert shot.stat().st_size > 1000
        if os.environ.get("GPT2JA_SCREENSHOT"):  # README's picture: GPT2JA_SCREENSHOT=docs/server.png
            shutil.copyfile(shot, ROOT / os.environ["GPT2JA_SCREENSHOT"])
        # the advanced controls, and top_k with top_p: every value shown is applied
        driver.find_element(By.CSS_SELECTOR, "#advanced summary").click()
        for name, value in (("repetition_penalty", "1.5"), ("min_p", "0.05"), ("top_p", "0.9")):
            driver.find_element(By.ID, name).clear()
            driver.find_element(By.ID, name).send_keys(value)
        driver.find_element(By.ID, "generate").click()
        wait.until(lambda d: "完了" in d.find_element(By.ID, "status").text and d.find_element(By.ID, "generated").text)
        shown = driver.find_element(By.ID, "generated").text
        expected = server.request("POST", "/v1/completions", {"prompt": "江戸時代のインターネット回線", "max_tokens": 60,
                                                              "seed": 7, "top_k": 40, "top_p": 0.9, "min_p": 0.05,
                                                              "repetition_penalty": 1.5})[2]
        assert "".join(shown.split()) == "".join(expected["choices"][0]["text"].split())
        plain = server.request("POST", "/v1/completions", {"prompt": "江戸時代のインターネット回線", "max_tokens": 60,
                                                           "seed": 7, "top_k": 40})[2]
        assert expected["choices"][0]["text"] != plain["choices"][0]["text"]
        # the stop button ends a long generation
        driver.find_element(By.ID, "max_tokens").clear()
        driver.find_element(By.ID, "max_tokens").send_keys("100000")
        driver.find_element(By.ID, "seed").clear()
        driver.find_element(By.ID, "generate").click()
        wait.until(lambda d: d.find_element(By.ID, "generated").text != "")
        driver.find_element(By.ID, "stop").click()
        wait.until(lambda d: "停止" in d.find_element(By.ID, "status").text)
        assert driver.find_element(By.ID, "generate").is_enabled()
    finally:
        driver.quit()


def test_the_page_asks_for_the_api_key_and_shows_japanese_in_a_japanese_font():
    """On a 401 the page opens its API-key field and asks; the key stays for the next requests (never
    stored); the Japanese text is drawn with a Japanese font (.ci/run installs fonts-ipafont-gothic)."""
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser, driver_path = _chromium(), shutil.which("chromedriver")
    if not browser or not driver_path:
        pytest.skip("chromium and chromedriver are needed (apt-get install chromium chromium-driver)")
    s = Server("--batch_size", "2", env_extra={"GPT2JA_API_KEY": "sekrit"})
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=900,1000", "--lang=ja"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    try:
        driver.set_page_load_timeout(60)
        driver.get(s.base + "/")
        # fonts: the heading's Japanese characters are drawn by a Japanese font, not boxes
        families = driver.execute_script("return getComputedStyle(document.body).fontFamily")
        assert families.split(",")[0].strip().strip('"') == "Hiragino Sans" and "IPAGothic" in families
        driver.execute_cdp_cmd("DOM.enable", {})
        driver.execute_cdp_cmd("CSS.enable", {})
        root = driver.execute_cdp_cmd("DOM.getDocument", {})["root"]["nodeId"]
        h1 = driver.execute_cdp_cmd("DOM.querySelector", {"nodeId": root, "selector": "h1"})["nodeId"]
        used = driver.execute_cdp_cmd("CSS.getPlatformFontsForNode", {"nodeId": h1})["fonts"]
        japanese = ("IPA", "Noto Sans CJK", "Noto Sans JP", "Source Han", "Takao", "VL Gothic", "Hiragino",
                    "Yu Gothic", "Meiryo")
        assert used and any(f["familyName"].startswith(japanese) for f in used), used
        # no key: a 401 opens the field and asks
        box = driver.find_element(By.ID, "api_key_box")
        assert box.get_attribute("open") is None
        driver.find_element(By.ID, "max_tokens").clear()
        driver.find_element(By.ID, "max_tokens").send_keys("8")
        driver.find_element(By.ID, "generate").click()
        wait = WebDriverWait(driver, 120, poll_frequency=0.05)
        wait.until(lambda d: "API キー" in d.find_element(By.ID, "status").text)
        assert box.get_attribute("open") is not None
        assert driver.switch_to.active_element.get_attribute("id") == "api_key"
        assert driver.find_element(By.ID, "generate").is_enabled()
        # a wrong key says so
        driver.switch_to.active_element.send_keys("wrong")
        driver.find_element(By.ID, "generate").click()
        wait.until(lambda d: "違います" in d.find_element(By.ID, "status").text)
        # the right key (Enter in the field generates), then again without typing it
        field = driver.find_element(By.ID, "api_key")
        field.clear()
        field.send_keys("sekrit\n")
        wait.until(lambda d: "完了" in d.find_element(By.ID, "status").text)
        assert driver.find_element(By.ID, "generated").text != ""
        from selenium.webdriver.support.expected_conditions import staleness_of

        before = driver.find_element(By.ID, "generated")
        driver.find_element(By.ID, "generate").click()
        wait.until(staleness_of(before))  # a new request's output replaced the last one
        wait.until(lambda d: "完了" in d.find_element(By.ID, "status").text)
        assert driver.find_element(By.ID, "generated").text != ""
        assert field.get_attribute("value") == "sekrit"
        assert driver.execute_script("return localStorage.length + document.cookie.length") == 0
    finally:
        driver.quit()
        assert s.stop() == 0


def test_embeddings_json_reads_back_the_same_float32_with_or_without_orjson(monkeypatch):
    import server.app as app

    vectors = np.random.default_rng(0).standard_normal((3, 16)).astype(np.float32)
    bodies = []
    for fast in ([app.orjson] if app.orjson is not None else []) + [None]:
        monkeypatch.setattr(app, "orjson", fast)
        data = [{"embedding": v if fast is not None else v.tolist()} for v in vectors]
        bodies.append(json.loads(app._json({"data": data}).body))
    for body in bodies:
        np.testing.assert_array_equal(np.array([d["embedding"] for d in body["data"]], np.float32), vectors)
