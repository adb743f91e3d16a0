"""What every prefill strategy returns beside the cache and logits, and shared defaults."""

from dataclasses import asdict, dataclass, field


@dataclass
class PrefillStats:
    """Timing and token counts of one prefill.

    ttft_s: seconds from the call until the first token's logits were computed.
    prompt_tokens: tokens this call added to the cache.
    context_tokens: tokens in the cache afterwards (earlier turns included).
    """

    strategy: str
    prompt_tokens: int
    context_tokens: int
    ttft_s: float
    extra: dict = field(default_factory=dict)

    @property
    def prefill_tok_s(self):
        return self.prompt_tokens / self.ttft_s if self.ttft_s > 0 else float("inf")

    def as_dict(self):
        d = asdict(self)
        d["prefill_tok_s"] = self.prefill_tok_s
        return d


class PromptCache(list):
    """Per-layer base KV caches (the list's items) and what strategies keep beside them.

    tokens: token ids the base cache holds, in order (a strategy with its own model, like
        kvp's aux, catches up on the ones it has not seen at the next turn).
    aux: the aux model's per-layer caches (kvp), else None.
    """

    def __init__(self, layers):
        super().__init__(layers)
        self.tokens = []
        self.aux = None


CPU_CHUNK, GPU_CHUNK = 512, 8192  # prefill tokens per forward call (default_chunk_size)


def default_chunk_size():
    """Tokens per prefill forward call: 512 on a CPU (less of each causal score matrix is
    wasted), 8192 on a GPU (larger matmuls keep it busy). `bench --chunk-size` compares others
    (docs/results has the measurements behind these defaults)."""
    import mlx.core as mx

    return GPU_CHUNK if mx.default_device() == mx.gpu else CPU_CHUNK
