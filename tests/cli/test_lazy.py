"""LazyLLM: keep-ratio 1 is full; pruning keeps positions and the last token; revival."""
from edgeprefill.prefill.lazy import SCHEDULES
from tests.conftest import CLI


PROMPT = "the quick brown fox jumps over the lazy dog and then it runs far away"


def test_lazy_in_generate_cli_and_unknown_schedule(tiny_models, cli_env):
    import json
    import subprocess

    model = str(tiny_models["llama"])
    r = subprocess.run([*CLI, "generate", "--model", model,
                        "--prompt", PROMPT, "--strategy", "lazy-aggressive", "--max-tokens", "4",
                        "--json"], env=cli_env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    stats = json.loads(r.stdout)["stats"]
    assert stats["strategy"] == "lazy" and stats["extra"]["schedule"] == "aggressive"
    r = subprocess.run([*CLI, "generate", "--model", model,
                        "--prompt", "hi", "--strategy", "lazy-nope"], env=cli_env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "unknown lazy schedule 'nope'" in r.stderr
    assert set(SCHEDULES) >= {"gentle", "default", "aggressive", "none"}
