"""edgeprefill: short time-to-first-token for local LLMs on MLX.

The Python API, in mlx-lm's shape (edgeprefill/api.py):

    model = edgeprefill.load("default")
    text = edgeprefill.generate(model, "Why is the sky blue?", strategy="kvp", max_tokens=64)
    for r in edgeprefill.stream_generate(model, prompt, strategy="lazy"): ...
    result = edgeprefill.prefill(model, token_ids, strategy="kvp")  # result.cache for mlx-lm

On Linux, importing edgeprefill makes MLX run on OpenBLAS when it is installed (blas.py); it
must come before mlx's first import, so it is the first thing done here.
"""

from edgeprefill.blas import use_fast_blas as _use_fast_blas

__version__ = "0.1.0"
_use_fast_blas()

# As in mlx-lm, the functions take the names of the modules they live beside (generate, prefill):
# imported here, the names are the functions.
from edgeprefill.api import (EdgeprefillError, GenerationResponse, PrefillResult,  # noqa: E402
                             PrefixCache, generate, load, prefill, stream_generate)

__all__ = ["load", "generate", "stream_generate", "prefill", "GenerationResponse",
           "PrefillResult", "PrefixCache", "EdgeprefillError"]
