"""edgeprefill: short time-to-first-token for local LLMs on MLX."""

__version__ = "0.1.0"
