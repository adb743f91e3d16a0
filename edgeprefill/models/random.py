"""Random-weight models of any supported family and shape, written as HF folders.

Tests build tiny ones; the benchmark builds real shapes (`--shape llama-8b`) for speed-only
runs with no weights to download. The folder is a normal HF checkpoint (config.json,
model.safetensors, tokenizer files), optionally 4-bit quantized the way mlx-community's are.
"""

import json
from pathlib import Path

from edgeprefill.fsio import atomic_folder

# Real architectures' shapes (hidden, layers, intermediate, heads, kv heads, vocab, and the
# context window of the real model: 131072 for Llama 3.1 / 3.2, 8192 for SmolLM2).
SHAPES = {
    "tiny": dict(hidden_size=64, num_hidden_layers=4, intermediate_size=128,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=384),
    "smollm2-135m": dict(hidden_size=576, num_hidden_layers=30, intermediate_size=1536,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                         max_position_embeddings=8192),
    "llama-1b": dict(hidden_size=2048, num_hidden_layers=16, intermediate_size=8192,
                     num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                     max_position_embeddings=131072),
    "llama-3b": dict(hidden_size=3072, num_hidden_layers=28, intermediate_size=8192,
                     num_attention_heads=24, num_key_value_heads=8, vocab_size=128256,
                     max_position_embeddings=131072),
    "llama-8b": dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=14336,
                     num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                     max_position_embeddings=131072),
}

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_CORPUS = (
    "The quick brown fox jumps over the lazy dog. What is the capital of France? Paris is "
    "the capital of France. def prefill(prompt_ids): return cache, logits, stats\n"
    "Time to first token is the wait before the first word of an answer appears. ") * 20


def make_config(family, shape="tiny", **overrides):
    """HF config dict for a random model of `family` (llama, qwen2, qwen3) and `shape`."""
    cfg = dict(SHAPES[shape]) if isinstance(shape, str) else dict(shape)
    cfg.setdefault("max_position_embeddings", 512 if shape == "tiny" else 32768)
    cfg.update(model_type=family, rms_norm_eps=1e-5, rope_theta=10000.0,
               tie_word_embeddings=family != "qwen2", bos_token_id=1, eos_token_id=2)
    cfg["head_dim"] = cfg["hidden_size"] // cfg["num_attention_heads"]
    cfg["architectures"] = [{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                             "qwen3": "Qwen3ForCausalLM"}[family]]
    cfg.update(overrides)
    return cfg


def write_tokenizer(folder, vocab_size):
    """A byte-level BPE tokenizer of `vocab_size` trained on a fixed text, with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([_CORPUS], trainer)
    tok.save(str(Path(folder) / "tokenizer.json"))
    (Path(folder) / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
        "chat_template": CHAT_TEMPLATE, "model_max_length": 1 << 20}))


def random_model_folder(path, family="llama", shape="tiny", seed=0, quantize_bits=None,
                        group_size=32, dtype="float32", **overrides):
    """Write a random-weight HF folder and return its path.

    Args:
        path: folder to create (replaced if it exists).
        family: llama | qwen2 | qwen3.
        shape: a SHAPES name or a dict of the config's size fields.
        seed: weights seed.
        quantize_bits: e.g. 4 to write an mlx-community style quantized folder.
        dtype: stored dtype of unquantized weights.
    """
    import mlx.core as mx
    from mlx.utils import tree_map
    from mlx_lm.utils import _get_classes, quantize_model, save_config, save_model

    path = Path(path)
    config = make_config(family, shape, **overrides)
    model_cls, args_cls = _get_classes(config)
    mx.random.seed(seed)
    model = model_cls(args_cls.from_dict(config))
    # Small weights keep deep random models numerically tame.
    model.update(tree_map(lambda p: (p * 0.5).astype(getattr(mx, dtype)), model.parameters()))
    mx.eval(model.parameters())
    if quantize_bits:
        model, config = quantize_model(model, config, group_size=group_size, bits=quantize_bits)
    with atomic_folder(path) as tmp:
        save_model(tmp, model, donate_model=True)
        save_config(config, tmp / "config.json")
        write_tokenizer(tmp, config["vocab_size"])
    return path


def load_random(shape, family="llama", dtype="float32", seed=0):
    """A LoadedModel of random weights in memory (nothing written but a small tokenizer), for
    speed-only benchmarks of real shapes: `load_random('llama-8b', dtype='bfloat16')`."""
    import mlx.core as mx
    from mlx.utils import tree_map
    from mlx_lm.utils import _get_classes, load_tokenizer

    from edgeprefill.errors import EdgeprefillError
    from edgeprefill.fsio import cache_dir
    from edgeprefill.models.loaded import LoadedModel
    from edgeprefill.models import Transformer

    if shape not in SHAPES:
        raise EdgeprefillError(f"unknown --shape '{shape}': choose one of {', '.join(SHAPES)}")
    config = make_config(family, shape)
    model_cls, args_cls = _get_classes(config)
    mx.random.seed(seed)
    model = model_cls(args_cls.from_dict(config))
    model.update(tree_map(lambda p: (p * 0.5).astype(getattr(mx, dtype)), model.parameters()))
    mx.eval(model.parameters())
    tok_dir = cache_dir() / "random-tokenizers" / str(min(config["vocab_size"], 4096))
    if not (tok_dir / "tokenizer.json").is_file():
        with atomic_folder(tok_dir) as tmp:
            write_tokenizer(tmp, min(config["vocab_size"], 4096))
    tokenizer = load_tokenizer(tok_dir)
    return LoadedModel(Transformer(model, config), tokenizer, config, tok_dir,
                       f"random:{family}-{shape}")
