"""The TTFT benchmark: every strategy (from the registry) on prompts of given lengths, each
record holding its TTFT, analytic FLOPs, peak memory and its quality against the base's exact
prefill on the same prompts (first-token agreement and KL, continuation NLL ratio), so no
speed-up is shown without its cost. `edgeprefill bench` prints and plots these records.

Two backends run the same strategies: MLX (`MlxRunner`) and the torch mirror (`MirrorRunner`,
CPU or CUDA). Random-weight models of real shapes (`--shape`) give speed-only records.
"""

import statistics

from edgeprefill.errors import EdgeprefillError
from edgeprefill.prefill import registry


def bench_prompt_sets(lm, n, count, continuation, random_tokens, seed=0):
    """[(prompt ids, continuation ids)] of held-out text, or random tokens (no continuation)."""
    import numpy as np

    if random_tokens:
        rng = np.random.default_rng((seed, n))
        vocab = min(lm.model.vocab_size, len(lm.tokenizer.vocab) if hasattr(
            lm.tokenizer, "vocab") else lm.model.vocab_size)
        return [(rng.integers(3, max(4, vocab), size=n).tolist(), []) for _ in range(count)]
    from edgeprefill.data import bench_prompts

    return [(ids[:n], ids[n:]) for ids in bench_prompts(lm.tokenizer, n, count, continuation)]


class MlxRunner:
    """Strategies on MLX, built once each from the registry with `options` (chunk_size, kvp,
    kvp_tail, workers: each strategy takes the ones it declares)."""

    backend = "mlx"

    def __init__(self, lm, options):
        self.lm, self.options, self.built = lm, options, {}

    def strategy(self, name):
        if name not in self.built:
            spec, _ = registry.parse(name)
            opts = {k: v for k, v in self.options.items() if k in spec.options}
            self.built[name] = registry.build(name, self.lm, **opts)
        return self.built[name]

    def run(self, name, ids):
        """(TTFT seconds, first-token logits as numpy) of one prefill."""
        import numpy as np

        _, logits, stats = self.strategy(name).prefill(ids)
        return stats.ttft_s, np.array(logits), stats.extra

    def quality(self, name, prompt, continuation):
        """(first-token logits, mean continuation NLL or None) of one prefill."""
        import numpy as np

        from edgeprefill.quality import continuation_logits, mean_nll

        strat = self.strategy(name)
        cache, logits, _ = strat.prefill(prompt)
        first = np.array(logits)
        if not continuation:
            return first, None
        forward = getattr(strat, "forward", self.lm.model)
        return first, mean_nll(continuation_logits(forward, cache, first, continuation),
                               continuation)

    def peak_reset(self):
        import mlx.core as mx

        mx.reset_peak_memory()

    def peak(self):
        import mlx.core as mx

        return int(mx.get_peak_memory())

    def device(self):
        import mlx.core as mx

        return str(mx.default_device())

    def close(self):
        for s in self.built.values():
            if hasattr(s, "close"):
                s.close()


class MirrorRunner(MlxRunner):
    """The same strategies on the torch mirror (CPU: float32, CUDA: bfloat16)."""

    backend = "mirror"

    def __init__(self, lm, options, device="cpu"):
        import torch

        from edgeprefill.mirror.convert import mirror_from_mlx

        if device == "cuda" and not torch.cuda.is_available():
            raise EdgeprefillError("--device cuda but torch sees no CUDA GPU: use --device cpu")
        super().__init__(lm, options)
        dtype = torch.float32 if device == "cpu" else torch.bfloat16
        self.model, self.torch_device = mirror_from_mlx(lm.model, dtype, device), device

    def strategy(self, name):
        if name not in self.built:
            spec, _ = registry.parse(name)
            opts = {k: v for k, v in self.options.items() if k in spec.options}
            self.built[name] = registry.build_mirror(name, self.model, self.lm, **opts)
        return self.built[name]

    def _prefill(self, name, ids, room):
        s = self.strategy(name)
        cache = s.make_cache(room) if hasattr(s, "make_cache") else self.model.make_cache(room)
        return s, s.prefill(ids, cache=cache)

    def run(self, name, ids):
        _, (_, logits, stats) = self._prefill(name, ids, len(ids) + 1)
        return stats.ttft_s, logits.float().cpu().numpy(), stats.extra

    def quality(self, name, prompt, continuation):
        import numpy as np
        import torch

        from edgeprefill.quality import mean_nll

        s, (cache, logits, _) = self._prefill(name, prompt, len(prompt) + len(continuation) + 1)
        first = logits.float().cpu().numpy()
        if not continuation:
            return first, None
        rows = [first[None]]
        if len(continuation) > 1:
            with torch.no_grad():
                ids = torch.tensor([continuation[:-1]], device=self.torch_device)
                rows.append(getattr(s, "forward", self.model)(ids, cache)[0].float().cpu()
                            .numpy())
        return first, mean_nll(np.concatenate(rows), continuation)

    def peak_reset(self):
        import torch

        if self.torch_device == "cuda":
            torch.cuda.reset_peak_memory_stats()

    def peak(self):
        import torch

        return int(torch.cuda.max_memory_allocated()) if self.torch_device == "cuda" else None

    def device(self):
        return self.torch_device


def pair_record(runner, strategies):
    """The header's record of the KV Prediction pair a run used: its folder, and from its card
    what sets its cost (aux kind, predictor input and rank, exact tail, training steps)."""
    from edgeprefill.kvp.artifact import read_card
    from edgeprefill.kvp.pairs import ensure_default_pair, is_random_pair

    kvp = runner.options.get("kvp")
    if is_random_pair(kvp) or not any(registry.parse(s)[0].pair for s in strategies):
        return {}
    path = kvp or ensure_default_pair(runner.lm)
    card = read_card(path)
    return {"kvp": str(path), "kvp_card": {
        "aux": card["aux"]["kind"], "predictor_input": card.get("predictor_input", "kv"),
        "predictor_rank": card.get("predictor_rank"), "tail": card.get("tail", 1),
        "steps": card.get("fit", {}).get("steps")}}


def check_lengths(lm, lengths, continuation):
    if min(lengths) < 2:
        raise EdgeprefillError("--prompt-tokens must be at least 2")
    for n in lengths:
        if n + continuation + 1 >= lm.model.max_context:
            raise EdgeprefillError(f"--prompt-tokens {n} (+{continuation} continuation) does not "
                                   f"fit the model's context ({lm.model.max_context}): use "
                                   "shorter prompts")


def bench_records(runner, strategies, lengths, trials=3, warmup=1, n_prompts=1, continuation=32,
                  random_tokens=False, progress=None, task=None):
    """One record per (strategy, prompt length): TTFT (median, min, max over trials after
    warm-ups), FLOPs, peak memory and quality against `full` on the same prompts (measured
    outside the timed runs; None for random tokens). `progress()` after each timed prefill.
    task: (name, rows per length, haystack) adds task accuracy (edgeprefill.tasks): greedy
    answers on generated rows of each length, beside full's on the same rows."""
    from edgeprefill.quality import first_token_quality

    lm = runner.lm
    continuation = 0 if random_tokens else continuation
    check_lengths(lm, lengths, continuation)
    records = []
    for n in lengths:
        task_rows = task_full = None
        if task:
            from edgeprefill.tasks import make_rows, run_rows

            task_rows = make_rows(lm.tokenizer, task[0], n, task[1], task[2])
            task_full = run_rows(lm, runner.strategy("full"), task_rows)
        sets = bench_prompt_sets(lm, n, n_prompts, continuation, random_tokens)
        base = None if random_tokens else [runner.quality("full", p, c) for p, c in sets]
        for s in strategies:
            times, split = [], {}
            runner.peak_reset()
            for p, _ in sets:
                for k in range(warmup + trials):
                    t, _, extra = runner.run(s, p)
                    if k >= warmup:
                        times.append(t)
                        for key, v in extra.items():  # the strategy's own time split
                            if key.endswith("_s") and isinstance(v, (int, float)):
                                split.setdefault(key, []).append(v)
                    if progress:
                        progress()
            peak = runner.peak()
            q = dict.fromkeys(("first_token_agreement", "first_token_kl", "nll", "nll_exact",
                               "nll_ratio"))
            if base is not None:
                q = first_token_quality(base, [runner.quality(s, p, c) for p, c in sets])
            if task_rows:
                from edgeprefill.tasks import summarize_rows

                res = task_full if s == "full" else run_rows(lm, runner.strategy(s), task_rows)
                t = summarize_rows(res, task_full)
                q.update(task=task[0], task_rows=t["rows"], task_accuracy=t["accuracy"],
                         task_accuracy_ci95=t["accuracy_ci95"],
                         task_relative_accuracy=t["relative_accuracy"])
            med = statistics.median(times)
            records.append({
                "strategy": s, "prompt_tokens": n, "ttft_s": med, "ttft_min_s": min(times),
                "ttft_max_s": max(times), "trials": len(times), "prefill_tok_s": n / med,
                "ttft_flops": registry.flops(s, runner.strategy(s), lm.config, n),
                "peak_mem_bytes": peak,
                "split_s": {k: statistics.median(v) for k, v in split.items()}, **q})
    return records


def load_bench_model(model="default", shape=None, dtype="auto"):
    """The model a benchmark runs: `model`, or with `shape` a random-weight model of that real
    shape (llama-1b, llama-8b, ...; bfloat16 on a GPU, float32 on a CPU by default)."""
    from edgeprefill.loading import load

    if not shape:
        return load(model, dtype=dtype)
    from edgeprefill.models.random import load_random

    if dtype == "auto":
        import mlx.core as mx

        dtype = "bfloat16" if mx.default_device() == mx.gpu else "float32"
    return load_random(shape, dtype=dtype)


def run_bench(lm, strategies, lengths, backend="mlx", device="cpu", trials=3, warmup=1,
              n_prompts=1, continuation=32, random_tokens=False, progress=None, task=None,
              **options):
    """Benchmark `strategies` on `lm`: {"header": machine, model and settings, "records": one
    per (strategy, length)}. Options go to the strategies (chunk_size, kvp, kvp_tail, workers).
    task: (name, rows, haystack) adds a task-accuracy column (MLX backend, real weights).
    """
    from edgeprefill.blas import matmul_gflops
    from edgeprefill.machine import machine_info, now

    if trials < 1 or warmup < 0 or n_prompts < 1 or continuation < 0:
        raise EdgeprefillError("--trials and --prompts must be >= 1, --warmup and "
                               "--continuation >= 0")
    random_weights = lm.model_id.startswith("random:")
    random_tokens = random_tokens or random_weights
    if random_weights and options.get("kvp") is None:
        options["kvp"] = "random"
    if task and (backend != "mlx" or random_weights):
        raise EdgeprefillError("--task scores answers on the MLX backend of a real model: drop "
                               "--task, or --backend mirror / --shape")
    for s in strategies:
        if backend == "mirror" and registry.parse(s)[0].mirror is None:
            registry.build_mirror(s, None, lm)  # raises its one-line error
    runner = MlxRunner(lm, options) if backend == "mlx" else MirrorRunner(lm, options, device)
    try:
        header = machine_info()
        header.update(date=now(),
                      backend=backend, device=runner.device(), model=lm.model_id,
                      model_path=str(lm.path), dtype=str(lm.model.dtype).split(".")[-1],
                      matmul_gflops_fp32=round(matmul_gflops(), 1), trials=trials,
                      warmup=warmup, prompts_per_length=n_prompts,
                      artifacts=pair_record(runner, strategies),
                      kvp_tail=options.get("kvp_tail"), random_weights=random_weights,
                      random_tokens=random_tokens, continuation_tokens=continuation,
                      task=dict(zip(("name", "rows", "haystack"), task)) if task else None,
                      options={k: v for k, v in options.items() if k != "say"})
        records = bench_records(runner, strategies, lengths, trials, warmup, n_prompts,
                                continuation, random_tokens, progress, task)
    finally:
        runner.close()
    return {"header": header, "records": records}


def prefix_records(lm, lengths, prefix_tokens, trials=3, warmup=1, folder=None,
                   random_tokens=False, progress=None):
    """TTFT of prompts whose first `prefix_tokens` tokens were prefilled before: one record per
    (mode, prompt length) for three modes:

        cold         full prefill of the whole prompt;
        warm-file    the prefix's cache loaded from a prompt-cache file (the load is timed),
                     its longest common prefix kept, the rest prefilled with full;
        warm-memory  the prefix's cache already in memory (as a chat's next turn, or a server's
                     prefix cache), the rest prefilled with full.

    Every mode gives the same first token (checked). `folder` holds the cache file (default: a
    temporary folder, removed afterwards).
    """
    import tempfile
    import time
    from pathlib import Path

    import numpy as np

    from edgeprefill.cache import load_cache, reuse, save_cache
    from edgeprefill.prefill import FullPrefill

    check_lengths(lm, lengths, 0)
    if any(n <= prefix_tokens for n in lengths):
        raise EdgeprefillError(f"--prefix-tokens {prefix_tokens} must be below every "
                               "--prompt-tokens: the new tokens come after it")
    full = FullPrefill(lm.model)
    records = []
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        path = Path(tmp) / "prefix.safetensors"
        for n in lengths:
            ids = bench_prompt_sets(lm, n, 1, 0, random_tokens)[0][0]
            prefix = ids[:prefix_tokens]
            pcache, _, _ = full.prefill(prefix)
            nbytes = save_cache(path, lm, pcache, prefix)
            times = {"cold": [], "warm-file": [], "warm-memory": []}
            loads, first = [], {}
            for k in range(warmup + trials):
                t0 = time.perf_counter()
                _, logits, _ = full.prefill(ids)
                t_cold = time.perf_counter() - t0
                first.setdefault("cold", int(np.argmax(np.array(logits))))
                t0 = time.perf_counter()
                cache, info = load_cache(path, lm)
                cache, rest, _ = reuse(cache, info, ids)
                t_load = time.perf_counter() - t0
                _, logits, _ = full.prefill(rest, cache=cache)
                t_file = time.perf_counter() - t0
                first.setdefault("warm-file", int(np.argmax(np.array(logits))))
                for c in pcache:  # back to the prefix: the memory cache is reused as it is
                    c.trim(c.offset - prefix_tokens)
                pcache.tokens = list(prefix)
                t0 = time.perf_counter()
                _, logits, _ = full.prefill(ids[prefix_tokens:], cache=pcache)
                t_mem = time.perf_counter() - t0
                first.setdefault("warm-memory", int(np.argmax(np.array(logits))))
                if k >= warmup:
                    times["cold"].append(t_cold)
                    times["warm-file"].append(t_file)
                    times["warm-memory"].append(t_mem)
                    loads.append(t_load)
                if progress:
                    progress()
            cold = statistics.median(times["cold"])
            for mode, ts in times.items():
                med = statistics.median(ts)
                records.append({"mode": mode, "prompt_tokens": n, "prefix_tokens": prefix_tokens,
                                "new_tokens": n - prefix_tokens, "ttft_s": med,
                                "ttft_min_s": min(ts), "ttft_max_s": max(ts), "trials": len(ts),
                                "x_cold": med / cold, "first_token": first[mode],
                                "same_first_token": first[mode] == first["cold"],
                                **({"load_s": statistics.median(loads), "file_bytes":
                                    path.stat().st_size, "kv_bytes": nbytes}
                                   if mode == "warm-file" else {})})
    return records
