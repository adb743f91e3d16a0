"""Convert a GGUF file (llama, qwen2, qwen3) into a Hugging Face model folder.

The folder holds config.json, model.safetensors (dequantized fp32 weights in HF names and
layout) and the tokenizer files, so mlx-lm's loader (and the torch mirror) read it like any
HF checkpoint. llama.cpp stores llama's Q and K weights row-permuted for its own RoPE kernel;
they are un-permuted here.
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


def read_config(reader):
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
    a = lambda k, d=None: _field(reader, f"{arch}.{k}", d)  # noqa: E731
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
    config = read_config(reader)
    with atomic_folder(out_dir) as tmp:
        say("dequantizing weights")
        save_file(read_weights(reader, config), str(tmp / "model.safetensors"))
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        say("building tokenizer")
        _write_tokenizer(gguf_path, tmp)
        (tmp / "edgeprefill_source.json").write_text(
            json.dumps({"converted_from": gguf_path.name, "size": gguf_path.stat().st_size})
        )
    return out_dir


def _write_tokenizer(gguf_path, out_dir):
    """Save the GGUF's tokenizer (vocab, merges, chat template) as HF tokenizer files."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tok.save_pretrained(str(out_dir))
