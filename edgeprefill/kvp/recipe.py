"""Training a KV Prediction pair by gradient, one stage (`train_pair`) or a recipe of stages
(`run_recipe`): a YAML file whose `defaults` apply to every stage and whose `stages` each
continue from the one before (`init`), so the shipped pair is reproduced by one command:

    edgeprefill kvp train --recipe recipes/smollm2-135m-t050.yaml

A stage whose artifact is already complete is skipped, so a stopped recipe resumes at the stage
it was in (each stage also resumes from its own checkpoint). Options given with the recipe
override every stage (e.g. fewer steps for a quick check that every stage runs).
"""

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Optional

from edgeprefill.errors import EdgeprefillError


@dataclass
class TrainConfig:
    """One training run; the field names are `kvp train`'s flags (see its --help)."""

    aux: str = "T-0.50"
    input: str = "auto"
    init: Optional[str] = None
    predictor_rank: Optional[int] = None
    train_aux: str = "auto"
    train_aux_layers: int = 0
    aux_weight: float = 1.0
    kv_weight: float = 1.0
    self_kv: str = "exact"
    steps: int = 200
    stop_step: Optional[int] = None
    batch: int = 8
    seq: int = 256
    lr: float = 3e-4
    objective: str = "ce"
    warmup: int = 20
    tokens: int = 300000
    data: str = "default"
    ridge_tokens: int = 30000
    tail: int = 1
    train_tail: Optional[int] = None
    seed: int = 0
    backend: str = "mlx"
    device: str = "cpu"
    precision: str = "auto"
    checkpoint_every: int = 50
    time_limit: Optional[float] = None
    resume: bool = False
    eval_pairs: int = 16

    @classmethod
    def from_dict(cls, d, where="the recipe"):
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise EdgeprefillError(f"{where}: unknown option '{unknown[0]}': use the names of "
                                   "`edgeprefill kvp train --help` with _ for -")
        return cls(**d)

    @property
    def window(self):
        """The exact tail trained for: train_tail, else tail with self_kv exact, else 1."""
        if self.train_tail is not None:
            return self.train_tail
        return self.tail if self.self_kv == "exact" else 1

    def check(self):
        """What the options must satisfy together (single values are checked when parsed)."""
        if self.seq < 8:
            raise EdgeprefillError("--seq must be >= 8")
        if self.tokens < self.seq + 1:
            raise EdgeprefillError("--tokens must be larger than --seq")
        if self.precision != "auto" and self.backend != "mirror":
            raise EdgeprefillError("--precision is for --backend mirror; the MLX trainer runs in "
                                   "the model's --dtype")
        if self.train_aux_layers and self.train_aux == "no":
            raise EdgeprefillError("--train-aux-layers trains aux blocks: drop --train-aux no")
        if self.train_tail not in (None, 1) and self.self_kv != "exact":
            raise EdgeprefillError("--train-tail needs --self-kv exact (the tail's own K/V are "
                                   "exact): drop --self-kv predicted or --train-tail")
        if self.window >= self.seq:
            raise EdgeprefillError(f"--train-tail {self.window} (default: --tail) must be below "
                                   f"--seq {self.seq}, or no position trains on predicted K/V: "
                                   "pass a smaller --train-tail or a longer --seq")


def _grown(aux, k):
    """init with trained copies and train_aux_layers K: the aux with copies of its last K
    blocks, the init's trained copies kept (an error if K would drop one)."""
    from edgeprefill.kvp.train import grow_copies

    want, have = aux.layers[-k:], aux.model.copied
    if set(want) == set(have):
        return aux
    if not set(have) <= set(want):
        need = len(aux.layers) - min(aux.layers.index(h) for h in have)
        raise EdgeprefillError(f"--train-aux-layers {k}: the --init pair already trains aux "
                               f"blocks {have}; pass at least {need} to keep them")
    return grow_copies(aux, want)


def _start(lm, cfg, source, rank, progress):
    """(aux, predictor, train_aux, init card's fit, rank_init) to train from: the init pair
    (grown or reduced to low rank as asked), a checkpoint's shapes, or a ridge fit."""
    from edgeprefill.data import fit_chunks
    from edgeprefill.kvp.artifact import load_artifact
    from edgeprefill.kvp.aux import parse_aux_kind
    from edgeprefill.kvp.fit import fit_ridge, input_moments, reduce_rank
    from edgeprefill.kvp.pairs import build_predictor

    base = lm.model
    kind, _ = parse_aux_kind(cfg.aux)
    train_aux = (cfg.train_aux == "yes" or cfg.train_aux_layers > 0
                 or (cfg.train_aux == "auto" and kind != "T"))
    aux, pred = build_predictor(base, cfg.aux, source, rank=rank if cfg.resume else None)
    if cfg.train_aux_layers > len(aux.layers):
        raise EdgeprefillError(f"--train-aux-layers {cfg.train_aux_layers}: the aux has only "
                               f"{len(aux.layers)} blocks")
    init_fit, rank_init = {}, None
    if cfg.init:
        init_aux, pred, card = load_artifact(cfg.init, base)
        if init_aux.kind != aux.kind or pred.source != source:
            raise EdgeprefillError(f"--init artifact is {init_aux.kind}/{pred.source}, not "
                                   f"{aux.kind}/{source}: pick a matching one")
        aux, init_fit = init_aux, card.get("fit", {})
        if rank and pred.rank not in (None, rank):
            raise EdgeprefillError(f"--predictor-rank {rank}: the --init pair's predictor has "
                                   f"rank {pred.rank}; pass --predictor-rank {pred.rank} or "
                                   "drop the option")
        if hasattr(aux.model, "copied"):  # the pair's trained copies train on with it
            if cfg.train_aux == "no":
                raise EdgeprefillError(f"--train-aux no: the --init pair's aux blocks "
                                       f"{aux.model.copied} are trained copies, which train on "
                                       "with the predictor; drop --train-aux no")
            train_aux = True
            if cfg.train_aux_layers:
                aux = _grown(aux, cfg.train_aux_layers)
        if rank and not pred.rank:  # resuming: the checkpoint holds the low-rank weights
            if cfg.resume:
                pred = build_predictor(base, cfg.aux, source, rank=rank)[1]
            else:
                chunks = fit_chunks(lm.tokenizer, cfg.ridge_tokens, 256)
                total = sum(len(c) for c in chunks)
                moments = input_moments(aux, pred, chunks,
                                        lambda d: progress("input moments", d, total))
                pred = reduce_rank(pred, rank, moments)
            rank_init = {"from": "the --init pair's full-rank predictor", "rank": rank,
                         "moments_tokens": cfg.ridge_tokens}
    elif not cfg.resume:
        chunks = fit_chunks(lm.tokenizer, cfg.ridge_tokens, 256)
        total = sum(len(c) for c in chunks)
        pred, _ = fit_ridge(base, aux, pred, chunks, rank=rank,
                            progress=lambda d: progress("ridge init", d, total))
    return aux, pred, train_aux, init_fit, rank_init


def train_pair(lm, cfg, out, say=print, progress=None, on_step=None):
    """Train one pair (the paper's loss) into the artifact folder `out`.

    Args:
        lm: the base LoadedModel.
        cfg: TrainConfig.
        out: artifact folder; OUT.ckpt holds checkpoints, OUT.train.jsonl the loss log.
        say: one-line notices; progress(label, done, total): set-up steps;
        on_step(record): after each training step.
    Returns:
        (out, quality on cfg.eval_pairs held-out pairs, or {}).
    """
    from edgeprefill.data import BUILTIN_PAIRS, FIT_DATA, SITE_FIT_DATA, WIDE_FIT_DATA, fit_chunks
    from edgeprefill.kvp.artifact import save_artifact
    from edgeprefill.kvp.pairs import check_rank, resolve_source
    from edgeprefill.loading import cache_dir
    from edgeprefill.prefill.kv_prediction import KVPrediction
    from edgeprefill.quality import evaluate, references

    cfg.check()
    progress = progress or (lambda label, done, total: None)
    source, rank = resolve_source(cfg.aux, cfg.input), cfg.predictor_rank
    check_rank(rank, source)
    out = Path(out)
    ckpt, log_path = Path(f"{out}.ckpt"), Path(f"{out}.train.jsonl")
    if cfg.resume and not (ckpt / "state.json").is_file():
        raise EdgeprefillError(f"--resume but no checkpoint at {ckpt}: run without --resume")
    base = lm.model
    aux, pred, train_aux, init_fit, rank_init = _start(lm, cfg, source, rank, progress)
    say(f"fitting text: {cfg.tokens} tokens of the {cfg.data} set (tokenized once, then read "
        "from the cache)")
    windows = fit_chunks(lm.tokenizer, cfg.tokens, cfg.seq + 1, data=cfg.data,
                         cache=cache_dir() / "data")
    if len(windows) < 2:
        raise EdgeprefillError("too little fitting text for these --tokens/--seq")
    hp = dict(batch=cfg.batch, steps=cfg.steps, lr=cfg.lr, warmup=cfg.warmup, seed=cfg.seed,
              objective=cfg.objective, aux_weight=cfg.aux_weight, kv_weight=cfg.kv_weight,
              self_kv=cfg.self_kv, window=cfg.window)
    copies = aux.layers[-cfg.train_aux_layers:] if cfg.train_aux_layers else None
    if cfg.backend == "mlx":
        from edgeprefill.kvp.train import Trainer, trainable_aux

        t_aux = (trainable_aux(aux, copies) if train_aux and not hasattr(aux.model, "copied")
                 else aux)
        trainer = Trainer(base, t_aux, pred, windows, **hp)
    else:
        precision = (("bf16" if cfg.device == "cuda" else "fp32") if cfg.precision == "auto"
                     else cfg.precision)
        trainer = mirror_trainer(base, aux, pred, windows, train_aux, cfg.device,
                                 {**hp, "precision": precision}, copies)
    if cfg.resume:
        trainer.load_checkpoint(ckpt)
        say(f"resumed from {ckpt} at step {trainer.step}")
    elif log_path.exists():
        log_path.unlink()
    lines = []

    def log(rec):
        lines.append(json.dumps(rec))
        if on_step:
            on_step(rec)
        if (rec["step"] % cfg.checkpoint_every == 0 or rec["step"] == cfg.steps
                or rec["step"] == cfg.stop_step
                or (cfg.time_limit and rec["elapsed_s"] >= cfg.time_limit)):
            with open(log_path, "a") as f:  # the loss log grows with the checkpoints
                f.write("".join(x + "\n" for x in lines))
            lines.clear()

    trainer.run(log=log, checkpoint=ckpt, every=cfg.checkpoint_every, time_limit=cfg.time_limit,
                stop_step=cfg.stop_step)
    if cfg.backend == "mirror":
        from edgeprefill.mirror.convert import trained_pair_to_mlx

        pred, aux_weights, q_aux = trained_pair_to_mlx(trainer, aux, pred)
    else:
        aux_weights = t_aux.model.aux_weights() if hasattr(t_aux.model, "copied") else None
        q_aux = t_aux
    quality = {}
    if cfg.eval_pairs > 0:
        refs = references(lm, cfg.eval_pairs,
                          progress=lambda d, t: progress("exact references", d, t))
        strategy = KVPrediction(base, q_aux, pred, tail=cfg.tail)
        quality = evaluate(lm, strategy, refs, lambda d, t: progress("evaluating", d, t))
        quality["data"] = BUILTIN_PAIRS
    fit_info = {"method": "ridge+gradient" if not cfg.init else "gradient",
                "backend": cfg.backend if cfg.backend == "mlx" else f"mirror-{cfg.device}",
                **({"precision": trainer.precision} if cfg.backend == "mirror" else {}),
                "steps": trainer.step, "batch": cfg.batch, "seq": cfg.seq, "lr": cfg.lr,
                "tokens_seen": trainer.step * cfg.batch * cfg.seq,
                "objective": cfg.objective, "train_aux": train_aux,
                "aux_weight": cfg.aux_weight, "kv_weight": cfg.kv_weight,
                "self_kv": cfg.self_kv, "train_tail": cfg.window,
                "data": {"default": FIT_DATA, "wide": WIDE_FIT_DATA,
                         "site": SITE_FIT_DATA}[cfg.data],
                "data_tokens": len(windows) * (cfg.seq + 1), "log": log_path.name}
    if cfg.init:  # what training continued from
        fit_info["init"] = {"artifact": Path(cfg.init).name, **{
            k: init_fit[k] for k in ("method", "steps", "data") if k in init_fit}}
    if rank_init:
        fit_info["rank_init"] = rank_init
    save_artifact(out, pred, aux, base, lm.model_id, fit_info, quality, tail=cfg.tail,
                  aux_weights=aux_weights)
    return out, quality


def mirror_trainer(base, aux, pred, windows, train_aux, device, hp, copies=None):
    """A torch Trainer for an MLX base / aux / predictor (converted here; convert.py brings
    the trained weights back); `copies`: the aux blocks to train (default all)."""
    import torch

    from edgeprefill.mirror.convert import aux_to_torch, mirror_from_mlx, predictor_to_torch
    from edgeprefill.mirror.kvp.train import Trainer, trainable_aux

    if device == "cuda" and not torch.cuda.is_available():
        raise EdgeprefillError("--device cuda but torch sees no CUDA GPU: use --device cpu")
    if aux.kind == "C":
        raise EdgeprefillError("the mirror trainer supports auxes made of the base's blocks "
                               "(LP, T); train KVP-C with --backend mlx")
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    tbase = mirror_from_mlx(base, device=device)
    taux = aux_to_torch(aux, tbase)
    if hasattr(aux.model, "copied"):  # an --init artifact with trained aux blocks
        taux.model.train_copies(True)
    elif train_aux:
        taux = trainable_aux(taux, copies)
    return Trainer(tbase, taux, predictor_to_torch(pred, device=device), windows, device=device,
                   **hp)


def load_recipe(path):
    """{"name", "model", "defaults": {...}, "stages": [{"name", ...options}]} from a YAML file,
    checked (one line naming the problem)."""
    import yaml

    path = Path(path)
    try:
        recipe = yaml.safe_load(path.read_text())
    except OSError as e:
        raise EdgeprefillError(f"cannot read recipe {path} ({e.strerror}): pass a recipe file "
                               "such as recipes/smollm2-135m-t050.yaml") from None
    except yaml.YAMLError as e:
        raise EdgeprefillError(f"recipe {path} is not valid YAML "
                               f"({str(e).splitlines()[0]}): fix the file") from None
    if not isinstance(recipe, dict) or not isinstance(recipe.get("stages"), list) \
            or not recipe["stages"]:
        raise EdgeprefillError(f"recipe {path} has no list of stages: see "
                               "recipes/smollm2-135m-t050.yaml for the format")
    defaults = recipe.get("defaults") or {}
    for i, stage in enumerate(recipe["stages"]):
        if not isinstance(stage, dict) or not isinstance(stage.get("name"), str):
            raise EdgeprefillError(f"recipe {path}: stage {i + 1} needs a name")
        opts = {k: v for k, v in {**defaults, **stage}.items() if k != "name"}
        TrainConfig.from_dict(opts, f"recipe {path}, stage {stage['name']}")
    return recipe


def stage_configs(recipe, overrides, work):
    """[(stage name, TrainConfig, out folder)]: defaults, then the stage, then `overrides`;
    each stage after the first starts from the one before (unless it names its own init)."""
    out, prev = [], None
    for stage in recipe["stages"]:
        opts = {**(recipe.get("defaults") or {}), **stage, **overrides}
        name = opts.pop("name")
        opts.setdefault("init", prev)
        cfg = TrainConfig.from_dict(opts)
        folder = Path(work) / name
        out.append((name, cfg, folder))
        prev = str(folder)
    return out


def run_recipe(lm, recipe, out, overrides=None, work=None, say=print, progress=None,
               on_step=None):
    """Run every stage of a recipe; the last stage's artifact is copied to `out`.

    Args:
        lm: the base LoadedModel (the recipe's `model`).
        recipe: from load_recipe.
        out: the final artifact folder.
        overrides: options applied to every stage (TrainConfig names).
        work: where the stages' artifacts go (default: OUT.stages).
    Returns:
        (out, the last stage's quality).
    """
    import shutil

    from edgeprefill.fsio import atomic_folder

    work = Path(work or f"{out}.stages")
    work.mkdir(parents=True, exist_ok=True)
    quality = {}
    stages = stage_configs(recipe, overrides or {}, work)
    for k, (name, cfg, folder) in enumerate(stages, 1):
        if (folder / "card.json").is_file():
            say(f"stage {k}/{len(stages)} {name}: done before, kept ({folder})")
            quality = json.loads((folder / "card.json").read_text()).get("quality") or {}
            continue
        if Path(f"{folder}.ckpt", "state.json").is_file():
            cfg.resume = True
        say(f"stage {k}/{len(stages)} {name}: {cfg.steps} steps"
            + (f" (stopping at {cfg.stop_step})" if cfg.stop_step else "")
            + (f", from {Path(cfg.init).name}" if cfg.init else ""))
        _, quality = train_pair(lm, cfg, folder, say, progress, on_step)
    with atomic_folder(Path(out)) as tmp:
        for f in stages[-1][2].iterdir():
            shutil.copy2(f, tmp / f.name)
    return Path(out), quality


__all__ = ["TrainConfig", "train_pair", "load_recipe", "stage_configs", "run_recipe"]
