"""Torch mirror of edgeprefill.kvp.aux.AuxModel: the same forward (it only composes the
model's embed / block / head), with the mirror's buffer caches."""

from edgeprefill.kvp import aux as _aux
from edgeprefill.mirror.models.transformer import KVCache

AuxOutput = _aux.AuxOutput


class AuxModel(_aux.AuxModel):
    """A mirror Transformer run over a subset of its blocks (LP, T or C aux)."""

    def make_cache(self, max_len=None, batch=1):
        m = self.model
        max_len = max_len or m.max_context
        return [KVCache(batch, m.n_kv_heads, max_len, m.head_dim, m.dtype, m.device)
                for _ in self.layers]


def aux_to_torch(aux, tbase):
    """Mirror AuxModel of an MLX AuxModel made of `tbase`'s blocks (tbase: the mirror of the
    MLX base): the base's own blocks, except an artifact's trained copies (aux.safetensors),
    which are mirrored with their weights (frozen; view.train_copies(True) to train them)."""
    copied = getattr(aux.model, "copied", None)
    if not copied:
        return AuxModel(tbase, aux.layers, aux.kind)
    from edgeprefill.mirror.kvp.train import AuxView

    view = AuxView(tbase, copied)
    view.load_aux_weights(aux.model.aux_weights())
    view.train_copies(False)
    return AuxModel(view, aux.layers, aux.kind)
