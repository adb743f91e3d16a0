"""KV Prediction training path (MLX and torch mirror), the mirror's kvp strategy, kvp train."""
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch

from edgeprefill.kvp.aux import AuxModel, make_aux
from edgeprefill.kvp.predictor import KVPredictor
from edgeprefill.loading import load
from edgeprefill.prefill.kv_prediction import KVPrediction


def _identity(m):
    aux = AuxModel(m, range(m.n_layers), "identity")
    return aux, KVPredictor.identity(list(range(m.n_layers)), m.n_kv_heads, m.head_dim)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_identity_on_the_training_path(tiny_models, family):
    """With aux = base, identity map and predictor, the training forward (K/V replaced by the
    predictions) gives the base's own CE, the aux CE equals it, and the L1 term is zero."""
    from edgeprefill.kvp.train import loss_terms

    m = load(str(tiny_models[family])).model
    rng = np.random.default_rng(0)
    ids = mx.array(rng.integers(3, m.vocab_size, size=(2, 17)))
    x, y = ids[:, :-1], ids[:, 1:]
    total, ce_b, ce_a, l1 = loss_terms(m, *_identity(m), x, y)
    kl_total, kl_b, kl_a, _ = loss_terms(m, *_identity(m), x, y, objective="kl")
    assert kl_b.item() < 1e-5 and kl_a.item() < 1e-5
    ce = nn.losses.cross_entropy(m(x).astype(mx.float32), y).mean()
    assert abs(ce_b.item() - ce.item()) < 1e-4 and abs(ce_a.item() - ce.item()) < 1e-4
    assert l1.item() < 1e-6 and abs(total.item() - 2 * ce.item()) < 1e-4


def test_mirror_loss_equals_mlx_loss(tiny_models):
    from edgeprefill.kvp.train import loss_terms
    from edgeprefill.mirror.convert import mirror_from_mlx, predictor_to_torch
    from edgeprefill.mirror.kvp.aux import AuxModel as TAux
    from edgeprefill.mirror.kvp.train import loss_terms as t_loss_terms

    m = load(str(tiny_models["qwen3"])).model
    aux, _, _ = make_aux(m, "LP-0.50")
    pred = KVPredictor([0, 0, 1, 1], aux.kv_dim, m.n_kv_heads, m.head_dim)  # random init
    rng = np.random.default_rng(1)
    ids = rng.integers(3, m.vocab_size, size=(2, 13))
    got = loss_terms(m, aux, pred, mx.array(ids[:, :-1]), mx.array(ids[:, 1:]))
    tm = mirror_from_mlx(m)
    want = t_loss_terms(tm, TAux(tm, aux.layers, aux.kind), predictor_to_torch(pred),
                        torch.tensor(ids[:, :-1]), torch.tensor(ids[:, 1:]))
    for a, b in zip(got, want):  # paper loss
        assert abs(a.item() - float(b)) < 1e-3 * max(1.0, abs(a.item()))
    got = loss_terms(m, aux, pred, mx.array(ids[:, :-1]), mx.array(ids[:, 1:]), "kl")
    want = t_loss_terms(tm, TAux(tm, aux.layers, aux.kind), predictor_to_torch(pred),
                        torch.tensor(ids[:, :-1]), torch.tensor(ids[:, 1:]), "kl")
    for a, b in zip(got, want):  # distillation
        assert abs(a.item() - float(b)) < 1e-3 * max(1.0, abs(a.item()))
    # aux weight 0 skips the aux's head on both sides: its term reads 0, the rest is unchanged
    got0 = loss_terms(m, aux, pred, mx.array(ids[:, :-1]), mx.array(ids[:, 1:]), "kl", 0.0)
    want0 = t_loss_terms(tm, TAux(tm, aux.layers, aux.kind), predictor_to_torch(pred),
                         torch.tensor(ids[:, :-1]), torch.tensor(ids[:, 1:]), "kl", 0.0)
    for a, b, full in zip(got0, want0, got):
        assert abs(a.item() - float(b)) < 1e-3 * max(1.0, abs(a.item()))
    assert got0[2].item() == 0 and abs(got0[1].item() - got[1].item()) < 1e-6
    assert abs(got0[0].item() - (got[1] + got[3]).item()) < 1e-5
    got_kv = loss_terms(m, aux, pred, mx.array(ids[:, :-1]), mx.array(ids[:, 1:]), "kl", 0.0,
                        kv_weight=0.1)
    want_kv = t_loss_terms(tm, TAux(tm, aux.layers, aux.kind), predictor_to_torch(pred),
                           torch.tensor(ids[:, :-1]), torch.tensor(ids[:, 1:]), "kl", 0.0, 0.1)
    for total in (got_kv[0].item(), float(want_kv[0])):
        assert abs(total - (got[1] + 0.1 * got[3]).item()) < 1e-4


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_self_kv_exact_is_what_inference_computes(tiny_models, family):
    """With self_kv 'exact' the training forward at position t is what KV Prediction computes
    for a prompt ending at t (predicted K/V before it, its own exact K/V): the last position's
    logits equal the kvp strategy's first-token logits, where 'predicted' (the paper: every K/V
    replaced, the query's own too) differs; the identity pair stays exact; MLX and the mirror
    agree on the loss."""
    from edgeprefill.kvp.fit import fit_ridge
    from edgeprefill.kvp.pairs import build_predictor
    from edgeprefill.kvp.train import loss_terms, replaced_block, self_exact_mask
    from edgeprefill.mirror.convert import mirror_from_mlx, predictor_to_torch
    from edgeprefill.mirror.kvp.aux import AuxModel as TAux
    from edgeprefill.mirror.kvp.train import loss_terms as t_loss_terms

    m = load(str(tiny_models[family])).model
    aux, pred = build_predictor(m, "T-0.50", "hidden2")
    rng = np.random.default_rng(5)
    pred, _ = fit_ridge(m, aux, pred, [rng.integers(3, 300, 24).tolist() for _ in range(3)])
    ids = rng.integers(3, m.vocab_size, size=13).tolist()
    _, want, _ = KVPrediction(m, aux, pred).prefill(ids)
    x = mx.array([ids])
    kv = {i: (k, v) for i, k, v in pred.base_kv(aux.forward(x, None, pred.hidden_layers()))}
    got = {}
    for name, mask in (("exact", self_exact_mask(len(ids))), ("predicted", None)):
        h = m.embed(x)
        for i in range(m.n_layers):
            h = replaced_block(m, i, h, *kv[i], mask)
        got[name] = np.array(m.head(h)[0, -1])
    np.testing.assert_allclose(got["exact"], np.array(want).reshape(-1), atol=1e-4, rtol=1e-4)
    assert np.abs(got["predicted"] - got["exact"]).max() > 1e-3
    y = mx.array([ids[1:] + [3]])
    _, kl_id, _, _ = loss_terms(m, *_identity(m), x, y, "kl", self_kv="exact")
    assert kl_id.item() < 1e-5
    a = loss_terms(m, aux, pred, x, y, "kl", 0.0, 0.1, "exact")
    tm = mirror_from_mlx(m)
    b = t_loss_terms(tm, TAux(tm, aux.layers, aux.kind), predictor_to_torch(pred),
                     torch.tensor(np.array(x)), torch.tensor(np.array(y)), "kl", 0.0, 0.1,
                     "exact")
    for u, w in zip(a, b):
        assert abs(u.item() - float(w)) < 1e-3 * max(1.0, abs(u.item()))
    p = loss_terms(m, aux, pred, x, y, "kl", 0.0, 0.1)
    assert abs(p[1].item() - a[1].item()) > 1e-6 and abs(p[3].item() - a[3].item()) < 1e-6


def test_train_tail_window_is_what_an_exact_tail_computes(tiny_models):
    """With an exact window of T (kvp train --train-tail T) position t of each block of T is
    trained as KV Prediction runs a prompt ending at t with an exact tail of (t mod T) + 1:
    T at a block's last position, 2 one past a block's start; MLX and the mirror agree on
    the loss, which differs from the tail-1 loss; a window with the paper's 'predicted' is
    refused."""
    from edgeprefill.kvp.fit import fit_ridge
    from edgeprefill.kvp.pairs import build_predictor
    from edgeprefill.kvp.train import Trainer, loss_terms, replaced_block, self_exact_mask
    from edgeprefill.mirror.convert import mirror_from_mlx, predictor_to_torch
    from edgeprefill.mirror.kvp.aux import AuxModel as TAux
    from edgeprefill.mirror.kvp.train import loss_terms as t_loss_terms

    m = load(str(tiny_models["llama"])).model
    aux, pred = build_predictor(m, "T-0.50", "hidden2")
    rng = np.random.default_rng(7)
    pred, _ = fit_ridge(m, aux, pred, [rng.integers(3, 300, 24).tolist() for _ in range(3)])
    ids = rng.integers(3, m.vocab_size, size=14).tolist()
    x = mx.array([ids])
    kv = {i: (k, v) for i, k, v in pred.base_kv(aux.forward(x, None, pred.hidden_layers()))}
    h = m.embed(x)
    mask = self_exact_mask(len(ids), 4)
    for i in range(m.n_layers):
        h = replaced_block(m, i, h, *kv[i], mask)
    logits = np.array(m.head(h)[0])
    for t, tail in ((11, 4), (9, 2), (12, 1)):
        _, want, _ = KVPrediction(m, aux, pred, tail=tail).prefill(ids[:t + 1])
        np.testing.assert_allclose(logits[t], np.array(want).reshape(-1), atol=1e-4, rtol=1e-4)
    y = mx.array([ids[1:] + [3]])
    a = loss_terms(m, aux, pred, x, y, "kl", 0.0, 0.1, "exact", window=4)
    tm = mirror_from_mlx(m)
    b = t_loss_terms(tm, TAux(tm, aux.layers, aux.kind), predictor_to_torch(pred),
                     torch.tensor(np.array(x)), torch.tensor(np.array(y)), "kl", 0.0, 0.1,
                     "exact", window=4)
    for u, w in zip(a, b):
        assert abs(u.item() - float(w)) < 1e-3 * max(1.0, abs(u.item()))
    one = loss_terms(m, aux, pred, x, y, "kl", 0.0, 0.1, "exact")
    assert abs(one[1].item() - a[1].item()) > 1e-6
    with pytest.raises(ValueError, match="window"):
        Trainer(m, aux, pred, [ids], self_kv="predicted", window=4)


def test_mirror_bf16_autocast_keeps_the_loss_and_its_gradient(tiny_models):
    """--precision bf16 (matmuls under bfloat16 autocast, float32 logits and losses) gives the
    float32 loss to bf16 accuracy and a gradient pointing the same way, on CPU here (CUDA on a
    GPU machine)."""
    from edgeprefill.mirror.convert import mirror_from_mlx, predictor_to_torch
    from edgeprefill.mirror.kvp.aux import AuxModel as TAux
    from edgeprefill.mirror.kvp.train import Trainer

    m = load(str(tiny_models["llama"])).model
    aux, _, _ = make_aux(m, "T-0.50")
    pred = KVPredictor([0, 0, 1, 1], aux.kv_dim, m.n_kv_heads, m.head_dim)
    windows = np.random.default_rng(2).integers(3, m.vocab_size, size=(8, 33)).tolist()
    tm = mirror_from_mlx(m)
    grads, losses = {}, {}
    for prec in ("fp32", "bf16"):
        tp = predictor_to_torch(pred)
        t = Trainer(tm, TAux(tm, aux.layers, aux.kind), tp, windows, batch=4, lr=1e-9,
                    warmup=1, objective="kl", aux_weight=0.0, precision=prec)
        losses[prec] = t.train_step()
        grads[prec] = torch.cat([p.grad.flatten() for p in tp.parameters()])
    a, b = losses["fp32"], losses["bf16"]
    assert a["aux"] == 0 == b["aux"]
    assert abs(a["loss"] - b["loss"]) < 0.03 * a["loss"] and a["loss"] != b["loss"]
    cos = torch.nn.functional.cosine_similarity(grads["fp32"], grads["bf16"], dim=0)
    assert cos > 0.98
    with pytest.raises(ValueError, match="precision"):
        Trainer(tm, TAux(tm, aux.layers, aux.kind), tp, windows, precision="fp16")


@pytest.mark.parametrize("kind,source", [("LP-0.50", "kv"), ("T-0.50", "hidden")])
def test_mirror_kvp_strategy_equals_mlx(tiny_models, kind, source):
    """Parity of the kvp path, a second turn included (the aux catches up on the gap)."""
    from edgeprefill.kvp.fit import fit_ridge
    from edgeprefill.kvp.pairs import build_predictor
    from edgeprefill.mirror.convert import mirror_from_mlx, predictor_to_torch
    from edgeprefill.mirror.kvp.aux import AuxModel as TAux
    from edgeprefill.mirror.prefill.kv_prediction import KVPrediction as TKVP

    lm = load(str(tiny_models["llama"]))
    m = lm.model
    aux, pred = build_predictor(m, kind, source)
    rng = np.random.default_rng(2)
    pred, _ = fit_ridge(m, aux, pred, [rng.integers(3, 300, 32).tolist() for _ in range(4)])
    tm = mirror_from_mlx(m)
    ours = KVPrediction(m, aux, pred, tail=2)
    theirs = TKVP(tm, TAux(tm, aux.layers, aux.kind), predictor_to_torch(pred), tail=2)
    c1, l1, _ = ours.prefill([5, 17, 200, 3, 99, 42, 7])
    t1, tl1, _ = theirs.prefill([5, 17, 200, 3, 99, 42, 7], cache=theirs.make_cache(64))
    np.testing.assert_allclose(tl1.numpy(), np.array(l1), atol=2e-4, rtol=2e-4)
    for c in (c1, t1):
        c.tokens.append(11)  # a decoded token the aux has not seen
    mx.eval(m(mx.array([[11]]), c1))
    with torch.no_grad():
        tm(torch.tensor([[11]]), t1)
    _, l2, s2 = ours.prefill([8, 9, 10, 12], cache=c1)
    _, tl2, ts2 = theirs.prefill([8, 9, 10, 12], cache=t1)
    assert s2.extra["aux_tokens"] == ts2.extra["aux_tokens"] == 2 + 1 + 2
    np.testing.assert_allclose(tl2.numpy(), np.array(l2), atol=2e-4, rtol=2e-4)


def test_mlx_training_lowers_the_loss_and_resumes(tiny_models, tmp_path):
    from edgeprefill.kvp.train import Trainer, trainable_aux

    m = load(str(tiny_models["llama"])).model
    aux, layer_map, exact = make_aux(m, "LP-0.50")
    pred = KVPredictor(layer_map, aux.kv_dim, m.n_kv_heads, m.head_dim)
    rng = np.random.default_rng(3)
    windows = [list(np.tile(rng.integers(3, 300, 5), 4)[:17]) for _ in range(4)]
    t_aux = trainable_aux(aux)
    before = mx.array(m.layers[0].self_attn.k_proj.weight)
    tr = Trainer(m, t_aux, pred, windows, batch=4, steps=30, lr=3e-3, warmup=2)
    logs = []
    tr.run(log=logs.append, checkpoint=tmp_path / "ck", every=10)
    assert logs[-1]["loss"] < logs[0]["loss"]
    assert mx.array_equal(before, m.layers[0].self_attn.k_proj.weight)  # base frozen
    assert not mx.array_equal(before, t_aux.model.layers[0].self_attn.k_proj.weight)
    # resume from the step-30 checkpoint into a fresh trainer: same state, continues
    pred2 = KVPredictor(layer_map, aux.kv_dim, m.n_kv_heads, m.head_dim)
    tr2 = Trainer(m, trainable_aux(aux), pred2, windows, batch=4, steps=32, lr=3e-3, warmup=2)
    tr2.load_checkpoint(tmp_path / "ck")
    assert tr2.step == 30
    assert mx.allclose(tr2.predictor.k_proj[1].weight, pred.k_proj[1].weight)
    tr2.run()
    assert tr2.step == 32


def test_wide_fitting_set_never_contains_held_out_text():
    """The wide set (every stdlib module but the held-out ones) holds no line of the held-out
    text: in particular not the held-out language-reference topics, which pydoc_data/topics.py
    stores as string literals (it was in the wide set before 2026-11-27)."""
    import random
    import sysconfig
    from pathlib import Path

    from edgeprefill.data import (
        BENCH_MODULES,
        FIT_MODULES,
        prose_text,
        stdlib_text,
        wide_fit_modules,
    )

    wide = wide_fit_modules()
    held = {Path(m).stem for m in BENCH_MODULES}
    assert len(wide) > 5 * len(FIT_MODULES)
    assert not any(Path(m).stem in held or any(h in Path(m).stem for h in held) for m in wide)
    assert not any(part in ("test", "tests", "idlelib", "lib2to3", "pydoc_data")
                   for m in wide for part in Path(m).parts[:-1])
    root = Path(sysconfig.get_paths()["stdlib"])
    assert {m for m in FIT_MODULES if (root / m).is_file()} <= set(wide)
    text = "\n".join((root / m).read_text(encoding="utf-8", errors="replace") for m in wide)

    def lines(t, n):  # distinctive lines: long, mostly letters, no quotes or escapes
        return [x.strip() for x in t.splitlines() if len(x.strip()) >= n
                and sum(c.isalpha() for c in x) >= 20 and not set("'\"\\") & set(x)]

    prose = lines(prose_text(heldout=True), 50)
    code = random.Random(0).sample(lines(stdlib_text(BENCH_MODULES), 60), 200)
    assert len(prose) > 100
    assert [x for x in prose + code if x in text] == []


def test_site_fitting_set_reads_installed_packages_only(tiny_models):
    """--data site: the wide set plus installed packages' sources (never edgeprefill, tests,
    pydoc_data or held-out module names) and their METADATA descriptions."""

    from edgeprefill.data import _site_code_ids, fit_chunks, site_fit_files

    code, meta = site_fit_files()
    assert len(code) > 100 and meta
    assert not any(p in ("tests", "test", "pydoc_data") for f in code for p in f.parts)
    assert not any("edgeprefill" in f.parts[-2] or f.stem in ("argparse", "textwrap")
                   for f in code)
    assert all(f.name == "METADATA" and f.parent.name.endswith(".dist-info") for f in meta)
    tok = load(str(tiny_models["llama"])).tokenizer
    ids = _site_code_ids(tok, 3000)
    assert len(ids) == 3000 and ids == _site_code_ids(tok, 3000)  # the same files every run
    assert _site_code_ids(tok, 0) == []  # a budget the wide set already fills
    with pytest.raises(ValueError, match="pick one of default, wide, site"):
        fit_chunks(tok, 1000, 64, "everything")


def test_fitting_windows_are_cached_and_keyed_by_what_they_depend_on(tiny_models, tmp_path,
                                                                     monkeypatch):
    """fit_chunks(cache=folder) tokenizes once: a second call with the same set, budget and
    tokenizer reads the .npy back (the same windows) without encoding anything; another
    budget, window or tokenizer is another entry; a damaged entry is rebuilt, and a cache that
    cannot be written leaves the run going."""
    from edgeprefill.data import fit_chunks

    tok = load(str(tiny_models["llama"])).tokenizer
    plain = fit_chunks(tok, 2000, 65, "default")
    first = fit_chunks(tok, 2000, 65, "default", cache=tmp_path)
    assert first.dtype == np.int32 and first.tolist() == plain
    assert [f.suffix for f in tmp_path.iterdir()] == [".npy"]  # no temporary file left

    class Counting:  # the same tokenizer, counting its encode calls
        def __init__(self, t):
            self.t, self.vocab_size, self.calls = t, t.vocab_size, 0

        def encode(self, text):
            self.calls += 1
            return self.t.encode(text)

    counting = Counting(tok)
    again = fit_chunks(counting, 2000, 65, "default", cache=tmp_path)
    assert counting.calls == 1 and np.array_equal(again, first)  # the key's probe only
    assert len(fit_chunks(tok, 2000, 33, "default", cache=tmp_path)[0]) == 33
    shifted = Counting(tok)  # a tokenizer that splits text differently: its own entry
    shifted.encode = lambda text: [i + 1 for i in tok.encode(text)]
    moved = fit_chunks(shifted, 2000, 65, "default", cache=tmp_path)
    assert len(list(tmp_path.glob("*.npy"))) == 3 and moved[0][0] == first[0][0] + 1
    entry = next(f for f in tmp_path.glob("fit-default-2000x65-*.npy")
                 if np.array_equal(np.load(f), first))
    entry.write_bytes(b"not a numpy file")  # a damaged entry is rebuilt, not trusted
    assert np.array_equal(fit_chunks(tok, 2000, 65, "default", cache=tmp_path), first)
    assert np.array_equal(np.load(entry), first)

    def full_disk(path, array):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("edgeprefill.fsio.atomic_save_npy", full_disk)
    assert fit_chunks(tok, 1000, 65, "default", cache=tmp_path).shape == (15, 65)  # still runs
    assert len(list(tmp_path.glob("*.npy"))) == 3


def test_trained_aux_copies_mirror_and_keep_the_base_k_norm(tiny_models):
    """A pair with trained copies of aux blocks (qwen3: QK-norm) runs the same on the mirror
    (aux_to_torch: the bench's and the export's path), and neither trainer moves a copy's
    k_norm off the base's (the base cache holds the copy's keys under the base's k_norm)."""
    from mlx.utils import tree_flatten, tree_unflatten

    from edgeprefill.kvp.fit import fit_ridge
    from edgeprefill.kvp.pairs import build_predictor
    from edgeprefill.kvp.train import Trainer, trainable_aux
    from edgeprefill.mirror.convert import mirror_from_mlx, pair_to_torch
    from edgeprefill.mirror.kvp.train import Trainer as TTrainer
    from edgeprefill.mirror.prefill.kv_prediction import KVPrediction as TKVP

    m = load(str(tiny_models["qwen3"])).model
    aux, pred = build_predictor(m, "T-0.50", "hidden2")
    aux = trainable_aux(aux, aux.layers[-1:])
    k = aux.model.copied[0]
    layer = aux.model.layers[k]
    layer.update(tree_unflatten([(n, w * 1.3) for n, w in
                                 tree_flatten(layer.trainable_parameters())]))
    rng = np.random.default_rng(4)
    windows = [rng.integers(3, 300, 17).tolist() for _ in range(4)]
    pred, _ = fit_ridge(m, aux, pred, windows)
    tm = mirror_from_mlx(m)
    taux, tpred = pair_to_torch(aux, pred, tm)
    prompt = [5, 17, 200, 3, 99, 42, 7, 8]
    _, logits, _ = KVPrediction(m, aux, pred).prefill(prompt)
    _, tlogits, _ = TKVP(tm, taux, tpred).prefill(prompt, cache=TKVP(tm, taux, tpred)
                                                  .make_cache(64))
    np.testing.assert_allclose(tlogits.numpy(), np.array(logits), atol=2e-4, rtol=2e-4)
    assert not any(p.requires_grad for p in taux.model.copies.parameters())  # inference

    base_norm = np.array(m.layers[k].self_attn.k_norm.weight)
    Trainer(m, aux, pred, windows, batch=2, steps=2, lr=1e-2, warmup=1).run()
    assert np.array_equal(np.array(aux.model.layers[k].self_attn.k_norm.weight), base_norm)
    taux.model.train_copies(True)
    copy = taux.model.copies[str(k)]
    q_before = copy.self_attn.q_proj.weight.detach().clone()
    TTrainer(tm, taux, tpred, windows, batch=2, steps=2, lr=1e-2, warmup=1).run()
    assert np.array_equal(copy.self_attn.k_norm.weight.detach().numpy(), base_norm)
    assert not torch.equal(copy.self_attn.q_proj.weight, q_before)  # the rest does train


def test_trained_kvp_c_copies_run_on_the_mirror(tiny_models, tmp_path):
    """A KVP-C pair whose aux blocks were trained (copies of the small model's blocks) runs the
    same on the mirror benchmark's path: the small model is mirrored, then its copies."""
    from mlx.utils import tree_flatten, tree_unflatten

    from edgeprefill.kvp.fit import fit_ridge
    from edgeprefill.kvp.pairs import build_predictor
    from edgeprefill.kvp.train import trainable_aux
    from edgeprefill.mirror.convert import mirror_from_mlx, pair_to_torch
    from edgeprefill.mirror.prefill.kv_prediction import KVPrediction as TKVP
    from edgeprefill.models.random import random_model_folder

    lm = load(str(tiny_models["llama"]))
    small = load(str(random_model_folder(tmp_path / "small", "llama", "tiny", seed=3,
                                         num_hidden_layers=2, hidden_size=32,
                                         intermediate_size=64)))
    m = lm.model
    aux, pred = build_predictor(m, "C", "kv", aux_lm=small, tokenizer=lm.tokenizer)
    aux = trainable_aux(aux)
    for k in aux.model.copied:
        layer = aux.model.layers[k]
        layer.update(tree_unflatten([(n, w * 1.3) for n, w in
                                     tree_flatten(layer.trainable_parameters())]))
    rng = np.random.default_rng(5)
    pred, _ = fit_ridge(m, aux, pred, [rng.integers(3, 300, 17).tolist() for _ in range(4)])
    tm = mirror_from_mlx(m)
    taux, tpred = pair_to_torch(aux, pred, tm)
    prompt = [5, 17, 200, 3, 99, 42, 7, 8]
    _, logits, _ = KVPrediction(m, aux, pred).prefill(prompt)
    theirs = TKVP(tm, taux, tpred)
    _, tlogits, _ = theirs.prefill(prompt, cache=theirs.make_cache(64))
    np.testing.assert_allclose(tlogits.numpy(), np.array(logits), atol=2e-4, rtol=2e-4)
