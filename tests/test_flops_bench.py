"""Analytic FLOPs against a hand count, and the benchmark's JSON records."""

import json
import subprocess
import sys

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


def test_bench_json_records_are_complete_and_consistent(tiny_models, cli_env, tmp_path):
    out = tmp_path / "b.json"
    r = subprocess.run([sys.executable, "-m", "apps.cli", "bench", "--model",
                        str(tiny_models["llama"]), "--prompt-tokens", "16,40", "--trials", "2",
                        "--json", str(out)], env=cli_env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    data = json.loads(out.read_text())
    for key in ("machine", "backend", "device", "mlx", "model", "blas", "matmul_gflops_fp32"):
        assert key in data["header"]
    recs = data["records"]
    assert {(x["strategy"], x["prompt_tokens"]) for x in recs} == {
        (s, n) for s in ("full", "mlx-lm") for n in (16, 40)}
    for x in recs:
        assert x["ttft_min_s"] <= x["ttft_s"] <= x["ttft_max_s"]
        assert abs(x["prefill_tok_s"] - x["prompt_tokens"] / x["ttft_s"]) < 1e-6
        assert x["ttft_flops"] > 0 and x["trials"] == 2
        # mlx-lm's own path and ours compute the same model: same first token.
        assert x["first_token_agreement"] == 1.0 and x["first_token_kl"] < 1e-4
