"""`edgeprefill export`: a model (and its KV Prediction artifact) as a Core ML package for the
Neural Engine, built from the torch mirror; `--verify` runs the package's MIL program in the
numpy interpreter against the mirror (works on Linux, where Core ML cannot run)."""

import json
import os
import sys
from pathlib import Path

from edgeprefill.apps.argtypes import positive
from edgeprefill.errors import EdgeprefillError


def add_parser(sub):
    from edgeprefill.apps.shared import add_model_args
    from edgeprefill.converters.coreml import COMPUTE_UNITS, LAYOUTS, QUANTIZE

    p = sub.add_parser("export", help="export to a Core ML .mlpackage (prefill, decode, "
                       "kvp_prefill) for the Neural Engine")
    add_model_args(p)
    p.add_argument("--kvp", default=None, metavar="ARTIFACT",
                   help="KV Prediction artifact (a T-<fraction> pair) for the kvp_prefill "
                   "function; 'default' = the model's default pair")
    p.add_argument("--out", required=True, help="the package to write (DIR.mlpackage)")
    p.add_argument("--context", type=positive, default=1024,
                   help="KV state length in tokens (a multiple of 32)")
    p.add_argument("--chunk", type=positive, default=64, help="tokens per prefill call")
    p.add_argument("--quantize", default="none", choices=QUANTIZE,
                   help="weight compression of linear/conv weights")
    p.add_argument("--layout", default="ane", choices=LAYOUTS,
                   help="ane: (B,C,1,S) activations and 1x1 convs; default: (B,S,C), linear, "
                   "fused attention")
    p.add_argument("--compute-units", default="ane", choices=list(COMPUTE_UNITS),
                   help="preferred compute units recorded in the package")
    p.add_argument("--force", action="store_true", help="replace an existing --out package")
    p.add_argument("--verify", action="store_true",
                   help="run every function in the numpy MIL interpreter against the torch "
                   "mirror on a short held-out prompt and print the differences")
    p.add_argument("--json", default=None, help="write the export report here")
    p.set_defaults(run=run_export)


def check_out(out, force):
    out = Path(out)
    if out.suffix != ".mlpackage":
        raise EdgeprefillError(f"--out {out}: the package name must end in .mlpackage")
    if not out.parent.is_dir():
        raise EdgeprefillError(f"--out {out}: folder {out.parent} does not exist: create it "
                               "first")
    if out.exists() and not force:
        raise EdgeprefillError(f"--out {out} exists: pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise EdgeprefillError(f"--out {out} is a file, not a package folder: remove it or pick "
                               "another name (--force replaces packages only)")
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise EdgeprefillError(f"--out {out}: folder {out.parent} is not writable: pick another")
    import tempfile

    try:  # the package is written beside its final place, then renamed: try that first
        tempfile.TemporaryDirectory(dir=out.parent).cleanup()
    except OSError as e:
        raise EdgeprefillError(f"--out {out}: cannot write in {out.parent} ({e.strerror}): "
                               "pick another folder") from None
    return out


def quiet_coremltools():
    """coremltools logs a warning per untested torch version, missing macOS-only proxy and
    re-added state var, and draws a progress bar per pass: keep the terminal for our report."""
    import logging
    import os
    import warnings

    os.environ.setdefault("TQDM_DISABLE", "1")
    logging.getLogger("coremltools").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="coremltools")
    warnings.filterwarnings("ignore", category=UserWarning, message=".*coremltools.*")


def run_export(args):
    import time

    quiet_coremltools()

    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from edgeprefill.converters.coreml import export as ex
    from edgeprefill.fsio import atomic_write_text

    ex.check_options(args.context, args.chunk, args.quantize, args.layout, args.compute_units)
    out = check_out(args.out, args.force)
    console = Console(stderr=True)
    started = time.perf_counter()
    lm, mirror, pred, aux, card = load_for_export(args)
    if args.context > mirror.max_context:
        raise EdgeprefillError(f"--context {args.context} exceeds the model's "
                               f"{mirror.max_context} positions: pass a smaller one")
    functions = ["prefill", "decode"] + (["kvp_prefill"] if pred is not None else [])
    steps = 2 * len(functions) + 2
    with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as bar:
        task = bar.add_task("building", total=steps)
        em = ex.build(mirror, args.context, args.layout, pred, aux)
        models = {}
        for f in functions:
            bar.update(task, description=f"converting {f}")
            models[f] = ex.convert_function(em, f, args.chunk, args.compute_units)
            bar.advance(task)
            bar.update(task, description=f"compressing {f} ({args.quantize})")
            models[f] = ex.quantize_model(models[f], args.quantize, mirror.vocab_size)
            bar.advance(task)
        bar.update(task, description="saving the multifunction package")
        ex.save_package(models, out)
        bar.advance(task)
        bar.update(task, description="reading it back")
        report = ex.package_report(out)
        bar.advance(task)
    report.update(model=lm.model_id, kvp=str(args.kvp) if pred is not None else None,
                  context=args.context, chunk=args.chunk, quantize=args.quantize,
                  layout=args.layout, compute_units=args.compute_units,
                  export_s=round(time.perf_counter() - started, 1))
    if card is not None:
        report["kvp_card"] = {"aux": card["aux"]["kind"], "tail": card.get("tail", 1),
                              "predictor_rank": card.get("predictor_rank"),
                              "quality": card.get("quality")}
    if args.verify:
        from edgeprefill.converters.coreml.verify import verify_package

        report["verify"] = verify_package(out, mirror, pred, aux, args.chunk,
                                          prompt_ids=held_out_prompt(lm, args.chunk),
                                          tail=card.get("tail", 1) if card else 1)
    print_report(report, out)
    if args.json:
        atomic_write_text(args.json, json.dumps(report, indent=2))
        console.print(f"wrote {args.json}")
    return 0


def held_out_prompt(lm, chunk):
    """A held-out prompt of 1.5 chunks plus one token (so prefill pads its last chunk)."""
    from edgeprefill.data import bench_prompts

    n = chunk + chunk // 2 + 1
    try:
        return bench_prompts(lm.tokenizer, n, 1)[0]
    except Exception:  # noqa: BLE001  (tiny test tokenizers): any ids in the vocabulary
        return [(7 * i + 3) % lm.model.vocab_size for i in range(n)]


def load_for_export(args):
    """(LoadedModel, mirror Transformer, torch predictor or None, mirror aux or None, card)."""
    from edgeprefill.loading import load
    from edgeprefill.mirror.convert import mirror_from_mlx

    lm = load(args.model, dtype="float32")
    mirror = mirror_from_mlx(lm.model)
    if not args.kvp:
        return lm, mirror, None, None, None
    from edgeprefill.kvp.artifact import load_artifact
    from edgeprefill.mirror.convert import aux_to_torch
    from edgeprefill.mirror.convert import predictor_to_torch

    path = args.kvp
    if path == "default":
        from edgeprefill.kvp.pairs import ensure_default_pair

        path = ensure_default_pair(lm)
    aux, pred, card = load_artifact(path, lm.model)
    kind = card["aux"]["kind"]
    if not kind.startswith("T-") or list(aux.layers) != list(range(len(aux.layers))):
        raise EdgeprefillError(f"--kvp {path} is a {kind} pair: the Core ML export runs KVP-T "
                               "pairs (the aux is the base's first layers); fit one with "
                               "`edgeprefill kvp fit --aux T-0.50`")
    return lm, mirror, predictor_to_torch(pred), aux_to_torch(aux, mirror), card


def print_report(report, out):
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 100))
    t = Table(title=f"{out}: {report['size_bytes'] / 2**20:.1f} MiB, functions "
                    f"{', '.join(report['functions'])}")
    t.add_column("op")
    t.add_column("count", justify="right")
    for op, n in report["ops"].items():
        t.add_row(op, str(n))
    console.print(t)
    console.print("states: " + ", ".join(f"{k} {v}" for k, v in report["states"].items()))
    console.print(f"fused attention ops: {report['fused_attention']}; float32 compute ops: "
                  f"{sum(report['fp32_ops'].values())} {report['fp32_ops'] or ''}")
    if "verify" in report:
        for f, r in report["verify"].items():
            console.print(f"verify {f}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float)
                                                       else f"{k} {v}" for k, v in r.items()))
    print(f"wrote {out}", file=sys.stderr)
