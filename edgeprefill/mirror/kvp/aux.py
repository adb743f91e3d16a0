"""Torch mirror of edgeprefill.kvp.aux.AuxModel: the same forward (it only composes the
model's embed / block / head), with the mirror's buffer caches."""

from edgeprefill.kvp.aux import AuxModel as MlxAuxModel
from edgeprefill.kvp.aux import AuxOutput
from edgeprefill.mirror.models.transformer import KVCache



class AuxModel(MlxAuxModel):
    """A mirror Transformer run over a subset of its blocks (LP, T or C aux)."""

    def make_cache(self, max_len=None, batch=1):
        m = self.model
        max_len = max_len or m.max_context
        return [KVCache(batch, m.n_kv_heads, max_len, m.head_dim, m.dtype, m.device)
                for _ in self.layers]
