"""`edgeprefill bench`: time-to-first-token per strategy and prompt length, with its quality.

Every strategy's first-token distribution is compared with the base model's exact prefill on
the same prompt (top-1 agreement, KL), so no speed-up is shown without its cost. The `mlx-lm`
row is mlx-lm's own generation path on the same model and prompts: the anchor users know.
"""

import datetime
import statistics
import sys
import time

from edgeprefill.apps.argtypes import non_negative, positive
from edgeprefill.apps.runahead import PARALLEL_STRATEGIES, RANDOM_PAIR
from edgeprefill.apps.shared import parse_list, write_json
from edgeprefill.bench import bench_prompt_sets, random_kvp_pair
from edgeprefill.errors import EdgeprefillError

KVP_STRATEGIES = {"kvp", "aux-only", "runahead-kvp"}  # need a KV Prediction pair


def pair_record(path):
    """The header's record of the KV Prediction pair a run used: its folder, and from its card
    what sets its cost (aux kind, predictor input and rank, exact tail, training steps)."""
    from edgeprefill.kvp.artifact import read_card

    card = read_card(path)
    return {"kvp": str(path), "kvp_card": {
        "aux": card["aux"]["kind"], "predictor_input": card.get("predictor_input", "kv"),
        "predictor_rank": card.get("predictor_rank"), "tail": card.get("tail", 1),
        "steps": card.get("fit", {}).get("steps")}}


def add_parser(sub):
    from edgeprefill.apps.shared import add_kvp_tail_arg, add_model_args

    p = sub.add_parser("bench", help="measure TTFT per strategy and prompt length")
    add_model_args(p)
    p.add_argument("--strategies", default="full,mlx-lm",
                   help="comma list: full, mlx-lm, kvp, aux-only, lazy[-<schedule>|-K1:K2:K3], "
                   "runahead, tsp, runahead-kvp, runahead-streams (mlx backend); full, kvp, "
                   "lazy (mirror backend)")
    p.add_argument("--prompt-tokens", default="128,512,1024", help="comma list of lengths")
    p.add_argument("--trials", type=positive, default=3)
    p.add_argument("--warmup", type=non_negative, default=1)
    p.add_argument("--prompts", type=positive, default=1, help="distinct prompts per length")
    p.add_argument("--chunk-size", type=positive, default=None, help="prefill chunk (full)")
    p.add_argument("--kvp", default=None, metavar="FOLDER",
                   help="KV Prediction artifact for kvp / aux-only / runahead-kvp (default: "
                   "the model's T-0.50 pair)")
    add_kvp_tail_arg(p)
    p.add_argument("--workers", type=positive, default=2,
                   help="runahead / tsp / runahead-kvp: local worker processes")
    p.add_argument("--backend", default="mlx", choices=["mlx", "mirror"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="mirror backend device")
    p.add_argument("--continuation", type=positive, default=32,
                   help="tokens after each prompt scored for the NLL ratio (0: skip)")
    p.add_argument("--random-tokens", action="store_true",
                   help="random token prompts (speed only: quality columns omitted)")
    p.add_argument("--shape", default=None,
                   help="random-weight model of a real shape instead of --model (llama-1b, "
                   "llama-3b, llama-8b, smollm2-135m; speed only)")
    p.add_argument("--aux-shape", default=None,
                   help="with --shape: a random KVP-C aux of this shape for kvp / aux-only "
                   "(default: T-0.50 of the base, random predictor)")
    p.add_argument("--json", metavar="FILE", default=None, help="write the records as JSON")
    p.add_argument("--plot", metavar="FILE.png", default=None,
                   help="PNG: TTFT vs prompt length, and quality vs TTFT")
    p.set_defaults(run=run)


class Runner:
    """What both backends share: `run_many`, every timed prefill of one prompt."""

    def run_many(self, strategy, ids, count, progress=None):
        """TTFTs (seconds) of `count` prefills of `ids`, in order (warm-ups first)."""
        times = []
        for _ in range(count):
            times.append(self.run(strategy, ids)[0])
            if progress:
                progress()
        return times


class MlxRunner(Runner):
    """Runs strategies on the MLX backend: (prompt ids) -> (ttft seconds, first logits)."""

    def __init__(self, lm, chunk_size, kvp_artifact=None, random_pair=None, workers=2,
                 kvp_tail=None):
        self.lm = lm
        self.kvp_tail = kvp_tail  # None: the card's (1 for a random pair)
        self.workers = workers
        self.chunk_size = chunk_size
        self.strategies = {}
        self.kvp_artifact = kvp_artifact
        self.random_pair = random_pair  # (aux, predictor) for random-weight shapes

    def available(self):
        from edgeprefill.prefill import SCHEDULES

        return ("full", "mlx-lm", "kvp", "aux-only", "lazy", *PARALLEL_STRATEGIES,
                "runahead-streams") + tuple(
            f"lazy-{s}" for s in SCHEDULES)

    def strategy(self, name):
        """The prefill strategy object, built once (kvp loads its artifact here)."""
        from edgeprefill.prefill import AuxOnly, KVPrediction, make_strategy

        if name not in self.strategies:
            opts = {"chunk_size": self.chunk_size} if self.chunk_size else {}
            tail = {"tail": self.kvp_tail} if self.kvp_tail and name == "kvp" else {}
            if name in ("kvp", "aux-only") and self.random_pair:
                aux, pred = self.random_pair
                self.strategies[name] = (KVPrediction(self.lm.model, aux, pred, **opts, **tail)
                                         if name == "kvp" else AuxOnly(self.lm.model, aux, **opts))
                return self.strategies[name]
            if name in ("kvp", "aux-only"):
                opts["artifact"] = self.kvp_artifact
            self.strategies[name] = make_strategy(name, self.lm.model, **opts, **tail)
        return self.strategies[name]

    def quality(self, strategy, prompt, continuation):
        """(first-token logits, mean continuation NLL) of `strategy` (numpy, float)."""
        import mlx.core as mx
        import numpy as np

        from edgeprefill.evaluate import continuation_logits, mean_nll

        if strategy in PARALLEL_STRATEGIES:  # the last worker scores the continuation
            r = self._parallel(strategy, prompt, continuation)
            return np.array(r["logits"], dtype=np.float32), r.get("nll")
        if strategy == "mlx-lm":  # mlx-lm's own model call and prompt cache
            from mlx_lm.models.cache import make_prompt_cache

            model = self.lm.model.model
            cache = make_prompt_cache(model)
            first = np.array(model(mx.array(prompt)[None], cache)[0, -1].astype(mx.float32))
            forward = model
        else:
            strat = self.strategy(strategy)
            cache, logits, _ = strat.prefill(prompt)
            first, forward = np.array(logits), getattr(strat, "forward", self.lm.model)
        if not continuation:
            return first, None
        return first, mean_nll(continuation_logits(forward, cache, first, continuation),
                               continuation)

    def flops_options(self, name):
        from edgeprefill.flops import flops_options

        if name in ("mlx-lm", "runahead", "tsp"):
            return {}
        return flops_options(self.strategy("kvp" if name == "runahead-kvp" else name))

    def artifacts(self, strategies):
        if self.random_pair or not KVP_STRATEGIES & set(strategies):
            return {}
        return pair_record(self.kvp_artifact)

    def peak_reset(self):
        import mlx.core as mx

        mx.reset_peak_memory()

    def peak(self):
        import mlx.core as mx

        return int(mx.get_peak_memory())

    def _parallel(self, strategy, ids, continuation=None, trials=1):
        """`trials` prefills on one launch of local workers: the last rank's result
        (apps.runahead; ttft_all_s holds every trial's TTFT)."""
        from edgeprefill.apps.runahead import run_prefill

        artifact = None
        if strategy == "runahead-kvp":
            artifact = RANDOM_PAIR if self.random_pair else self.kvp_artifact
        return run_prefill(self.lm, ids, strategy, self.workers, artifact=artifact,
                           continuation=continuation, trials=trials,
                           tail=self.kvp_tail if artifact else None)

    def run_many(self, strategy, ids, count, progress=None):
        """Parallel strategies run every trial on ONE launch of the workers, so warm-ups warm
        the processes that are timed (a fresh process pays one-off costs -- NCCL set-up, GPU
        kernel loading -- that a long-running app pays once)."""
        if strategy not in PARALLEL_STRATEGIES:
            return super().run_many(strategy, ids, count, progress)
        times = self._parallel(strategy, ids, trials=count)["ttft_all_s"]
        for _ in range(count):
            if progress:
                progress()
        return times

    def run(self, strategy, ids):
        import mlx.core as mx
        import numpy as np

        if strategy in PARALLEL_STRATEGIES:  # separate worker processes; TTFT measured there
            r = self._parallel(strategy, ids)
            return r["ttft_s"], np.array(r["logits"], dtype=np.float32)
        if strategy == "mlx-lm":
            from mlx_lm.generate import generate_step

            start = time.perf_counter()
            steps = generate_step(mx.array(ids), self.lm.model.model, max_tokens=1)
            _, logprobs = next(steps)
            mx.eval(logprobs)
            ttft = time.perf_counter() - start
            return ttft, np.array(logprobs.astype(mx.float32))
        _, logits, stats = self.strategy(strategy).prefill(ids)
        return stats.ttft_s, np.array(logits)


class MirrorRunner(Runner):
    """Runs strategies on the torch mirror (CPU or CUDA)."""

    def __init__(self, lm, chunk_size, device, kvp_artifact=None, random_pair=None,
                 kvp_tail=None):
        import torch

        from edgeprefill.mirror.loading import mirror_from_mlx

        if device == "cuda" and not torch.cuda.is_available():
            raise EdgeprefillError("--device cuda but torch sees no CUDA GPU: use --device cpu")
        dtype = torch.float32 if device == "cpu" else torch.bfloat16
        self.model = mirror_from_mlx(lm.model, dtype=dtype, device=device)
        self.device = device
        self.chunk_size = chunk_size
        self.kvp_artifact = kvp_artifact
        self.lm = lm
        self.pair = None
        self.random_pair = random_pair  # MLX (aux, predictor) of random weights (--shape)
        self.kvp_tail = kvp_tail  # None: the card's

    def available(self):
        from edgeprefill.prefill import SCHEDULES

        return ("full", "kvp", "lazy") + tuple(f"lazy-{s}" for s in SCHEDULES)

    def _strategy(self, name):
        from edgeprefill.mirror.prefill import STRATEGIES

        opts = {"chunk_size": self.chunk_size} if self.chunk_size else {}
        if name.startswith("lazy"):
            return STRATEGIES["lazy"](self.model, schedule=name[5:] or "default", **opts)
        if name != "kvp":
            return STRATEGIES[name](self.model, **opts)
        if self.pair is None:
            self.pair = (mirror_pair(*self.random_pair, self.model) if self.random_pair else
                         mirror_kvp_pair(self.lm.model, self.model, self.kvp_artifact))
        aux, pred, tail = self.pair
        return STRATEGIES["kvp"](self.model, aux, pred, tail=self.kvp_tail or tail, **opts)

    def flops_options(self, name):
        from edgeprefill.flops import flops_options

        if name.startswith("lazy"):
            return {"schedule": self._strategy(name)}
        return flops_options(self._strategy(name)) if name == "kvp" else {}

    def artifacts(self, strategies):
        if self.random_pair or "kvp" not in strategies:
            return {}
        return pair_record(self.kvp_artifact)

    def _cache(self, strategy, n):
        s = self._strategy(strategy)
        return s, (s.make_cache(n) if hasattr(s, "make_cache") else self.model.make_cache(n))

    def quality(self, strategy, prompt, continuation):
        import torch

        s, cache = self._cache(strategy, len(prompt) + len(continuation) + 1)
        _, logits, _ = s.prefill(prompt, cache=cache)
        first = logits.float().cpu().numpy()
        if not continuation:
            return first, None
        from edgeprefill.evaluate import mean_nll

        rows = [first[None]]
        if len(continuation) > 1:
            with torch.no_grad():
                ids = torch.tensor([continuation[:-1]], device=self.device)
                forward = getattr(s, "forward", self.model)
                rows.append(forward(ids, cache)[0].float().cpu().numpy())
        import numpy as np

        return first, mean_nll(np.concatenate(rows), continuation)

    def peak_reset(self):
        import torch

        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()

    def peak(self):
        import torch

        return int(torch.cuda.max_memory_allocated()) if self.device == "cuda" else None

    def run(self, strategy, ids):
        s, cache = self._cache(strategy, len(ids) + 1)
        _, logits, stats = s.prefill(ids, cache=cache)
        return stats.ttft_s, logits.float().cpu().numpy()


def mirror_kvp_pair(base, tbase, artifact):
    """(mirror aux, mirror predictor, tail) for an artifact made on the MLX side."""
    from edgeprefill.kvp.artifact import load_artifact

    if artifact is None:
        raise EdgeprefillError("kvp on the mirror backend needs an artifact: pass --kvp FOLDER")
    aux, pred, card = load_artifact(artifact, base)
    return mirror_pair(aux, pred, tbase, card.get("tail", 1))


def mirror_pair(aux, pred, tbase, tail=1):
    """(mirror aux, mirror predictor, tail) of an MLX pair: an aux of the base's own blocks
    runs the mirror base's, a KVP-C aux a mirror of its own model; trained block copies, if
    any, are mirrored with their weights."""
    from edgeprefill.mirror.kvp.train import aux_to_torch
    from edgeprefill.mirror.kvp.predictor import predictor_to_torch
    from edgeprefill.mirror.loading import mirror_from_mlx

    if aux.kind == "C":  # the MLX copies' view keeps the small model itself as _base
        own = getattr(aux.model, "_base", aux.model)
        tbase_aux = mirror_from_mlx(own, tbase.dtype, tbase.device)
    else:
        tbase_aux = tbase
    taux = aux_to_torch(aux, tbase_aux)
    return taux, predictor_to_torch(pred, tbase.device, tbase.dtype), tail


def bench_records(runner, lm, strategies, lengths, trials, warmup, n_prompts, progress=None,
                  continuation=32, random_tokens=False):
    """One record per (strategy, prompt length): TTFT stats, FLOPs, memory, quality vs base.

    Quality (first-token agreement and KL, continuation NLL ratio) is measured against the
    base's exact prefill on the same prompts, outside the timed runs; None for random tokens.
    """
    import numpy as np

    from edgeprefill.evaluate import kl_divergence
    from edgeprefill.flops import strategy_flops

    records = []
    for n in lengths:
        if n + continuation + 1 >= lm.model.max_context:
            raise EdgeprefillError(f"--prompt-tokens {n} (+{continuation} continuation) does not "
                                   f"fit the model's context ({lm.model.max_context}): use "
                                   "shorter prompts")
        sets = bench_prompt_sets(lm, n, n_prompts, continuation, random_tokens)
        base = None if random_tokens else [runner.quality("full", p, c) for p, c in sets]
        for s in strategies:
            times = []
            runner.peak_reset()
            for p, _ in sets:
                times += runner.run_many(s, p, warmup + trials, progress)[warmup:]
            peak = runner.peak()
            q = {"first_token_agreement": None, "first_token_kl": None, "nll": None,
                 "nll_exact": None, "nll_ratio": None}
            if base is not None:
                got = [runner.quality(s, p, c) for p, c in sets]
                q["first_token_agreement"] = float(np.mean(
                    [np.argmax(g[0]) == np.argmax(b[0]) for g, b in zip(got, base)]))
                q["first_token_kl"] = float(np.mean(
                    [kl_divergence(b[0], g[0]) for g, b in zip(got, base)]))
                if continuation and all(g[1] is not None for g in got):
                    q["nll"] = float(np.mean([g[1] for g in got]))
                    q["nll_exact"] = float(np.mean([b[1] for b in base]))
                    q["nll_ratio"] = q["nll"] / q["nll_exact"]
            med = statistics.median(times)
            records.append({
                "strategy": s, "prompt_tokens": n, "ttft_s": med, "ttft_min_s": min(times),
                "ttft_max_s": max(times), "trials": len(times), "prefill_tok_s": n / med,
                "ttft_flops": strategy_flops(s, lm.config, n, **runner.flops_options(s)),
                "peak_mem_bytes": peak, **q})
    return records


def runner_accepts(runner, name):
    """Whether the runner has strategy `name`; a custom lazy-K1:K2:K3 schedule counts where
    lazy is available (a malformed one raises its one-line error here)."""
    known = runner.available()
    if name in known:
        return True
    if name.startswith("lazy-") and "lazy" in known:
        from edgeprefill.prefill.lazy import resolve_schedule

        resolve_schedule(name[5:])
        return True
    return False


def run(args):
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    from edgeprefill.apps.info import machine_info
    from edgeprefill.blas import matmul_gflops
    from edgeprefill.loading import load

    lengths = parse_list(args.prompt_tokens, int, "--prompt-tokens")
    strategies = parse_list(args.strategies, str, "--strategies")
    if args.trials < 1 or args.warmup < 0 or args.prompts < 1:
        raise EdgeprefillError("--trials and --prompts must be >= 1, --warmup >= 0")
    if min(lengths) < 2:
        raise EdgeprefillError("--prompt-tokens must be at least 2")
    if args.continuation < 0:
        raise EdgeprefillError("--continuation must be >= 0")
    random_pair = None
    if args.shape:
        from edgeprefill.models.random import load_random

        dtype = "float32" if args.dtype == "auto" else args.dtype
        if args.dtype == "auto":
            import mlx.core as mx

            dtype = "bfloat16" if mx.default_device() == mx.gpu else "float32"
        lm = load_random(args.shape, dtype=dtype)
        args.random_tokens = True
        if KVP_STRATEGIES & set(strategies):
            if args.aux_shape and "runahead-kvp" in strategies:
                raise EdgeprefillError("runahead-kvp with --shape runs the T-0.50 random pair "
                                       "only: drop --aux-shape")
            random_pair = random_kvp_pair(lm, args.aux_shape, dtype)
    else:
        if args.aux_shape:
            raise EdgeprefillError("--aux-shape goes with --shape (random-weight models)")
        lm = load(args.model, dtype=args.dtype)
    from edgeprefill.apps.shared import kvp_tail, strategy_options

    kvp, tail = None, kvp_tail(args)
    if KVP_STRATEGIES & set(strategies) and not random_pair:
        kvp = strategy_options(args, lm, "kvp")["artifact"]
    runner = (MlxRunner(lm, args.chunk_size, kvp, random_pair, args.workers, tail)
              if args.backend == "mlx"
              else MirrorRunner(lm, args.chunk_size, args.device, kvp, random_pair, tail))
    unknown = [s for s in strategies if not runner_accepts(runner, s)]
    if unknown:
        raise EdgeprefillError(f"strategy {unknown[0]} is not available on the {args.backend} "
                               f"backend: choose from {', '.join(runner.available())}")
    header = machine_info()
    header.update(date=datetime.datetime.now().isoformat(timespec="seconds"),
                  backend=args.backend,
                  device=args.device if args.backend == "mirror" else header["mlx_device"],
                  model=lm.model_id, model_path=str(lm.path), dtype=args.dtype,
                  matmul_gflops_fp32=round(matmul_gflops(), 1), trials=args.trials,
                  warmup=args.warmup, prompts_per_length=args.prompts,
                  artifacts=runner.artifacts(strategies), kvp_tail=tail,
                  random_weights=bool(args.shape),
                  random_tokens=args.random_tokens, continuation_tokens=args.continuation,
                  shape=args.shape, aux_shape=args.aux_shape)
    console = Console(stderr=True)
    total = len(lengths) * len(strategies) * args.prompts * (args.trials + args.warmup)
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("benchmarking", total=total)
        records = bench_records(runner, lm, strategies, lengths, args.trials, args.warmup,
                                args.prompts, progress=lambda: bar.advance(task),
                                continuation=0 if args.random_tokens else args.continuation,
                                random_tokens=args.random_tokens)
    table = Table(title=f"TTFT, {lm.model_id}, {args.backend} on {header['device']} "
                        f"({header['blas']} BLAS, {header['matmul_gflops_fp32']} GFLOPS)")
    for col in ("strategy", "prompt", "TTFT ms (min-max)", "x full", "tok/s", "GFLOP",
                "peak MB", "agree", "KL", "NLL x"):
        table.add_column(col, justify="right")
    full = {r["prompt_tokens"]: r["ttft_s"] for r in records if r["strategy"] == "full"}
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    for r in records:
        ratio = r["ttft_s"] / full[r["prompt_tokens"]] if r["prompt_tokens"] in full else None
        table.add_row(r["strategy"], str(r["prompt_tokens"]),
                      f"{r['ttft_s'] * 1e3:.0f} ({r['ttft_min_s'] * 1e3:.0f}-"
                      f"{r['ttft_max_s'] * 1e3:.0f})", fmt(ratio, ".2f"),
                      f"{r['prefill_tok_s']:.1f}",
                      f"{r['ttft_flops'] / 1e9:.1f}" if r["ttft_flops"] else "-",
                      f"{r['peak_mem_bytes'] / 2**20:.0f}" if r["peak_mem_bytes"] else "-",
                      fmt(r["first_token_agreement"], ".2f"), fmt(r["first_token_kl"], ".4f"),
                      fmt(r["nll_ratio"], ".3f"))
    Console(width=max(Console().width, 110)).print(table)
    if args.json:
        write_json(args.json, {"header": header, "records": records})
        print(f"wrote {args.json}", file=sys.stderr)
    if args.plot:
        from edgeprefill.apps.plots import bench_plot

        bench_plot(records, args.plot, table.title)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0
