"""Where KV Prediction loses a long-prompt task's answer.

For each row of a task (edgeprefill.tasks) the prompt's head (all but the exact tail) is
prefilled twice: exactly by the base, and by the pair (the aux plus the predictor). Hybrid
caches then take the exact K/V for one part and the predicted K/V for the rest; the base runs
the tail over each, as kvp does, and answers greedily. A part whose exact K/V brings the answer
back is where the prediction loses it.

Parts:
    layers      the base layers the aux copies (its own layers, trained ones included), and
                the predicted layers in contiguous groups by depth.
    needles     the tokens of the needle sentences (every layer), found in the prompt by the
                task's pattern; and the converse, everything exact but the needles.
"""

import re
import time

import mlx.core as mx

from edgeprefill.errors import EdgeprefillError

# The needle sentences of edgeprefill.tasks (niah-* and vartrack*), as they read in a prompt.
NEEDLE_PATTERN = re.compile(r"One of the special magic numbers for [a-z]+-[a-z]+ is: \d+\."
                            r"|VAR [A-Z]{2}\d{2} = (?:VAR [A-Z]{2}\d{2}|\d+)\.")


def needle_positions(tokenizer, ids):
    """The indices of the tokens of `ids` that overlap a needle sentence (empty if none)."""
    pieces = [tokenizer.decode([t]) for t in ids]
    ends, total = [], 0
    for p in pieces:
        total += len(p)
        ends.append(total)
    text = "".join(pieces)
    out = set()
    for m in NEEDLE_PATTERN.finditer(text):
        start = 0
        for i, end in enumerate(ends):
            if end > m.start() and start < m.end():
                out.add(i)
            start = end
    return sorted(out)


def layer_parts(strategy, groups):
    """[(label, base layers)]: the aux-copied layers, then the predicted ones in `groups`
    contiguous groups by depth."""
    plan = strategy.predictor
    parts = [(f"layers {plan.exact[0]}-{plan.exact[-1]} (aux-copied)", list(plan.exact))] if (
        plan.exact) else []
    pred = plan.predicted
    groups = max(1, min(groups, len(pred)))
    for g in range(groups):
        part = pred[g * len(pred) // groups:(g + 1) * len(pred) // groups]
        if part:
            parts.append((f"layers {part[0]}-{part[-1]} (predicted)", part))
    return parts


class _Prepared:
    """A prefill already done: hands its cache and logits to edgeprefill.generate."""

    def __init__(self, cache, logits, stats):
        self.cache, self.logits, self.stats = cache, logits, stats

    def prefill(self, prompt_ids, cache=None, progress=None):
        return self.cache, self.logits, self.stats


def _layer_kv(cache, i, m):
    c = cache[i]
    return c.keys[:, :, :m, :], c.values[:, :, :m, :]


def _hybrid(strategy, exact, predicted, m, layers=(), tokens=None, invert=False):
    """A base cache over the head's m positions: exact K/V at `layers` (every position) and at
    `tokens` (positions, every layer), predicted elsewhere; `invert` swaps the two."""
    from edgeprefill.prefill.base import PromptCache
    from edgeprefill.prefill.kv_prediction import write_fresh

    cache = PromptCache(strategy.model.make_cache())
    mask = None
    if tokens:
        spots = set(tokens)
        mask = mx.array([i in spots for i in range(m)])[None, None, :, None]
    layers = set(layers)
    for i in range(len(cache)):
        ke, ve = _layer_kv(exact, i, m)
        kp, vp = _layer_kv(predicted, i, m)
        if invert:  # the chosen part predicted, the rest exact
            ke, ve, kp, vp = kp, vp, ke, ve
        if i in layers:
            k, v = ke, ve
        elif mask is not None:
            k, v = mx.where(mask, ke, kp), mx.where(mask, ve, vp)
        else:
            k, v = kp, vp
        write_fresh(cache[i], k, v, strategy.tail + 64)
    return cache


PARTS = ("layers", "needles")


def diagnose_rows(lm, strategy, rows, groups=3, parts=PARTS, progress=None):
    """Greedy answers of each hybrid on `rows`.

    Args:
        lm: the base (edgeprefill.loading.LoadedModel).
        strategy: a built `kvp` strategy (its pair and exact tail).
        rows: task rows (edgeprefill.tasks.make_rows).
        groups: predicted layers are repaired in this many depth groups.
        parts: which hybrids beside the two controls (kvp, exact): "layers" (the layer
            groups), "needles" (the needle's tokens, and every token but them).
        progress: callable(done, total).
    Returns:
        {"variants": {label: [row results]}, "needle_tokens": [per row]}: row results as
        edgeprefill.tasks.run_rows gives them. Labels: "kvp" (nothing repaired), one per layer
        part, "needle tokens", "all but needle tokens", "exact" (every position repaired).
    """
    from edgeprefill.prefill.base import PrefillStats
    from edgeprefill.prefill.full import FullPrefill, as_token_array
    from edgeprefill.tasks import answer_row, row_ids

    if not hasattr(strategy, "predictor"):
        raise EdgeprefillError("diagnosis needs the kvp strategy (a KV Prediction pair)")
    unknown = set(parts) - set(PARTS)
    if unknown or not parts:
        raise EdgeprefillError(f"--parts takes {', '.join(PARTS)} (got {', '.join(parts)})")
    needles_too = "needles" in parts
    parts = layer_parts(strategy, groups) if "layers" in parts else []
    full = FullPrefill(lm.model, chunk_size=strategy.chunk_size)
    labels = ["kvp", *(p[0] for p in parts),
              *(("needle tokens", "all but needle tokens") if needles_too else ()), "exact"]
    variants = {k: [] for k in labels}
    needles = []
    for done, row in enumerate(rows):
        ids = row_ids(lm.tokenizer, row)
        arr = as_token_array(ids)
        tail = min(strategy.tail, len(ids) - 1)
        m = len(ids) - tail
        exact = full.prefill(arr[:m])[0]
        predicted = strategy.predicted_cache(arr[:m], room=tail)
        spots = [t for t in needle_positions(lm.tokenizer, ids) if t < m]
        needles.append(len(spots))
        plans = {"kvp": {}, **{label: {"layers": ls} for label, ls in parts},
                 **({"needle tokens": {"tokens": spots},
                     "all but needle tokens": {"tokens": spots, "invert": True}}
                    if needles_too else {}),
                 "exact": {"layers": range(lm.model.n_layers)}}
        for label, how in plans.items():
            start = time.perf_counter()
            cache = _hybrid(strategy, exact, predicted, m, **how)
            logits = strategy.base_step(arr[m:], cache)
            cache.tokens.extend(ids)
            stats = PrefillStats(label, len(ids), cache[0].offset, time.perf_counter() - start)
            r = answer_row(lm, _Prepared(cache, logits, stats), row, ids=ids)
            variants[label].append({**r, "id": row.get("id", done)})
        if progress:
            progress(done + 1, len(rows))
    return {"variants": variants, "needle_tokens": needles}
