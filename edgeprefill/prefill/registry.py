"""Every prefill strategy, declared once: its name, what it does in one line, the options it
takes, how to build it on MLX and on the torch mirror, and its analytic TTFT FLOPs.

The CLI's choices and help, the benchmark, the evaluation, the chat and the Python API all read
this table. Every built strategy keeps one contract (edgeprefill.prefill):

    strategy.prefill(prompt_ids, cache=None, progress=None) -> (cache, logits, stats)

Names: `full`, `mlx-lm`, `kvp`, `aux-only`, `lazy` (or `lazy-<schedule>`, `lazy-K1:K2:K3`),
`gemfilter`, `specprefill`, `kvp+specprefill`, `runahead-streams`, `runahead`, `tsp`,
`runahead-kvp`.

Options (keywords of `build`; the CLI flag in brackets):
    chunk_size [--chunk-size]: prompt tokens per forward call.
    kvp [--kvp]: a KV Prediction pair folder (default: the model's; the bundled default model's
        pair installs on first use), or "random[:<shape>]" for random-weight shapes.
    kvp_tail [--kvp-tail]: tokens the base runs itself at the end of the prompt (default: the
        pair's card).
    keep [--keep]: gemfilter / specprefill / kvp+specprefill: the prompt tokens the base
        computes, a fraction in (0, 1] or a count.
    filter_layer [--filter-layer]: gemfilter's selecting layer (default: 0.4 of the depth).
    draft [--draft]: specprefill's speculator: a model of the same tokenizer, "aux" (the kvp
        pair's aux, the default where the model has a pair) or "random:<shape>".
    lookahead, select_chunk [--lookahead, --select-chunk]: specprefill's decoded look-ahead
        tokens and selection chunk.
    positions [--positions]: original (each kept token keeps its position) or fresh (the kept
        tokens renumbered 0..k-1).
    workers, hostfile, backend [--workers, --hostfile]: worker processes (local, or over
        machines with an mlx.launch hostfile) and their mx.distributed backend.
    say: callable(str) for one-line notices (a pair installed, a worker restarted).
"""

from dataclasses import dataclass
from typing import Callable, Optional

from edgeprefill.errors import EdgeprefillError

PAIR_OPTIONS = ("kvp", "kvp_tail")
SELECT_OPTIONS = {"gemfilter": ("chunk_size", "keep", "filter_layer", "positions"),
                  "specprefill": ("chunk_size", "keep", "lookahead", "select_chunk", "positions"),
                  "kvp+specprefill": ("chunk_size", "keep", "select_chunk")}
WORKER_OPTIONS = ("workers", "hostfile", "backend")


@dataclass(frozen=True)
class Strategy:
    """One row of the registry.

    name: what users type (`--strategy NAME`, `strategy="NAME"`).
    summary: one line for help text and the README's table.
    build: (lm, variant, **options) -> the MLX strategy (a LoadedModel in).
    flops: (config, n_tokens, built strategy) -> analytic TTFT FLOPs.
    mirror: (torch model, lm, variant, **options) -> the torch mirror's strategy, or None.
    options: the keyword options it takes (see the module docstring).
    variants: how a suffix is read (`lazy-<schedule>`), or None.
    exact: True where its cache and logits equal the base's exact prefill.
    """

    name: str
    summary: str
    build: Callable
    flops: Callable
    mirror: Optional[Callable] = None
    options: tuple = ("chunk_size",)
    variants: Optional[str] = None
    exact: bool = False

    @property
    def pair(self):
        """Takes a KV Prediction pair (--kvp, --kvp-tail)."""
        return "kvp" in self.options

    @property
    def workers(self):
        """Prefills on worker processes (--workers, --hostfile)."""
        return "workers" in self.options


# --- builders (MLX) --------------------------------------------------------------------------

def _opts(options, *names):
    return {k: options[k] for k in names if options.get(k) is not None}


def _full(lm, variant, **o):
    from edgeprefill.prefill.full import FullPrefill

    return FullPrefill(lm.model, **_opts(o, "chunk_size"))


def _mlx_lm(lm, variant, **o):
    from edgeprefill.prefill.full import MlxLmPrefill

    return MlxLmPrefill(lm.model, int(variant)) if variant else MlxLmPrefill(lm.model)


def _kvp(lm, variant, kvp=None, kvp_tail=None, say=None, **o):
    from edgeprefill.kvp.pairs import load_pair
    from edgeprefill.prefill.kv_prediction import KVPrediction

    aux, pred, card = load_pair(lm, kvp, say)
    return KVPrediction(lm.model, aux, pred, tail=kvp_tail or card.get("tail", 1),
                        **_opts(o, "chunk_size"))


def _aux_only(lm, variant, kvp=None, say=None, **o):
    from edgeprefill.kvp.pairs import load_pair
    from edgeprefill.prefill.aux_only import AuxOnly

    aux, _, _ = load_pair(lm, kvp, say)
    return AuxOnly(lm.model, aux, **_opts(o, "chunk_size"))


def _lazy(lm, variant, **o):
    from edgeprefill.prefill.lazy import LazyPrefill

    return LazyPrefill(lm.model, schedule=variant or "default", **_opts(o, "chunk_size"))


def _gemfilter(lm, variant, **o):
    from edgeprefill.prefill.gemfilter import GemFilter

    return GemFilter(lm.model, **_opts(o, *SELECT_OPTIONS["gemfilter"]))


def _specprefill(lm, variant, draft=None, kvp=None, say=None, **o):
    from edgeprefill.prefill.specprefill import SpecPrefill, load_draft

    return SpecPrefill(lm.model, load_draft(lm, draft, kvp, say),
                       **_opts(o, *SELECT_OPTIONS["specprefill"]))


def _kvp_select(lm, variant, kvp=None, kvp_tail=None, say=None, **o):
    from edgeprefill.kvp.pairs import load_pair
    from edgeprefill.prefill.specprefill import KVPSpecPrefill

    aux, pred, card = load_pair(lm, kvp, say)
    return KVPSpecPrefill(lm.model, aux, pred, tail=kvp_tail or card.get("tail", 1),
                          **_opts(o, *SELECT_OPTIONS["kvp+specprefill"]))


def _streams(lm, variant, **o):
    from edgeprefill.prefill.runahead import StreamRunahead

    return StreamRunahead(lm.model)


def _on_workers(name):
    def build(lm, variant, workers=2, hostfile=None, backend="auto", kvp=None, kvp_tail=None,
              say=None, **o):
        from edgeprefill.distributed.pool import WorkerPrefill

        local = None
        if name == "runahead-kvp":  # every worker loads this pair; later turns run it here
            from edgeprefill.kvp.pairs import ensure_default_pair, is_random_pair

            if kvp is None:
                kvp = str(ensure_default_pair(lm, say=say))
            local = _kvp(lm, None, kvp=kvp, kvp_tail=kvp_tail, say=say)
            kvp_tail = kvp_tail or local.tail
            if not is_random_pair(kvp):
                kvp = str(kvp)
        return WorkerPrefill(lm, name, workers or 2, hostfile, backend or "auto", kvp, kvp_tail,
                             say, local)
    return build


# --- builders (torch mirror) -----------------------------------------------------------------

def _mirror_full(tmodel, lm, variant, **o):
    from edgeprefill.mirror.prefill import FullPrefill

    return FullPrefill(tmodel, **_opts(o, "chunk_size"))


def _mirror_kvp(tmodel, lm, variant, kvp=None, kvp_tail=None, say=None, **o):
    from edgeprefill.kvp.pairs import load_pair
    from edgeprefill.mirror.convert import pair_to_torch
    from edgeprefill.mirror.prefill import KVPrediction

    aux, pred, card = load_pair(lm, kvp, say)
    taux, tpred = pair_to_torch(aux, pred, tmodel)
    return KVPrediction(tmodel, taux, tpred, tail=kvp_tail or card.get("tail", 1),
                        **_opts(o, "chunk_size"))


def _mirror_lazy(tmodel, lm, variant, **o):
    from edgeprefill.mirror.prefill import LazyPrefill

    return LazyPrefill(tmodel, schedule=variant or "default", **_opts(o, "chunk_size"))


def _mirror_gemfilter(tmodel, lm, variant, **o):
    from edgeprefill.mirror.prefill import GemFilter

    return GemFilter(tmodel, **_opts(o, *SELECT_OPTIONS["gemfilter"]))


def _mirror_specprefill(tmodel, lm, variant, draft=None, kvp=None, say=None, **o):
    from edgeprefill.mirror.convert import aux_to_torch, mirror_from_mlx
    from edgeprefill.mirror.prefill import SpecPrefill
    from edgeprefill.prefill.specprefill import AuxDraft, load_draft

    d = load_draft(lm, draft, kvp, say)
    if isinstance(d, AuxDraft):
        td = AuxDraft(aux_to_torch(d.aux, tmodel))
    else:
        td = mirror_from_mlx(d, dtype=tmodel.dtype, device=tmodel.device)
    return SpecPrefill(tmodel, td, **_opts(o, *SELECT_OPTIONS["specprefill"]))


def _mirror_kvp_select(tmodel, lm, variant, kvp=None, kvp_tail=None, say=None, **o):
    from edgeprefill.kvp.pairs import load_pair
    from edgeprefill.mirror.convert import pair_to_torch
    from edgeprefill.mirror.prefill import KVPSpecPrefill

    aux, pred, card = load_pair(lm, kvp, say)
    taux, tpred = pair_to_torch(aux, pred, tmodel)
    return KVPSpecPrefill(tmodel, taux, tpred, tail=kvp_tail or card.get("tail", 1),
                          **_opts(o, *SELECT_OPTIONS["kvp+specprefill"]))


# --- FLOPs -----------------------------------------------------------------------------------

def _exact_flops(config, n, built):
    from edgeprefill.flops import prefill_flops

    return prefill_flops(config, n)


def _pair_flops(fn):
    def flops(config, n, built):
        from edgeprefill.flops import pair_options

        return fn(config, n, **pair_options(getattr(built, "kvp", None) or built))
    return flops


def _kvp_flops(config, n, built):
    from edgeprefill.flops import kvp_flops

    return _pair_flops(kvp_flops)(config, n, built)


def _aux_only_flops(config, n, built):
    from edgeprefill.flops import aux_only_flops

    return _pair_flops(aux_only_flops)(config, n, built)


def _lazy_flops(config, n, built):
    from edgeprefill.flops import lazy_flops, lazy_tokens_per_layer

    per_layer = lazy_tokens_per_layer(config["num_hidden_layers"], n, built.bounds,
                                      list(built.schedule.keep))
    return lazy_flops(config, n, per_layer)


def _gemfilter_flops(config, n, built):
    from edgeprefill.flops import gemfilter_flops
    from edgeprefill.prefill.selection import keep_count

    return gemfilter_flops(config, n, keep_count(built.keep, n), built.filter_layer)


def _specprefill_flops(config, n, built):
    from edgeprefill.flops import specprefill_flops
    from edgeprefill.prefill.selection import keep_count

    d = built.draft
    return specprefill_flops(config, n, keep_count(built.keep, n), d.config, d.n_layers,
                             built.lookahead)


def _kvp_select_flops(config, n, built):
    from edgeprefill.flops import kvp_select_flops, pair_options

    return kvp_select_flops(config, n, built.kept_count(n - min(built.tail, n)),
                            **pair_options(built))


def _tsp_flops(config, n, built):
    from edgeprefill.flops import tsp_flops

    return tsp_flops(config, n)


STRATEGIES = {s.name: s for s in (
    Strategy("full", "exact chunked prefill of the base (the baseline)", _full, _exact_flops,
             _mirror_full, exact=True),
    Strategy("mlx-lm", "mlx-lm's own prefill path on the same model (the anchor users know), "
             "at its default 2048-token step", _mlx_lm, _exact_flops, options=(), exact=True,
             variants="mlx-lm-<step> (prefill step in tokens, e.g. mlx-lm-8192: full's GPU "
             "chunk)"),
    Strategy("kvp", "KV Prediction: a small aux predicts the base's KV cache; the base runs "
             "only the prompt's tail", _kvp, _kvp_flops, _mirror_kvp,
             options=("chunk_size", *PAIR_OPTIONS)),
    Strategy("aux-only", "the kvp pair's aux model alone, prefill and decoding (the paper's "
             "baseline at kvp's FLOPs)", _aux_only, _aux_only_flops,
             options=("chunk_size", "kvp")),
    Strategy("lazy", "LazyLLM: prune the prompt tokens the last token attends to least, "
             "layer by layer", _lazy, _lazy_flops, _mirror_lazy,
             variants="lazy-<schedule> (gentle, default, aggressive) or lazy-K1:K2:K3 (the "
             "fractions kept at 30%, 60% and 90% of the layers)"),
    Strategy("gemfilter", "GemFilter: the base's early layers pick the tokens the last one "
             "attends to; the base prefills only those (training-free)", _gemfilter,
             _gemfilter_flops, _mirror_gemfilter,
             options=SELECT_OPTIONS["gemfilter"]),
    Strategy("specprefill", "SpecPrefill: a small draft's look-ahead attention picks chunks of "
             "the prompt; the base prefills only those at their positions (training-free)",
             _specprefill, _specprefill_flops, _mirror_specprefill,
             options=(*SELECT_OPTIONS["specprefill"], "draft", "kvp")),
    Strategy("kvp+specprefill", "kvp whose aux pass also picks the tokens the base computes "
             "exactly over the predicted cache (the needle the question asks for)",
             _kvp_select, _kvp_select_flops, _mirror_kvp_select,
             options=(*SELECT_OPTIONS["kvp+specprefill"], *PAIR_OPTIONS)),
    Strategy("runahead-streams", "KV-Runahead over two streams of this process (GPU + CPU on "
             "Apple silicon)", _streams, _exact_flops, options=(), exact=True),
    Strategy("runahead", "KV-Runahead: the prompt split over worker processes that hand each "
             "layer's KV cache on", _on_workers("runahead"), _exact_flops,
             options=WORKER_OPTIONS, exact=True),
    Strategy("tsp", "sequence-parallel baseline for runahead: every worker all-gathers all "
             "keys", _on_workers("tsp"), _tsp_flops, options=WORKER_OPTIONS, exact=True),
    Strategy("runahead-kvp", "kvp whose aux prefill runs as KV-Runahead on worker processes",
             _on_workers("runahead-kvp"), _kvp_flops,
             options=(*WORKER_OPTIONS, *PAIR_OPTIONS)),
)}


def names():
    """Every strategy name, in the registry's order."""
    return list(STRATEGIES)


def parse(name):
    """(Strategy, variant) of a name: `kvp` -> (kvp, None), `lazy-0.8:0.6:0.5` -> (lazy,
    '0.8:0.6:0.5'). A bad name or variant raises a one-line EdgeprefillError."""
    if not isinstance(name, str):
        raise EdgeprefillError(f"strategy must be a name like 'kvp' (got {type(name).__name__})")
    if name in STRATEGIES:
        return STRATEGIES[name], None
    spec, variant = next(((s, name[len(s.name) + 1:]) for s in STRATEGIES.values()
                          if s.variants and name.startswith(s.name + "-")), (None, ""))
    if spec is None or not variant:
        raise EdgeprefillError(f"unknown strategy '{name}': choose one of {', '.join(names())}"
                               f" (see `edgeprefill strategies`)")
    if spec.name == "mlx-lm" and not (variant.isdigit() and int(variant) > 0):
        raise EdgeprefillError(f"unknown strategy '{name}': mlx-lm-<step> takes a prefill step "
                               "in tokens (mlx-lm-8192)")
    if spec.name == "lazy":
        from edgeprefill.prefill.lazy import resolve_schedule

        resolve_schedule(variant)  # a malformed schedule gets its one-line error here
    return spec, variant


def is_exact(name):
    """Whether the named strategy gives the exact prefill (False for an unknown name)."""
    try:
        return parse(name)[0].exact
    except EdgeprefillError:
        return False


def build(name, lm, **options):
    """The named strategy over a loaded model, with the options it takes (None values are
    dropped: the strategy's default). An option the strategy does not take is refused."""
    spec, variant = parse(name)
    options = {k: v for k, v in options.items() if v is not None}
    _check_options(spec, name, options)
    return spec.build(lm, variant, **options)


def build_mirror(name, tmodel, lm, **options):
    """The named strategy on the torch mirror `tmodel` (built from `lm`)."""
    spec, variant = parse(name)
    if spec.mirror is None:
        with_mirror = [s.name for s in STRATEGIES.values() if s.mirror]
        raise EdgeprefillError(f"strategy {name} has no torch mirror: choose one of "
                               f"{', '.join(with_mirror)} with --backend mirror")
    options = {k: v for k, v in options.items() if v is not None}
    _check_options(spec, name, options)
    return spec.mirror(tmodel, lm, variant, **options)


def _check_options(spec, name, options):
    from edgeprefill.prefill.kv_prediction import check_tail

    unknown = sorted(set(options) - set(spec.options) - {"say"})
    if unknown:
        flag = "--" + unknown[0].replace("_", "-")
        raise EdgeprefillError(f"strategy {name} takes no {unknown[0]} option ({flag}): drop "
                               f"it, or pick a strategy that does")
    check_tail(options.get("kvp_tail"))
    if options.get("workers") is not None and options["workers"] < 1:
        raise EdgeprefillError(f"--workers must be >= 1 (got {options['workers']})")


def flops(name, built, config, n_tokens):
    """Analytic TTFT FLOPs of a built strategy on an `n_tokens` prompt."""
    return parse(name)[0].flops(config, n_tokens, built)


def help_text():
    """The strategies as the CLI's --strategy help lists them."""
    parts = []
    for s in STRATEGIES.values():
        parts.append(s.name + (f" ({s.variants})" if s.variants else ""))
    return "prefill strategy: " + ", ".join(parts) + " (default: full)"


def table():
    """[(name, summary)] for `edgeprefill strategies` and the README."""
    suffix = {"lazy": "[-<schedule>|-K1:K2:K3]", "mlx-lm": "[-<step>]"}
    return [(s.name + suffix.get(s.name, ""), s.summary) for s in STRATEGIES.values()]
