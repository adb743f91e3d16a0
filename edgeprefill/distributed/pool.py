"""Running prefills on runahead workers from the parent process: a file of jobs on one
launch (`run_jobs`, the tuner's and tests' path), and a pool of workers kept alive between
prompts whose results come back as arrays (`WorkerPrefill`: the prefill contract)."""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from edgeprefill.distributed.launch import (WORKER, check_local_workers, kill_groups, last_lines,
                                            launch, resolve_backend, start_local)
from edgeprefill.errors import EdgeprefillError

POOL_PREFIX = "edgeprefill-runahead-"  # a pool's job folder: <prefix><pid>.<random>


def run_jobs(lm, jobs, n_workers, timeout=300, hostfile=None, dtype="auto", backend="auto",
             link=False, arrays=False):
    """Launch the workers once and run every job on them (no process start or model load
    between jobs). A job: {"strategy": "runahead" | "tsp" | "runahead-kvp", "ids": [...],
    optional "sizes", "alpha", "trials", "check", "max_tokens", "logits", "continuation", and
    for runahead-kvp "artifact" and "tail"}. With `link`, the last two ranks time
    point-to-point messages (the projection model's link figures). With `arrays`, each job's
    cache and logits come back too (over machines: the last rank must share this folder).

    Returns:
        {"results": [one dict per job], "link": [...], "arrays": [(cache, logits) per job]}.
    """
    if not hostfile:
        check_local_workers(n_workers, lm)
    jobs = [dict(job, arrays=arrays) for job in jobs]
    with tempfile.TemporaryDirectory() as tmp:
        jobs_file, out_file = Path(tmp) / "jobs.json", Path(tmp) / "out.json"
        jobs_file.write_text(json.dumps({"jobs": jobs, "link": link}))
        args = ["--model", lm.spec, "--dtype", dtype or "auto", "--jobs", str(jobs_file),
                "--out", str(out_file)]
        launch(n_workers, args, timeout, hostfile, backend)
        parts = [json.loads(f.read_text()) for f in sorted(Path(tmp).glob("out.json.rank*"))]
        results = {r["job"]: r for part in parts for r in part["results"]}
        if len(results) != len(jobs):
            raise EdgeprefillError("a runahead worker wrote no result: see the worker output")
        report = {k: v for part in parts for k, v in part.items() if k != "results" and v}
        report["results"] = [results[i] for i in range(len(jobs))]
        if arrays:
            report["arrays"] = [read_result(lm, Path(tmp) / f"out.json.job{i}.safetensors")[:2]
                                for i in range(len(jobs))]
        return report


def check_pair(lm, strategy, artifact, tail):
    """runahead-kvp's pair as every worker will load it (a folder made absolute, or a random
    pair's name), refused here before any worker starts if it does not load."""
    if strategy != "runahead-kvp":
        return None
    from edgeprefill.kvp.pairs import is_random_pair, load_pair

    if not artifact:
        raise EdgeprefillError("runahead-kvp needs a KV Prediction pair: pass --kvp FOLDER")
    if not is_random_pair(artifact):
        artifact = str(Path(artifact).resolve())
    load_pair(lm, artifact)
    return artifact


def run_prefill(lm, ids, strategy, n_workers, timeout=300, sizes=None, check=False,
                max_tokens=0, trials=1, hostfile=None, alpha=None, dtype="auto", backend="auto",
                artifact=None, continuation=None, tail=None):
    """One job on one launch: the last rank's result dict (see run_jobs)."""
    artifact = check_pair(lm, strategy, artifact, tail)
    job = {"strategy": strategy, "ids": list(ids), "sizes": sizes, "alpha": alpha,
           "trials": trials, "check": check, "max_tokens": max_tokens, "artifact": artifact,
           "tail": tail, "continuation": list(continuation) if continuation else None}
    return run_jobs(lm, [job], n_workers, timeout, hostfile, dtype, backend)["results"][0]


def read_result(lm, path):
    """(cache, logits, result dict) from a worker's result file (see worker.write_result)."""
    import mlx.core as mx
    from mlx_lm.models.cache import KVCache

    from edgeprefill.prefill.base import PromptCache

    arrays, meta = mx.load(str(path), return_metadata=True)
    path.unlink()

    def layers(prefix, n):
        out = []
        for i in range(n):
            c = KVCache()
            c.update_and_fetch(arrays[f"{prefix}{i}.keys"], arrays[f"{prefix}{i}.values"])
            out.append(c)
        return out

    cache = PromptCache(layers("", lm.model.n_layers))
    n_aux = sum(1 for k in arrays if k.startswith("aux.") and k.endswith(".keys"))
    cache.aux = layers("aux.", n_aux) if n_aux else None
    logits = arrays["logits"]
    mx.eval(logits, [c.keys_and_values() for c in cache + (cache.aux or [])])
    return cache, logits, json.loads(meta["result"])


class RunaheadPool:
    """Local runahead workers kept alive between prompts (the chat's `runahead` strategy):
    started once, each prompt is one job; the cache comes back through a file in /dev/shm
    (or the temp folder) and decoding runs in this process.

    Args:
        lm: the LoadedModel (its spec is what the workers load).
        workers: ranks to start.
        backend: mx.distributed backend (auto: nccl on CUDA GPUs, else ring).
    """

    def __init__(self, lm, workers=2, backend="auto", dtype="auto", start_timeout=300):
        import shutil

        if workers < 1:
            raise EdgeprefillError("--workers must be >= 1")
        check_local_workers(workers, lm)
        self.lm, self.workers, self.k = lm, workers, 0
        from edgeprefill.fsio import clean_stale

        shm = "/dev/shm" if Path("/dev/shm").is_dir() else tempfile.gettempdir()
        clean_stale(shm, POOL_PREFIX)  # folders of pools whose chat was killed
        self.dir = Path(tempfile.mkdtemp(prefix=f"{POOL_PREFIX}{os.getpid()}.", dir=shm))
        self._cleanup = lambda: shutil.rmtree(self.dir, ignore_errors=True)
        backend = resolve_backend(backend)
        worker = [*WORKER, "--backend", backend, "--model", lm.spec, "--dtype", dtype or "auto",
                  "--jobs", "-", "--out", "-", "--serve", str(self.dir)]
        self.log = open(self.dir / "workers.log", "w")
        self.procs = start_local(workers, worker, backend, self.dir, output=self.log)
        self._wait_for(lambda: all((self.dir / f"ready-{r}").exists() for r in range(workers)),
                       start_timeout, "did not start")

    def _wait_for(self, done, timeout, what, error_file=None):
        """Poll until done(); on a dead rank, an error file or the timeout: stop, raise."""
        import time

        deadline = time.monotonic() + timeout
        while not done():
            dead = [r for r, p in enumerate(self.procs) if p.poll() is not None]
            if (error_file and error_file.is_file()) or dead or time.monotonic() > deadline:
                why = error_file.read_text() if error_file and error_file.is_file() else (
                    f"rank {dead[0]}, exit code {self.procs[dead[0]].returncode}" if dead
                    else f"{what} within {timeout:.0f} s")
                self.log.flush()
                log = (self.dir / "workers.log").read_text(errors="replace")
                why += f"; its last output: {last_lines(log) or 'none'}"
                self.close()
                raise EdgeprefillError(f"a runahead worker failed ({why}): use another "
                                       "strategy, or fewer --workers")
            time.sleep(0.002)

    def run(self, job, timeout=None):
        """(cache, logits, result dict) of one job (a dict as in run_jobs) on the pool."""
        from edgeprefill.fsio import atomic_write_text

        k = self.k
        self.k += 1
        atomic_write_text(self.dir / f"job-{k}.json", json.dumps(job))
        out = self.dir / f"result-{k}.safetensors"
        self._wait_for(out.is_file, timeout or 600, "no result",
                       error_file=self.dir / f"error-{k}.txt")
        return read_result(self.lm, out)

    def close(self):
        if not self.procs:
            return
        (self.dir / "stop").touch()
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                kill_groups([p])
        self.procs = []
        self.log.close()
        self._cleanup()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass


class WorkerPrefill:
    """The prefill contract for the strategies that run on worker processes (runahead, tsp,
    runahead-kvp): a fresh conversation is prefilled by the workers and its cache and logits
    come back here as arrays, so decoding (any sampler) runs in this process. A later turn
    extends that cache here (runahead parallelises a prompt from position 0; a follow-up only
    adds its new tokens): with `full`, or with `kvp` for runahead-kvp.

    Local workers stay up between prompts (RunaheadPool); one that dies is restarted once, and
    if that fails the turn is prefilled here with the local strategy (said in one line). With a
    hostfile every prompt is one `mlx.launch` over the machines.

    TTFT is measured here: from the call until the cache and logits are in this process (the
    workers' own prefill time is in stats.extra["workers_ttft_s"]); starting the workers is
    not part of it, as loading a model is not.

    Args:
        lm: the LoadedModel (its spec is what the workers load).
        name: "runahead", "tsp" or "runahead-kvp".
        workers: ranks to start.
        hostfile: an mlx.launch hostfile (workers over machines).
        backend: mx.distributed backend (auto: nccl on CUDA GPUs, else ring).
        kvp, kvp_tail: runahead-kvp's pair (a folder or a random pair's name) and exact tail.
        say: where one-line notices go (default: stderr).
    """

    def __init__(self, lm, name="runahead", workers=2, hostfile=None, backend="auto", kvp=None,
                 kvp_tail=None, say=None, local=None):
        from edgeprefill.prefill.full import FullPrefill

        if workers < 1:
            raise EdgeprefillError("--workers must be >= 1")
        self.name, self.lm, self.workers, self.backend = name, lm, workers, backend
        self.hostfile, self.tail = hostfile, kvp_tail
        self.say = say or (lambda msg: print(f"edgeprefill: {msg}", file=sys.stderr))
        self.artifact = check_pair(lm, name, kvp, kvp_tail)
        self.kvp = local if name == "runahead-kvp" else None  # the pair, for FLOPs and turns
        self.local = local or FullPrefill(lm.model)
        self.pool = None if hostfile else RunaheadPool(lm, workers, backend)

    def job(self, ids):
        return {"strategy": self.name, "ids": ids, "artifact": self.artifact, "tail": self.tail}

    def _pool_or_none(self):
        """The pool, restarted (once, said in one line) if a worker has died since the last
        prompt; None if it cannot be restarted."""
        if self.pool.procs and all(p.poll() is None for p in self.pool.procs):
            return self.pool
        self.pool.close()
        try:
            self.pool = RunaheadPool(self.lm, self.workers, self.backend)
        except EdgeprefillError as e:
            self.say(f"runahead workers could not be restarted ({e})")
            return None
        self.say("a runahead worker had died: restarted the workers")
        return self.pool

    def _fallback(self, prompt_ids, cache, progress, why):
        self.say(f"{why}: this turn is prefilled with {self.local.name}")
        cache, logits, stats = self.local.prefill(prompt_ids, cache, progress)
        stats.extra["workers"] = f"fell back to {self.local.name} ({why})"
        return cache, logits, stats

    def prefill(self, prompt_ids, cache=None, progress=None):
        """See edgeprefill.prefill: (cache, logits, stats) with the cache in this process."""
        import time

        from edgeprefill.prefill.base import PrefillStats

        if cache is not None and len(cache.tokens):
            cache, logits, stats = self.local.prefill(prompt_ids, cache, progress)
            stats.extra["workers"] = f"later turn: new tokens prefilled here ({self.local.name})"
            return cache, logits, stats
        start = time.perf_counter()
        ids = [int(x) for x in prompt_ids]
        if self.hostfile:
            rep = run_jobs(self.lm, [self.job(ids)], self.workers, hostfile=self.hostfile,
                           backend=self.backend, arrays=True)
            (cache, logits), result = rep["arrays"][0], rep["results"][0]
        else:
            if self._pool_or_none() is None:
                return self._fallback(prompt_ids, cache, progress, "no runahead workers")
            try:
                cache, logits, result = self.pool.run(self.job(ids))
            except EdgeprefillError as e:  # a worker died mid-prompt: the pool is closed
                return self._fallback(prompt_ids, cache, progress, str(e).split(":")[0])
        cache.tokens = ids
        stats = PrefillStats(self.name, len(ids), len(ids), time.perf_counter() - start,
                             {"workers": result["workers"], "sizes": result["sizes"],
                              "workers_ttft_s": result["ttft_s"], "bytes_moved": result["bytes"]})
        return cache, logits, stats

    def close(self):
        if self.pool is not None:
            self.pool.close()
