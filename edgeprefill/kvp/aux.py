"""Auxiliary models for KV Prediction.

KVP-LP: the base's own blocks, a subset at regular intervals (shared weights, no extra memory).
KVP-T:  the base's first m blocks, unchanged (shared weights); their K/V are the base's exactly.
KVP-C:  a separate smaller model of the same family and tokenizer.
All run causally over a prompt and return each aux layer's pre-RoPE K/V (and, on request, the
hidden state leaving chosen layers); they keep their own KV cache, so a later chat turn only
runs the new tokens.
"""

from dataclasses import dataclass, field

import mlx.core as mx
from mlx_lm.models.cache import KVCache

from edgeprefill.errors import EdgeprefillError

AUX_KINDS_HELP = ("LP-0.75, LP-0.50, LP-0.25 (paper), T-<fraction> such as T-0.50, or C "
                  "with --aux-model (a smaller model of the same tokenizer)")


@dataclass
class AuxOutput:
    """h: (1, L, D) leaving the last aux layer; kv: per aux layer (keys pre-RoPE, values),
    (1, Hkv_A, L, hd_A); hidden: aux layer -> (1, L, D) hidden state leaving it (asked-for
    layers only)."""

    h: mx.array
    kv: list
    hidden: dict = field(default_factory=dict)


class AuxModel:
    """A transformer run over a subset of its blocks.

    Args:
        model: edgeprefill.models.Transformer whose blocks the aux runs.
        layers: the block indices it runs, in order (all of them for KVP-C).
        kind: 'LP-<fraction>', 'T-<fraction>' or 'C'.
    """

    def __init__(self, model, layers, kind):
        self.model = model
        self.layers = list(layers)
        self.kind = kind
        self.n_layers = len(self.layers)
        self.kv_dim = model.n_kv_heads * model.head_dim
        self.hidden_size = model.hidden_size

    def make_cache(self):
        return [KVCache() for _ in self.layers]

    def forward(self, ids, cache, hidden_from=(), before_layer=None, after_layer=None):
        """Run the aux over (1, L) ids after what `cache` holds.

        Args:
            ids: (1, L) int token ids.
            cache: the aux's per-layer caches (from make_cache), extended in place.
            hidden_from: aux layer indices whose output hidden state to return.
            before_layer, after_layer: optional calls (a) and (a, out) around aux layer a,
                `out` the AuxOutput so far (out.h: the hidden state leaving layer a). KV
                runahead receives the prefix K/V into cache[a] before and sends it on after;
                kvp's overlapped path queues the base step's layers as their K/V appear.
        Returns:
            AuxOutput.
        """
        h = self.model.embed(ids)
        out = AuxOutput(h, [])
        if -1 in hidden_from:
            out.hidden[-1] = h
        for a, layer in enumerate(self.layers):
            if before_layer:
                before_layer(a)
            blk = self.model.block(layer, h, cache=None if cache is None else cache[a])
            h = out.h = blk.h
            out.kv.append((blk.keys, blk.values))
            if a in hidden_from:
                out.hidden[a] = h
            if after_layer:
                after_layer(a, out)
        return out

    def logits(self, h):
        """(1, L, D) -> (1, L, V) through the aux model's own head (the aux-only baseline)."""
        return self.model.head(h)


def parse_aux_kind(spec):
    """'LP-0.50' -> ('LP', 0.5); 'T-0.5' -> ('T', 0.5). Raises EdgeprefillError."""
    from edgeprefill.kvp.layer_map import LP_FRACTIONS

    kind, _, frac = str(spec).upper().partition("-")
    if kind == "C" and not frac:
        return "C", None
    try:
        fraction = float(frac)
    except ValueError:
        fraction = None
    ok = (kind == "LP" and fraction in LP_FRACTIONS) or (
        kind == "T" and fraction is not None and 0 < fraction < 1)
    if not ok:
        raise EdgeprefillError(f"unknown aux kind '{spec}': use {AUX_KINDS_HELP}")
    return kind, fraction


def make_aux(base, spec, aux_lm=None, base_tokenizer=None):
    """(AuxModel, layer map j_i, exact base layers) for an LP, T or C aux of `base` (C: the
    LoadedModel `aux_lm`, checked against `base_tokenizer`)."""
    from edgeprefill.kvp.layer_map import (compact_layer_map, lp_kept_layers, lp_layer_map,
                                           truncated_layer_map, truncated_layers)

    kind, fraction = parse_aux_kind(spec)
    if kind == "C":
        if aux_lm is None:
            raise EdgeprefillError("aux kind C needs the smaller model: pass --aux-model M")
        aux = compact_aux(aux_lm.model, base_tokenizer, aux_lm.tokenizer)
        from pathlib import Path

        aux.spec = str(Path(aux_lm.spec).resolve()) if Path(aux_lm.spec).exists() else aux_lm.spec
        return aux, compact_layer_map(base.n_layers, aux.n_layers), []
    if kind == "LP":
        kept = lp_kept_layers(base.n_layers, fraction)
        return AuxModel(base, kept, f"LP-{fraction:.2f}"), lp_layer_map(base.n_layers, kept), []
    m = truncated_layers(base.n_layers, fraction)
    return (AuxModel(base, range(m), f"T-{fraction:.2f}"),
            truncated_layer_map(base.n_layers, m), list(range(m)))


def layer_pruned_aux(base, fraction):
    """KVP-LP: the base's blocks kept by lp_kept_layers(fraction)."""
    return make_aux(base, f"LP-{fraction}")[0]


def compact_aux(aux_model, base_tokenizer, aux_tokenizer):
    """KVP-C: a separate smaller model; refused unless it tokenizes exactly like the base."""
    vb, va = base_tokenizer.vocab_size, aux_tokenizer.vocab_size
    probe = "KV Prediction: def f(x):\n    return x ** 2  # ünïcode 東京 123"
    if vb != va or base_tokenizer.encode(probe) != aux_tokenizer.encode(probe):
        raise EdgeprefillError("the aux model's tokenizer differs from the base's: KVP-C needs "
                               "a smaller model of the same family and tokenizer")
    return AuxModel(aux_model, range(aux_model.n_layers), "C")
