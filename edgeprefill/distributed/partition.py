"""How a prompt is split over runahead workers: even, FLOP-balanced, a mix of the two, or the
mix tuned per model, prompt length and worker count (`edgeprefill runahead tune` writes the
table, every runahead prefill reads it)."""

import json
import sys
from pathlib import Path

from edgeprefill.projection import check_sizes, greedy_split
from edgeprefill.projection import even_sizes as even_partition

TABLE_NAME = "runahead-partitions.json"


def balanced_partition(n, p, config):
    """Chunk lengths with equal analytic per-worker FLOPs (projections + MLP linear in the
    chunk, attention growing with the prefix), so earlier chunks are larger."""
    from edgeprefill.flops import attention_flops, layer_matmul_flops

    p = max(1, min(p, n))
    per_tok = layer_matmul_flops(config)

    def cost(start, length):
        return length * per_tok + attention_flops(config, length, start)

    target = cost(0, n) / p
    return greedy_split(lambda start, length: cost(start, length) <= target, n, p)


def resolve_partition(partition, n, p, config, what="workers"):
    """Chunk lengths from a partition argument: None (FLOP-balanced), a callable (n, p) ->
    lengths, or the lengths themselves; checked to split n tokens over at most p ranks."""
    if partition is None:
        sizes = balanced_partition(n, p, config)
    else:
        sizes = partition(n, p) if callable(partition) else partition
    return check_sizes(sizes, n, p, what)


def mixed_partition(n, p, config, alpha):
    """Chunk lengths between even (alpha 0) and FLOP-balanced (alpha 1), extrapolated beyond."""
    from edgeprefill.projection import mix_sizes

    return mix_sizes(even_partition(n, p), balanced_partition(n, p, config), alpha, n)



def table_path():
    from edgeprefill.loading import cache_dir

    return cache_dir() / TABLE_NAME


def partition_from_table(model_id, n, p, config, path=None, warn=True):
    """Chunk lengths for (n, p): alpha interpolated linearly in n from the tuned table; an even
    split with a warning when the table has no entry for this model and worker count."""
    path = Path(path) if path else table_path()
    rows = {}
    if path.is_file():
        rows = json.loads(path.read_text()).get(model_id, {}).get(str(p), {})
    if not rows:
        if warn:
            print(f"edgeprefill: warning: no tuned runahead partition for {model_id} with {p} "
                  "workers: using an even split (run `edgeprefill runahead tune`)",
                  file=sys.stderr)
        return even_partition(n, p)
    pts = sorted((int(k), v) for k, v in rows.items())
    if n <= pts[0][0]:
        alpha = pts[0][1]
    elif n >= pts[-1][0]:
        alpha = pts[-1][1]
    else:
        for (n0, a0), (n1, a1) in zip(pts, pts[1:]):
            if n0 <= n <= n1:
                alpha = a0 + (a1 - a0) * (n - n0) / (n1 - n0)
                break
    return mixed_partition(n, p, config, alpha)



__all__ = ["TABLE_NAME", "balanced_partition", "even_partition", "mixed_partition",
           "partition_from_table", "resolve_partition", "table_path"]
