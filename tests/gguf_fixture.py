"""Write a tiny llama GGUF file the way llama.cpp's converter does (permuted Q/K, Q8_0)."""

import json
from pathlib import Path

import numpy as np


def llama_cpp_permute(w, n_heads):
    """llama.cpp's convert_hf_to_gguf permutation of Q/K rows (the inverse of ours)."""
    shape = w.shape
    return w.reshape(n_heads, 2, shape[0] // n_heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def write_tiny_gguf(hf_folder, out_path, quantize=True, pre="default", tokenizer_model="gpt2"):
    import gguf
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import quantize as gquant
    from safetensors.numpy import load_file

    hf_folder = Path(hf_folder)
    cfg = json.loads((hf_folder / "config.json").read_text())
    weights = load_file(str(hf_folder / "model.safetensors"))
    tok = json.loads((hf_folder / "tokenizer.json").read_text())
    w = gguf.GGUFWriter(str(out_path), "llama")
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    w.add_tokenizer_model(tokenizer_model)
    w.add_tokenizer_pre(pre)
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([3 if t.startswith("<|") else 1 for t, _ in vocab])
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template(json.loads((hf_folder / "tokenizer_config.json").read_text())[
        "chat_template"])
    names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
             "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for hf_name, arr in weights.items():
        arr = arr.astype(np.float32)
        if hf_name == "model.embed_tokens.weight":
            name = "token_embd.weight"
        elif hf_name == "model.norm.weight":
            name = "output_norm.weight"
        else:
            parts = hf_name.split(".")
            name = f"blk.{parts[2]}.{names['.'.join(parts[3:-1])]}.{parts[-1]}"
        if ".attn_q." in name:
            arr = llama_cpp_permute(arr, cfg["num_attention_heads"])
        elif ".attn_k." in name:
            arr = llama_cpp_permute(arr, cfg["num_key_value_heads"])
        if quantize and arr.ndim == 2:
            w.add_tensor(name, gquant(arr, Q.Q8_0), raw_dtype=Q.Q8_0)
        else:
            w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(out_path)
