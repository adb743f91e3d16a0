"""Quality of a prefill strategy against the base model's exact prefill.

For each (prompt, continuation) pair, against the base's exact (full) prefill of the prompt:
- first-token top-1 agreement and KL(base || strategy) of the first-token distributions;
- teacher-forced continuation NLL (mean nats per continuation token), decoding the continuation
  with the strategy's cache, and the ratio of its mean to the exact prefill's;
- greedy match: how many of the base's greedy tokens the strategy's cache reproduces before
  the first disagreement (teacher-forced on the base's greedy sequence, so one forward call).
The exact reference is computed once per pair and reused across strategies (`reference`).
"""

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from edgeprefill.prefill.full import FullPrefill


def log_softmax(x):
    """Log-probabilities over the last axis (numpy float64)."""
    x = np.asarray(x, dtype=np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def kl_divergence(p_logits, q_logits):
    """KL(p || q) of two (V,) logit vectors, p the base."""
    lp, lq = log_softmax(p_logits), log_softmax(q_logits)
    return float((np.exp(lp) * (lp - lq)).sum())


@dataclass
class Reference:
    """The base's exact results on one pair."""

    prompt: list
    continuation: list
    first_logits: np.ndarray
    nll: float
    greedy: list
    ttft_s: float


def continuation_logits(forward, cache, first_logits, tokens):
    """(len(tokens), V) logits predicting `tokens` after a prefill, teacher-forced; the cache
    is trimmed back afterwards so it can be reused (unless it says it is not trimmable)."""
    rows = [np.asarray(first_logits, dtype=np.float32)[None]]
    if len(tokens) > 1:
        out = forward(mx.array(tokens[:-1], dtype=mx.int32)[None], cache)[0]
        rows.append(np.array(out.astype(mx.float32)))
        if getattr(cache, "trimmable", True):
            for c in cache:
                c.trim(len(tokens) - 1)
    return np.concatenate(rows)


def mean_nll(logits, tokens):
    lp = log_softmax(logits)
    return float(-lp[np.arange(len(tokens)), tokens].mean())


def reference(model, prompt, continuation, greedy_tokens=16):
    """Reference for one pair (token-id lists) from the base's exact prefill."""
    cache, logits, stats = FullPrefill(model).prefill(prompt)
    first = np.array(logits)
    nll = mean_nll(continuation_logits(model, cache, first, continuation), continuation)
    greedy = [int(first.argmax())]
    for _ in range(greedy_tokens - 1):
        out = model(mx.array([[greedy[-1]]], dtype=mx.int32), cache)
        greedy.append(int(mx.argmax(out[0, -1]).item()))
    return Reference(prompt, continuation, first, nll, greedy, stats.ttft_s)


# A pair whose base puts its top two first tokens closer than this in probability is a near-tie:
# top-1 agreement there is close to a coin flip for any approximation, so summaries also give
# the agreement over the other pairs (reported beside the plain agreement, never instead of it).
NEAR_TIE = 0.05


def top_two_margin(logits):
    """(p1 - p2, index of the second most likely token) of a (V,) logit vector."""
    p = np.exp(log_softmax(np.asarray(logits).ravel()))
    first, second = np.argsort(-p)[:2]
    return float(p[first] - p[second]), int(second)


def score(model, strategy, ref):
    """Per-pair metrics of `strategy` against a Reference."""
    cache, logits, stats = strategy.prefill(ref.prompt)
    first = np.array(logits)
    forward = getattr(strategy, "forward", model)
    nll = mean_nll(continuation_logits(forward, cache, first, ref.continuation), ref.continuation)
    if not getattr(cache, "trimmable", True):  # e.g. lazy: start again from a new prefill
        cache, _, _ = strategy.prefill(ref.prompt)
    pred = continuation_logits(forward, cache, first, ref.greedy).argmax(axis=-1)
    match = 0
    while match < len(ref.greedy) and pred[match] == ref.greedy[match]:
        match += 1
    margin, second = top_two_margin(ref.first_logits)
    return {"agree": float(first.argmax() == ref.first_logits.argmax()),
            "base_margin": margin, "second_choice": float(first.argmax() == second),
            "kl": kl_divergence(ref.first_logits, first), "nll": nll, "nll_exact": ref.nll,
            "greedy_match": match, "ttft_s": stats.ttft_s, "ttft_exact_s": ref.ttft_s}


def wilson_interval(hits, n, z=1.96):
    """(low, high) 95% Wilson score interval of a proportion hits/n: how far a top-1 agreement
    measured on n pairs can sit from the rate on all such text (40 pairs: about +-0.1)."""
    if n == 0:
        return None
    p, z2 = hits / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * np.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return [float(max(0.0, centre - half)), float(min(1.0, centre + half))]


def summarize(rows, greedy_tokens):
    """Mean metrics over pairs (the record `edgeprefill eval` prints). Beside the agreement:
    near_ties, the pairs whose base top-two margin is under NEAR_TIE; agreement_clear, the
    agreement over the others (None if there are none); misses_second_choice, the misses that
    took the base's second choice; agreement_ci95, the agreement's 95% Wilson interval."""
    mean = lambda k: float(np.mean([r[k] for r in rows]))  # noqa: E731
    nll, nll_exact = mean("nll"), mean("nll_exact")
    clear = [r["agree"] for r in rows if r["base_margin"] >= NEAR_TIE]
    return {"pairs": len(rows), "first_token_agreement": mean("agree"),
            "agreement_ci95": wilson_interval(sum(r["agree"] for r in rows), len(rows)),
            "near_ties": len(rows) - len(clear),
            "agreement_clear": float(np.mean(clear)) if clear else None,
            "misses_second_choice": int(sum(r["second_choice"] for r in rows)),
            "first_token_kl": mean("kl"), "nll": nll, "nll_exact": nll_exact,
            "nll_ratio": nll / nll_exact if nll_exact > 0 else float("nan"),
            "greedy_match": mean("greedy_match"), "greedy_tokens": greedy_tokens,
            "ttft_s": mean("ttft_s"), "ttft_exact_s": mean("ttft_exact_s")}


def tokenize_pairs(tokenizer, rows):
    """[(prompt ids, continuation ids)] for {"prompt", "continuation"} rows (raw text, no chat
    template: the continuation is the text that follows the prompt)."""
    out = []
    for row in rows:
        p = list(tokenizer.encode(row["prompt"]))
        c = list(tokenizer.encode(row["continuation"], add_special_tokens=False))
        if p and c:
            out.append((p, c))
    return out


def first_token_quality(base, got):
    """Agreement, KL and NLL ratio of a strategy's runs against the exact prefill's on the same
    prompts (the bench's quality columns).

    Args:
        base, got: [(first-token logits (V,), continuation NLL or None)] per prompt.
    """
    q = {"first_token_agreement": float(np.mean(
            [np.argmax(g[0]) == np.argmax(b[0]) for g, b in zip(got, base)])),
         "first_token_kl": float(np.mean([kl_divergence(b[0], g[0]) for g, b in zip(got, base)])),
         "nll": None, "nll_exact": None, "nll_ratio": None}
    if all(g[1] is not None for g in got) and all(b[1] is not None for b in base):
        q["nll"] = float(np.mean([g[1] for g in got]))
        q["nll_exact"] = float(np.mean([b[1] for b in base]))
        q["nll_ratio"] = q["nll"] / q["nll_exact"]
    return q


def references(lm, n_pairs, data=None, greedy_tokens=16, progress=None):
    """Exact-prefill References for held-out pairs: a JSONL file of {"prompt", "continuation"}
    or the built-in set; `progress(done, total)` after each."""
    from edgeprefill.data import heldout_pairs, read_pairs
    from edgeprefill.errors import EdgeprefillError

    rows = read_pairs(data) if data else heldout_pairs(lm.tokenizer, n_pairs)
    pairs = tokenize_pairs(lm.tokenizer, rows)[:n_pairs]
    for p, c in pairs:
        if len(p) + len(c) + greedy_tokens >= lm.model.max_context:
            raise EdgeprefillError(f"an evaluation pair has {len(p) + len(c)} tokens, beyond "
                                   f"the model's context {lm.model.max_context}: shorten it")
    refs = []
    for p, c in pairs:
        refs.append(reference(lm.model, p, c, greedy_tokens))
        if progress:
            progress(len(refs), len(pairs))
    return refs


def evaluate(lm, strategy, refs, progress=None):
    """Summary metrics (summarize) of a built strategy over References."""
    rows = []
    for ref in refs:
        rows.append(score(lm.model, strategy, ref))
        if progress:
            progress(len(rows), len(refs))
    return summarize(rows, len(refs[0].greedy) if refs else 0)
