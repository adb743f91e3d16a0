"""`edgeprefill runahead tune` and `project`: the partition search (per worker count and
prompt length, written to the table every runahead prefill reads) and the projection of
runahead / tsp / full TTFT onto 2..8 machines from layer times measured here and a link model."""

import json
from pathlib import Path

from edgeprefill.distributed.partition import table_path
from edgeprefill.distributed.pool import run_jobs
from edgeprefill.errors import EdgeprefillError
from edgeprefill.machine import now


def tune(lm, workers, lengths, alphas, trials=3, with_tsp=False, out=None, dtype="auto",
         backend="auto", timeout=1800, say=print):
    """Time runahead at each partition mix `alphas` (0 even, 1 FLOP-balanced) per worker count
    and prompt length (one launch per worker count), keep the fastest alpha in the table at
    `out` (default: the cache's), and return the record of every timing (tsp too, and the
    link figures, with `with_tsp`)."""
    from edgeprefill.bench import bench_prompt_sets
    from edgeprefill.fsio import atomic_write_text
    from edgeprefill.machine import machine_info

    out = Path(out) if out else table_path()
    table = json.loads(out.read_text()) if out.is_file() else {}
    entry = table.setdefault(lm.model_id, {})
    record = {"model": lm.model_id, "machine": machine_info(), "date": now(), "runs": []}
    random_tokens = lm.spec.startswith("random:")
    for p in workers:
        prompts = {n: bench_prompt_sets(lm, n, 1, 0, random_tokens)[0][0] for n in lengths}
        jobs = [{"strategy": "runahead", "ids": prompts[n], "alpha": a, "trials": trials}
                for n in lengths for a in alphas]
        if with_tsp:
            jobs += [{"strategy": "tsp", "ids": prompts[n], "trials": trials} for n in lengths]
        say(f"p={p}: {len(jobs)} prefills on {p} workers ...")
        rep = run_jobs(lm, jobs, p, timeout=timeout, dtype=dtype, backend=backend,
                       link=with_tsp)
        record["runs"].append({"workers": p, "backend": rep["backend"], "device": rep["device"],
                               "link": rep.get("link"), "results": rep["results"]})
        for n in lengths:
            rows = [r for r in rep["results"] if r["n"] == n and r["strategy"] == "runahead"]
            for r in rows:
                say(f"p={p} n={n} alpha={r['alpha']:g} sizes={r['sizes']} "
                    f"TTFT {r['ttft_s'] * 1e3:.1f} ms")
            best = min(rows, key=lambda r: r["ttft_s"])
            entry.setdefault(str(p), {})[str(n)] = best["alpha"]
            tsp = [r for r in rep["results"] if r["n"] == n and r["strategy"] == "tsp"]
            extra = (f"; tsp {tsp[0]['ttft_s'] * 1e3:.1f} ms "
                     f"({tsp[0]['ttft_s'] / best['ttft_s']:.2f}x runahead)" if tsp else "")
            say(f"p={p} n={n}: alpha {best['alpha']:g}, {best['ttft_s'] * 1e3:.1f} ms{extra}")
    atomic_write_text(out, json.dumps(table, indent=2))
    record["table"] = str(out)
    return record


def measure_layer_cost(lm, max_tokens, trials=2, progress=None):
    """Time the real blocks (all layers, evaluated layer by layer as runahead does) over chunks
    after cached prefixes; returns (LayerCost, samples, head seconds)."""
    import time

    import mlx.core as mx

    from edgeprefill.projection import fit_layer_cost

    m = lm.model
    N = max_tokens
    grid = sorted({(max(1, c), s) for c in (N // 16, N // 4, N // 2, N) for s in (0, N // 2)
                   if c + s <= N} | {(max(1, N // 16), N - max(1, N // 16))})
    rng = mx.random.key(0)
    samples = []
    for c, s in grid:
        best = None
        for k in range(trials + 1):
            cache = m.make_cache()
            if s:
                kv = mx.random.normal((2, 1, m.n_kv_heads, s, m.head_dim), key=rng).astype(
                    m.dtype)
                for layer in cache:
                    layer.update_and_fetch(kv[0], kv[1])
            h = m.embed(mx.arange(3, 3 + c)[None] % m.vocab_size)
            mx.eval(h, [x.keys_and_values() for x in cache] if s else [])
            t0 = time.perf_counter()
            for i in range(m.n_layers):
                h = m.block(i, h, cache=cache[i]).h
                mx.eval(h)
            dt = (time.perf_counter() - t0) / m.n_layers
            if k:  # the first run warms up kernels
                best = dt if best is None else min(best, dt)
            del cache
        samples.append((c, s, best))
        if progress:
            progress(c, s, best)
    h = m.embed(mx.array([[3]]))
    mx.eval(h)
    t0 = time.perf_counter()
    for _ in range(3):
        mx.eval(m.head(h))
    head = (time.perf_counter() - t0) / 3
    return fit_layer_cost(samples), samples, head




def read_tune_records(files):
    """The runs of `runahead tune --with-tsp --json` records, each tagged with its file."""
    measured = []
    for f in files:
        try:
            rec = json.loads(Path(f).read_text())
            measured += [dict(run, source=f) for run in rec["runs"]]
        except (OSError, ValueError, KeyError, TypeError):
            raise EdgeprefillError(f"cannot read a tune record from {f}: pass the --json file "
                                   "of `edgeprefill runahead tune --with-tsp`") from None
    return measured


def project(lm, workers, lengths, links, latency_us=50.0, measured=(), chunk=None, say=print):
    """Projected TTFT of runahead / tsp / full on `workers` machines joined by `links` (Gb/s)
    from per-layer times measured here; `measured` (tune records' runs) are predicted with
    their own measured link and listed beside what they measured."""
    from edgeprefill.bench import bench_prompt_sets
    from edgeprefill.machine import machine_info
    from edgeprefill.prefill.base import default_chunk_size
    from edgeprefill.prefill.full import FullPrefill
    from edgeprefill.prefill.runahead import kv_bytes_per_token
    from edgeprefill.projection import Link, best_runahead, full_time, runahead_time, tsp_time

    lengths = sorted(set(lengths) | {r["n"] for run in measured for r in run["results"]})
    m = lm.model
    chunk = chunk or default_chunk_size()
    kvb = kv_bytes_per_token(m)
    cost, samples, head = measure_layer_cost(
        lm, max(lengths), progress=lambda c, s, t: say(
            f"layer time: chunk {c} after {s}: {t * 1e3:.3f} ms"))
    say(f"fit: t0 {cost.t0 * 1e6:.1f} us, {cost.a * 1e9:.2f} ns/token, "
        f"{cost.b * 1e12:.3f} ps/token/key; rms error {cost.rms_rel:.1%}")
    L = m.n_layers
    record = {"model": lm.model_id, "machine": machine_info(), "date": now(),
              "layer_cost": {"t0_s": cost.t0, "a_s_per_token": cost.a,
                             "b_s_per_token_key": cost.b, "rms_rel": cost.rms_rel},
              "samples": [{"chunk": c, "prefix": s, "layer_s": t} for c, s, t in samples],
              "head_s": head, "kv_bytes_per_token_layer": kvb, "chunk_size": chunk,
              "latency_us": latency_us, "workers": workers, "links": links, "full": [],
              "projection": [], "validation": []}
    for n in lengths:  # the cost model against a real single-process prefill here
        ids = bench_prompt_sets(lm, n, 1, 0, lm.spec.startswith("random:"))[0][0]
        strat = FullPrefill(m, chunk)
        times = [strat.prefill(ids)[2].ttft_s for _ in range(2)]
        record["full"].append({"n": n, "measured_s": min(times[1:] or times),
                               "predicted_s": full_time(cost, n, L, chunk, head)})
    for gb in links:
        link = Link.gbit(gb, latency_us)
        for n in lengths:
            f = full_time(cost, n, L, chunk, head)
            for p in workers:
                sizes, ra = best_runahead(cost, link, n, p, L, kvb, head)
                record["projection"].append({
                    "gbit_s": gb, "n": n, "workers": p, "runahead_s": ra, "sizes": sizes,
                    "tsp_s": tsp_time(cost, link, n, p, L, kvb, head), "full_s": f})
    for run in measured:
        if not run.get("link"):
            continue
        link = Link.fit(run["link"])
        say(f"p={run['workers']} {run.get('backend')} measured link: "
            f"{link.latency_s * 1e6:.1f} us, {link.bytes_per_s / 1e9:.2f} GB/s")
        for r in run["results"]:
            if r["strategy"] == "runahead":
                pred = runahead_time(cost, link, r["sizes"], L, kvb, head)
            else:
                pred = tsp_time(cost, link, r["n"], run["workers"], L, kvb, head)
            record["validation"].append({
                "workers": run["workers"], "n": r["n"], "strategy": r["strategy"],
                "backend": run.get("backend"), "sizes": r["sizes"], "measured_s": r["ttft_s"],
                "predicted_s": pred, "link_latency_s": link.latency_s,
                "link_bytes_per_s": link.bytes_per_s})
    return record
