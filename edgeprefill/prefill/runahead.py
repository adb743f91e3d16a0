"""`runahead`: KV-Runahead parallel prefill (Cho et al., ICML 2024) over mx.distributed, and the
`tsp` baseline it is compared with.

p workers (ranks of an mx.distributed group, e.g. started by `mlx.launch --backend ring`) each
hold the whole model. The prompt is split into p contiguous chunks, earlier ones larger (later
tokens attend to more keys). Per layer, rank r receives from rank r-1 the rotated K/V of every
position before its chunk, appends its own (causal inside the chunk, full over the prefix) and
sends the concatenation on to rank r+1 (point-to-point). The last rank ends with the full cache
and the first token's logits; decoding runs there.

`tsp` (tensor/sequence-parallel baseline): an even split; per layer every rank all-gathers all
K/V and attends its queries densely over all N keys, masking the future.

Bytes moved per layer (K and V of one token = b bytes): runahead sum_{r<p-1} end_r * b
(= (p-1)N/2 * b for an even split), tsp (p-1)N * b.
"""

import time

import mlx.core as mx
from edgeprefill.prefill.base import PrefillStats, PromptCache
from edgeprefill.prefill.full import as_token_array
from edgeprefill.distributed.partition import (balanced_partition, even_partition,  # noqa: F401
                                               resolve_partition)

# How the prefix K/V moves between ranks: point-to-point send/recv (the paper; ring, MPI), or,
# on NCCL with MLX's CUDA backend (0.32: no Send/Recv on the GPU), an all-sum between the two
# ranks in which the receiver contributes zeros -- the same bytes each way over a duplex link
# and the same rendezvous, so two-worker timings are those of a send.
HANDOFFS = ("sendrecv", "allsum")


def kv_bytes_per_token(model):
    """Bytes of one token's K and V in one layer."""
    return 2 * model.n_kv_heads * model.head_dim * mx.zeros((), model.dtype).itemsize


def runahead_bytes(model, sizes):
    """Bytes runahead sends over all layers for chunk `sizes`."""
    ends = [sum(sizes[:r + 1]) for r in range(len(sizes))]
    return sum(ends[:-1]) * kv_bytes_per_token(model) * model.n_layers


def kvp_runahead_bytes(kvp, sizes):
    """Bytes runahead-kvp sends for chunk `sizes` of the aux's tokens: the aux layers' K/V
    handed on layer by layer plus the predicted base layers' K/V (one message per rank)."""
    ends = [sum(sizes[:r + 1]) for r in range(len(sizes))]
    aux, pred = kvp.aux, kvp.predictor
    per_token = (kv_bytes_per_token(aux.model) * aux.n_layers
                 + kv_bytes_per_token(kvp.model) * len(pred.predicted))
    return sum(ends[:-1]) * per_token


def tsp_bytes(model, n, p):
    """Bytes tsp's all-gathers deliver over all layers (each rank receives the others' K/V)."""
    return (p - 1) * n * kv_bytes_per_token(model) * model.n_layers


class RunaheadPrefill:
    """One rank's part of a KV-Runahead prefill.

    Args:
        model: edgeprefill.models.Transformer (every rank holds the whole model).
        group: an mx.distributed group (None: mx.distributed.init()).
        partition: chunk lengths, or a callable (n, p) -> lengths; default balanced.
    """

    name = "runahead"

    def __init__(self, model, group=None, partition=None, handoff="sendrecv"):
        self.model = model
        self.group = group or mx.distributed.init()
        self.partition = partition
        if handoff not in HANDOFFS:
            raise ValueError(f"handoff must be one of {HANDOFFS}, not {handoff!r}")
        self.handoff = handoff

    def _send(self, kv, dst):
        """Hand the prefix K/V to rank dst (an array to evaluate)."""
        if self.handoff == "allsum":  # two ranks: the sum with the receiver's zeros is kv
            return mx.distributed.all_sum(kv, group=self.group)
        return mx.distributed.send(kv, dst, group=self.group)

    def _recv(self, shape, dtype, src):
        if self.handoff == "allsum":
            return mx.distributed.all_sum(mx.zeros(shape, dtype=dtype), group=self.group)
        return mx.distributed.recv(shape, dtype, src, group=self.group)

    def sizes(self, n):
        return resolve_partition(self.partition, n, self.group.size(), self.model.config)

    def take_prefix(self, layer_cache, s0, r, model=None):
        """Rank r > 0: receive the rotated K/V of positions 0..s0-1 of one layer of `model`
        (default: the base) from rank r-1 into `layer_cache` (a fresh KVCache)."""
        if r > 0:
            m = model or self.model
            kv = self._recv((2, m.n_kv_heads, s0, m.head_dim), m.dtype, r - 1)
            layer_cache.update_and_fetch(kv[0:1], kv[1:2])

    def pass_on(self, layer_cache, h, r, p, stats):
        """After a layer: rank r < p-1 sends the prefix plus its chunk's K/V (one message, K
        and V stacked) to rank r+1; every rank evaluates the layer before the next one."""
        if r < p - 1:
            kv = mx.concatenate(layer_cache.keys_and_values(), axis=0)
            mx.eval(h, self._send(kv, r + 1))
            stats.extra["bytes_sent"] += kv.nbytes
        else:
            mx.eval(h, layer_cache.keys_and_values())

    def _begin(self, prompt_ids, cache, counter):
        """(start time, ids, n, sizes, rank, stats) shared by runahead and tsp."""
        if cache is not None:
            raise ValueError(f"{self.name} prefills a fresh conversation (no earlier cache)")
        start = time.perf_counter()
        ids = as_token_array(prompt_ids)
        n = ids.shape[0]
        sizes = self.sizes(n)
        r = self.group.rank()
        stats = PrefillStats(self.name, n, n, 0.0, {"sizes": sizes, "rank": r, counter: 0})
        return start, ids, n, sizes, r, stats

    def prefill(self, prompt_ids, cache=None, progress=None):
        """Runs on every rank. The last rank returns (full cache, logits, stats); the others
        return (None, None, stats) once their chunk has been handed on."""
        g, m = self.group, self.model
        start, ids, n, sizes, r, stats = self._begin(prompt_ids, cache, "bytes_sent")
        p = len(sizes)
        if self.handoff == "allsum" and g.size() != 2:
            raise ValueError("the all-sum hand-off (NCCL on CUDA, where MLX has no Send/Recv) "
                             "runs 2 workers: use 2, or the ring backend for more")
        if r >= p:  # more workers than useful: this rank has nothing to do
            stats.ttft_s = time.perf_counter() - start
            return None, None, stats
        s0 = sum(sizes[:r])
        h = m.embed(ids[s0:s0 + sizes[r]][None])
        cache = PromptCache(m.make_cache())
        for i in range(m.n_layers):
            self.take_prefix(cache[i], s0, r)
            h = m.block(i, h, cache=cache[i]).h
            self.pass_on(cache[i], h, r, p, stats)
        logits = None
        if r == p - 1:
            logits = m.head(h[:, -1:])[0, -1].astype(mx.float32)
            mx.eval(logits)
            cache.tokens.extend(ids.tolist())
        else:
            cache = None
        stats.ttft_s = time.perf_counter() - start
        return cache, logits, stats


class TspPrefill(RunaheadPrefill):
    """The tsp baseline: even split, all-gather of K/V per layer, dense attention with a mask."""

    name = "tsp"

    def sizes(self, n):
        return even_partition(n, self.group.size())

    def prefill(self, prompt_ids, cache=None, progress=None):
        g, m = self.group, self.model
        start, ids, n, sizes, r, stats = self._begin(prompt_ids, cache, "bytes_received")
        p_all = g.size()
        c = max(sizes)  # all-gather needs equal shapes: pad every chunk to the largest
        s0 = sum(sizes[:r]) if r < len(sizes) else n
        mine = sizes[r] if r < len(sizes) else 0
        tok = ids[s0:s0 + mine]
        if mine < c:
            tok = mx.concatenate([tok, mx.zeros((c - mine,), dtype=mx.int32)])
        h = m.embed(tok[None])
        qpos = mx.arange(s0, s0 + c)
        # key j of the gathered layout: rank j // c, offset j % c -> its absolute position
        kpos = mx.array([sum(sizes[:q]) + o if q < len(sizes) and o < sizes[q] else n + 1
                         for q in range(p_all) for o in range(c)])
        mask = kpos[None, :] <= qpos[:, None]
        keep = [q * c + o for q in range(len(sizes)) for o in range(sizes[q])]
        # the gathered keys plus this rank's own (appended by the block, masked out: the
        # gathered copy already holds them) -- dense scores over every position, then the mask
        mask = mx.concatenate([mask, mx.zeros((c, c), dtype=mx.bool_)], axis=1)
        cache = PromptCache(m.make_cache())
        H = m.n_kv_heads
        for i in range(m.n_layers):
            k, v = m.project_kv(i, h)
            k_rot = m.rotate_keys(i, k, positions=qpos)
            gk = mx.distributed.all_gather(k_rot[0], group=g)  # (p*Hkv, c, hd)
            gv = mx.distributed.all_gather(v[0], group=g)
            gk = gk.reshape(p_all, H, c, -1).transpose(1, 0, 2, 3).reshape(1, H, p_all * c, -1)
            gv = gv.reshape(p_all, H, c, -1).transpose(1, 0, 2, 3).reshape(1, H, p_all * c, -1)
            stats.extra["bytes_received"] += (p_all - 1) * (k_rot.nbytes + v.nbytes)
            h = m.block(i, h, positions=qpos, replace_kv=(k, v), prefix_kv=(gk, gv),
                        mask=mask).h
            if r == len(sizes) - 1:
                sel = mx.array(keep)
                cache[i].update_and_fetch(gk[:, :, sel], gv[:, :, sel])
            mx.eval(h)
        logits = None
        if r == len(sizes) - 1:
            logits = m.head(h[:, mine - 1:mine])[0, -1].astype(mx.float32)
            mx.eval(logits, [x.keys_and_values() for x in cache])
            cache.tokens.extend(ids.tolist())
        else:
            cache = None
        stats.ttft_s = time.perf_counter() - start
        return cache, logits, stats




class RunaheadKVPrediction(RunaheadPrefill):
    """`kvp` whose aux prefill runs as KV-Runahead (the composition of sections 1 and 3 of
    shared/PAPERS.md), one rank's part.

    The aux's N-1 prompt tokens (prompt[:-tail]) are split into runahead chunks. Per aux layer,
    rank r receives that layer's prefix K/V from rank r-1, runs its chunk, and sends the
    concatenation on (exactly as `runahead` does over the base's layers). Each rank then
    predicts the deep base layers' K/V for its own chunk (the predictor is per position) and
    hands them on in ONE message for all predicted layers (prefix + own chunk). The last rank
    ends with the aux cache, the base cache (a truncated aux's exact layers copied from the aux
    cache, the rest predicted) and runs the base step on the last `tail` tokens: the same cache
    and logits as single-process `kvp`.

    Args:
        kvp: an edgeprefill.prefill.KVPrediction (model, aux, predictor, tail).
        group, partition, handoff: as RunaheadPrefill (the partition splits the aux's tokens).
    """

    name = "runahead-kvp"

    def __init__(self, kvp, group=None, partition=None, handoff="sendrecv"):
        super().__init__(kvp.model, group, partition, handoff)
        self.kvp = kvp

    def prefill(self, prompt_ids, cache=None, progress=None):
        """Runs on every rank; the last useful rank returns (cache with .aux, logits, stats),
        the others (None, None, stats)."""
        kvp, m, g = self.kvp, self.model, self.group
        if cache is not None:
            raise ValueError(f"{self.name} prefills a fresh conversation (no earlier cache)")
        start = time.perf_counter()
        ids = as_token_array(prompt_ids)
        n = ids.shape[0]
        tail = min(kvp.tail, n)
        n_aux = n - tail
        sizes = self.sizes(n_aux) if n_aux else [0]
        p, r = len(sizes), g.rank()
        if self.handoff == "allsum" and g.size() != 2:
            raise ValueError("the all-sum hand-off (NCCL on CUDA, where MLX has no Send/Recv) "
                             "runs 2 workers: use 2, or the ring backend for more")
        stats = PrefillStats(self.name, n, n, 0.0, {"sizes": sizes, "rank": r, "bytes_sent": 0,
                                                    "aux": kvp.aux.kind, "tail": tail})
        if r >= p:  # more workers than useful
            stats.ttft_s = time.perf_counter() - start
            return None, None, stats
        s0 = sum(sizes[:r])
        aux_cache = kvp.aux.make_cache()
        base_cache = PromptCache(m.make_cache())
        base_cache.aux = aux_cache
        if sizes[r]:
            out = kvp.aux.forward(
                ids[s0:s0 + sizes[r]][None], aux_cache, kvp.predictor.hidden_layers(),
                before_layer=lambda a: self.take_prefix(aux_cache[a], s0, r, kvp.aux.model),
                after_layer=lambda a, o: self.pass_on(aux_cache[a], o.h, r, p, stats))
            self._hand_on_predictions(out, s0, r, p, base_cache, aux_cache, stats)
        if r < p - 1:
            stats.ttft_s = time.perf_counter() - start
            return None, None, stats
        logits = kvp.base_step(ids[n_aux:], base_cache)
        base_cache.tokens.extend(ids.tolist())
        stats.ttft_s = time.perf_counter() - start
        return base_cache, logits, stats

    def _hand_on_predictions(self, out, s0, r, p, base_cache, aux_cache, stats):
        """The predicted base layers' K/V for positions 0..s0+chunk-1 as one (Lp, 2, Hkv, S, hd)
        message: the prefix from rank r-1, this rank's chunk appended, sent on to rank r+1; the
        last rank fills the base cache (exact layers from its aux cache)."""
        m, plan = self.model, self.kvp.predictor
        kv = None
        if plan.predicted:
            kv = mx.stack(self.kvp.predicted_stacked(out, s0), axis=1)  # (Lp, 2, Hkv, c, hd)
            if r > 0:
                shape = (len(plan.predicted), 2, m.n_kv_heads, s0, m.head_dim)
                kv = mx.concatenate([self._recv(shape, m.dtype, r - 1), kv], axis=3)
        if r < p - 1:
            if kv is not None:
                mx.eval(self._send(kv, r + 1))
                stats.extra["bytes_sent"] += kv.nbytes
            return
        for s, i in enumerate(plan.predicted):
            base_cache[i].update_and_fetch(kv[s, 0:1], kv[s, 1:2])
        for i in plan.exact:  # the aux layer's own (full) cache
            base_cache[i].update_and_fetch(*aux_cache[plan.layer_map[i]].keys_and_values())
        mx.eval([c.keys_and_values() for c in base_cache])


class StreamRunahead:
    """KV-Runahead across streams of one process (Apple silicon: a GPU and a CPU stream over
    unified memory; elsewhere CPU streams). Each rank is a thread that creates its own stream
    (MLX streams belong to the thread that made them) and runs its chunk layer by layer; the
    prefix K/V of each layer is handed to the next rank in memory (a queue of evaluated arrays,
    no copy). The last rank ends with the full cache and the first token's logits.

    Args:
        model: edgeprefill.models.Transformer.
        devices: one MLX device per rank, e.g. ("gpu", "cpu"); default: ("gpu", "cpu") where
            MLX has a GPU, else ("cpu", "cpu").
        partition: chunk lengths or a callable (n, p) -> lengths; default FLOP-balanced.
    """

    name = "runahead-streams"

    def __init__(self, model, devices=None, partition=None):
        self.model = model
        if devices is None:
            devices = ("gpu", "cpu") if mx.default_device() == mx.gpu else ("cpu", "cpu")
        self.devices = [getattr(mx, d) if isinstance(d, str) else d for d in devices]
        self.partition = partition

    def sizes(self, n):
        return resolve_partition(self.partition, n, len(self.devices), self.model.config,
                                 "streams")

    def prefill(self, prompt_ids, cache=None, progress=None):
        import queue
        import threading

        if cache is not None:
            raise ValueError(f"{self.name} prefills a fresh conversation (no earlier cache)")
        m = self.model
        start = time.perf_counter()
        ids = as_token_array(prompt_ids)
        mx.eval(ids)  # no lazy work of this thread's stream may reach the ranks' threads
        n = ids.shape[0]
        sizes = self.sizes(n)
        p = len(sizes)
        inbox = [queue.Queue() for _ in range(p)]
        out, errors = {}, []

        def rank(r):
            try:
                with mx.stream(mx.new_stream(self.devices[r])):
                    s0 = sum(sizes[:r])
                    h = m.embed(ids[s0:s0 + sizes[r]][None])
                    layers = PromptCache(m.make_cache())
                    for i in range(m.n_layers):
                        if r > 0:
                            k, v = inbox[r].get()
                            if k is None:  # the previous rank failed
                                return
                            layers[i].update_and_fetch(k, v)
                        h = m.block(i, h, cache=layers[i]).h
                        if r < p - 1:
                            k, v = layers[i].keys_and_values()
                            mx.eval(h, k, v)
                            inbox[r + 1].put((k, v))
                        else:
                            mx.eval(h, layers[i].keys_and_values())
                    if r == p - 1:
                        logits = m.head(h[:, -1:])[0, -1].astype(mx.float32)
                        mx.eval(logits)
                        out["cache"], out["logits"] = layers, logits
            except Exception as e:  # noqa: BLE001  (re-raised in the calling thread)
                errors.append(e)
                if r < p - 1:
                    inbox[r + 1].put((None, None))

        threads = [threading.Thread(target=rank, args=(r,), daemon=True) for r in range(p)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        cache = out["cache"]
        cache.tokens.extend(ids.tolist())
        if progress:
            progress(n, n)
        stats = PrefillStats(self.name, n, n, time.perf_counter() - start,
                             {"sizes": sizes, "devices": [str(d) for d in self.devices]})
        return cache, out["logits"], stats
