"""Torch mirror of edgeprefill.kvp.aux.AuxModel (same forward contract)."""

from dataclasses import dataclass, field

import torch

from edgeprefill.mirror.models.transformer import KVCache


@dataclass
class AuxOutput:
    """As edgeprefill.kvp.aux.AuxOutput: h, kv per aux layer, hidden {aux layer: h leaving it}."""

    h: torch.Tensor
    kv: list
    hidden: dict = field(default_factory=dict)


class AuxModel:
    """A mirror Transformer run over a subset of its blocks (LP, T or C aux)."""

    def __init__(self, model, layers, kind):
        self.model = model
        self.layers = list(layers)
        self.kind = kind
        self.n_layers = len(self.layers)
        self.kv_dim = model.n_kv_heads * model.head_dim
        self.hidden_size = model.hidden_size

    def make_cache(self, max_len=None, batch=1):
        m = self.model
        max_len = max_len or m.max_context
        return [KVCache(batch, m.n_kv_heads, max_len, m.head_dim, m.dtype, m.device)
                for _ in self.layers]

    def forward(self, ids, cache, hidden_from=()):
        h = self.model.embed(ids)
        out = AuxOutput(h, [])
        if -1 in hidden_from:
            out.hidden[-1] = h
        for a, layer in enumerate(self.layers):
            blk = self.model.block(layer, h, cache=None if cache is None else cache[a])
            h = blk.h
            out.kv.append((blk.keys, blk.values))
            if a in hidden_from:
                out.hidden[a] = h
        out.h = h
        return out

    def logits(self, h):
        return self.model.head(h)
