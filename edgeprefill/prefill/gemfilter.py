"""`gemfilter`: GemFilter (Shi et al., arXiv 2409.17422), training-free.

Early layers already find the tokens a question needs. For a prompt of n tokens:
1. the base's first r + 1 layers run over the whole prompt (layers 0 .. r, r the filter layer;
   the paper uses layer 13 of Llama-3.1-8B's 32, here 0.4 of the depth by default);
2. the last token's attention at the filter layer, summed over query heads, scores every
   prompt token; the top k are kept in their original order (the last token always);
3. the whole base prefills the kept tokens as a short prompt. The paper numbers them afresh
   (positions 0 .. k-1, `positions="fresh"`); `positions="original"` keeps each token's own
   position, as SpecPrefill does.

TTFT FLOPs: (r + 1) / L of a full prefill of n tokens, plus a full prefill of k tokens.
Decoding continues over the k cached tokens.
"""

from edgeprefill.errors import EdgeprefillError
from edgeprefill.prefill.selection import Selective, pooled

FILTER_DEPTH = 0.4  # the paper's layer 13 of 32, as a fraction of the depth
DEFAULT_KEEP = 0.25
QUERIES = 32  # the last tokens whose attention scores (the paper: 1); docs/selection.md


def filter_layer_index(n_layers, layer=None):
    """The filter layer: `layer` if given (0-based, checked), else round(0.4 * n_layers)."""
    if layer is None:
        return min(n_layers - 1, max(0, round(FILTER_DEPTH * n_layers)))
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n_layers:
        raise EdgeprefillError(f"--filter-layer must be a layer index 0..{n_layers - 1} "
                               f"(got {layer!r}): the default is {round(FILTER_DEPTH * n_layers)}")
    return layer


class GemFilter(Selective):
    """Args:
        model: edgeprefill.models.Transformer (the base).
        keep: tokens kept: a fraction in (0, 1] or a count.
        filter_layer: the layer whose attention selects (default 0.4 of the depth).
        positions: "fresh" (the paper) or "original".
        chunk_size: prompt tokens per forward call.
    """

    name = "gemfilter"

    def __init__(self, model, keep=DEFAULT_KEEP, filter_layer=None, positions="fresh",
                 chunk_size=None, queries=QUERIES):
        super().__init__(model, keep, positions, chunk_size)
        self.filter_layer = filter_layer_index(model.n_layers, filter_layer)
        self.queries = queries

    def scores(self, ids, extra):
        """Pass 1: layers 0 .. r over the prompt (chunked, into caches dropped afterwards);
        at layer r, the attention of the last `queries` tokens (pooled, max over heads, mean
        over those queries; queries=1 with no pooling: the paper's last-token row summed over
        heads) as (n,) host scores."""
        ops, m, r = self.ops, self.model, self.filter_layer
        scratch = m.make_cache()[:r + 1]
        n = ids.shape[0]
        for s in range(0, n, self.chunk_size):
            chunk = ids[s:s + self.chunk_size]
            q = min(self.queries, chunk.shape[0]) if s + self.chunk_size >= n else 0
            h = m.embed(chunk[None])
            for i in range(r + 1):
                out = m.block(i, h, cache=scratch[i], attn_probs=q if i == r else 0)
                h = out.h
            ops.eval(h, [c.keys_and_values() for c in scratch])
        extra["filter_layer"] = r
        if self.queries == 1:
            return ops.numpy(ops.float32(out.attn[0, :, 0, :n]).sum(0))
        return ops.numpy(pooled(ops, out.attn, n)).mean(axis=0)
