"""The per-layer model seam shared by every prefill strategy."""

from edgeprefill.models.transformer import FAMILIES, BlockOutput, Transformer, apply_rope

__all__ = ["FAMILIES", "BlockOutput", "Transformer", "apply_rope"]
