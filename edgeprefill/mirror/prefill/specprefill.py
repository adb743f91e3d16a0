"""Torch mirror of edgeprefill.prefill.specprefill: SpecPrefill and kvp+specprefill, the same
algorithms over the mirror model and pair."""

import torch

from edgeprefill.mirror.prefill.full import NoGrad, default_chunk_size
from edgeprefill.mirror.prefill.kv_prediction import KVPrediction
from edgeprefill.mirror.prefill.selection import TorchOps
from edgeprefill.prefill.specprefill import DEFAULT_KEEP, LOOKAHEAD, SELECT_CHUNK
from edgeprefill.prefill.specprefill import KVPSpecPrefill as MlxKVPSpecPrefill
from edgeprefill.prefill.specprefill import SpecPrefill as MlxSpecPrefill


class SpecPrefill(NoGrad, MlxSpecPrefill):
    """`specprefill` on the torch mirror; arguments as the MLX strategy (the draft a mirror
    Transformer or an AuxDraft over a mirror aux)."""

    ops = TorchOps

    def __init__(self, model, draft, keep=DEFAULT_KEEP, lookahead=LOOKAHEAD,
                 select_chunk=SELECT_CHUNK, positions="original", chunk_size=None):
        super().__init__(model, draft, keep, lookahead, select_chunk, positions,
                         chunk_size or default_chunk_size(model))


class KVPSpecPrefill(MlxKVPSpecPrefill):
    """`kvp+specprefill` on the torch mirror; arguments as the MLX strategy (mirror aux and
    predictor)."""

    ops = TorchOps
    make_cache = KVPrediction.make_cache
    _run_aux = KVPrediction._run_aux

    def __init__(self, model, aux, predictor, keep=None, select_chunk=SELECT_CHUNK,
                 chunk_size=None, tail=1):
        super().__init__(model, aux, predictor, keep, select_chunk,
                         chunk_size or default_chunk_size(model), tail)

    @torch.no_grad()
    def prefill(self, prompt_ids, cache=None, progress=None):
        if cache is not None and cache[0].offset:  # later turns run as the mirror's kvp
            return KVPrediction.prefill(self, prompt_ids, cache, progress)
        return super().prefill(prompt_ids, cache, progress)
