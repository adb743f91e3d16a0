"""`edgeprefill chat`: a rich terminal chat with per-turn TTFT, cache reuse across turns,
/commands, Ctrl-C to stop a reply, and /save + /load of the conversation with its caches."""

import json
import os
import select
import sys
import time
from pathlib import Path

from edgeprefill.apps.argtypes import fraction, non_negative, non_negative_float, positive
from edgeprefill.errors import EdgeprefillError

HELP = """commands:
  /help              this text
  /reset             forget the conversation (and its caches)
  /strategy NAME     prefill strategy: full, kvp, aux-only, lazy[-<schedule>|-K1:K2:K3], runahead
  /system TEXT       set the system message (starts a new conversation)
  /stats             session totals
  /save FILE         save the conversation and its caches
  /load FILE         load a saved conversation (no prefill needed)
  /quit              exit (Ctrl-D too)
input: a line is one message; paste multi-line text freely; or open a block with \"\"\" and
close it with \"\"\". Ctrl-C stops a reply (the session stays)."""
SAVE_FORMAT = "edgeprefill-chat/1"
# Seconds to wait after each streamed token: a knob for tests and demos of Ctrl-C.
DELAY_S = float(os.environ.get("EDGEPREFILL_DECODE_DELAY_S", "0") or 0)


def add_parser(sub):
    from edgeprefill.apps.shared import add_kvp_tail_arg, add_model_args

    p = sub.add_parser("chat", help="chat in the terminal (multi-turn, cache reuse)")
    add_model_args(p)
    p.add_argument("--strategy", default="full",
                   help="prefill strategy: full, kvp, aux-only, lazy[-<schedule>|-K1:K2:K3], "
                   "runahead (local worker processes; later turns extend the cache here)")
    p.add_argument("--workers", type=positive, default=2,
                   help="runahead: local worker processes, started once for the session")
    p.add_argument("--kvp", default=None, metavar="FOLDER",
                   help="KV Prediction artifact (default: the model's default pair)")
    add_kvp_tail_arg(p)
    p.add_argument("--system", default=None, help="system message")
    p.add_argument("--max-tokens", type=positive, default=512)
    p.add_argument("--temp", type=non_negative_float, default=0.0)
    p.add_argument("--top-p", type=fraction, default=1.0)
    p.add_argument("--seed", type=non_negative, default=None)
    p.add_argument("--prompt", default=None,
                   help="one turn, non-interactive ('-' reads stdin); piped stdin works too")
    p.set_defaults(run=run)


def common_prefix(a, b):
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class Session:
    """The conversation, its caches and the strategy that prefills each turn."""

    def __init__(self, lm, args, console):
        self.lm, self.args, self.console = lm, args, console
        self.system = args.system
        self.messages = []
        self.cache = None
        self.totals = {"turns": 0, "prompt_tokens": 0, "generated_tokens": 0, "ttft_s": 0.0,
                       "decode_s": 0.0}
        self.set_strategy(args.strategy)

    def set_strategy(self, name):
        from edgeprefill.apps.shared import strategy_options
        from edgeprefill.prefill import make_strategy

        old = getattr(self, "strategy", None)
        if name == "runahead":
            from edgeprefill.apps.runahead import PooledRunahead

            self.console.print(f"[dim]starting {self.args.workers} runahead workers ...[/dim]")
            t0 = time.perf_counter()
            new = PooledRunahead(self.lm, self.args.workers, say=lambda msg: self.console.print(
                f"[yellow]{msg}[/yellow]", highlight=False))
            self.console.print(f"[dim]runahead workers ready ({time.perf_counter() - t0:.1f} s; "
                               "the first prompt of a conversation runs on them)[/dim]")
        else:
            new = make_strategy(name, self.lm.model, **strategy_options(self.args, self.lm, name))
        if hasattr(old, "close"):
            old.close()
        self.args.strategy = name
        self.strategy = new
        self.strategy_name = name
        self.cache = None  # caches are per strategy (kvp keeps an aux cache, lazy subsets)

    def reset(self):
        self.messages, self.cache = [], None

    def close(self):
        if hasattr(self.strategy, "close"):
            self.strategy.close()

    def _new_tokens(self, ids):
        """Tokens to prefill: what the cache lacks; the cache is trimmed to the common prefix
        when the re-rendered conversation differs from what it holds."""
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
        drop = len(held) - n
        for c in self.cache:
            c.trim(drop)
        aux = getattr(self.cache, "aux", None)
        if aux and aux[0].offset > n:
            for c in aux:
                c.trim(aux[0].offset - n)
        del self.cache.tokens[n:]
        return ids[n:]

    def turn(self, text):
        """One user message: prefill the new tokens, stream the reply, print the status."""
        from rich.progress import BarColumn, Progress, TextColumn

        from edgeprefill.generate import build_prompt, stream_generate

        lm, args = self.lm, self.args
        msgs = self.messages + [{"role": "user", "content": text}]
        ids = build_prompt(lm.tokenizer, text, system=self.system, history=self.messages)
        new = self._new_tokens(ids)
        progress, bar = None, None
        if len(new) > 256 and self.console.is_terminal:
            bar = Progress(TextColumn("prefill"), BarColumn(), TextColumn(
                "{task.completed}/{task.total} tokens"), console=self.console, transient=True)
            task = bar.add_task("prefill", total=len(new))
            bar.start()
            progress = lambda done, total: bar.update(task, completed=done)  # noqa: E731
        result, reply, interrupted = None, [], False
        try:
            for event in stream_generate(lm.model, lm.tokenizer, new, self.strategy,
                                         cache=self.cache, max_tokens=args.max_tokens,
                                         temp=args.temp, top_p=args.top_p, seed=args.seed,
                                         progress=progress):
                if bar is not None:
                    bar.stop()
                    bar = None
                sys.stdout.write(event.text)
                sys.stdout.flush()
                reply.append(event.text)
                if DELAY_S:
                    time.sleep(DELAY_S)
                result = event.result or result
        except KeyboardInterrupt:
            interrupted = True
        finally:
            if bar is not None:
                bar.stop()
        sys.stdout.write("\n")
        if result is None:  # stopped mid-reply: keep what was said; the next turn re-syncs
            c = self.cache
            if c is not None and c[0].offset != len(c.tokens):  # stopped inside the prefill
                self.cache = None
            self.messages = msgs + [{"role": "assistant", "content": "".join(reply)}]
            self.console.print("[yellow](reply stopped)[/yellow]" if interrupted else "")
            return None
        self.cache = result.cache
        self.messages = msgs + [{"role": "assistant", "content": result.text}]
        st = result.stats()
        t = self.totals
        t["turns"] += 1
        t["prompt_tokens"] += st["prompt_tokens"]
        t["generated_tokens"] += st["generated_tokens"]
        t["ttft_s"] += st["ttft_s"]
        t["decode_s"] += st["decode_s"]
        from edgeprefill.apps.shared import stats_line

        note = " | context full" if result.finish_reason == "context" else ""
        self.console.print(f"[dim]{stats_line(st)} | context {st['context_tokens']}{note}[/dim]",
                           highlight=False)
        if result.finish_reason == "context":
            self.console.print("[yellow]the model's context window is full: /reset to start "
                               "a new conversation[/yellow]")
        return result

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


def read_message(prompt="> "):
    """One user message: a line; a pasted burst of lines; or a \"\"\" block."""
    line = input(prompt)
    if line.strip() == '"""':
        lines = []
        while True:
            nxt = input("")
            if nxt.strip() == '"""':
                return "\n".join(lines)
            lines.append(nxt)
    lines = [line]
    while sys.stdin in select.select([sys.stdin], [], [], 0.05)[0]:  # the rest of a paste
        more = sys.stdin.readline()
        if not more:
            break
        lines.append(more.rstrip("\n"))
    return "\n".join(lines)


def command(session, text):
    """Run a /command; returns False to quit."""
    name, _, arg = text[1:].partition(" ")
    arg = arg.strip()
    c = session.console
    say = lambda msg: c.print(msg, highlight=False)  # noqa: E731
    if name in ("quit", "exit", "q"):
        return False
    if name == "help":
        say(HELP)
    elif name == "reset":
        session.reset()
        say("[dim]conversation reset[/dim]")
    elif name == "strategy":
        if not arg:
            say(f"[dim]strategy: {session.strategy_name}[/dim]")
        else:
            session.set_strategy(arg)
            session.cache = None
            say(f"[dim]strategy {arg}: the next turn prefills the conversation with it[/dim]")
    elif name == "system":
        session.system = arg or None
        session.reset()
        say("[dim]system message set; conversation reset[/dim]")
    elif name == "stats":
        t = session.totals
        dec = t["generated_tokens"] / t["decode_s"] if t["decode_s"] else 0.0
        say(f"[dim]turns {t['turns']} | prompt tokens {t['prompt_tokens']} | TTFT total "
                f"{t['ttft_s']:.2f} s (mean {t['ttft_s'] / max(1, t['turns']) * 1e3:.0f} ms) | "
                f"generated {t['generated_tokens']} tok, {dec:.1f} tok/s | context "
                f"{len(session.cache.tokens) if session.cache is not None else 0}[/dim]")
    elif name == "save":
        if not arg:
            raise EdgeprefillError("/save needs a file name: /save FILE")
        with_cache = session.save(arg)
        say(f"[dim]saved {len(session.messages)} messages"
                f"{' and caches' if with_cache else ' (this strategy’s caches are not saved)'}"
                f" to {arg}[/dim]")
    elif name == "load":
        if not arg:
            raise EdgeprefillError("/load needs a file name: /load FILE")
        meta = session.load(arg)
        say(f"[dim]loaded {len(meta['messages'])} messages ({meta['strategy']}); "
                f"{'caches restored' if session.cache is not None else 'will prefill'}[/dim]")
    else:
        raise EdgeprefillError(f"unknown command /{name}: /help lists them")
    return True


def run(args):
    from rich.console import Console

    from edgeprefill.apps.shared import read_prompt, validate_sampling
    from edgeprefill.loading import load

    validate_sampling(args)
    console = Console(stderr=True, soft_wrap=True)
    one_shot = args.prompt is not None or not sys.stdin.isatty()
    text = None
    if one_shot:
        text = read_prompt(args.prompt if args.prompt is not None else "-")
        if not text.strip():
            raise EdgeprefillError("the prompt is empty: pass --prompt TEXT or pipe text in")
    if not one_shot:
        # Ctrl-C stops a reply: restore Python's handler even if whatever started us ignored
        # SIGINT (a child inherits that, and Python then leaves Ctrl-C ignored)
        import signal

        signal.signal(signal.SIGINT, signal.default_int_handler)
    lm = load(args.model, dtype=args.dtype)
    session = Session(lm, args, console)
    try:
        return interact(session, console, text if one_shot else None)
    finally:
        session.close()


def interact(session, console, one_shot_text=None):
    """The read-eval loop (or a single turn)."""
    lm = session.lm
    if one_shot_text is not None:
        session.turn(one_shot_text)
        return 0
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    console.print(f"[bold]edgeprefill chat[/bold] · {lm.model_id} · strategy "
                  f"{session.strategy_name} · /help for commands, Ctrl-D to quit")
    while True:
        try:
            text = read_message()
        except EOFError:
            sys.stdout.write("\n")
            return 0
        except KeyboardInterrupt:
            sys.stdout.write("\n")
            continue
        except UnicodeDecodeError as e:
            console.print(f"[red]error:[/red] that message is not valid UTF-8 (byte "
                          f"{e.object[e.start:e.start + 1].hex()} at {e.start}): type or paste "
                          "UTF-8 text", highlight=False)
            continue
        if not text.strip():
            continue
        try:
            if text.startswith("/"):
                if not command(session, text.strip()):
                    return 0
                continue
            session.turn(text)
        except EdgeprefillError as e:
            console.print(f"[red]error:[/red] {e}", highlight=False)
