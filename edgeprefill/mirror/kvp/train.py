"""Torch mirror of edgeprefill.kvp.train: the paper's loss and a resumable trainer, so KV
Prediction can be trained on an NVIDIA GPU. Same loss terms, schedule and checkpoint contents
(as torch files) as the MLX trainer."""

import copy
import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from edgeprefill.fsio import atomic_folder
from edgeprefill.mirror.kvp.aux import AuxModel


class AuxView(torch.nn.Module):
    """A mirror Transformer whose blocks `layers` are trainable copies; the rest is the base's."""

    def __init__(self, base, layers):
        super().__init__()
        self.copies = torch.nn.ModuleDict(
            {str(k): copy.deepcopy(base.model.layers[k]) for k in layers})
        object.__setattr__(self, "_base", base)
        self.copied = list(layers)
        self.train_copies(True)

    def train_copies(self, flag):
        """Make the copies trainable (or not), except a k_norm (qwen3), which stays the base's:
        the base cache holds the copy's keys normalized by the base's k_norm, so the copy's
        own cache agrees with it only while the two norms are equal."""
        self.copies.requires_grad_(flag)
        for layer in self.copies.values():
            norm = getattr(layer.self_attn, "k_norm", None)
            if norm is not None:
                norm.requires_grad_(False)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_base"), name)

    def block(self, i, h, **kwargs):
        base = self._base
        if str(i) not in self.copies:
            return base.block(i, h, **kwargs)
        layers = base.model.layers
        saved = layers[i]
        layers[i] = self.copies[str(i)]
        try:
            return base.block(i, h, **kwargs)
        finally:
            layers[i] = saved

    def aux_weights(self):
        return {f"layers.{k}.{n}": p for k in self.copied
                for n, p in self.copies[str(k)].state_dict().items()}

    def load_aux_weights(self, weights):
        """Load {'layers.<k>.<name>': numpy array} (aux_weights' names) into the copies;
        refuses names that differ from the copies' own (convert.aux_to_torch brings MLX's)."""
        mine = self.aux_weights()
        if set(weights) != set(mine):
            diff = sorted(set(weights) ^ set(mine))[:3]
            raise ValueError(f"the aux copies' weights do not match the mirror's blocks: {diff}")
        with torch.no_grad():
            for name, w in weights.items():
                mine[name].copy_(torch.from_numpy(np.asarray(w, dtype=np.float32)))


def trainable_aux(aux, layers=None):
    return AuxModel(AuxView(aux.model, aux.layers if layers is None else layers), aux.layers,
                    aux.kind)


def _kl(p_logits, q_logits):
    lp = torch.log_softmax(p_logits, dim=-1)
    lq = torch.log_softmax(q_logits, dim=-1)
    return (lp.exp() * (lp - lq)).sum(-1).mean()


def self_exact_mask(L, device, window=1):
    """As edgeprefill.kvp.train.self_exact_mask."""
    t = torch.arange(L, device=device)
    start = torch.div(t, window, rounding_mode="floor") * window
    predicted = t[None, :] < start[:, None]
    exact = (t[None, :] >= start[:, None]) & (t[None, :] <= t[:, None])
    return torch.cat([predicted, exact], dim=1)


def replaced_block(base, i, h, k, v, mask=None):
    """As edgeprefill.kvp.train.replaced_block."""
    k, v = k.to(h.dtype), v.to(h.dtype)
    if mask is None:
        return base.block(i, h, replace_kv=(k, v)).h
    return base.block(i, h, prefix_kv=(base.rotate_keys(i, k), v), mask=mask).h


def _head32(head, h):
    """Logits in float32 even under bf16 autocast: a KL of ~0.1 between two bf16 logit
    vectors (steps of 1/16 at |logit| 16) would be mostly rounding."""
    with torch.autocast(h.device.type, enabled=False):
        return head(h.float()).float()


def loss_terms(base, aux, predictor, x, y, objective="ce", aux_weight=1.0,
               kv_weight=1.0, self_kv="predicted", window=1):
    """(total, base term, aux term, mean per-layer L1), as the MLX loss_terms (the aux's head
    is skipped when aux_weight is 0)."""
    with torch.no_grad():
        h = base.embed(x)
        true = []
        for i in range(base.n_layers):
            out = base.block(i, h)
            h = out.h
            true.append((out.keys, out.values))
        exact = _head32(base.head, h) if objective == "kl" else None
    aux_out = aux.forward(x, None, predictor.hidden_layers())
    hb = base.embed(x)
    mask = self_exact_mask(x.shape[1], x.device, window) if self_kv == "exact" else None
    l1 = 0.0
    for i, k, v in predictor.base_kv(aux_out):
        tk, tv = true[i]
        if base.has_qk_norm:
            kn = base.model.layers[i].self_attn.k_norm
            k_cmp, tk = kn(k), kn(tk)
        else:
            k_cmp = k
        l1 = l1 + (k_cmp.float() - tk.float()).abs().mean() + (v.float() - tv.float()).abs().mean()
        hb = replaced_block(base, i, hb, k, v, mask)
    V = base.vocab_size
    logits = _head32(base.head, hb)
    if objective == "kl":
        t_base = _kl(exact, logits)
    else:
        t_base = F.cross_entropy(logits.reshape(-1, V), y.reshape(-1))
    t_aux = torch.zeros((), device=logits.device)
    if aux_weight:
        aux_logits = _head32(aux.logits, aux_out.h)
        t_aux = (_kl(exact, aux_logits) if objective == "kl"
                 else F.cross_entropy(aux_logits.reshape(-1, V), y.reshape(-1)))
    l1 = l1 / base.n_layers
    return t_base + aux_weight * t_aux + kv_weight * l1, t_base, t_aux, l1


def lr_at(step, lr, steps, warmup):
    """The MLX schedule: linear warm-up from lr/100, then cosine to lr/10."""
    warmup = max(1, warmup)
    if step < warmup:
        return lr / 100 + (lr - lr / 100) * step / warmup
    t = min(1.0, (step - warmup) / max(1, steps - warmup))
    return lr / 10 + (lr - lr / 10) * 0.5 * (1 + math.cos(math.pi * t))


# fp32: everything in float32 (TF32 matmuls on a GPU); bf16: matmuls of the frozen base, the aux
# and the predictor under bfloat16 autocast, with float32 parameters, residual stream, norms,
# RoPE, logits and losses.
PRECISIONS = ("fp32", "bf16")


class Trainer:
    """Arguments as edgeprefill.kvp.train.Trainer; tensors live on `device`; `precision`: one of
    PRECISIONS."""

    def __init__(self, base, aux, predictor, windows, batch=8, steps=200, lr=3e-4, warmup=20,
                 weight_decay=0.1, clip=1.0, seed=0, device="cpu", objective="ce",
                 aux_weight=1.0, kv_weight=1.0, precision="fp32", self_kv="predicted",
                 window=1):
        from edgeprefill.kvp.train import SELF_KV, check_window

        check_window(self_kv, window)
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if self_kv not in SELF_KV:
            raise ValueError(f"self_kv must be one of {SELF_KV}, got {self_kv!r}")
        self.self_kv, self.window = self_kv, window
        self.objective, self.aux_weight, self.precision = objective, aux_weight, precision
        self.kv_weight = kv_weight
        self.base, self.aux, self.predictor = base, aux, predictor
        for p in base.parameters():
            p.requires_grad_(False)
        self.data = np.array(windows, dtype=np.int64)
        self.batch, self.steps, self.clip, self.seed = batch, steps, clip, seed
        self.lr, self.warmup, self.device = lr, warmup, device
        view = aux.model
        self.params = list(predictor.parameters()) + (
            list(view.copies.parameters()) if isinstance(view, AuxView) else [])
        self.opt = torch.optim.AdamW(self.params, lr=lr, betas=(0.9, 0.95),
                                     weight_decay=weight_decay)
        self.step = 0

    def batch_at(self, step):
        rng = np.random.default_rng((self.seed, step))
        rows = torch.from_numpy(self.data[rng.integers(0, len(self.data), size=self.batch)])
        rows = rows.to(self.device)
        return rows[:, :-1], rows[:, 1:]

    def train_step(self):
        x, y = self.batch_at(self.step)
        for g in self.opt.param_groups:
            g["lr"] = lr_at(self.step, self.lr, self.steps, self.warmup)
        with torch.autocast(x.device.type, dtype=torch.bfloat16,
                            enabled=self.precision == "bf16"):
            total, t_base, t_aux, l1 = loss_terms(self.base, self.aux, self.predictor, x, y,
                                                  self.objective, self.aux_weight, self.kv_weight,
                                                  self.self_kv, self.window)
        self.opt.zero_grad(set_to_none=True)
        total.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.opt.step()
        self.step += 1
        return {"step": self.step, "loss": total.item(), "base": t_base.item(),
                "aux": t_aux.item(), "l1": float(l1), "grad_norm": norm.item(),
                "lr": self.opt.param_groups[0]["lr"]}

    def _state(self):
        view = self.aux.model
        return {"predictor": self.predictor.state_dict(),
                "aux": view.copies.state_dict() if isinstance(view, AuxView) else {},
                "optimizer": self.opt.state_dict()}

    def save_checkpoint(self, path):
        with atomic_folder(path) as tmp:
            torch.save(self._state(), tmp / "checkpoint.pt")
            (tmp / "state.json").write_text(json.dumps({"step": self.step, "seed": self.seed}))

    def load_checkpoint(self, path):
        path = Path(path)
        try:  # tensors and plain containers only: a checkpoint never runs code when read
            state = torch.load(path / "checkpoint.pt", map_location=self.device,
                               weights_only=True)
        except Exception as e:  # noqa: BLE001
            from edgeprefill.errors import EdgeprefillError

            raise EdgeprefillError(f"cannot read {path / 'checkpoint.pt'} ({type(e).__name__}): "
                                   "the checkpoint is corrupted; start without --resume") from None
        self.predictor.load_state_dict(state["predictor"])
        view = self.aux.model
        if isinstance(view, AuxView):
            view.copies.load_state_dict(state["aux"])
        self.opt.load_state_dict(state["optimizer"])
        self.step = json.loads((path / "state.json").read_text())["step"]

    def run(self, log=None, checkpoint=None, every=50, time_limit=None, stop_step=None):
        from edgeprefill.kvp.train import run_training

        run_training(self, log, checkpoint, every, time_limit, stop_step)

