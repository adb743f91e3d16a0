"""Measuring a running server from outside, as its clients see it (standard library only):
streamed requests with the time to their first text, concurrent rounds checked against
answers run alone, and the server's resident memory.

`edgeprefill serve-bench` drives these against a server it starts; the tests use them too.
"""

import http.client
import json
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

from edgeprefill.errors import EdgeprefillError


class Reply:
    """One request's outcome: HTTP status, text, finish_reason, the server's prefill field,
    seconds to the first text (streamed requests), whether the stream ended with [DONE], and
    the error body when status != 200."""

    def __init__(self, status, text="", finish=None, prefill=None, first_s=None, done=False,
                 error=None, usage=None):
        self.status, self.text, self.finish, self.prefill = status, text, finish, prefill
        self.first_s, self.done, self.error, self.usage = first_s, done, error, usage

    @property
    def complete(self):
        return self.status == 200 and self.finish is not None and self.done


def post(base, path, body, api_key=None, timeout=600):
    """POST JSON to base+path; a streamed body (body["stream"]) is read event by event.
    Returns a Reply."""
    u = urlparse(base)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    t0 = time.perf_counter()
    try:
        conn.request("POST", u.path.rstrip("/") + path, json.dumps(body), headers)
        resp = conn.getresponse()
        if resp.status != 200:
            return Reply(resp.status, error=json.loads(resp.read() or b"{}"))
        if not body.get("stream"):
            d = json.loads(resp.read())
            c = d["choices"][0]
            text = c["message"]["content"] if "message" in c else c["text"]
            return Reply(200, text, c["finish_reason"], d.get("prefill"), done=True,
                         usage=d.get("usage"))
        return _read_stream(resp, t0)
    finally:
        conn.close()


def _read_stream(resp, t0):
    text, finish, prefill, first, usage = "", None, None, None, None
    for raw in resp:
        line = raw.decode().strip()
        if not line.startswith("data: "):
            continue
        data = line[6:]
        if data == "[DONE]":
            return Reply(200, text, finish, prefill, first, True, usage=usage)
        d = json.loads(data)
        if "error" in d:
            return Reply(200, text, None, prefill, first, error=d)
        prefill = d.get("prefill", prefill)
        usage = d.get("usage", usage)
        for c in d["choices"]:
            piece = c.get("delta", {}).get("content") if "delta" in c else c.get("text")
            if piece:
                first = first or time.perf_counter() - t0
                text += piece
            finish = c.get("finish_reason") or finish
    return Reply(200, text, finish, prefill, first, False, usage=usage)


def get(base, path, api_key=None):
    """GET base+path -> (status, JSON body)."""
    u = urlparse(base)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    try:
        conn.request("GET", u.path.rstrip("/") + path,
                     headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"{}")
    finally:
        conn.close()


def rss_mb(pid):
    """Resident memory of process `pid` in MiB (ps works on Linux and macOS)."""
    out = subprocess.run(["ps", "-o", "rss=", "-p", str(pid)], capture_output=True, text=True)
    return int(out.stdout.strip() or 0) / 1024


def run_round(base, bodies, clients, path="/chat/completions", api_key=None):
    """Every body sent once, `clients` at a time; Replies in the bodies' order."""
    with ThreadPoolExecutor(clients) as pool:
        return list(pool.map(lambda b: post(base, path, b, api_key), bodies))


class Server:
    """`edgeprefill serve` in a child process on a free loopback port, stopped on exit.

    Args:
        args: serve's arguments after the command (--model ..., --strategy ...).
        env: the child's environment.
    """

    def __init__(self, args, env=None, ready_s=600):
        cmd = [sys.executable, "-m", "edgeprefill.apps.cli", "serve", "--port", "0",
               "--log-level", "warning", *args]
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                     env=env, text=True)
        self.log = []
        self.base = None
        deadline = time.time() + ready_s
        for line in self.proc.stderr:
            self.log.append(line)
            if " on http://" in line:
                self.base = line.split(" on ")[1].split()[0]
                break
            if time.time() > deadline:
                break
        if self.base is None:
            self.stop()
            raise EdgeprefillError("the server did not start: " + "".join(self.log).strip()[-300:])
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self):
        for line in self.proc.stderr:
            self.log.append(line)

    @property
    def pid(self):
        return self.proc.pid

    def stop(self, sig_timeout=20):
        """Ctrl-C, as a user stops it; the exit status (killed after `sig_timeout` s)."""
        if self.proc.poll() is None:
            self.proc.send_signal(2)
            try:
                self.proc.wait(sig_timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def _texts(tokenizer, n_tokens, count, offset=0):
    """`count` distinct held-out texts of about `n_tokens` tokens (code and prose windows)."""
    from edgeprefill.data import bench_prompts

    windows = bench_prompts(tokenizer, n_tokens, count + offset)[offset:]
    return [tokenizer.decode(w) for w in windows]


def ttft_records(base, tokenizer, strategies, prompt_tokens, question_tokens=64, trials=1,
                 max_tokens=4, progress=None):
    """Cold and warm-prefix TTFT per strategy, through the server: each trial sends a
    document it has not seen with one question (cold), then the same document with a new
    question (warm: the prefix cache holds the document). One record per (strategy, trial)
    with the server's figures (ttft_ms: request in -> first token) and the client's
    (client_ms: request out -> first text)."""
    n = len(strategies) * trials
    docs = _texts(tokenizer, prompt_tokens, n)
    questions = _texts(tokenizer, question_tokens, 2 * n, offset=n)
    records = []
    for i, (s, t) in enumerate((s, t) for s in strategies for t in range(trials)):
        rec = {"strategy": s, "trial": t}
        for mode, q in (("cold", questions[2 * i]), ("warm", questions[2 * i + 1])):
            body = {"messages": [{"role": "user", "content": docs[i] + "\n\nQuestion: " + q}],
                    "max_tokens": max_tokens, "stream": True, "prefill": {"strategy": s},
                    "stream_options": {"include_usage": True}}
            r = post(base, "/chat/completions", body)
            if not r.complete:
                raise EdgeprefillError(f"{s} {mode} request failed: {r.error}")
            p = r.prefill
            rec[mode] = {"ttft_ms": p["ttft_ms"], "prefill_ms": p["prefill_ms"],
                         "client_ms": round(r.first_s * 1000, 1) if r.first_s else None,
                         "prompt_tokens": r.usage["prompt_tokens"],
                         "cached_tokens": p.get("cached_tokens", 0),
                         "prefilled_with": p["prefilled_with"], "exact": p["exact"]}
            if progress:
                progress()
        rec["warm_speedup"] = round(rec["cold"]["ttft_ms"] / rec["warm"]["ttft_ms"], 2)
        records.append(rec)
    return records


def load_bodies(tokenizer, max_prompt_tokens, distinct=12, max_tokens=16):
    """`distinct` greedy chat requests of mixed lengths: three documents (a quarter, half and
    all of `max_prompt_tokens`) asked three questions each, and short prompts."""
    docs = _texts(tokenizer, max_prompt_tokens, 3)
    sizes = [max(16, max_prompt_tokens // 4), max(16, max_prompt_tokens // 2), max_prompt_tokens]
    docs = [tokenizer.decode(tokenizer.encode(d)[:k]) for d, k in zip(docs, sizes)]
    asks = ["What is this about?", "Quote its first line.", "List three names in it."]
    bodies = [{"messages": [{"role": "user", "content": d + "\n\n" + a}]} for d in docs
              for a in asks]
    short = ["Hello!", "What is the capital of France?", "Write a haiku about tea.",
             "Explain time-to-first-token in one sentence."]
    bodies += [{"messages": [{"role": "user", "content": s}]} for s in short]
    bodies = bodies[:distinct]
    for b in bodies:
        b.update(max_tokens=max_tokens, temperature=0)
    return bodies


def load_rounds(server, bodies, requests=50, clients=8, rounds=3, progress=None):
    """Each distinct body run alone (one at a time), then `rounds` rounds of `requests`
    requests (the bodies in turn, every other one streamed) from `clients` concurrent
    clients. Every answer must be complete and equal to its body's answer alone. Returns
    {"alone_s", "rounds": [{wall_s, errors, mismatches, ttft_ms, rss_mb}], "rss_growth"}."""
    t0 = time.perf_counter()
    alone = []
    for b in bodies:
        r = post(server.base, "/chat/completions", b)
        if not r.complete:
            raise EdgeprefillError(f"a request run alone failed: {r.error}")
        alone.append(r.text)
    out = {"alone_s": round(time.perf_counter() - t0, 2), "rounds": []}
    for k in range(rounds):
        batch = [dict(bodies[i % len(bodies)], stream=i % 2 == 0) for i in range(requests)]
        t0 = time.perf_counter()
        replies = run_round(server.base, batch, clients)
        wall = time.perf_counter() - t0
        ttfts = [r.prefill["ttft_ms"] for r in replies if r.complete]
        from edgeprefill.server.engine import percentiles

        out["rounds"].append({
            "round": k + 1, "requests": requests, "clients": clients, "wall_s": round(wall, 2),
            "errors": sum(not r.complete for r in replies),
            "mismatches": sum(r.complete and r.text != alone[i % len(bodies)]
                              for i, r in enumerate(replies)),
            "ttft_ms": percentiles(ttfts), "rss_mb": round(rss_mb(server.pid), 1)})
        if progress:
            progress()
    rss = [r["rss_mb"] for r in out["rounds"]]
    out["rss_growth"] = round((max(rss) - rss[0]) / rss[0], 4) if rss and rss[0] else None
    return out
