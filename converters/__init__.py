"""Model converters: GGUF -> HF folder (and, later, torch mirror -> Core ML)."""
