"""A loaded model: the per-layer Transformer, its tokenizer and where it came from."""

from dataclasses import dataclass
from pathlib import Path

DEFAULT_MODEL = "default"  # the spec of the bundled model
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


@dataclass
class LoadedModel:
    """A model ready to run: the per-layer Transformer, its tokenizer and where it came from."""

    model: object  # edgeprefill.models.Transformer
    tokenizer: object  # mlx_lm TokenizerWrapper
    config: dict
    path: Path
    spec: str

    @property
    def mlx_model(self):
        """The mlx-lm model (for mlx_lm.generate / stream_generate)."""
        return self.model.model

    @property
    def model_id(self):
        """A readable identity: the spec, and for 'default' the model name."""
        return DEFAULT_MODEL_NAME if self.spec == DEFAULT_MODEL else self.spec
