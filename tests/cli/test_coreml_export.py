"""Core ML export: every function of the package runs in the numpy MIL interpreter and matches
the torch mirror (Linux has no Core ML runtime); structural checks; on macOS, Core ML itself.

Tolerances (logits of a tiny random model, |logit| up to ~3): float16 weights and compute
rel. max logit error < 1e-2 and state error < 1e-2; int8 weights < 2e-2; int4 block / 4-bit
palette < 0.15 with logit cosine > 0.97 -- all with the same top-1 token.
"""
import json
import subprocess

import pytest

from tests.conftest import CLI


pytest.importorskip("coremltools")


def test_export_cli_writes_a_package_and_refuses_bad_options(tiny_models, cli_env, tmp_path):
    model = str(tiny_models["llama"])
    out = tmp_path / "tiny.mlpackage"
    cmd = [*CLI, "export", "--model", model, "--out", str(out),
           "--context", "64", "--chunk", "16", "--layout", "default", "--verify", "--json",
           str(tmp_path / "r.json")]
    r = subprocess.run(cmd, env=cli_env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["functions"] == ["decode", "prefill"] and rep["verify"]["prefill"]["top1_match"]
    assert "scaled_dot_product_attention" in r.stdout and "key_cache" in r.stdout
    assert not list(tmp_path.glob(".export-*"))  # no temporary leftovers
    bad = [(["--context", "100"], "multiple of 32"), (["--chunk", "0"], "--chunk"),
           ([], "exists: pass --force")]
    for extra, msg in bad:
        r = subprocess.run(cmd[:8] + extra, env=cli_env, capture_output=True, text=True,
                           timeout=300)
        assert r.returncode != 0 and msg in r.stderr and r.stderr.count("\n") == 1, r.stderr
    r = subprocess.run(cmd[:7] + [str(tmp_path / "x.zip")], env=cli_env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode != 0 and "must end in .mlpackage" in r.stderr
    assert not (tmp_path / "x.zip").exists()
