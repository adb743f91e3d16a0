import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import edgeprefill  # noqa: E402,F401  before mlx: the tests run on OpenBLAS as users do
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub

FAMILIES = ("llama", "qwen2", "qwen3")
CLI = (sys.executable, "-m", "edgeprefill.apps.cli")  # the command line, as a user runs it


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """{family: HF folder} of tiny random models, one per supported family."""
    from edgeprefill.models.random import random_model_folder

    base = tmp_path_factory.mktemp("tiny")
    return {f: random_model_folder(base / f, family=f, seed=i) for i, f in enumerate(FAMILIES)}


@pytest.fixture(scope="session")
def tiny_quantized(tmp_path_factory):
    """A tiny llama folder quantized to 4 bits the way mlx-community's are."""
    from edgeprefill.models.random import random_model_folder

    return random_model_folder(tmp_path_factory.mktemp("q4") / "llama-q4", "llama",
                               quantize_bits=4, group_size=32)


@pytest.fixture
def cli_env(tmp_path):
    """Environment for running the CLI as a user would, with a private cache."""
    env = dict(os.environ)
    env["EDGEPREFILL_CACHE"] = str(tmp_path / "cache")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.fixture
def chat(tiny_models, cli_env):
    """Spawn `edgeprefill chat` on the tiny llama in a pseudo-terminal (pexpect)."""
    import pexpect

    def spawn(*extra, env=None, preexec_fn=None):
        child = pexpect.spawn(sys.executable, ["-m", "edgeprefill.apps.cli", "chat", "--model",
                                               str(tiny_models["llama"]), "--max-tokens", "6",
                                               *extra], env=env or cli_env, encoding="utf-8",
                              timeout=120, dimensions=(40, 200), preexec_fn=preexec_fn)
        child.expect("edgeprefill chat")
        child.expect("> ")
        return child
    return spawn
