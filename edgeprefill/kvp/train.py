"""Gradient training of a KV Prediction pair with the paper's loss (MLX).

    loss = CE(base logits, K/V of every base layer REPLACED by the predictions, causal)
         + CE(aux logits)
         + w_kv * sum_i [ L1(K_hat_i, K_i) + L1(V_hat_i, V_i) ],   w_kv = 1 / n_base_layers

(objective 'kl' swaps both CE terms for KL to the exact base's logits: see loss_terms.)

K_i, V_i are the frozen base's own pre-RoPE K/V on the same text (keys compared after the base's
k_norm where it has one). The base is frozen; the predictor is trained, and the aux's blocks too
when `train_aux` (then the aux becomes a copy of the base's blocks, saved in the artifact; a
truncated aux is by default left as the base's own layers, so it costs no extra memory and its
K/V stay exact). The tied embedding / LM head the aux shares with the base stays frozen.
Training starts from whatever the predictor holds (normally the ridge solution).
"""

import copy
import json
import math
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from edgeprefill.fsio import atomic_folder
from edgeprefill.kvp.aux import AuxModel


class AuxView:
    """A Transformer whose blocks `layers` are trainable copies; everything else (embedding,
    head, the other blocks) is the base's. Same API as edgeprefill.models.Transformer."""

    def __init__(self, base, layers):
        self._base = base
        self.layers = list(base.layers)
        for k in layers:
            self.layers[k] = copy.deepcopy(base.layers[k])
            norm = getattr(self.layers[k].self_attn, "k_norm", None)
            if norm is not None:  # stays the base's: see the mirror's AuxView.train_copies
                norm.freeze()
        self.copied = list(layers)

    def __getattr__(self, name):
        return getattr(self._base, name)

    def block(self, i, h, **kwargs):
        return type(self._base).block(self, i, h, **kwargs)

    def rotate_keys(self, i, keys, offset=0, positions=None):
        return type(self._base).rotate_keys(self, i, keys, offset, positions)

    def aux_weights(self):
        """{'layers.<k>.<param>': array} of the copied blocks."""
        out = {}
        for k in self.copied:
            for name, w in tree_flatten(self.layers[k].parameters()):
                out[f"layers.{k}.{name}"] = w
        return out

    def load_aux_weights(self, weights):
        for k in self.copied:
            prefix = f"layers.{k}."
            items = [(n[len(prefix):], w) for n, w in weights.items() if n.startswith(prefix)]
            self.layers[k].load_weights(items, strict=True)


def trainable_aux(aux, layers=None):
    """An AuxModel over trainable copies of `aux`'s blocks (for LP, T or C auxes); `layers`:
    only these block indices are copied (default: all the aux runs)."""
    view = AuxView(aux.model, aux.layers if layers is None else layers)
    return AuxModel(view, aux.layers, aux.kind)


def grow_copies(aux, layers):
    """An artifact's aux (`aux.model` an AuxView) with trainable copies of `layers`, a superset
    of the blocks it already trains: those keep their trained weights, the others start as the
    underlying model's own blocks (how `kvp train --init P --train-aux-layers K` adds copies).
    Raises ValueError if `layers` leaves out a trained block."""
    have = list(aux.model.copied)
    missing = sorted(set(have) - set(layers))
    if missing:
        raise ValueError(f"blocks {missing} are trained copies already and must stay copies")
    grown = trainable_aux(AuxModel(aux.model._base, aux.layers, aux.kind), sorted(layers))
    for k in have:
        grown.model.layers[k] = aux.model.layers[k]
    return grown


class Trainable(nn.Module):
    """What the optimizer updates: the predictor, and the aux's copied blocks if any."""

    def __init__(self, predictor, aux):
        super().__init__()
        self.predictor = predictor
        view = aux.model
        self.aux_blocks = [view.layers[k] for k in getattr(view, "copied", [])]


OBJECTIVES = ("ce", "kl")
# What each position's query sees at its own position in the replaced-K/V run: 'predicted' (the
# paper: every K/V replaced) or 'exact' (its own K/V from its own hidden state, the predictions
# at earlier positions only), which is what inference does for the prompt's last token.
# Functions default to the paper's; `kvp train` defaults to 'exact', which trained better pairs.
SELF_KV = ("predicted", "exact")


def self_exact_mask(L, window=1):
    """(L, 2L) bool over [predicted keys | exact keys]. Positions fall in blocks of `window`;
    query t sees the predicted keys before its block and the exact keys from its block's start
    to t, its own among them: what KV Prediction computes for a prompt ending at t with an
    exact tail of t - start + 1 tokens. window 1 is the paper's tail of 1 at every position;
    window T trains every tail from 1 to T, T itself at each block's last position."""
    t = mx.arange(L)
    start = (t // window) * window
    predicted = t[None, :] < start[:, None]
    exact = (t[None, :] >= start[:, None]) & (t[None, :] <= t[:, None])
    return mx.concatenate([predicted, exact], axis=1)


def check_window(self_kv, window):
    """Raise ValueError unless `window` (exact positions per query) suits `self_kv`."""
    if window < 1 or (window > 1 and self_kv != "exact"):
        raise ValueError(f"an exact window of {window} needs self_kv 'exact' and window >= 1")


def replaced_block(base, i, h, k, v, mask=None):
    """Base block i over h with its K/V replaced by the predictions (k, v) pre-RoPE; with
    `mask` (self_exact_mask) each query attends to its own exact K/V instead of its
    prediction."""
    k, v = k.astype(h.dtype), v.astype(h.dtype)
    if mask is None:
        return base.block(i, h, replace_kv=(k, v)).h
    return base.block(i, h, prefix_kv=(base.rotate_keys(i, k), v), mask=mask).h


def _kl(p_logits, q_logits):
    """Mean over positions of KL(p || q), p the exact base (no gradient)."""
    lp = p_logits - mx.logsumexp(p_logits, axis=-1, keepdims=True)
    lq = q_logits - mx.logsumexp(q_logits, axis=-1, keepdims=True)
    return (mx.exp(lp) * (lp - lq)).sum(axis=-1).mean()


def loss_terms(base, aux, predictor, x, y, objective="ce", aux_weight=1.0,
               kv_weight=1.0, self_kv="predicted", window=1):
    """(total, base term, aux term, mean per-layer L1) for (B, L) inputs x and targets y.

    objective 'ce' is the paper's (cross-entropy on the text's next tokens); 'kl' distils the
    exact base instead (KL(base || replaced-KV base), KL(base || aux)): on a small corpus CE
    lets the predictor fine-tune the base onto the fitting text, KL only rewards reproducing it.
    aux_weight scales the aux's own term (the paper: 1; 0 when the aux is a feature extractor,
    like a truncated aux, not a language model of its own: then the aux's head is not run and
    its term reads 0). kv_weight scales the consistency term (the paper: 1, i.e. the L1 averaged
    over layers); with the KL objective the term mostly steers the direction of the update (its
    gradient is far larger than the KL's), so a smaller weight lets training follow the KL.
    self_kv: one of SELF_KV; window: with self_kv 'exact', the longest exact tail trained for
    (self_exact_mask: every tail from 1 to window).
    """
    h = base.embed(x)
    true = []
    for i in range(base.n_layers):
        out = base.block(i, h)
        h = out.h
        true.append((mx.stop_gradient(out.keys), mx.stop_gradient(out.values)))
    exact = mx.stop_gradient(base.head(h).astype(mx.float32)) if objective == "kl" else None
    aux_out = aux.forward(x, None, predictor.hidden_layers())
    hb = base.embed(x)
    mask = self_exact_mask(x.shape[1], window) if self_kv == "exact" else None
    l1 = 0.0
    for i, k, v in predictor.base_kv(aux_out):
        tk, tv = true[i]
        if base.has_qk_norm:
            kn = base.layers[i].self_attn.k_norm
            k_cmp, tk = kn(k), kn(tk)
        else:
            k_cmp = k
        l1 = l1 + mx.abs(k_cmp - tk).mean() + mx.abs(v - tv).mean()
        hb = replaced_block(base, i, hb, k, v, mask)
    logits = base.head(hb).astype(mx.float32)
    if objective == "kl":
        t_base = _kl(exact, logits)
    else:
        t_base = nn.losses.cross_entropy(logits, y).mean()
    t_aux = mx.array(0.0)
    if aux_weight:  # the aux's own head: skipped when its term weighs nothing
        aux_logits = aux.logits(aux_out.h).astype(mx.float32)
        t_aux = (_kl(exact, aux_logits) if objective == "kl"
                 else nn.losses.cross_entropy(aux_logits, y).mean())
    l1 = l1 / base.n_layers
    return t_base + aux_weight * t_aux + kv_weight * l1, t_base, t_aux, l1


def lr_schedule(lr, steps, warmup):
    """Linear warm-up, then cosine from lr to lr / 10 (the paper's 1.2e-3 -> 1.2e-4 shape)."""
    warm = optim.linear_schedule(lr / 100, lr, max(1, warmup))
    cos = optim.cosine_decay(lr, max(1, steps - warmup), lr / 10)
    return optim.join_schedules([warm, cos], [max(1, warmup)])


class Trainer:
    """Runs the optimization with resumable checkpoints.

    Args:
        base: frozen edgeprefill.models.Transformer.
        aux: AuxModel (from trainable_aux when the aux is trained).
        predictor: KVPredictor, initialized (normally by ridge).
        windows: list of token-id lists of length seq + 1.
        batch, steps, lr, warmup, weight_decay, clip: the optimization.
        seed: batch sampling seed.
        objective, aux_weight, kv_weight, self_kv, window: as loss_terms.
    """

    def __init__(self, base, aux, predictor, windows, batch=8, steps=200, lr=3e-4, warmup=20,
                 weight_decay=0.1, clip=1.0, seed=0, objective="ce", aux_weight=1.0,
                 kv_weight=1.0, self_kv="predicted", window=1):
        check_window(self_kv, window)
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
        if self_kv not in SELF_KV:
            raise ValueError(f"self_kv must be one of {SELF_KV}, got {self_kv!r}")
        self.objective, self.aux_weight, self.kv_weight = objective, aux_weight, kv_weight
        self.self_kv, self.window = self_kv, window
        self.base, self.aux, self.predictor = base, aux, predictor
        self.data = np.array(windows, dtype=np.int32)
        self.batch, self.steps, self.clip, self.seed = batch, steps, clip, seed
        self.params = Trainable(predictor, aux)
        self.opt = optim.AdamW(learning_rate=lr_schedule(lr, steps, warmup), betas=[0.9, 0.95],
                               weight_decay=weight_decay)
        self.step = 0
        self._grad = nn.value_and_grad(self.params, self._loss)

    def _loss(self, x, y):
        return loss_terms(self.base, self.aux, self.predictor, x, y, self.objective,
                          self.aux_weight, self.kv_weight, self.self_kv, self.window)

    def batch_at(self, step):
        rng = np.random.default_rng((self.seed, step))
        rows = self.data[rng.integers(0, len(self.data), size=self.batch)]
        return mx.array(rows[:, :-1]), mx.array(rows[:, 1:])

    def train_step(self):
        x, y = self.batch_at(self.step)
        (total, t_base, t_aux, l1), grads = self._grad(x, y)
        grads, norm = optim.clip_grad_norm(grads, self.clip)
        self.opt.update(self.params, grads)
        mx.eval(self.params.parameters(), self.opt.state, total, t_base, t_aux, l1, norm)
        self.step += 1
        return {"step": self.step, "loss": total.item(), "base": t_base.item(),
                "aux": t_aux.item(), "l1": l1.item(), "grad_norm": norm.item(),
                "lr": float(self.opt.learning_rate.item())}

    def save_checkpoint(self, path):
        """Trainable weights, optimizer state and step, atomically."""
        with atomic_folder(path) as tmp:
            mx.save_safetensors(str(tmp / "params.safetensors"),
                                dict(tree_flatten(self.params.parameters())))
            state = {k: v for k, v in tree_flatten(self.opt.state) if isinstance(v, mx.array)}
            mx.save_safetensors(str(tmp / "optimizer.safetensors"), state)
            (tmp / "state.json").write_text(json.dumps({"step": self.step, "seed": self.seed}))

    def load_checkpoint(self, path):
        path = Path(path)
        self.params.load_weights(list(mx.load(str(path / "params.safetensors")).items()))
        state = mx.load(str(path / "optimizer.safetensors"))
        self.opt.state = tree_unflatten(list(state.items()))
        self.step = json.loads((path / "state.json").read_text())["step"]

    def run(self, log=None, checkpoint=None, every=50, time_limit=None, stop_step=None):
        """Train to `steps` (or until `time_limit` seconds); log(record) per step; checkpoint
        every `every` steps and at the end."""
        run_training(self, log, checkpoint, every, time_limit, stop_step)


def run_training(trainer, log=None, checkpoint=None, every=50, time_limit=None, stop_step=None):
    """The loop both trainers (MLX and torch mirror) share: step, check, log, checkpoint.
    It ends at `steps`, after `time_limit` seconds, or at `stop_step` (a stage of a recipe that
    was stopped early: its learning-rate schedule still spans `steps`)."""
    start = time.perf_counter()
    while trainer.step < trainer.steps:
        rec = trainer.train_step()
        rec["elapsed_s"] = time.perf_counter() - start
        if not all(math.isfinite(rec[k]) for k in ("loss", "grad_norm")):
            raise FloatingPointError(f"loss became {rec['loss']} at step {rec['step']}")
        if log:
            log(rec)
        out_of_time = (time_limit is not None and rec["elapsed_s"] >= time_limit
                       or stop_step is not None and trainer.step >= stop_step)
        if checkpoint and (trainer.step % every == 0 or trainer.step == trainer.steps
                           or out_of_time):
            trainer.save_checkpoint(checkpoint)
        if out_of_time:
            break
