"""A multi-turn conversation over one prefill strategy: its messages, the caches that carry
from turn to turn (only a turn's new tokens are prefilled), and saving / loading both in one
safetensors file (written to a temporary file, then renamed). `edgeprefill chat` drives it."""

import json
import os
from pathlib import Path

from edgeprefill.errors import EdgeprefillError

SAVE_FORMAT = "edgeprefill-chat/1"


class Conversation:
    """Messages, the caches after the last turn and the strategy that prefills each turn.

    Args:
        lm: LoadedModel.
        name: the strategy's name.
        build: callable(name) -> a built strategy (default: registry.build(name, lm)).
        system: optional system message.
    """

    def __init__(self, lm, name="full", build=None, system=None):
        from edgeprefill.prefill.registry import build as build_named

        self.lm, self.system = lm, system
        self.build = build or (lambda n: build_named(n, lm))
        self.messages, self.cache, self.strategy = [], None, None
        self.exact = True  # every token of the cache was prefilled exactly (or healed)
        self.auto_heal, self.healer = False, None
        self.totals = {"turns": 0, "prompt_tokens": 0, "generated_tokens": 0, "ttft_s": 0.0,
                       "decode_s": 0.0}
        self.set_strategy(name)

    def set_strategy(self, name):
        """Switch strategy (built first, so a bad name keeps the old one; the old one is then
        closed). Caches are per strategy (kvp keeps an aux cache, lazy token subsets), so the
        next turn prefills the conversation again."""
        new = self.build(name)
        if hasattr(self.strategy, "close"):
            self.strategy.close()
        self.strategy, self.strategy_name, self.cache = new, name, None
        self.exact, self.healer = True, None

    def reset(self):
        self.messages, self.cache, self.exact, self.healer = [], None, True, None

    def heal(self):
        """Replace the cache by the exact prefill of its tokens now (edgeprefill.cache.heal);
        returns the tokens healed."""
        from edgeprefill.cache import heal

        if self.cache is None:
            return 0
        self.healer = None
        self.cache = heal(self.lm, self.cache)
        self.exact = True
        return len(self.cache.tokens)

    def _swap_healed(self):
        """At a turn boundary: the background healer's exact cache, if it is ready."""
        if self.healer is None or self.cache is None:
            return
        healed = self.healer.take(self.cache)
        self.healer = None  # ready or not: the cache changes with this turn
        if healed is not None:
            self.cache, self.exact = healed, True

    def close(self):
        if hasattr(self.strategy, "close"):
            self.strategy.close()

    def prompt_ids(self, text):
        """(conversation ids with the new user message, the tokens to prefill: what the cache
        lacks). The cache is trimmed to the common prefix when the re-rendered conversation
        differs from what it holds."""
        from edgeprefill.generate import build_prompt

        ids = build_prompt(self.lm.tokenizer, text, system=self.system, history=self.messages)
        self._swap_healed()
        return ids, self._new_tokens(ids)

    def _new_tokens(self, ids):
        """Tokens to prefill: what the cache lacks; the cache is trimmed to the common prefix
        when the re-rendered conversation differs from what it holds."""
        from edgeprefill.cache import common_prefix, trim_to

        if self.cache is None:
            return ids
        held = self.cache.tokens
        n = common_prefix(held, ids)
        if n == len(held) and n < len(ids):
            return ids[n:]
        if not getattr(self.cache, "trimmable", True) or n == 0:
            self.cache = None
            return ids
        n = min(n, len(ids) - 1)  # at least one new token to prefill
        trim_to(self.cache, n)
        return ids[n:]

    def finish_turn(self, text, reply, result):
        """Record a turn: the user's text, the reply, and the caches (`result` None when the
        reply was stopped: what was said is kept and the next turn re-syncs)."""
        msgs = self.messages + [{"role": "user", "content": text},
                                {"role": "assistant", "content": reply}]
        if result is None:
            c = self.cache
            if c is not None and c[0].offset != len(c.tokens):  # stopped inside the prefill
                self.cache = None
        else:
            self.cache = result.cache
            self.exact = self.exact and self._strategy_exact()
            if self.auto_heal and not self.exact:
                self._start_healer()
            st = result.stats()
            for k in ("prompt_tokens", "generated_tokens", "ttft_s", "decode_s"):
                self.totals[k] += st[k]
            self.totals["turns"] += 1
        self.messages = msgs

    def _strategy_exact(self):
        from edgeprefill.prefill.registry import parse

        return parse(self.strategy_name)[0].exact

    def _start_healer(self):
        from edgeprefill.cache import Healer

        try:
            self.healer = Healer(self.lm, self.cache)
        except EdgeprefillError:  # lazy and selection caches skip positions: nothing to heal
            self.healer = None

    def summary(self):
        """The session's totals in one line."""
        t = self.totals
        dec = t["generated_tokens"] / t["decode_s"] if t["decode_s"] else 0.0
        return (f"turns {t['turns']} | prompt tokens {t['prompt_tokens']} | TTFT total "
                f"{t['ttft_s']:.2f} s (mean {t['ttft_s'] / max(1, t['turns']) * 1e3:.0f} ms) | "
                f"generated {t['generated_tokens']} tok, {dec:.1f} tok/s | context "
                f"{len(self.cache.tokens) if self.cache is not None else 0}")

    # /save and /load: the conversation plus every cache array, in one safetensors file
    def save(self, path):
        import mlx.core as mx

        from edgeprefill.kvp.artifact import config_hash

        meta = {"format": SAVE_FORMAT, "model": self.lm.model_id,
                "config_hash": config_hash(self.lm.model), "strategy": self.strategy_name,
                "system": self.system, "messages": self.messages}
        arrays = {}
        cache = self.cache
        if cache is not None and getattr(cache, "trimmable", True):
            meta["tokens"] = list(cache.tokens)
            for name, layers in (("base", cache), ("aux", getattr(cache, "aux", None) or [])):
                for i, c in enumerate(layers):
                    k, v = c.keys_and_values()
                    arrays[f"{name}.{i}.keys"], arrays[f"{name}.{i}.values"] = k, v
        path = Path(path).expanduser()
        if path.is_dir():
            raise EdgeprefillError(f"cannot save the chat to {path}: it is a folder; give a file "
                                   "name (the conversation is kept)")
        if not path.parent.is_dir():
            raise EdgeprefillError(f"cannot save the chat to {path}: folder {path.parent} does "
                                   "not exist; create it or pick another (the conversation is "
                                   "kept)")
        tmp = path.with_name(f".{path.name}.tmp.safetensors")
        try:
            mx.save_safetensors(str(tmp), arrays or {"empty": mx.zeros((1,))},
                                metadata={"edgeprefill": json.dumps(meta)})
            os.replace(tmp, path)
        except (OSError, RuntimeError, ValueError) as e:
            reason = getattr(e, "strerror", None) or str(e).splitlines()[0][:120]
            raise EdgeprefillError(f"cannot save the chat to {path} ({reason}): pick a writable "
                                   "file (the conversation is kept)") from None
        finally:
            tmp.unlink(missing_ok=True)
        return len(arrays) > 0

    def load(self, path):
        import mlx.core as mx
        from mlx_lm.models.cache import KVCache

        from edgeprefill.kvp.artifact import config_hash
        from edgeprefill.prefill import PromptCache

        path = Path(path)
        if not path.is_file():
            raise EdgeprefillError(f"{path} does not exist: give a file written by /save")
        try:
            arrays, meta = mx.load(str(path), return_metadata=True)
            meta = json.loads(meta["edgeprefill"])
        except Exception:
            raise EdgeprefillError(f"{path} is not a saved edgeprefill chat: give a file "
                                   "written by /save") from None
        if not isinstance(meta, dict) or meta.get("format") != SAVE_FORMAT:
            raise EdgeprefillError(f"{path} has format "
                                   f"{meta.get('format') if isinstance(meta, dict) else meta!r}, "
                                   f"expected {SAVE_FORMAT!r}: give a file written by /save")
        check_saved_chat(path, meta, arrays, self.lm.model)
        if meta["config_hash"] != config_hash(self.lm.model):
            raise EdgeprefillError(f"{path} was saved with model {meta['model']}: start chat "
                                   "with that model to load it")
        if meta["strategy"] != self.strategy_name:
            self.set_strategy(meta["strategy"])
        self.system, self.messages = meta["system"], meta["messages"]
        self.cache = None
        if "tokens" in meta:
            def layers(name):
                out = []
                while f"{name}.{len(out)}.keys" in arrays:
                    c = KVCache()
                    c.update_and_fetch(arrays[f"{name}.{len(out)}.keys"],
                                       arrays[f"{name}.{len(out)}.values"])
                    out.append(c)
                return out

            cache = PromptCache(layers("base"))
            cache.tokens = list(meta["tokens"])
            aux = layers("aux")
            cache.aux = aux or None
            self.cache = cache
        return meta


def check_saved_chat(path, meta, arrays, model):
    """Refuse a /save file whose fields or cache arrays do not fit together (one line naming
    the field), so a wrong file never gives a wrong reply."""
    def bad(field, expected):
        raise EdgeprefillError(f"{path}: field '{field}' is not {expected}: give a file written "
                               "by /save")

    if not isinstance(meta.get("config_hash"), str):
        bad("config_hash", "a string")
    if not isinstance(meta.get("strategy"), str):
        bad("strategy", "a strategy name")
    if meta.get("system") is not None and not isinstance(meta["system"], str):
        bad("system", "text or null")
    msgs = meta.get("messages")
    if not isinstance(msgs, list) or not all(
            isinstance(m, dict) and m.get("role") in ("user", "assistant")
            and isinstance(m.get("content"), str) for m in msgs):
        bad("messages", "a list of {role: user|assistant, content: text}")
    if "tokens" not in meta:
        return
    tokens = meta["tokens"]
    if not isinstance(tokens, list) or not all(isinstance(t, int) and 0 <= t < model.vocab_size
                                               for t in tokens):
        bad("tokens", "a list of token ids of this model")
    for i in range(model.n_layers):
        k, v = arrays.get(f"base.{i}.keys"), arrays.get(f"base.{i}.values")
        want = (1, model.n_kv_heads, len(tokens), model.head_dim)
        if k is None or v is None or tuple(k.shape) != want or tuple(v.shape) != want:
            bad(f"base.{i}", f"a cache of {len(tokens)} tokens for this model")
    if f"base.{model.n_layers}.keys" in arrays:
        bad(f"base.{model.n_layers}", "absent (the model has fewer layers)")
