"""A projection model for parallel prefill: TTFT of `runahead`, `tsp` and single-process `full`
on p machines, from a per-layer compute cost measured on one machine and a link model.

Compute: one layer over a chunk of c tokens after a prefix of s cached tokens costs

    t(c, s) = t0 + a * c + b * c * (s + (c + 1) / 2)

(fixed launch/overhead, per-token projections + MLP, attention over the prefix and the causal
half of the chunk), fitted by least squares to timings of the real blocks (`fit_layer_cost`).

Link: a message of m bytes takes latency + m / bandwidth (`Link`); `Link.fit` reads it off
measured round trips.

Runahead (shared/PAPERS.md section 3) is simulated layer by layer as the code runs it: rank r
computes layer i once it has received the prefix K/V of layer i from rank r-1 and finished its
own layer i-1; a send is a rendezvous (it starts when the receiver has posted its receive, i.e.
finished its previous layer) and holds the sender until delivered. tsp: per layer an all-gather
of every rank's K/V (ring: p-1 steps of one chunk each), then the block over its even chunk with
dense attention over all N keys.
"""

from dataclasses import dataclass

import numpy as np


@dataclass
class LayerCost:
    """Per-layer compute time t(c, s) in seconds (see the module doc)."""

    t0: float
    a: float
    b: float
    rms_rel: float = 0.0  # relative RMS error of the fit on its samples

    def __call__(self, c, s):
        return self.t0 + self.a * c + self.b * c * (s + (c + 1) / 2)


def fit_layer_cost(samples):
    """Least-squares LayerCost from [(chunk c, prefix s, seconds per layer)] (>= 3 samples);
    coefficients are clipped at zero (a negative overhead is noise)."""
    if len(samples) < 3:
        raise ValueError("need at least 3 (chunk, prefix, seconds) samples to fit the cost")
    c = np.array([x[0] for x in samples], dtype=np.float64)
    s = np.array([x[1] for x in samples], dtype=np.float64)
    t = np.array([x[2] for x in samples], dtype=np.float64)
    design = np.stack([np.ones_like(c), c, c * (s + (c + 1) / 2)], axis=1)
    # relative errors matter: weight each sample by 1/t so short chunks are not ignored
    w = 1.0 / t
    coef, *_ = np.linalg.lstsq(design * w[:, None], t * w, rcond=None)
    coef = np.maximum(coef, 0.0)
    pred = design @ coef
    return LayerCost(*map(float, coef), rms_rel=float(np.sqrt(np.mean(((pred - t) / t) ** 2))))


@dataclass
class Link:
    """Point-to-point link: latency (s) and bandwidth (bytes/s)."""

    latency_s: float
    bytes_per_s: float

    def time(self, nbytes):
        return 0.0 if nbytes <= 0 else self.latency_s + nbytes / self.bytes_per_s

    @classmethod
    def gbit(cls, gbit_per_s, latency_us=50.0):
        """A network link of `gbit_per_s` Gb/s (e.g. 10, 40) with `latency_us` latency."""
        return cls(latency_us * 1e-6, gbit_per_s * 1e9 / 8)

    @classmethod
    def fit(cls, round_trips):
        """From [{"bytes": m, "round_trip_s": t}]: one-way time t/2 = latency + m / bandwidth."""
        m = np.array([x["bytes"] for x in round_trips], dtype=np.float64)
        t = np.array([x["round_trip_s"] / 2 for x in round_trips], dtype=np.float64)
        design = np.stack([np.ones_like(m), m], axis=1)
        (lat, inv_bw), *_ = np.linalg.lstsq(design / t[:, None], np.ones_like(t), rcond=None)
        return cls(max(float(lat), 0.0), 1.0 / max(float(inv_bw), 1e-15))


def runahead_time(cost, link, sizes, n_layers, kv_bytes_per_token, head_s=0.0):
    """Simulated TTFT of runahead over chunk `sizes` (one per rank)."""
    p = len(sizes)
    starts = [sum(sizes[:r]) for r in range(p)]
    comp = [cost(sizes[r], starts[r]) for r in range(p)]
    free = [0.0] * p  # when each rank is done with its previous layer (sends included)
    for _ in range(n_layers):
        arrive = 0.0
        new = [0.0] * p
        for r in range(p):
            begin = free[r] if r == 0 else arrive
            end = begin + comp[r]
            if r < p - 1:  # rendezvous with rank r+1, which posts its receive when free
                start_send = max(end, free[r + 1])
                arrive = start_send + link.time(starts[r + 1] * kv_bytes_per_token)
                new[r] = arrive
            else:
                new[r] = end
        free = new
    return free[-1] + head_s


def tsp_time(cost, link, n, p, n_layers, kv_bytes_per_token, head_s=0.0):
    """Simulated TTFT of tsp: even chunks, ring all-gather of K/V, dense attention over N."""
    c = -(-n // p)
    gather = (p - 1) * link.time(c * kv_bytes_per_token) if p > 1 else 0.0
    # dense scores over all p*c gathered keys (+ its own, masked): about c * (N + c) work,
    # which t(c, s) counts as s + (c + 1) / 2 keys per query
    layer = cost(c, p * c + (c - 1) / 2)
    return n_layers * (layer + gather) + head_s


def full_time(cost, n, n_layers, chunk, head_s=0.0):
    """Single-process chunked prefill."""
    total, s = 0.0, 0
    while s < n:
        c = min(chunk, n - s)
        total += cost(c, s)
        s += c
    return n_layers * total + head_s


def check_sizes(sizes, n, p, what="workers"):
    """`sizes` as a list, or ValueError if it does not split n tokens over at most p ranks."""
    sizes = list(sizes)
    if sum(sizes) != n or len(sizes) > p or min(sizes) < 1:
        raise ValueError(f"partition {sizes} does not split {n} tokens over {p} {what}")
    return sizes


def even_sizes(n, p):
    """p contiguous chunk lengths summing to n, as even as possible (earlier ones +1)."""
    p = max(1, min(p, n))
    return [n // p + (1 if r < n % p else 0) for r in range(p)]


def greedy_split(fits, n, p):
    """p contiguous chunk lengths of n: each of the first p-1 the longest for which
    fits(start, length) holds (at least 1, leaving a token for every later chunk), the last the
    rest."""
    out, start = [], 0
    for r in range(p - 1):
        lo, hi = 1, n - start - (p - 1 - r)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if fits(start, mid):
                lo = mid
            else:
                hi = mid - 1
        out.append(lo)
        start += lo
    return out + [n - start]


def cost_balanced_sizes(cost, n, p):
    """Chunk lengths giving every rank the same compute t(c_r, s_r) (earlier chunks larger)."""
    p = max(1, min(p, n))
    lo_t, hi_t = 0.0, cost(n, 0)

    def split(target):
        return greedy_split(lambda s, c: cost(c, s) <= target, n, p)

    for _ in range(60):  # bisect on the per-rank time so the last chunk costs the same
        mid_t = (lo_t + hi_t) / 2
        sizes = split(mid_t)
        if cost(sizes[-1], n - sizes[-1]) > mid_t:
            lo_t = mid_t
        else:
            hi_t = mid_t
    return split(hi_t)


def mix_sizes(even, balanced, alpha, n):
    """Chunk lengths between `even` (alpha 0) and `balanced` (alpha 1), extrapolated beyond;
    `even` when the mix is not a valid partition."""
    if len(even) != len(balanced):
        return list(even)
    raw = [max(1.0, e + alpha * (b - e)) for e, b in zip(even, balanced)]
    sizes = [max(1, int(round(x * n / sum(raw)))) for x in raw]
    sizes[-1] = n - sum(sizes[:-1])
    return sizes if sizes[-1] >= 1 else list(even)


def best_runahead(cost, link, n, p, n_layers, kv_bytes_per_token, head_s=0.0,
                  alphas=np.linspace(0.0, 1.5, 16)):
    """(sizes, seconds) of the fastest simulated partition between even and cost-balanced,
    the same family of partitions `edgeprefill runahead tune` searches on real runs."""
    ev, bal = even_sizes(n, p), cost_balanced_sizes(cost, n, p)
    best = None
    for a in alphas:
        sizes = mix_sizes(ev, bal, float(a), n)
        t = runahead_time(cost, link, sizes, n_layers, kv_bytes_per_token, head_s)
        if best is None or t < best[1]:
            best = (sizes, t)
    return best
