from edgeprefill.mirror.models.transformer import (FAMILIES, BlockOutput, KVCache, Transformer,
                                                    apply_rope)

__all__ = ["FAMILIES", "BlockOutput", "KVCache", "Transformer", "apply_rope"]
