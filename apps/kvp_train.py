"""`edgeprefill kvp train`: gradient training of a KV Prediction pair (the paper's loss), on
MLX or on the torch mirror (CPU or an NVIDIA GPU), with resumable checkpoints."""

import json
from pathlib import Path

from edgeprefill.apps.argtypes import non_negative, non_negative_float, positive, positive_float
from edgeprefill.errors import EdgeprefillError


def add_train_parser(ksub):
    from edgeprefill.apps.shared import add_model_args
    from edgeprefill.apps.shared import add_rank_arg
    from edgeprefill.kvp.pairs import DEFAULT_AUX

    t = ksub.add_parser("train", help="train predictor (and aux) with the paper's loss")
    add_model_args(t)
    t.add_argument("--aux", default=DEFAULT_AUX, help="aux kind (LP-0.50, T-0.25, ...)")
    t.add_argument("--input", default="auto", choices=["auto", "kv", "hidden", "hidden-in",
                                                      "hidden2"],
                   help="predictor input (auto: hidden for T, kv for LP)")
    t.add_argument("--init", default=None, metavar="FOLDER",
                   help="start from this artifact's predictor (default: a ridge fit first)")
    add_rank_arg(t)
    t.add_argument("--train-aux", default="auto", choices=["auto", "yes", "no"],
                   help="train copies of the aux's blocks too (auto: yes for LP, no for T, "
                   "whose aux is the base's own exact layers)")
    t.add_argument("--train-aux-layers", type=non_negative, default=0, metavar="K",
                   help="train copies of only the aux's last K blocks (implies --train-aux "
                   "yes; 0: all of them); with --init, K beyond the pair's trained copies "
                   "adds copies of the blocks before them")
    t.add_argument("--aux-weight", type=non_negative_float, default=1.0,
                   help="weight of the aux's own loss term (the paper: 1; 0 for an aux that "
                   "only feeds the predictor, like a truncated one)")
    t.add_argument("--kv-weight", type=non_negative_float, default=1.0,
                   help="weight of the K/V consistency term, the L1 averaged over layers "
                   "(the paper: 1)")
    t.add_argument("--self-kv", default="exact", choices=["exact", "predicted"],
                   help="what each position attends to at its own position in training: its "
                   "own exact K/V, as the prompt's last token does at inference (default), or "
                   "its predicted K/V (the paper)")
    t.add_argument("--steps", type=positive, default=200)
    t.add_argument("--batch", type=positive, default=8)
    t.add_argument("--seq", type=positive, default=256, help="tokens per training sequence")
    t.add_argument("--lr", type=positive_float, default=3e-4)
    t.add_argument("--objective", default="ce", choices=["ce", "kl"],
                   help="ce: the paper's next-token CE terms; kl: distil the exact base (KL), "
                   "which cannot overfit a small corpus by fine-tuning the base onto it")
    t.add_argument("--warmup", type=non_negative, default=20)
    t.add_argument("--tokens", type=positive, default=300000,
                   help="fitting text to sample training windows from")
    t.add_argument("--data", default="default", choices=["default", "wide", "site"],
                   help="fitting text: default (31 stdlib modules + prose), wide (every "
                   "stdlib module but the held-out ones, ~3M tokens of code) or site (wide "
                   "plus the installed packages' sources and descriptions, up to --tokens)")
    t.add_argument("--ridge-tokens", type=positive, default=30000)
    t.add_argument("--tail", type=positive, default=1,
                   help="exact tail recorded in the card: the base runs the prompt's last TAIL "
                   "tokens itself at inference")
    t.add_argument("--train-tail", type=positive, default=None, metavar="T",
                   help="train for every exact tail from 1 to T (with --self-kv exact; "
                   "default: --tail, so training matches the card)")
    t.add_argument("--seed", type=non_negative, default=0)
    t.add_argument("--backend", default="mlx", choices=["mlx", "mirror"])
    t.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="mirror backend device")
    t.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="mirror backend: bf16 runs the matmuls under bfloat16 autocast "
                   "(float32 weights, norms, logits and losses); auto: bf16 on cuda, else fp32")
    t.add_argument("--checkpoint-every", type=positive, default=50)
    t.add_argument("--time-limit", type=positive_float, default=None, metavar="SECONDS",
                   help="stop (checkpoint and write the artifact) after this long")
    t.add_argument("--resume", action="store_true",
                   help="continue from OUT.ckpt (written every --checkpoint-every steps)")
    t.add_argument("--eval-pairs", type=non_negative, default=16,
                   help="held-out pairs to measure quality on for the card (0: skip)")
    t.add_argument("--out", default=None, help="artifact folder (default: the cache path of "
                   "this aux kind, '-trained' appended)")
    t.set_defaults(run=run_train)


def _check(args):
    # signs and ranges of single flags are checked when parsed (argtypes); here what they must
    # satisfy together
    if args.seq < 8:
        raise EdgeprefillError("--seq must be >= 8")
    if args.tokens < args.seq + 1:
        raise EdgeprefillError("--tokens must be larger than --seq")
    if args.precision != "auto" and args.backend != "mirror":
        raise EdgeprefillError("--precision is for --backend mirror; the MLX trainer runs in "
                               "the model's --dtype")
    if args.train_aux_layers and args.train_aux == "no":
        raise EdgeprefillError("--train-aux-layers trains aux blocks: drop --train-aux no")
    if args.train_tail not in (None, 1) and args.self_kv != "exact":
        raise EdgeprefillError("--train-tail needs --self-kv exact (the tail's own K/V are "
                               "exact): drop --self-kv predicted or --train-tail")
    if _train_tail(args) >= args.seq:
        raise EdgeprefillError(f"--train-tail {_train_tail(args)} (default: --tail) must be below "
                               f"--seq {args.seq}, or no position trains on predicted K/V: pass "
                               "a smaller --train-tail or a longer --seq")


def _train_tail(args):
    """The exact tail trained for: --train-tail, else --tail with --self-kv exact, else 1."""
    if args.train_tail is not None:
        return args.train_tail
    return args.tail if args.self_kv == "exact" else 1


def _grown(aux, k):
    """--init with trained copies and --train-aux-layers K: the aux with copies of its last K
    blocks, the init's trained copies kept (an error if K would drop one)."""
    from edgeprefill.kvp.train import grow_copies

    want = aux.layers[-k:]
    have = aux.model.copied
    if set(want) == set(have):
        return aux
    if not set(have) <= set(want):
        need = len(aux.layers) - min(aux.layers.index(h) for h in have)
        raise EdgeprefillError(f"--train-aux-layers {k}: the --init pair already trains aux "
                               f"blocks {have}; pass at least {need} to keep them")
    return grow_copies(aux, want)


def _reduced(lm, aux, pred, rank, tokens, console):
    """--init with a full-rank predictor and --predictor-rank: its best rank-R approximation
    on the inputs of `tokens` tokens of the default fitting text."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from edgeprefill.data import fit_chunks
    from edgeprefill.kvp.fit import input_moments, reduce_rank

    chunks = fit_chunks(lm.tokenizer, tokens, 256)
    with Progress(TextColumn(f"rank {rank} init {{task.description}}"), BarColumn(),
                  TimeElapsedColumn(), console=console, transient=True) as bar:
        task = bar.add_task("input moments", total=sum(len(c) for c in chunks))
        moments = input_moments(aux, pred, chunks, lambda d: bar.update(task, completed=d))
    return reduce_rank(pred, rank, moments)


def run_train(args):
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from edgeprefill.apps.shared import builtin_refs, evaluate_refs
    from edgeprefill.kvp.pairs import (build_predictor, check_rank, default_artifact_path,
                                       resolve_source)
    from edgeprefill.prefill.kv_prediction import KVPrediction
    from edgeprefill.data import (BUILTIN_PAIRS, FIT_DATA, SITE_FIT_DATA, WIDE_FIT_DATA,
                                  fit_chunks)
    from edgeprefill.kvp.artifact import load_artifact, save_artifact
    from edgeprefill.kvp.aux import parse_aux_kind
    from edgeprefill.kvp.fit import fit_ridge
    from edgeprefill.loading import cache_dir, load

    _check(args)
    kind, _ = parse_aux_kind(args.aux)
    source = resolve_source(args.aux, args.input)
    rank = args.predictor_rank
    check_rank(rank, source)
    train_aux = (args.train_aux == "yes" or args.train_aux_layers > 0
                 or (args.train_aux == "auto" and kind != "T"))
    lm = load(args.model, dtype=args.dtype)
    base = lm.model
    console = Console(stderr=True)
    out = Path(args.out) if args.out else Path(
        str(default_artifact_path(lm.model_id, args.aux, source, rank)) + "-trained")
    ckpt = Path(str(out) + ".ckpt")
    if args.resume and not (ckpt / "state.json").is_file():
        raise EdgeprefillError(f"--resume but no checkpoint at {ckpt}: run without --resume")

    aux, pred = build_predictor(base, args.aux, source, rank=rank if args.resume else None)
    rank_init = None
    if args.train_aux_layers > len(aux.layers):
        raise EdgeprefillError(f"--train-aux-layers {args.train_aux_layers}: the aux has only "
                               f"{len(aux.layers)} blocks")
    if args.init:
        init_aux, pred, card = load_artifact(args.init, base)
        if init_aux.kind != aux.kind or pred.source != source:
            raise EdgeprefillError(f"--init artifact is {init_aux.kind}/{pred.source}, not "
                                   f"{aux.kind}/{source}: pick a matching one")
        aux = init_aux
        init_fit = card.get("fit", {})
        if rank and pred.rank not in (None, rank):
            raise EdgeprefillError(f"--predictor-rank {rank}: the --init pair's predictor has "
                                   f"rank {pred.rank}; pass --predictor-rank {pred.rank} or "
                                   "drop the option")
        if hasattr(aux.model, "copied"):  # the pair's trained copies train on with it
            if args.train_aux == "no":
                raise EdgeprefillError(f"--train-aux no: the --init pair's aux blocks "
                                       f"{aux.model.copied} are trained copies, which train on "
                                       "with the predictor; drop --train-aux no")
            train_aux = True
            if args.train_aux_layers:
                aux = _grown(aux, args.train_aux_layers)
        if rank and not pred.rank:  # resuming: the checkpoint holds the low-rank weights
            pred = (build_predictor(base, args.aux, source, rank=rank)[1] if args.resume
                    else _reduced(lm, aux, pred, rank, args.ridge_tokens, console))
            rank_init = {"from": "the --init pair's full-rank predictor", "rank": rank,
                         "moments_tokens": args.ridge_tokens}  # (a resumed run's start too)
    elif not args.resume:
        chunks = fit_chunks(lm.tokenizer, args.ridge_tokens, 256)
        with Progress(TextColumn("ridge init {task.description}"), BarColumn(),
                      TimeElapsedColumn(), console=console, transient=True) as bar:
            task = bar.add_task(aux.kind, total=sum(len(c) for c in chunks))
            pred, _ = fit_ridge(base, aux, pred, chunks, rank=rank,
                                progress=lambda d: bar.update(task, completed=d))
    with console.status(f"fitting text: {args.tokens} tokens of the {args.data} set "
                        "(tokenized once, then read from the cache)"):
        windows = fit_chunks(lm.tokenizer, args.tokens, args.seq + 1, data=args.data,
                             cache=cache_dir() / "data")
    if len(windows) < 2:
        raise EdgeprefillError("too little fitting text for these --tokens/--seq")

    log_path = Path(str(out) + ".train.jsonl")
    hp = dict(batch=args.batch, steps=args.steps, lr=args.lr, warmup=args.warmup,
              seed=args.seed, objective=args.objective, aux_weight=args.aux_weight,
              kv_weight=args.kv_weight, self_kv=args.self_kv, window=_train_tail(args))
    copies = aux.layers[-args.train_aux_layers:] if args.train_aux_layers else None
    if args.backend == "mlx":
        from edgeprefill.kvp.train import Trainer, trainable_aux

        t_aux = (trainable_aux(aux, copies) if train_aux and not hasattr(aux.model, "copied")
                 else aux)
        trainer = Trainer(base, t_aux, pred, windows, **hp)
    else:
        from edgeprefill.apps.kvp_mirror import mirror_trainer

        precision = (("bf16" if args.device == "cuda" else "fp32") if args.precision == "auto"
                     else args.precision)
        trainer, t_aux = mirror_trainer(base, aux, pred, windows, train_aux, args.device,
                                        {**hp, "precision": precision}, copies)
    if args.resume:
        trainer.load_checkpoint(ckpt)
        console.print(f"resumed from {ckpt} at step {trainer.step}")
    if not args.resume and log_path.exists():
        log_path.unlink()
    lines = []

    with Progress(TextColumn("training {task.description}"), BarColumn(),
                  TextColumn("step {task.completed}/{task.total}"), TextColumn("{task.fields[loss]}"),
                  TimeElapsedColumn(), console=console) as bar:
        task = bar.add_task(f"{aux.kind} ({source})", total=args.steps,
                            completed=trainer.step, loss="")

        def log(rec):
            lines.append(json.dumps(rec))
            bar.update(task, completed=rec["step"],
                       loss=f"loss {rec['loss']:.3f} (base {args.objective} {rec['base']:.3f}"
                            f", aux {rec['aux']:.3f}, L1 {rec['l1']:.4f})")
            if (rec["step"] % args.checkpoint_every == 0 or rec["step"] == args.steps
                    or (args.time_limit and rec["elapsed_s"] >= args.time_limit)):
                with open(log_path, "a") as f:  # the loss log grows with the checkpoints
                    f.write("".join(x + "\n" for x in lines))
                lines.clear()

        trainer.run(log=log, checkpoint=ckpt, every=args.checkpoint_every,
                    time_limit=args.time_limit)

    if args.backend == "mirror":
        from edgeprefill.apps.kvp_mirror import export_trained

        pred, aux_weights, q_aux = export_trained(trainer, base, aux, pred, train_aux)
    else:
        aux_weights = t_aux.model.aux_weights() if hasattr(t_aux.model, "copied") else None
        q_aux = t_aux
    quality = {}
    if args.eval_pairs > 0:
        refs = builtin_refs(lm, args.eval_pairs, console)
        strategy = KVPrediction(base, q_aux, pred)
        strategy.tail = args.tail
        quality = evaluate_refs(lm, strategy, refs, console, "evaluating")
        quality["data"] = BUILTIN_PAIRS
    fit_info = {"method": "ridge+gradient" if not args.init else "gradient",
                "backend": args.backend if args.backend == "mlx" else f"mirror-{args.device}",
                **({"precision": trainer.precision} if args.backend == "mirror" else {}),
                "steps": trainer.step, "batch": args.batch, "seq": args.seq, "lr": args.lr,
                "tokens_seen": trainer.step * args.batch * args.seq,
                "objective": args.objective, "train_aux": train_aux,
                "aux_weight": args.aux_weight, "kv_weight": args.kv_weight,
                "self_kv": args.self_kv, "train_tail": _train_tail(args),
                "data": {"default": FIT_DATA, "wide": WIDE_FIT_DATA,
                         "site": SITE_FIT_DATA}[args.data],
                "data_tokens": len(windows) * (args.seq + 1),
                "log": log_path.name}
    if args.init:  # what training continued from
        fit_info["init"] = {"artifact": Path(args.init).name, **{
            k: init_fit[k] for k in ("method", "steps", "data") if k in init_fit}}
    if rank_init:  # the predictor was reduced to low rank before training
        fit_info["rank_init"] = rank_init
    save_artifact(out, pred, aux, base, lm.model_id, fit_info, quality, tail=args.tail,
                  aux_weights=aux_weights)
    q = (f"; held-out agreement {quality['first_token_agreement']:.2f}, NLL ratio "
         f"{quality['nll_ratio']:.2f}" if quality else "")
    console.print(f"wrote {out} ({aux.kind}, {source}, {trainer.step} steps{q})")
    return 0
