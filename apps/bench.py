"""`edgeprefill bench`: time-to-first-token per strategy and prompt length, with its quality.

Every strategy's first-token distribution is compared with the base model's exact prefill on
the same prompt (top-1 agreement, KL), so no speed-up is shown without its cost. The `mlx-lm`
row is mlx-lm's own generation path on the same model and prompts: the anchor users know.
"""

import datetime
import json
import statistics
import sys
import time

from edgeprefill.errors import EdgeprefillError


def add_parser(sub):
    from apps.generate import add_model_args

    p = sub.add_parser("bench", help="measure TTFT per strategy and prompt length")
    add_model_args(p)
    p.add_argument("--strategies", default="full,mlx-lm",
                   help="comma list: full, mlx-lm (mlx backend); full (mirror backend)")
    p.add_argument("--prompt-tokens", default="128,512,1024", help="comma list of lengths")
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--prompts", type=int, default=1, help="distinct prompts per length")
    p.add_argument("--chunk-size", type=int, default=None, help="prefill chunk (full)")
    p.add_argument("--kvp", default=None, metavar="FOLDER",
                   help="KV Prediction artifact for the kvp strategy (default: the model's "
                   "LP-0.50 artifact)")
    p.add_argument("--backend", default="mlx", choices=["mlx", "mirror"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="mirror backend device")
    p.add_argument("--json", metavar="FILE", default=None, help="write the records as JSON")
    p.set_defaults(run=run)


def parse_list(text, cast, what):
    try:
        items = [cast(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise EdgeprefillError(f"bad {what} list '{text}': give comma-separated values") from None
    if not items:
        raise EdgeprefillError(f"empty {what} list: give at least one value")
    return items


def kl_divergence(p_logits, q_logits):
    """KL(p || q) of two (V,) logit vectors (numpy float64), p the base."""
    import numpy as np

    def log_softmax(x):
        x = x.astype(np.float64)
        x = x - x.max()
        return x - np.log(np.exp(x).sum())

    lp, lq = log_softmax(p_logits), log_softmax(q_logits)
    return float((np.exp(lp) * (lp - lq)).sum())


class MlxRunner:
    """Runs strategies on the MLX backend: (prompt ids) -> (ttft seconds, first logits)."""

    def __init__(self, lm, chunk_size, kvp_artifact=None):
        self.lm = lm
        self.chunk_size = chunk_size
        self.strategies = {}
        self.kvp_artifact = kvp_artifact

    def available(self):
        return ("full", "mlx-lm", "kvp")

    def strategy(self, name):
        """The prefill strategy object, built once (kvp loads its artifact here)."""
        from edgeprefill.prefill import make_strategy

        if name not in self.strategies:
            opts = {"chunk_size": self.chunk_size} if self.chunk_size else {}
            if name == "kvp":
                opts["artifact"] = self.kvp_artifact
            self.strategies[name] = make_strategy(name, self.lm.model, **opts)
        return self.strategies[name]

    def flops_options(self, name):
        if name == "kvp":
            aux = self.strategy("kvp").aux
            return {"aux_layers": aux.n_layers, "aux_kv_dim": aux.kv_dim}
        return {}

    def peak_reset(self):
        import mlx.core as mx

        mx.reset_peak_memory()

    def peak(self):
        import mlx.core as mx

        return int(mx.get_peak_memory())

    def run(self, strategy, ids):
        import mlx.core as mx
        import numpy as np

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


class MirrorRunner:
    """Runs strategies on the torch mirror (CPU or CUDA)."""

    def __init__(self, lm, chunk_size, device):
        import torch

        from edgeprefill.mirror.loading import mirror_from_mlx

        if device == "cuda" and not torch.cuda.is_available():
            raise EdgeprefillError("--device cuda but torch sees no CUDA GPU: use --device cpu")
        dtype = torch.float32 if device == "cpu" else torch.bfloat16
        self.model = mirror_from_mlx(lm.model, dtype=dtype, device=device)
        self.device = device
        self.chunk_size = chunk_size

    def available(self):
        from edgeprefill.mirror.prefill import STRATEGIES

        return tuple(STRATEGIES)

    def flops_options(self, name):
        return {}

    def peak_reset(self):
        import torch

        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()

    def peak(self):
        import torch

        return int(torch.cuda.max_memory_allocated()) if self.device == "cuda" else None

    def run(self, strategy, ids):
        from edgeprefill.mirror.prefill import STRATEGIES

        opts = {"chunk_size": self.chunk_size} if self.chunk_size else {}
        model = self.model
        cache = model.make_cache(max_len=len(ids) + 1)
        _, logits, stats = STRATEGIES[strategy](model, **opts).prefill(ids, cache=cache)
        return stats.ttft_s, logits.float().cpu().numpy()


def bench_records(runner, lm, strategies, lengths, trials, warmup, n_prompts, progress=None):
    """One record per (strategy, prompt length): TTFT stats, FLOPs, memory, quality vs base."""
    import numpy as np

    from edgeprefill.data import bench_prompts
    from edgeprefill.flops import strategy_flops

    records = []
    for n in lengths:
        if n + 1 >= lm.model.max_context:
            raise EdgeprefillError(f"--prompt-tokens {n} does not fit the model's context "
                                   f"({lm.model.max_context}): use shorter prompts")
        prompts = bench_prompts(lm.tokenizer, n, n_prompts)
        base = [runner.run("full", ids)[1] for ids in prompts]
        for s in strategies:
            times, agree, kls = [], [], []
            runner.peak_reset()
            for p, ids in enumerate(prompts):
                for t in range(warmup + trials):
                    ttft, logits = runner.run(s, ids)
                    if t >= warmup:
                        times.append(ttft)
                    if progress:
                        progress()
                agree.append(float(np.argmax(logits) == np.argmax(base[p])))
                kls.append(kl_divergence(base[p], logits))
            med = statistics.median(times)
            records.append({
                "strategy": s, "prompt_tokens": n, "ttft_s": med, "ttft_min_s": min(times),
                "ttft_max_s": max(times), "trials": len(times), "prefill_tok_s": n / med,
                "ttft_flops": strategy_flops(s, lm.config, n, **runner.flops_options(s)), "peak_mem_bytes": runner.peak(),
                "first_token_agreement": float(np.mean(agree)),
                "first_token_kl": float(np.mean(kls)),
            })
    return records


def write_json(path, payload):
    """Write JSON atomically (temp file, then rename)."""
    from edgeprefill.fsio import atomic_write_text

    atomic_write_text(path, json.dumps(payload, indent=2))


def run(args):
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    from apps.info import machine_info
    from edgeprefill.blas import matmul_gflops
    from edgeprefill.loading import load

    lengths = parse_list(args.prompt_tokens, int, "--prompt-tokens")
    strategies = parse_list(args.strategies, str, "--strategies")
    if args.trials < 1 or args.warmup < 0 or args.prompts < 1:
        raise EdgeprefillError("--trials and --prompts must be >= 1, --warmup >= 0")
    if min(lengths) < 2:
        raise EdgeprefillError("--prompt-tokens must be at least 2")
    lm = load(args.model, dtype=args.dtype)
    from apps.kvp import default_artifact_path

    kvp = args.kvp or default_artifact_path(lm.model_id)
    runner = (MlxRunner(lm, args.chunk_size, kvp) if args.backend == "mlx"
              else MirrorRunner(lm, args.chunk_size, args.device))
    unknown = [s for s in strategies if s not in runner.available()]
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
                  artifacts={"kvp": str(kvp)} if "kvp" in strategies else {})
    console = Console(stderr=True)
    total = len(lengths) * len(strategies) * args.prompts * (args.trials + args.warmup)
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("benchmarking", total=total)
        records = bench_records(runner, lm, strategies, lengths, args.trials, args.warmup,
                                args.prompts, progress=lambda: bar.advance(task))
    table = Table(title=f"TTFT, {lm.model_id}, {args.backend} on {header['device']} "
                        f"({header['blas']} BLAS, {header['matmul_gflops_fp32']} GFLOPS)")
    for col in ("strategy", "prompt", "TTFT ms (min-max)", "tok/s", "GFLOP", "peak MB",
                "agree", "KL"):
        table.add_column(col, justify="right")
    for r in records:
        table.add_row(r["strategy"], str(r["prompt_tokens"]),
                      f"{r['ttft_s'] * 1e3:.0f} ({r['ttft_min_s'] * 1e3:.0f}-"
                      f"{r['ttft_max_s'] * 1e3:.0f})", f"{r['prefill_tok_s']:.1f}",
                      f"{r['ttft_flops'] / 1e9:.1f}" if r["ttft_flops"] else "-",
                      f"{r['peak_mem_bytes'] / 2**20:.0f}" if r["peak_mem_bytes"] else "-",
                      f"{r['first_token_agreement']:.2f}", f"{r['first_token_kl']:.4f}")
    Console(width=max(Console().width, 110)).print(table)
    if args.json:
        write_json(args.json, {"header": header, "records": records})
        print(f"wrote {args.json}", file=sys.stderr)
    return 0
