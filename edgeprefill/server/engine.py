"""The server's engine: one model, one worker thread that runs the requests in turn (so no
two touch a cache at once), a bounded queue, the prefix cache shared by every request, the
strategies built once and kept, and TTFT figures per strategy.

A request's events reach its caller through the callback it was submitted with:
("text", str) as the answer streams, then ("done", summary) or ("error", status, message).
"""

import math
import queue
import sys
import threading
import time
from collections import defaultdict, deque

from edgeprefill.errors import EdgeprefillError


class QueueFull(Exception):
    """The engine holds as many requests as it may."""


class Job:
    """A submitted request: what to run, where its events go, and a cancel flag (a client
    that disconnected)."""

    def __init__(self, request, emit):
        self.request = request
        self.emit = emit
        self.accepted = time.perf_counter()
        self.cancelled = threading.Event()

    def cancel(self):
        self.cancelled.set()


def percentiles(values, qs=(50, 90, 99)):
    """Nearest-rank percentiles of `values` (ms), with their mean; {} when there are none."""
    if not values:
        return {}
    v = sorted(values)
    out = {f"p{q}": round(v[max(0, math.ceil(q / 100 * len(v)) - 1)], 2) for q in qs}
    out["mean"] = round(sum(v) / len(v), 2)
    return out


class Metrics:
    """Per-strategy counts and the last `keep` TTFT samples (ms)."""

    def __init__(self, keep=10_000):
        self.lock = threading.Lock()
        self.started = time.time()
        self.counts = defaultdict(lambda: defaultdict(int))
        self.samples = defaultdict(lambda: {k: deque(maxlen=keep)
                                            for k in ("ttft_ms", "prefill_ms", "queue_ms")})

    def record(self, strategy, outcome, summary=None):
        with self.lock:
            self.counts[strategy][outcome] += 1
            if summary and "ttft_ms" in summary:
                c = self.counts[strategy]
                c["prompt_tokens"] += summary["prompt_tokens"]
                c["cached_tokens"] += summary.get("cached_tokens", 0)
                c["completion_tokens"] += summary["completion_tokens"]
                for k, d in self.samples[strategy].items():
                    d.append(summary[k])

    def snapshot(self):
        with self.lock:
            return {name: {**dict(self.counts[name]),
                           **{k: percentiles(list(d)) for k, d in self.samples[name].items()}}
                    for name in self.counts}


class Engine:
    """Runs requests on one loaded model, one at a time, in arrival order.

    Args:
        lm: a LoadedModel.
        server_options: strategy options from the command line (kvp, draft, workers, ...),
            given to each strategy that takes them.
        cache_bytes: the prefix cache's budget in bytes (0: no prefix cache).
        max_queue: most requests held (running and waiting); more are refused (QueueFull).
        kv_bits: decode over a 4- or 8-bit cache.
    """

    def __init__(self, lm, server_options=None, cache_bytes=2**30, max_queue=16, kv_bits=None):
        from edgeprefill.cache import PrefixCache

        self.lm = lm
        self.server_options = {k: v for k, v in (server_options or {}).items() if v is not None}
        self.prefix = PrefixCache(cache_bytes) if cache_bytes else None
        self.max_queue = max_queue
        self.kv_bits = kv_bits
        self.metrics = Metrics()
        self.jobs = queue.Queue()
        self.lock = threading.Lock()
        self.held = 0  # running + waiting
        self.built = {}
        self.thread = threading.Thread(target=self._loop, name="edgeprefill-engine", daemon=True)
        self.thread.start()

    @property
    def window(self):
        return self.lm.model.max_context

    def submit(self, request, emit):
        """Queue `request`; its events go to `emit`. Raises QueueFull when the queue is full."""
        job = Job(request, emit)
        with self.lock:
            if self.held >= self.max_queue:
                raise QueueFull(f"the server holds {self.held} requests, its limit "
                                f"(--max-queue {self.max_queue}): retry shortly")
            self.held += 1
        self.jobs.put(job)
        return job

    def status(self):
        with self.lock:
            held = self.held
        pc = self.prefix
        return {"queue": {"held": held, "max": self.max_queue},
                "prefix_cache": ({"entries": len(pc), "bytes": pc.nbytes,
                                  "max_bytes": pc.max_bytes} if pc else None)}

    def close(self, timeout=10.0):
        """Stop the worker after the running request and close strategies with processes."""
        self.jobs.put(None)
        self.thread.join(timeout)
        for strat in self.built.values():
            if hasattr(strat, "close"):
                strat.close()
        self.built.clear()

    def strategy(self, name, options):
        """The built strategy for (name, options), built on first use and kept."""
        from edgeprefill.prefill import registry

        key = (name, tuple(sorted(options.items())))
        if key not in self.built:
            spec, _ = registry.parse(name)
            server = {k: v for k, v in self.server_options.items() if k in spec.options}
            self.built[key] = registry.build(name, self.lm, **{**server, **options})
        return self.built[key]

    def _loop(self):
        while True:
            job = self.jobs.get()
            if job is None:
                return
            name = job.request.strategy
            try:
                if job.cancelled.is_set():
                    self.metrics.record(name, "cancelled")
                    continue
                self._run(job)
            except EdgeprefillError as e:
                self.metrics.record(name, "errors")
                job.emit(("error", 400, str(e)))
            except Exception as e:  # a bug: the client gets a 500, the log one line
                self.metrics.record(name, "errors")
                print(f"edgeprefill serve: internal error: {type(e).__name__}: {e}",
                      file=sys.stderr)
                job.emit(("error", 500, f"internal error: {type(e).__name__}: {e}"))
            finally:
                with self.lock:
                    self.held -= 1

    def _run(self, job):
        from edgeprefill import api
        from edgeprefill.prefill import registry

        r = job.request
        started = time.perf_counter()
        strat = self.strategy(r.strategy, r.options)
        gen = api.stream_generate(self.lm, r.ids, strategy=strat, max_tokens=r.max_tokens,
                                  temp=r.temp, top_p=r.top_p, seed=r.seed, stop=r.stop,
                                  prompt_cache=self.prefix, kv_bits=self.kv_bits)
        first, last = None, None
        try:
            for resp in gen:
                if job.cancelled.is_set():
                    self.metrics.record(r.strategy, "cancelled")
                    return
                if first is None and resp.token is not None:
                    first = time.perf_counter()
                if resp.text:
                    job.emit(("text", resp.text))
                last = resp
        finally:
            gen.close()
        first = first or time.perf_counter()
        s = last.stats
        cached = s.get("cached_tokens", 0)
        exact = registry.is_exact(last.strategy) and (not cached or s.get("cache_exact", True))
        summary = {"strategy": r.strategy, "prefilled_with": last.strategy, "exact": exact,
                   "ttft_ms": round((first - job.accepted) * 1000, 2),
                   "prefill_ms": round(last.ttft_s * 1000, 2),
                   "queue_ms": round((started - job.accepted) * 1000, 2),
                   "prompt_tokens": len(r.ids), "completion_tokens": last.generation_tokens,
                   "finish_reason": last.finish_reason}
        if self.prefix is not None:
            summary["cached_tokens"] = cached
        self.metrics.record(r.strategy, "requests", summary)
        job.emit(("done", summary))
