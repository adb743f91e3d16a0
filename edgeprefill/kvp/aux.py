"""Auxiliary models for KV Prediction.

KVP-LP: the base's own blocks, a subset of them (shared weights, no extra memory).
KVP-C: a separate smaller model of the same family and tokenizer.
Both run causally over a prompt and return each aux layer's pre-RoPE K/V; they keep their own
KV cache, so a later chat turn only runs the new tokens.
"""

import mlx.core as mx
from mlx_lm.models.cache import KVCache

from edgeprefill.errors import EdgeprefillError


class AuxModel:
    """A transformer run over a subset of its blocks.

    Args:
        model: edgeprefill.models.Transformer whose blocks the aux runs.
        layers: the block indices it runs, in order (all of them for KVP-C).
        kind: 'LP-<fraction>' or 'C'.
    """

    def __init__(self, model, layers, kind):
        self.model = model
        self.layers = list(layers)
        self.kind = kind
        self.n_layers = len(self.layers)
        self.kv_dim = model.n_kv_heads * model.head_dim

    def make_cache(self):
        return [KVCache() for _ in self.layers]

    def forward(self, ids, cache):
        """Run the aux over (1, L) ids after what `cache` holds.

        Returns:
            (h, kv): h (1, L, D) leaving the last aux layer; kv a list per aux layer of
            (keys, values), each (1, Hkv_A, L, hd_A), keys pre-RoPE.
        """
        h = self.model.embed(ids)
        kv = []
        for a, layer in enumerate(self.layers):
            out = self.model.block(layer, h, cache=cache[a])
            h = out.h
            kv.append((out.keys, out.values))
        return h, kv

    def logits(self, h):
        """(1, L, D) -> (1, L, V) through the aux model's own head (the aux-only baseline)."""
        return self.model.head(h)


def layer_pruned_aux(base, fraction):
    """KVP-LP: the base's blocks kept by lp_kept_layers(fraction)."""
    from edgeprefill.kvp.layer_map import lp_kept_layers

    return AuxModel(base, lp_kept_layers(base.n_layers, fraction), f"LP-{fraction:.2f}")


def compact_aux(aux_model, base_tokenizer, aux_tokenizer):
    """KVP-C: a separate smaller model; refused unless it tokenizes exactly like the base."""
    vb, va = base_tokenizer.vocab_size, aux_tokenizer.vocab_size
    probe = "KV Prediction: def f(x):\n    return x ** 2  # ünïcode 東京 123"
    if vb != va or base_tokenizer.encode(probe) != aux_tokenizer.encode(probe):
        raise EdgeprefillError("the aux model's tokenizer differs from the base's: KVP-C needs "
                               "a smaller model of the same family and tokenizer")
    return AuxModel(aux_model, range(aux_model.n_layers), "C")


def eval_cache(cache):
    mx.eval([c.keys_and_values() for c in cache])
