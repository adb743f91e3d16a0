"""`edgeprefill serve` against real clients: the official `openai` package, raw HTTP, and a
bounded load test on the loopback address."""
import http.client
import json
import os
import socket
import subprocess
import time
from urllib.parse import urlparse

import pytest

from edgeprefill.server.load import Server, get, post, run_round
from tests.conftest import CLI, ROOT

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    e = dict(os.environ)
    e["EDGEPREFILL_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    return e


@pytest.fixture(scope="module")
def server(tiny_models, env):
    with Server(["--model", str(tiny_models["llama"])], env=env) as s:
        yield s


@pytest.fixture(scope="module")
def slow_model(tmp_path_factory):
    """A random model wide enough that a long answer takes seconds on a CPU."""
    from edgeprefill.models.random import random_model_folder

    shape = dict(hidden_size=512, num_hidden_layers=8, intermediate_size=1024,
                 num_attention_heads=8, num_key_value_heads=4, vocab_size=384,
                 max_position_embeddings=8192)
    return random_model_folder(tmp_path_factory.mktemp("slow") / "m", "llama", shape=shape)


def client(server, key="unused"):
    return openai.OpenAI(base_url=server.base, api_key=key, max_retries=0, timeout=120)


def ask(content):
    return [{"role": "user", "content": content}]


def test_openai_client_chat_streaming_stop_and_completions(server):
    c = client(server)
    r = c.chat.completions.create(model="tiny", messages=ask("Tell me about rivers."),
                                  max_tokens=12)
    text = r.choices[0].message.content
    assert r.choices[0].finish_reason in ("length", "stop") and r.usage.completion_tokens >= 1
    assert r.usage.prompt_tokens > 5
    prefill = r.model_extra["prefill"]
    assert prefill["strategy"] == "full" and prefill["exact"] is True and prefill["ttft_ms"] > 0
    # streamed: the same greedy answer, piece by piece, then usage
    pieces, usage, finish = [], None, None
    for ch in c.chat.completions.create(model="tiny", messages=ask("Tell me about rivers."),
                                        max_tokens=12, stream=True,
                                        stream_options={"include_usage": True}):
        if ch.choices:
            pieces.append(ch.choices[0].delta.content or "")
            finish = ch.choices[0].finish_reason or finish
        usage = ch.usage or usage
    assert "".join(pieces) == text and finish == r.choices[0].finish_reason
    assert usage.completion_tokens == r.usage.completion_tokens
    assert usage.prompt_tokens_details.cached_tokens > 0  # the same prompt again
    # a stop sequence cuts the answer before it, streamed or not
    long = c.chat.completions.create(model="tiny", messages=ask("Count."), max_tokens=24)
    full_text = long.choices[0].message.content
    stop = full_text[4:6]
    assert len(stop) == 2
    cut = c.chat.completions.create(model="tiny", messages=ask("Count."), max_tokens=24,
                                    stop=[stop])
    assert cut.choices[0].message.content == full_text[:full_text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
        model="tiny", messages=ask("Count."), max_tokens=24, stop=stop, stream=True)
        if ch.choices)
    assert streamed == cut.choices[0].message.content
    # text completions, and a per-request strategy
    t = c.completions.create(model="tiny", prompt="The river flows", max_tokens=6)
    assert t.choices[0].text and t.usage.completion_tokens == 6
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model="tiny", prompt="The river flows", max_tokens=6, stream=True) if ch.choices)
    assert streamed == t.choices[0].text
    lazy = c.chat.completions.create(model="tiny", messages=ask("Tell me about rivers."),
                                     max_tokens=4, extra_body={"prefill": {"strategy": "lazy"}})
    assert lazy.model_extra["prefill"]["strategy"] == "lazy"
    assert [m.id for m in c.models.list().data] == [str(server_model(server))]


def server_model(server):
    return get(server.base, "/models")[1]["data"][0]["id"]


def test_bad_requests_get_openai_errors(server):
    c = client(server)
    cases = [
        (dict(temperature=5), 400, "temperature"),
        (dict(extra_body={"prefill": {"strategy": "nope"}}), 400, "unknown strategy"),
        (dict(extra_body={"prefill": {"strategy": "full", "keep": 0.5}}), 400, "keep"),
        (dict(extra_body={"prefill": {"strategy": "gemfilter", "keep": 7.5}}), 400, "keep"),
        (dict(extra_body={"top_k": 5}), 400, "top_k"),
        (dict(extra_body={"prefill": {"strategy": "kvp"}}), 400, "pair"),  # none for this model
        (dict(extra_body={"prefill": {"strategy": "kvp", "kvp": "/etc"}}), 400, "command-line"),
        (dict(n=2), 400, "n must be 1"),
        (dict(stop=["a", ""]), 400, "stop"),
    ]
    for kwargs, status, needle in cases:
        with pytest.raises(openai.APIStatusError) as e:
            c.chat.completions.create(model="tiny", messages=ask("hi"), max_tokens=2, **kwargs)
        assert e.value.status_code == status and needle in e.value.message, (kwargs, e.value)
        assert "Traceback" not in e.value.message
    with pytest.raises(openai.APIStatusError) as e:
        c.chat.completions.create(model="tiny", messages=ask("word " * 700), max_tokens=2)
    assert e.value.status_code == 413 and e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model="tiny", messages=[{"role": "robot", "content": "x"}])
    # raw HTTP: a body that is not JSON, an unknown route, a wrong method
    u = urlparse(server.base)
    for method, path, body, status in (("POST", "/v1/chat/completions", "{oops", 400),
                                       ("GET", "/v2/nothing", None, 404),
                                       ("GET", "/v1/chat/completions", None, 405)):
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
        conn.request(method, path, body)
        resp = conn.getresponse()
        payload = json.loads(resp.read())
        assert resp.status == status and payload["error"]["message"], (path, payload)
        conn.close()
    # the server is still there, and its metrics count what ran (this test's own request:
    # under xdist the module's other tests may run in another process)
    assert c.chat.completions.create(model="tiny", messages=ask("hi"), max_tokens=2).choices
    status, m = get(server.base.replace("/v1", ""), "/metrics")
    assert status == 200 and m["strategies"]["full"]["requests"] >= 1
    assert m["strategies"]["gemfilter"]["errors"] >= 1  # keep 7.5 failed when it was built
    assert set(m["strategies"]["full"]["ttft_ms"]) == {"p50", "p90", "p99", "mean"}


def test_api_key_is_checked_on_every_request(tiny_models, env):
    with Server(["--model", str(tiny_models["llama"]), "--api-key", "s3cret"], env=env) as s:
        with pytest.raises(openai.AuthenticationError):
            client(s, "wrong").chat.completions.create(model="m", messages=ask("hi"))
        assert client(s, "s3cret").chat.completions.create(
            model="m", messages=ask("hi"), max_tokens=2).choices[0].finish_reason
        root = s.base.replace("/v1", "")
        assert get(root, "/health")[0] == 401 and get(root, "/metrics")[0] == 401
        assert get(root, "/health", api_key="s3cret") == (200, {"status": "ok",
                                                               "model": server_model_key(s)})


def server_model_key(s):
    return get(s.base, "/models", api_key="s3cret")[1]["data"][0]["id"]


def _held(base):
    return get(base.replace("/v1", ""), "/metrics")[1]["queue"]["held"]


def _wait(cond, timeout=60):
    end = time.time() + timeout
    while time.time() < end:
        if cond():
            return True
        time.sleep(0.1)
    return False


def test_full_queue_gets_503_and_a_client_that_leaves_frees_its_slot(slow_model, env):
    with Server(["--model", str(slow_model), "--max-queue", "1"], env=env) as s:
        u = urlparse(s.base)
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=120)
        body = {"messages": ask("Write a long story."), "max_tokens": 4000, "stream": True}
        conn.request("POST", "/v1/chat/completions", json.dumps(body),
                     {"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200 and resp.readline().startswith(b"data: ")
        # the one slot is taken: another request is refused at once
        busy = post(s.base, "/chat/completions", {"messages": ask("hi"), "max_tokens": 2})
        assert busy.status == 503 and busy.error["error"]["code"] == "queue_full"
        # the streaming client goes away mid-answer: its slot frees long before 4000 tokens
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()
        assert _wait(lambda: _held(s.base) == 0, timeout=30)
        m = get(s.base.replace("/v1", ""), "/metrics")[1]
        assert m["strategies"]["full"].get("cancelled", 0) == 1
        ok = post(s.base, "/chat/completions", {"messages": ask("hi"), "max_tokens": 2})
        assert ok.complete


def _load_bodies():
    """50 requests from 12 distinct ones: long shared documents with different questions,
    short prompts, streamed and not, full and lazy (lazy ones share no document)."""
    docs = [("The Danube flows through ten countries and four capitals. " * 12),
            ("def prefill(ids):\n    return cache, logits\n" * 14)]
    distinct = []
    for d in docs:
        for q in ("What flows?", "Name a capital.", "Summarize.", "How many?"):
            distinct.append({"messages": ask(d + "\n" + q), "max_tokens": 10})
    distinct += [{"messages": ask("Hello there."), "max_tokens": 16},
                 {"messages": ask("Why is the sky blue?"), "max_tokens": 8}]
    distinct += [{"messages": ask(w * 30), "max_tokens": 8, "prefill": {"strategy": "lazy"}}
                 for w in ("lazy river ", "slow clouds ")]
    bodies = []
    for i in range(50):
        b = dict(distinct[(i * 7) % len(distinct)])
        b["stream"] = i % 2 == 0
        bodies.append(b)
    return distinct, bodies


def _key(b):
    return json.dumps({k: v for k, v in b.items() if k != "stream"}, sort_keys=True)


def test_load_8_clients_50_requests_each_answer_equals_it_run_alone(tiny_models, env):
    distinct, bodies = _load_bodies()
    with Server(["--model", str(tiny_models["llama"]), "--max-queue", "64"], env=env) as s:
        alone = {}
        for b in distinct:  # one at a time
            r = post(s.base, "/chat/completions", b)
            assert r.complete
            alone[_key(b)] = r.text
        for _ in range(2):
            replies = run_round(s.base, bodies, clients=8)
            assert all(r.complete for r in replies), [r.error for r in replies if not r.complete]
            wrong = [i for i, (b, r) in enumerate(zip(bodies, replies)) if r.text != alone[_key(b)]]
            assert not wrong, wrong
        m = get(s.base.replace("/v1", ""), "/metrics")[1]
        assert m["queue"]["held"] == 0
        assert m["strategies"]["full"]["cached_tokens"] > 0  # documents were reused
        assert m["strategies"]["lazy"]["requests"] == 2 + 2 * sum(
            1 for b in bodies if "prefill" in b)


def test_ctrl_c_and_sigterm_stop_cleanly_and_a_taken_port_is_one_line(tiny_models, env):
    for sig in (2, 15):
        s = Server(["--model", str(tiny_models["llama"])], env=env)
        assert post(s.base, "/chat/completions", {"messages": ask("hi"), "max_tokens": 2}).complete
        s.proc.send_signal(sig)
        assert s.proc.wait(30) == 0
        time.sleep(0.2)
        log = "".join(s.log)
        assert "stopped" in log and "Traceback" not in log, log
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        r = subprocess.run([*CLI, "serve", "--model", str(tiny_models["llama"]), "--port",
                            str(port)], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("edgeprefill: error: cannot listen")
    r = subprocess.run([*CLI, "serve", "--model", str(tiny_models["llama"]), "--strategy",
                        "bogus"], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        r.stderr.strip().splitlines()[-1]] and "unknown strategy 'bogus'" in r.stderr


def test_serve_bench_measures_cold_warm_and_load_and_checks_every_answer(tiny_models, env,
                                                                         tmp_path):
    out = tmp_path / "serve.json"
    r = subprocess.run([*CLI, "serve-bench", "--model", str(tiny_models["llama"]),
                        "--strategies", "full,lazy", "--prompt-tokens", "200",
                        "--question-tokens", "16", "--load-tokens", "200", "--requests", "12",
                        "--clients", "4", "--rounds", "2", "--json", str(out)],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    d = json.loads(out.read_text())
    full, lazy = d["ttft"]
    assert full["warm"]["cached_tokens"] > 150 and full["warm"]["exact"] is True
    assert lazy["cold"]["prefilled_with"] == "lazy" and lazy["warm"]["cached_tokens"] == 0
    assert [x["errors"] + x["mismatches"] for x in d["load"]["rounds"]] == [0, 0]
    assert d["server_exit"] == 0 and d["load"]["rss_growth"] is not None
