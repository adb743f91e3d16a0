"""`edgeprefill kvp train`: gradient training of a KV Prediction pair (the paper's loss), on
MLX or on the torch mirror (CPU or an NVIDIA GPU), one run or a recipe of stages
(edgeprefill.kvp.recipe does the work; this parses and shows progress)."""

import argparse
from pathlib import Path

from edgeprefill.apps.argtypes import non_negative, non_negative_float, positive, positive_float

S = argparse.SUPPRESS  # a flag not given is absent: the recipe's value (or the default) holds
CONTROL = ("command", "kvp_command", "run", "model", "dtype", "recipe", "out")


def add_train_parser(ksub):
    from edgeprefill.apps.shared import add_model_args
    from edgeprefill.apps.shared import add_rank_arg
    from edgeprefill.kvp.pairs import DEFAULT_AUX

    t = ksub.add_parser("train", help="train predictor (and aux) with the paper's loss, or "
                        "run a recipe of training stages")
    add_model_args(t)
    t.add_argument("--recipe", default=None, metavar="FILE.yaml",
                   help="run every stage of a recipe (recipes/smollm2-135m-t050.yaml makes the "
                   "shipped pair); flags given beside it override every stage")
    t.add_argument("--stop-step", type=positive, default=S,
                   help="stop at this step (the learning-rate schedule still spans --steps)")
    t.add_argument("--aux", default=S, help="aux kind (LP-0.50, T-0.25, ...)")
    t.add_argument("--input", default=S, choices=["auto", "kv", "hidden", "hidden-in",
                                                      "hidden2"],
                   help="predictor input (auto: hidden for T, kv for LP)")
    t.add_argument("--init", default=S, metavar="FOLDER",
                   help="start from this artifact's predictor (default: a ridge fit first)")
    add_rank_arg(t)
    t.add_argument("--train-aux", default=S, choices=["auto", "yes", "no"],
                   help="train copies of the aux's blocks too (auto: yes for LP, no for T, "
                   "whose aux is the base's own exact layers)")
    t.add_argument("--train-aux-layers", type=non_negative, default=S, metavar="K",
                   help="train copies of only the aux's last K blocks (implies --train-aux "
                   "yes; 0: all of them); with --init, K beyond the pair's trained copies "
                   "adds copies of the blocks before them")
    t.add_argument("--aux-weight", type=non_negative_float, default=S,
                   help="weight of the aux's own loss term (the paper: 1; 0 for an aux that "
                   "only feeds the predictor, like a truncated one)")
    t.add_argument("--kv-weight", type=non_negative_float, default=S,
                   help="weight of the K/V consistency term, the L1 averaged over layers "
                   "(the paper: 1)")
    t.add_argument("--self-kv", default=S, choices=["exact", "predicted"],
                   help="what each position attends to at its own position in training: its "
                   "own exact K/V, as the prompt's last token does at inference (default), or "
                   "its predicted K/V (the paper)")
    t.add_argument("--steps", type=positive, default=S)
    t.add_argument("--batch", type=positive, default=S)
    t.add_argument("--seq", type=positive, default=S, help="tokens per training sequence")
    t.add_argument("--lr", type=positive_float, default=S)
    t.add_argument("--objective", default=S, choices=["ce", "kl"],
                   help="ce: the paper's next-token CE terms; kl: distil the exact base (KL), "
                   "which cannot overfit a small corpus by fine-tuning the base onto it")
    t.add_argument("--warmup", type=non_negative, default=S)
    t.add_argument("--tokens", type=positive, default=S,
                   help="fitting text to sample training windows from")
    t.add_argument("--data", default=S, choices=["default", "wide", "site"],
                   help="fitting text: default (31 stdlib modules + prose), wide (every "
                   "stdlib module but the held-out ones, ~3M tokens of code) or site (wide "
                   "plus the installed packages' sources and descriptions, up to --tokens)")
    t.add_argument("--ridge-tokens", type=positive, default=S)
    t.add_argument("--tail", type=positive, default=S,
                   help="exact tail recorded in the card: the base runs the prompt's last TAIL "
                   "tokens itself at inference")
    t.add_argument("--train-tail", type=positive, default=S, metavar="T",
                   help="train for every exact tail from 1 to T (with --self-kv exact; "
                   "default: --tail, so training matches the card)")
    t.add_argument("--seed", type=non_negative, default=S)
    t.add_argument("--backend", default=S, choices=["mlx", "mirror"])
    t.add_argument("--device", default=S, choices=["cpu", "cuda"],
                   help="mirror backend device")
    t.add_argument("--precision", default=S, choices=["auto", "fp32", "bf16"],
                   help="mirror backend: bf16 runs the matmuls under bfloat16 autocast "
                   "(float32 weights, norms, logits and losses); auto: bf16 on cuda, else fp32")
    t.add_argument("--checkpoint-every", type=positive, default=S)
    t.add_argument("--time-limit", type=positive_float, default=S, metavar="SECONDS",
                   help="stop (checkpoint and write the artifact) after this long")
    t.add_argument("--resume", action="store_true", default=S,
                   help="continue from OUT.ckpt (written every --checkpoint-every steps)")
    t.add_argument("--eval-pairs", type=non_negative, default=S,
                   help="held-out pairs to measure quality on for the card (0: skip)")
    t.add_argument("--out", default=None, help="artifact folder (default: the cache path of "
                   "this aux kind, '-trained' appended)")
    t.set_defaults(run=run_train)


def run_train(args):
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from edgeprefill.kvp.pairs import default_artifact_path, resolve_source
    from edgeprefill.kvp.recipe import TrainConfig, load_recipe, run_recipe, train_pair
    from edgeprefill.loading import cache_dir, load

    given = {k: v for k, v in vars(args).items() if k not in CONTROL and v is not None}
    recipe = load_recipe(args.recipe) if args.recipe else None
    if recipe is None:
        TrainConfig(**given).check()  # before loading the model
    model = args.model if args.model != "default" or not recipe else recipe.get("model", "default")
    lm = load(model, dtype=args.dtype)
    console = Console(stderr=True)
    say = lambda msg: console.print(msg, highlight=False)  # noqa: E731
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn(
            "{task.completed}/{task.total}"), TextColumn("{task.fields[loss]}"),
            TimeElapsedColumn(), console=console) as bar:
        tasks = {}

        def progress(label, done, total):
            if label not in tasks:
                tasks[label] = bar.add_task(label, total=total, loss="")
            bar.update(tasks[label], completed=done, total=total)

        def on_step(rec):
            progress("training", rec["step"], rec.get("steps") or rec["step"])
            bar.update(tasks["training"], loss=f"loss {rec['loss']:.3f} (base {rec['base']:.3f}"
                       f", aux {rec['aux']:.3f}, L1 {rec['l1']:.4f})")

        if recipe:
            out = Path(args.out) if args.out else cache_dir() / "kvp" / recipe.get("name", "recipe")
            out, quality = run_recipe(lm, recipe, out, given, say=say, progress=progress,
                                      on_step=on_step)
        else:
            cfg = TrainConfig(**given)
            rank = cfg.predictor_rank
            out = Path(args.out) if args.out else Path(str(default_artifact_path(
                lm.model_id, cfg.aux, resolve_source(cfg.aux, cfg.input), rank)) + "-trained")
            out, quality = train_pair(lm, cfg, out, say, progress, on_step)
    q = (f"; held-out agreement {quality['first_token_agreement']:.2f}, NLL ratio "
         f"{quality['nll_ratio']:.2f}" if quality else "")
    say(f"wrote {out}{q}")
    return 0
