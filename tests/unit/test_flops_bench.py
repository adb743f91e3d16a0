"""Analytic FLOPs against a hand count, and the benchmark's JSON records."""
from edgeprefill.flops import attention_flops, prefill_flops
from edgeprefill.models.random import make_config


def test_prefill_flops_match_a_hand_count():
    cfg = make_config("llama", "tiny")  # D=64, 4 layers, F=128, H=4, Hkv=2, hd=16, V=384
    n = 3
    # Per token and layer: q 64*64 + k,v 2*64*32 + o 64*64 + mlp 3*64*128 MACs.
    macs_per_token_layer = 64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128
    # Causal attention: queries see 1, 2, 3 keys; QK^T and PV each H*hd MACs per pair.
    attn_macs_layer = (1 + 2 + 3) * 2 * 4 * 16
    head_macs = 64 * 384
    expected = 2 * (4 * (n * macs_per_token_layer + attn_macs_layer) + head_macs)
    assert prefill_flops(cfg, n) == expected


def test_attention_flops_count_the_cached_prefix():
    cfg = make_config("llama", "tiny")
    # 2 new queries after 5 cached tokens see 6 and 7 keys.
    assert attention_flops(cfg, 2, n_past=5) == 2 * 2 * 4 * 16 * (6 + 7)
