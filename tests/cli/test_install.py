"""What a fresh install needs: no torch on the core path, the README's Python example, a wheel
that carries the apps and the trained pair under the edgeprefill namespace, the GGUF tokenizer."""
import json
import re
import subprocess
import sys
import zipfile

import pytest

from tests.conftest import ROOT
from tests.gguf_fixture import write_tiny_gguf


# Runs in a child interpreter where importing torch or coremltools fails.
NO_TORCH = """
import sys
sys.modules["torch"] = None
sys.modules["coremltools"] = None
import importlib, pkgutil
import edgeprefill, edgeprefill.apps
skip = ("edgeprefill.mirror", "edgeprefill.converters")
for pkg in (edgeprefill, edgeprefill.apps):
    for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
        if not m.name.startswith(skip):
            importlib.import_module(m.name)
from edgeprefill.apps.cli import main
for strategy in ("full", "lazy", "runahead-streams"):
    assert main(["generate", "--model", sys.argv[1], "--prompt", "hi", "--max-tokens", "3",
                 "--strategy", strategy]) == 0
model = edgeprefill.load(sys.argv[1])
edgeprefill.generate(model, "hi", max_tokens=3)
assert not any(n.split(".")[0] in ("torch", "coremltools") for n, mod in sys.modules.items()
               if mod is not None), "torch or coremltools was imported"
print("CORE-OK")
"""


def _run(code, args=(), env=None, cwd=None, timeout=600):
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=timeout)


def readme_python_example():
    """The first ```python block of the README's 'Python API' section, verbatim."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Python API"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


BLAS_ORDER = """
import sys, warnings
warnings.simplefilter("always")
if sys.argv[1] == "mlx-first":
    import mlx.core
import edgeprefill
from edgeprefill.blas import loaded_blas
print(loaded_blas())
"""


def test_core_product_never_imports_torch_or_coremltools(tiny_models, tmp_path, cli_env):
    gguf_file = write_tiny_gguf(tiny_models["llama"], tmp_path / "tiny.gguf")
    r = _run(NO_TORCH, [gguf_file], env=cli_env, cwd=tmp_path)
    assert r.returncode == 0 and "CORE-OK" in r.stdout, r.stderr[-3000:]


def test_readme_python_example_runs(cli_env, tmp_path):
    r = _run(readme_python_example(), env=cli_env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("Paris") >= 2, r.stdout  # kvp and kvp + mlx-lm answer
    assert "TTFT" in r.stdout and "kvp prefill of" in r.stdout


def test_wheel_installs_apps_and_pair_under_the_edgeprefill_namespace(tmp_path, cli_env):
    import shutil

    src = shutil.copytree(ROOT, tmp_path / "src", ignore=shutil.ignore_patterns(
        ".venv", ".git", "build", "__pycache__", "*.egg-info", ".lock-venv"))  # builds write here
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                        "--no-build-isolation", "-w", str(tmp_path / "dist"), str(src)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    wheel = next((tmp_path / "dist").glob("edgeprefill-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops <= {"edgeprefill", wheel.name.split("-py")[0] + ".dist-info"}, tops
    for needed in ("edgeprefill/apps/cli.py", "edgeprefill/converters/coreml/export.py",
                   "edgeprefill/gguf.py", "edgeprefill/kvp/pairs.py",
                   "edgeprefill/assets/SmolLM2-135M-Instruct-T-0.50/card.json",
                   "edgeprefill/assets/SmolLM2-135M-Instruct-T-0.50/predictor.safetensors"):
        assert needed in names, needed
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "edgeprefill = edgeprefill.apps.cli:main" in zipfile.ZipFile(wheel).read(
        entry).decode()
    # Installed on its own (not the checkout), it runs the default model with kvp.
    target = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                        str(target), str(wheel)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    env = {k: v for k, v in cli_env.items() if k != "PYTHONPATH"}
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import edgeprefill.apps.cli as c; "
            "assert c.__file__.startswith(sys.argv[1]), c.__file__; "
            "sys.exit(c.main(['generate', '--model', 'default', '--strategy', 'kvp', "
            "'--prompt', 'What is the capital of France?', '--max-tokens', '12', '--json']))")
    r = _run(code, [target], env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["stats"]["strategy"] == "kvp" and "Paris" in out["text"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="OpenBLAS is chosen on Linux")
def test_library_picks_openblas_itself_and_warns_when_too_late(cli_env):
    from edgeprefill.blas import find_openblas

    if find_openblas() is None:
        pytest.skip("libopenblas0-pthread not installed")
    env = {k: v for k, v in cli_env.items() if k not in ("LD_PRELOAD", "EDGEPREFILL_BLAS")}
    r = _run(BLAS_ORDER, ["edgeprefill-first"], env=env)
    assert r.stdout.split() == ["openblas"] and "BLAS" not in r.stderr, r.stderr
    r = _run(BLAS_ORDER, ["mlx-first"], env=env)
    assert r.stdout.split() == ["bundled"] and "import edgeprefill first" in r.stderr
