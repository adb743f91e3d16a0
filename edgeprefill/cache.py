"""Prompt caches: a prefilled prompt's KV cache saved to disk in mlx-lm's format, loaded back,
and reused for a new prompt through their longest common token prefix.

The file is mlx-lm's (`mlx_lm.models.cache.save_prompt_cache` / `load_prompt_cache`, which this
module calls): one safetensors file of per-layer KVCache states, with string metadata. mlx-lm
writes {"model", "tokenizer_config"}; edgeprefill adds the same two keys and one more,
"edgeprefill", a JSON object:

    model_id, config_hash   the model that made it (refused for another one)
    tokenizer_hash          its tokenizer (vocabulary and chat template)
    strategy, exact         the prefill that made it; exact is false for kvp and the like
    tokens                  the cached token ids (for prefix matching)

A cache written by mlx-lm has no "edgeprefill" key: its layers' shapes are checked against the
model, and the new prompt is taken to continue it (mlx-lm's own rule), since its tokens are not
recorded.
"""

import hashlib
import json
from pathlib import Path

from edgeprefill.errors import EdgeprefillError

META_KEY = "edgeprefill"


def _hash(obj):
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def model_hash(lm):
    """What makes two models' caches interchangeable: their config's shape fields and their
    weights (a checksum of the embedding's first rows: the same model under another path or
    hub id matches, another fine-tune does not)."""
    import mlx.core as mx
    import numpy as np

    c = lm.config
    keys = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "vocab_size", "rope_theta", "intermediate_size")
    emb = lm.model.model.model.embed_tokens.weight[:64]
    weights = hashlib.sha256(np.array(emb.astype(mx.float32)).tobytes()).hexdigest()[:16]
    return _hash({k: c.get(k) for k in keys} | {"weights": weights})


def tokenizer_hash(lm):
    """The model's tokenizer's vocabulary and chat template, hashed once per loaded model
    (sorting a 128k-token vocabulary takes a tenth of a second or more: too long to repeat on
    every cache read or write)."""
    if "_tokenizer_hash" not in lm.__dict__:
        tok = getattr(lm.tokenizer, "_tokenizer", lm.tokenizer)
        lm._tokenizer_hash = _hash([sorted(tok.get_vocab().items()),
                                    getattr(tok, "chat_template", None)])
    return lm._tokenizer_hash


def common_prefix(a, b):
    """Length of the longest common prefix of two token lists."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _base_layers(cache):
    """The mlx-lm KVCaches of a strategy's cache, refusing one whose layers skip positions."""
    from mlx_lm.models.cache import KVCache

    if hasattr(cache, "next_pos"):  # LazyCache, SelectedCache: not one K/V per prompt token
        raise EdgeprefillError("this cache skips prompt positions (lazy, gemfilter, specprefill "
                               "keep only some tokens): make prompt caches with full, mlx-lm, kvp "
                               "or kvp+specprefill")
    from mlx_lm.models.cache import QuantizedKVCache

    layers = list(cache)
    if not all(isinstance(c, (KVCache, QuantizedKVCache)) for c in layers):
        raise EdgeprefillError("only mlx-lm KVCache layers can be saved as a prompt cache")
    return layers


def _compact(c):
    """A copy of a KVCache (or QuantizedKVCache) whose buffers end at its offset (mlx-lm's
    state is the whole preallocated buffer)."""
    from mlx_lm.models.cache import KVCache, QuantizedKVCache

    if isinstance(c, QuantizedKVCache):
        out = QuantizedKVCache(group_size=c.group_size, bits=c.bits)
        if c.offset:
            out.keys, out.values = (tuple(x[..., :c.offset, :] for x in t)
                                    for t in (c.keys, c.values))
            out.offset = c.offset
        return out
    out = KVCache()
    if c.offset:
        # new array objects (slices), never the same ones: mlx-lm writes a cache's next tokens
        # with item assignment, which changes the array object in place, so a shared object
        # would let a reused copy overwrite the entry it came from
        out.keys, out.values = c.keys[..., :c.offset, :], c.values[..., :c.offset, :]
        out.offset = c.offset
    return out


def _nbytes(layers):
    """Bytes of K/V of compact layers (quantized ones hold tuples of arrays)."""
    total = 0
    for c in layers:
        for t in (c.keys, c.values):
            total += sum(x.nbytes for x in t) if isinstance(t, (tuple, list)) else t.nbytes
    return total


def save_cache(path, lm, cache, tokens, strategy="full", exact=True, max_bytes=None):
    """Write a prompt cache file (atomically: a temporary file, then a rename).

    Args:
        path: the .safetensors file.
        lm: the LoadedModel that made it.
        cache: the strategy's cache (its base layers are saved; kvp's aux cache is not).
        tokens: the token ids it holds.
        strategy, exact: what made it.
        max_bytes: refuse a cache larger than this, before anything is written.
    Returns:
        The bytes of K/V written.
    """
    from mlx_lm.models.cache import save_prompt_cache

    from edgeprefill.fsio import atomic_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise EdgeprefillError(f"a prompt cache file ends in .safetensors (got {path.name}): "
                               "rename it")
    layers = [_compact(c) for c in _base_layers(cache)]
    if len(tokens) != layers[0].offset:
        raise ValueError(f"{len(tokens)} tokens for a cache of {layers[0].offset}")
    nbytes = _nbytes(layers)
    if max_bytes is not None and nbytes > max_bytes:
        raise EdgeprefillError(f"the prompt cache would take {nbytes / 2**20:.1f} MiB, over the "
                               f"budget of {max_bytes / 2**20:.1f} MiB: raise --max-cache-mb or "
                               "cache a shorter prompt")
    meta = {"model": str(lm.path),  # what mlx-lm loads for --prompt-cache-file
            "tokenizer_config": json.dumps({}),
            META_KEY: json.dumps({"model_id": lm.model_id, "config_hash": model_hash(lm),
                                  "tokenizer_hash": tokenizer_hash(lm),
                                  "strategy": strategy, "exact": bool(exact),
                                  "tokens": [int(t) for t in tokens]})}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        save_prompt_cache(str(tmp), layers, meta)
    return nbytes


def load_cache(path, lm):
    """(PromptCache, info) of a prompt cache file for `lm`.

    info: the "edgeprefill" metadata (strategy, exact, tokens, ...), or for a cache written by
    mlx-lm {"strategy": "mlx-lm", "exact": True, "tokens": None}. A file that is missing,
    corrupt, or made for another model or tokenizer raises a one-line EdgeprefillError.
    """
    import mlx.core as mx
    from mlx_lm.models.cache import load_prompt_cache

    from edgeprefill.prefill.base import PromptCache

    path = Path(path)
    if not path.is_file():
        raise EdgeprefillError(f"no prompt cache at {path}: make one with `edgeprefill "
                               "cache-prompt`")
    try:
        layers, meta = load_prompt_cache(str(path), return_metadata=True)
        mx.eval([c.state for c in layers])  # read all now: the read is the load's time
    except Exception as e:  # safetensors' and mlx's errors for a damaged or foreign file
        raise EdgeprefillError(f"{path} is not a readable prompt cache ({type(e).__name__}): "
                               "make it again with `edgeprefill cache-prompt`") from None
    try:
        info = json.loads(meta[META_KEY]) if META_KEY in meta else None
    except (TypeError, ValueError):
        raise EdgeprefillError(f"{path}: its edgeprefill metadata is damaged: make it again")
    m = lm.model
    if info is not None:
        if info.get("config_hash") != model_hash(lm):
            raise EdgeprefillError(f"{path} was made for {info.get('model_id')}, not "
                                   f"{lm.model_id}: make a cache with this model")
        if info.get("tokenizer_hash") != tokenizer_hash(lm):
            raise EdgeprefillError(f"{path} was made with another tokenizer than "
                                   f"{lm.model_id}'s: make a cache with this model")
    else:
        info = {"strategy": "mlx-lm", "exact": True, "tokens": None, "model_id": meta.get("model")}
    shape = (m.n_kv_heads, m.head_dim)

    def kv_shape(c):  # (kv heads, head dim) of a layer; a quantized one packs its last axis
        if c.keys is None:
            return None
        if isinstance(c.keys, (tuple, list)):  # mlx-lm loads a quantized layer's as a list
            return (c.keys[0].shape[1], c.keys[1].shape[-1] * c.group_size)
        return tuple(c.keys.shape[1::2])

    if len(layers) != m.n_layers or any(kv_shape(c) != shape for c in layers):
        raise EdgeprefillError(f"{path} does not fit {lm.model_id} ({len(layers)} layers of "
                               f"other K/V shapes): make a cache with this model")
    cache = PromptCache(layers)
    if info["tokens"] is not None:
        if len(info["tokens"]) != layers[0].offset:
            raise EdgeprefillError(f"{path}: its token list does not match its K/V: make it again")
        cache.tokens = list(info["tokens"])
    return cache, info


def reuse(cache, info, prompt_ids):
    """Match a loaded cache against a prompt: (cache trimmed to the reused prefix, the prompt
    tokens still to prefill, reused count). With recorded tokens the longest common prefix is
    kept (at least one prompt token is always left to prefill, for the first token's logits);
    without (an mlx-lm cache) the prompt continues the cache."""
    prompt_ids = list(prompt_ids)
    if info.get("tokens") is None:
        return cache, prompt_ids, cache[0].offset
    n = min(common_prefix(cache.tokens, prompt_ids), len(prompt_ids) - 1)
    trim_to(cache, n)
    return cache, prompt_ids[n:], n


def trim_to(cache, n):
    """Trim a PromptCache (its aux cache too) to its first n tokens, in place."""
    drop = cache[0].offset - n
    if drop > 0:
        for c in cache:
            c.trim(drop)
    aux = getattr(cache, "aux", None)
    if aux and aux[0].offset > n:
        for c in aux:
            c.trim(aux[0].offset - n)
    del cache.tokens[n:]


def can_continue(strategy):
    """True where `strategy` continues an exact base cache it did not make (full, mlx-lm)."""
    from edgeprefill.prefill.full import FullPrefill, MlxLmPrefill

    return isinstance(strategy, (FullPrefill, MlxLmPrefill))


def continuing(strategy, lm):
    """The strategy that prefills the tokens after a loaded cache: `strategy` where it
    continues an exact base cache (full, mlx-lm), else `full` (kvp, lazy and the selection
    strategies continue only caches they made themselves)."""
    from edgeprefill.prefill.full import FullPrefill

    return strategy if can_continue(strategy) else FullPrefill(lm.model)


class PrefixCache:
    """Prompt caches kept in memory, bounded in bytes, least recently used out first: a new
    prompt reuses the longest common prefix among them (the Python API's `prompt_cache=`; a
    chat's next turn, a document asked about many times).

    Args:
        max_bytes: the K/V bytes kept (default 1 GiB).
    """

    def __init__(self, max_bytes=2**30):
        from collections import OrderedDict

        self.max_bytes = max_bytes
        self.entries = OrderedDict()  # tuple(tokens) -> (layers, nbytes, info)
        self.nbytes = 0

    def __len__(self):
        return len(self.entries)

    def lookup(self, ids, exact_only=False):
        """(a PromptCache holding the longest cached prefix of `ids`, info) or (None, None).
        At least one token of `ids` is left to prefill; the stored entry is not changed.
        exact_only: consider only caches an exact strategy made."""
        from edgeprefill.prefill.base import PromptCache

        ids = list(ids)
        best, n = None, 0
        for key, (_, _, info) in self.entries.items():
            if exact_only and not info["exact"]:
                continue
            k = min(common_prefix(key, ids), len(ids) - 1)
            if k > n:
                best, n = key, k
        if best is None:
            return None, None
        self.entries.move_to_end(best)
        layers, _, info = self.entries[best]
        cache = PromptCache([_compact(c) for c in layers])
        cache.tokens = list(best)
        trim_to(cache, n)
        return cache, info

    def store(self, cache, strategy="full", exact=True):
        """Keep a copy of `cache` (its tokens: cache.tokens). Returns False (nothing kept)
        for a cache whose layers skip positions, one without a token list, or one larger than
        the budget; older entries go first to make room. Entries it extends go too (a
        conversation keeps its latest turn): every lookup they served, it serves, unless they
        are exact and it is not. Nothing is added where an entry already extends it."""
        try:
            layers = [_compact(c) for c in _base_layers(cache)]
        except EdgeprefillError:
            return False
        tokens = tuple(getattr(cache, "tokens", ()))
        if not tokens or len(tokens) != layers[0].offset:
            return False
        nbytes = _nbytes(layers)
        if nbytes > self.max_bytes:
            return False
        covering = next((k for k, (_, _, inf) in self.entries.items() if len(k) >= len(tokens)
                         and k[:len(tokens)] == tokens and (inf["exact"] or not exact)), None)
        if covering is not None:  # an entry holds these tokens and more, as exact: it serves
            self.entries.move_to_end(covering)
            return True
        for key in [k for k, (_, _, inf) in self.entries.items() if len(k) <= len(tokens)
                    and tokens[:len(k)] == k and (exact or not inf["exact"])]:
            self.nbytes -= self.entries.pop(key)[1]
        while self.entries and self.nbytes + nbytes > self.max_bytes:
            self.nbytes -= self.entries.popitem(last=False)[1][1]
        self.entries[tokens] = (layers, nbytes, {"strategy": strategy, "exact": bool(exact)})
        self.nbytes += nbytes
        return True


class CannotHeal(EdgeprefillError):
    """A cache with no K/V per prompt token (lazy and selection skip tokens): it cannot
    heal."""


def heal(lm, cache, chunk_size=None):
    """The exact K/V of the tokens an approximate cache holds (a full prefill of
    cache.tokens): a PromptCache that replaces it, keeping its aux cache (kvp's next turn
    continues from there). Only caches with one K/V per token (kvp's, a file's) heal; a lazy
    or selection cache raises CannotHeal."""
    if hasattr(cache, "next_pos"):
        raise CannotHeal("this cache skips prompt positions (lazy, gemfilter, specprefill keep "
                         "only some tokens): it cannot be healed")
    _base_layers(cache)
    if not cache.tokens or len(cache.tokens) != cache[0].offset:
        raise EdgeprefillError("this cache has no token list to recompute: it cannot be healed")
    healed = _heal_tokens(lm, list(cache.tokens), chunk_size)
    healed.aux = getattr(cache, "aux", None)
    return healed


class Healer:
    """heal() in a background thread (on its own MLX stream), while the user reads an answer.

    take(cache) returns the healed cache once it is ready and `cache` still holds exactly the
    tokens it was started from (a turn boundary), else None.
    """

    def __init__(self, lm, cache):
        import threading

        _base_layers(cache)
        self.lm, self.tokens, self.result, self.error = lm, list(cache.tokens), None, None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        import mlx.core as mx

        try:
            with mx.stream(mx.new_stream(mx.default_device())):
                self.result = _heal_tokens(self.lm, self.tokens)
        except Exception as e:  # noqa: BLE001  (reported by take's caller)
            self.error = e

    def done(self):
        return not self.thread.is_alive()

    def wait(self):
        self.thread.join()
        if self.error is not None:
            raise self.error

    def take(self, cache):
        if not self.done() or self.result is None or list(cache.tokens) != self.tokens:
            return None
        self.result.aux = getattr(cache, "aux", None)
        return self.result


def _heal_tokens(lm, tokens, chunk_size=None):
    import mlx.core as mx

    from edgeprefill.prefill.full import FullPrefill

    healed, _, _ = FullPrefill(lm.model, chunk_size).prefill(tokens)
    mx.eval([c.keys_and_values() for c in healed])
    return healed


KV_BITS = (4, 8)


def quantize(cache, bits, group_size=None):
    """Quantize a cache's base layers in place to `bits` (mlx-lm's QuantizedKVCache, as its
    --kv-bits): decoding then reads 4- or 8-bit keys and values. Group size: 64 where the head
    dimension allows, else 32. Lazy and selection caches (their layers skip positions) and
    caches of other layer kinds are refused."""
    from mlx_lm.models.cache import KVCache

    if bits not in KV_BITS:
        raise EdgeprefillError(f"--kv-bits must be 4 or 8 (got {bits})")
    if hasattr(cache, "next_pos"):
        raise EdgeprefillError("--kv-bits quantizes full, mlx-lm, kvp and runahead caches; this "
                               "strategy's layers skip positions: drop --kv-bits or pick one")
    hd = cache[0].keys.shape[-1]
    group = group_size or (64 if hd % 64 == 0 else 32)
    if hd % group:
        raise EdgeprefillError(f"--kv-bits needs a head dimension divisible by 32 (this model's "
                               f"is {hd}): drop --kv-bits")
    for i, c in enumerate(cache):
        if isinstance(c, KVCache):
            cache[i] = c.to_quantized(group_size=group, bits=bits)
    return cache
