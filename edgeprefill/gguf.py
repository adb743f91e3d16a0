"""Read a GGUF file (llama, qwen2, qwen3) into a Hugging Face model folder.

The folder holds config.json, model.safetensors (dequantized fp32 weights in HF names and
layout) and the tokenizer files, so mlx-lm's loader (and the torch mirror) read it like any
HF checkpoint. llama.cpp stores llama's Q and K weights row-permuted for its own RoPE kernel;
they are un-permuted here. The tokenizer is rebuilt from the GGUF metadata with the
`tokenizers` library alone (no transformers GGUF reader, which needs torch).
"""

import json
from pathlib import Path

import numpy as np

from edgeprefill.errors import EdgeprefillError
from edgeprefill.fsio import atomic_folder

SUPPORTED_ARCHS = ("llama", "qwen2", "qwen3")

# GGUF tensor name (after "blk.N.") -> HF name (after "model.layers.N.")
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}


def hf_tensor_name(gguf_name):
    """Map a GGUF tensor name (e.g. 'blk.3.attn_q.weight') to its HF name, or None if unused."""
    stem, _, suffix = gguf_name.rpartition(".")
    parts = stem.split(".")
    if parts[0] == "blk" and len(parts) == 3 and parts[2] in _BLOCK_NAMES:
        return f"model.layers.{parts[1]}.{_BLOCK_NAMES[parts[2]]}.{suffix}"
    if len(parts) == 1 and parts[0] in _TOP_NAMES:
        return f"{_TOP_NAMES[parts[0]]}.{suffix}"
    return None


def unpermute_qk(w, n_heads):
    """Undo llama.cpp's RoPE row permutation of a Q or K weight.

    Args:
        w: (out, in) or (out,) array as stored in the GGUF file.
        n_heads: query heads for Q, KV heads for K.
    Returns:
        The array in HF's (rotate-half) layout, same shape.
    """
    shape = w.shape
    w = w.reshape(n_heads, shape[0] // n_heads // 2, 2, *shape[1:])
    return w.swapaxes(1, 2).reshape(shape)


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def gguf_config(reader):
    """HF config dict from GGUF metadata."""
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise EdgeprefillError(
            f"GGUF architecture '{arch}' is not supported: use a llama, qwen2 or qwen3 model"
        )
    if any(t.name == "rope_freqs.weight" for t in reader.tensors):
        raise EdgeprefillError(
            "GGUF with rope_freqs (Llama 3.1+ rope scaling) is not supported by the GGUF "
            "converter: load the model's HF or mlx-community folder instead"
        )
    def a(key, default=None):
        value = _field(reader, f"{arch}.{key}", default)
        if value is None:
            raise EdgeprefillError(f"GGUF file lacks metadata '{arch}.{key}': it is incomplete "
                                   "or not a model file; re-download it")
        return value

    hidden = int(a("embedding_length"))
    heads = int(a("attention.head_count"))
    names = {t.name for t in reader.tensors}
    embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embd is None:
        raise EdgeprefillError("GGUF file has no token_embd.weight: it is not a language model")
    config = {
        "architectures": [{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                           "qwen3": "Qwen3ForCausalLM"}[arch]],
        "model_type": arch,
        "hidden_size": hidden,
        "num_hidden_layers": int(a("block_count")),
        "intermediate_size": int(a("feed_forward_length")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(a("attention.head_count_kv", heads)),
        "head_dim": int(a("attention.key_length", hidden // heads)),
        "rms_norm_eps": float(a("attention.layer_norm_rms_epsilon", 1e-6)),
        # Top-level key on purpose: mlx-lm's llama args read rope_theta only here.
        "rope_theta": float(a("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(a("context_length", 2048)),
        "vocab_size": int(embd.shape[1]),  # rows of the embedding (may exceed the token list)
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": "blk.0.attn_q.bias" in names,
        "torch_dtype": "float32",
    }
    for key, hf_key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id")):
        v = _field(reader, f"tokenizer.ggml.{key}")
        if v is not None:
            config[hf_key] = int(v)
    return config


def read_weights(reader, config):
    """Dequantized fp32 weights keyed by HF name, in HF layout."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    permute = config["model_type"] == "llama"
    weights = {}
    for t in reader.tensors:
        name = hf_tensor_name(t.name)
        if name is None:
            continue
        shape = tuple(int(d) for d in reversed(t.shape))
        if t.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            w = np.asarray(t.data, dtype=np.float32).reshape(shape)
        else:
            w = dequantize(t.data, t.tensor_type).astype(np.float32).reshape(shape)
        if permute and ".self_attn.q_proj." in name:
            w = unpermute_qk(w, config["num_attention_heads"])
        elif permute and ".self_attn.k_proj." in name:
            w = unpermute_qk(w, config["num_key_value_heads"])
        weights[name] = np.ascontiguousarray(w)
    expected = f"model.layers.{config['num_hidden_layers'] - 1}.mlp.down_proj.weight"
    if "model.embed_tokens.weight" not in weights or expected not in weights:
        raise EdgeprefillError("GGUF file is missing model tensors: re-download the file")
    return weights


def convert_gguf(gguf_path, out_dir, progress=None):
    """Convert `gguf_path` into an HF folder at `out_dir` (written atomically).

    Args:
        gguf_path: path of a .gguf file.
        out_dir: folder to create; must not exist yet.
        progress: optional callable(str) told about each step.
    Returns:
        Path of the finished folder.
    """
    import gguf
    from safetensors.numpy import save_file

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    say = progress or (lambda _msg: None)
    if not gguf_path.is_file():
        raise EdgeprefillError(f"GGUF file not found: {gguf_path}: check the path")
    try:
        reader = gguf.GGUFReader(str(gguf_path))
    except Exception as e:  # corrupted or truncated file
        raise EdgeprefillError(
            f"cannot read GGUF file {gguf_path} ({type(e).__name__}: {e}): the file is corrupted "
            "or not GGUF; re-download it"
        ) from None
    config = gguf_config(reader)
    with atomic_folder(out_dir) as tmp:
        say("dequantizing weights")
        save_file(read_weights(reader, config), str(tmp / "model.safetensors"))
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        say("building tokenizer")
        write_tokenizer(reader, tmp)
        (tmp / "edgeprefill_source.json").write_text(
            json.dumps({"converted_from": gguf_path.name, "size": gguf_path.stat().st_size})
        )
    return out_dir


# llama.cpp's pre-tokenizer names (tokenizer.ggml.pre) -> the split regex it applies before
# byte-level BPE; None: GPT-2's own regex (ByteLevel's built-in one).
_CONTRACTIONS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
_SPLIT_PATTERNS = {
    "default": None,
    "gpt2": None,
    "smollm": None,  # plus one token per digit (below)
    "llama-bpe": _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+",
    "qwen2": _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
             r"|\s*[\r\n]+|\s+(?!\S)|\s+",
}
_SPLIT_PATTERNS["llama3"] = _SPLIT_PATTERNS["llama-bpe"]
_CONTROL, _USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values of special tokens


def build_tokenizer(reader):
    """A `tokenizers.Tokenizer` equal to the GGUF's byte-level BPE tokenizer.

    Args:
        reader: a gguf.GGUFReader.
    Returns:
        (tokenizer, special): the Tokenizer and {"bos_token": str, ...} of the special tokens
        the metadata names.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.processors import TemplateProcessing

    kind = _field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise EdgeprefillError(
            f"GGUF tokenizer '{kind}' is not supported (edgeprefill reads byte-level BPE, "
            "'gpt2'): load the model's HF or mlx-community folder instead")
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    if pre not in _SPLIT_PATTERNS:
        raise EdgeprefillError(
            f"GGUF pre-tokenizer '{pre}' is not supported (known: "
            f"{', '.join(sorted(_SPLIT_PATTERNS))}): load the model's HF or mlx-community folder "
            "instead")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    merges = _field(reader, "tokenizer.ggml.merges")
    if not tokens or not merges:
        raise EdgeprefillError("GGUF file has no tokenizer.ggml.tokens or merges: it carries no "
                               "tokenizer; load the model's HF folder instead")
    types = _field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    vocab = {t: i for i, t in enumerate(tokens)}
    bpe = models.BPE(vocab, [tuple(m.split(" ", 1)) for m in merges], fuse_unk=False,
                     byte_fallback=False)
    tok = Tokenizer(bpe)
    pattern = _SPLIT_PATTERNS[pre]
    if pattern is None:
        steps = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
        if pre == "smollm":
            steps.insert(0, pre_tokenizers.Digits(individual_digits=True))
    else:
        steps = [pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    tok.pre_tokenizer = steps[0] if len(steps) == 1 else pre_tokenizers.Sequence(steps)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == _CONTROL])
    tok.add_tokens([AddedToken(t, normalized=False)
                    for t, ty in zip(tokens, types) if ty == _USER_DEFINED])
    special = {}
    for key, name in (("bos", "bos_token"), ("eos", "eos_token"), ("unknown", "unk_token"),
                      ("padding", "pad_token")):
        i = _field(reader, f"tokenizer.ggml.{key}_token_id")
        if i is not None and 0 <= int(i) < len(tokens):
            special[name] = tokens[int(i)]
    if _field(reader, "tokenizer.ggml.add_bos_token", False) and "bos_token" in special:
        bos = special["bos_token"]
        tok.post_processor = TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                special_tokens=[(bos, vocab[bos])])
    return tok, special


def write_tokenizer(reader, out_dir):
    """Write tokenizer.json and tokenizer_config.json (chat template included) to `out_dir`."""
    tok, special = build_tokenizer(reader)
    tok.save(str(Path(out_dir) / "tokenizer.json"))
    # No model_max_length: the context is config.json's; tokenizing a long corpus is fine.
    tc = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
          **special}
    template = _field(reader, "tokenizer.chat_template")
    if template:
        tc["chat_template"] = template
    (Path(out_dir) / "tokenizer_config.json").write_text(json.dumps(tc, indent=2))
