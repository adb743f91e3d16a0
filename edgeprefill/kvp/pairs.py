"""KV Prediction pairs: where a model's pair lives, the pair shipped with edgeprefill, and
building or fitting one (what `--strategy kvp` and `edgeprefill.prefill(strategy="kvp")` use)."""

import json
from pathlib import Path

from edgeprefill.errors import EdgeprefillError
from edgeprefill.fsio import path_lock

DEFAULT_AUX = "T-0.50"  # the default pair: truncated aux, hidden-state predictor


def default_artifact_path(model_id, aux=DEFAULT_AUX, source=None, rank=None):
    """Where `kvp fit` puts, and `--strategy kvp` looks for, a model's artifact (a low-rank
    one gets its own folder, `-r<rank>`)."""
    from edgeprefill.kvp.aux import parse_aux_kind
    from edgeprefill.loading import cache_dir

    kind, fraction = parse_aux_kind(aux)
    if kind == "C":
        raise EdgeprefillError("a KVP-C artifact has no default path: pass --out")
    source = source or ("hidden" if kind == "T" else "kv")
    safe = model_id.replace("/", "--")
    suffix = "" if source == ("hidden" if kind == "T" else "kv") else f"-{source}"
    suffix += f"-r{rank}" if rank else ""
    return cache_dir() / "kvp" / f"{safe}-{kind}-{fraction:.2f}{suffix}"


def resolve_source(aux_spec, source):
    from edgeprefill.kvp.aux import parse_aux_kind

    if source in (None, "auto"):
        return "hidden" if parse_aux_kind(aux_spec)[0] == "T" else "kv"
    return source


def check_rank(rank, source):
    """Raise EdgeprefillError unless a predictor rank suits the predictor input."""
    from edgeprefill.kvp.predictor import check_rank as _check

    try:
        _check(rank, source)
    except ValueError as e:
        raise EdgeprefillError(f"--predictor-rank {rank}: {e}; pass a positive rank with "
                               "--input hidden, hidden-in or hidden2, or drop the option") from None


def build_predictor(base, aux_spec, source, aux_lm=None, tokenizer=None, rank=None):
    """(aux, empty KVPredictor) for an aux kind and predictor input (C: aux_lm, a LoadedModel
    checked against the base's tokenizer); `rank`: a low-rank predictor."""
    from edgeprefill.kvp.aux import make_aux
    from edgeprefill.kvp.predictor import KVPredictor, input_dim

    aux, layer_map, exact = make_aux(base, aux_spec, aux_lm, tokenizer)
    in_dim = input_dim(aux, source)
    return aux, KVPredictor(layer_map, in_dim, base.n_kv_heads, base.head_dim, source, exact,
                            rank)


def fit_artifact(lm, aux_spec, out, source="auto", tokens=30000, chunk=256, lam=1e-3,
                 aux_lm=None, rank=None, measure=None, progress=None):
    """Fit a pair by ridge (`rank`: then reduce it to a low-rank predictor) and write it
    atomically.

    Args:
        lm: the base (LoadedModel).
        aux_spec: aux kind (T-0.50, LP-0.25, C with aux_lm, ...).
        out: the artifact folder.
        measure: optional callable(KVPrediction) -> quality dict recorded in the card.
        progress: optional callable(done_tokens, total_tokens, label).
    Returns:
        (path, quality dict).
    """
    from edgeprefill.data import BUILTIN_PAIRS, FIT_DATA, fit_chunks
    from edgeprefill.kvp.artifact import save_artifact
    from edgeprefill.kvp.fit import fit_ridge
    from edgeprefill.prefill.kv_prediction import KVPrediction

    if tokens < chunk or chunk < 8:
        raise EdgeprefillError("--tokens must be >= --chunk and --chunk >= 8")
    source = resolve_source(aux_spec, source)
    check_rank(rank, source)
    base = lm.model
    aux, pred = build_predictor(base, aux_spec, source, aux_lm, lm.tokenizer)
    chunks = fit_chunks(lm.tokenizer, tokens, chunk)
    total = sum(len(c) for c in chunks)
    label = f"{aux.kind} ({source}{f', rank {rank}' if rank else ''})"
    pred, used = fit_ridge(base, aux, pred, chunks, lam=lam, rank=rank,
                           progress=lambda done: progress and progress(done, total, label))
    quality = {}
    if measure is not None:
        quality = dict(measure(KVPrediction(base, aux, pred)), data=BUILTIN_PAIRS)
    fit_info = {"method": "ridge", "lam": lam, "tokens": used, "chunk": chunk, "steps": 0,
                "data": FIT_DATA}
    save_artifact(out, pred, aux, base, lm.model_id, fit_info, quality)
    return Path(out), quality


def bundled_dir():
    """edgeprefill/assets: trained pairs shipped with the package."""
    return Path(__file__).resolve().parents[1] / "assets"


def stale_bundled_copy(path, shipped):
    """True when `path` holds an earlier release's bundled pair (trained, not a ridge fit
    made here) whose weights (predictor, trained aux blocks) or card (e.g. its exact tail)
    differ from the ones shipped now: it is then replaced."""
    import filecmp

    try:
        card = json.loads((Path(path) / "card.json").read_text())
    except (OSError, ValueError):
        return False
    if card.get("fit", {}).get("method") == "ridge" or not (shipped / "card.json").is_file():
        return False
    names = {f.name for f in shipped.glob("*.safetensors")}
    return names != {f.name for f in Path(path).glob("*.safetensors")} or not all(
        filecmp.cmp(Path(path) / n, shipped / n, shallow=False) for n in names | {"card.json"})


def ensure_default_pair(lm, path=None, say=None):
    """The kvp pair folder for `lm`; for the bundled default model, installed on first use:
    the trained pair shipped with edgeprefill when it matches the model, else a ridge fit.
    Other models' folders are returned as they are (`edgeprefill kvp fit` makes them).

    Args:
        lm: LoadedModel.
        path: the pair folder (default: `default_artifact_path(lm.model_id)`).
        say: optional callable(str) told what is installed or fitted.
    """
    path = Path(path or default_artifact_path(lm.model_id))
    shipped = bundled_dir() / path.name
    if lm.spec != "default" or path.exists() and not stale_bundled_copy(path, shipped):
        return path
    with path_lock(path):  # a second process installing it waits, then finds it there
        if path.exists() and not stale_bundled_copy(path, shipped):
            return path
        return _install_default_pair(lm, path, shipped, say or (lambda _msg: None))


def _install_default_pair(lm, path, shipped, say):
    import shutil

    from edgeprefill.fsio import atomic_folder
    from edgeprefill.kvp.artifact import load_artifact

    if shipped.is_dir():
        try:
            _, _, card = load_artifact(shipped, lm.model)
        except EdgeprefillError:
            card = None  # a different build of the model: fit one instead
        if card is not None:
            with atomic_folder(path) as tmp:
                for f in shipped.iterdir():
                    shutil.copy2(f, tmp / f.name)
            q = card.get("quality") or {}
            say(f"kvp: installed the bundled default pair ({DEFAULT_AUX}, trained; held-out NLL "
                f"ratio {q.get('nll_ratio', float('nan')):.2f}, first-token agreement "
                f"{q.get('first_token_agreement', float('nan')):.2f} on "
                f"{q.get('data', 'held-out pairs')}) in {path}")
            return path
    say(f"first use of kvp: fitting the default pair ({DEFAULT_AUX}, hidden-state predictor) "
        f"into {path}, about two minutes, once")
    fit_artifact(lm, DEFAULT_AUX, path)
    return path


RANDOM_PAIR = "random"  # kvp="random" or "random:<shape>": random weights, speed runs only


def is_random_pair(kvp):
    return isinstance(kvp, str) and (kvp == RANDOM_PAIR or kvp.startswith(RANDOM_PAIR + ":"))


def random_pair(lm, aux_shape=None):
    """(aux, predictor) of random weights for speed-only kvp runs of a random-weight model
    (`--shape`): a KVP-C aux of `aux_shape` (same random tokenizer), else the base's first half
    (T-0.50) with a hidden-state predictor. Seeded: every runahead rank builds the same pair."""
    import mlx.core as mx

    from edgeprefill.kvp.aux import AuxModel
    from edgeprefill.kvp.layer_map import compact_layer_map
    from edgeprefill.kvp.predictor import KVPredictor
    from edgeprefill.models.random import load_random

    if not lm.model_id.startswith("random:"):
        raise EdgeprefillError(f"a random kvp pair is for random-weight shapes (--shape) only, "
                               f"not {lm.model_id}: pass --kvp FOLDER")
    base = lm.model
    mx.random.seed(0)
    if not aux_shape:
        aux, pred = build_predictor(base, DEFAULT_AUX, "hidden")
    else:
        small = load_random(aux_shape, dtype=str(base.dtype).split(".")[-1], seed=1).model
        aux = AuxModel(small, range(small.n_layers), "C")
        pred = KVPredictor(compact_layer_map(base.n_layers, small.n_layers), aux.kv_dim,
                           base.n_kv_heads, base.head_dim)
    pred.set_dtype(base.dtype)
    return aux, pred


def load_pair(lm, kvp=None, say=None):
    """(aux, predictor, card) of the pair `kvp` for `lm`: a folder (its card checked against
    the model), a random pair's name (card {}), or None: the model's own pair
    (ensure_default_pair)."""
    from edgeprefill.kvp.artifact import load_artifact

    if is_random_pair(kvp):
        return (*random_pair(lm, kvp.partition(":")[2] or None), {})
    folder = Path(kvp) if kvp else ensure_default_pair(lm, say=say)
    if not folder.exists():
        raise EdgeprefillError(
            f"no KV Prediction pair at {folder}: run `edgeprefill kvp fit` (or "
            "`make kvp-default` for the default model) or pass --kvp FOLDER")
    return load_artifact(folder, lm.model)
