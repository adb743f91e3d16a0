"""`edgeprefill chat`: a rich terminal chat with per-turn TTFT, cache reuse across turns,
/commands, Ctrl-C to stop a reply, and /save + /load of the conversation with its caches."""

import os
import select
import sys
import time

from edgeprefill.apps.argtypes import fraction, non_negative, non_negative_float, positive
from edgeprefill.errors import EdgeprefillError

HELP = """commands:
  /help              this text
  /reset             forget the conversation (and its caches)
  /strategy NAME     switch prefill strategy (edgeprefill strategies lists them)
  /system TEXT       set the system message (starts a new conversation)
  /stats             session totals
  /heal              recompute an approximate (kvp) cache exactly, now
  /save FILE         save the conversation and its caches
  /load FILE         load a saved conversation (no prefill needed)
  /quit              exit (Ctrl-D too)
input: a line is one message; paste multi-line text freely; or open a block with \"\"\" and
close it with \"\"\". Ctrl-C stops a reply (the session stays)."""
# Seconds to wait after each streamed token: a knob for tests and demos of Ctrl-C.
DELAY_S = float(os.environ.get("EDGEPREFILL_DECODE_DELAY_S", "0") or 0)


def add_parser(sub):
    from edgeprefill.apps.shared import add_model_args, add_strategy_args

    p = sub.add_parser("chat", help="chat in the terminal (multi-turn, cache reuse)")
    add_model_args(p)
    add_strategy_args(p)  # runahead & co.: workers start once; later turns extend the cache here
    p.add_argument("--system", default=None, help="system message")
    p.add_argument("--max-tokens", type=positive, default=512)
    p.add_argument("--temp", type=non_negative_float, default=0.0)
    p.add_argument("--top-p", type=fraction, default=1.0)
    p.add_argument("--seed", type=non_negative, default=None)
    p.add_argument("--prompt", action="append", default=None,
                   help="a turn, non-interactive ('-' reads stdin; repeat it for several turns "
                   "of one conversation); piped stdin works too")
    p.add_argument("--stats-json", default=None, metavar="FILE",
                   help="with --prompt: write each turn's TTFT and prefill figures as JSON")
    p.add_argument("--heal", action="store_true",
                   help="after each approximate turn (kvp), compute the exact cache in the "
                   "background and swap it in at the next turn when ready")
    p.add_argument("--prompt-cache", default=None, metavar="FILE",
                   help="start from a prompt cache (edgeprefill cache-prompt): the turns reuse "
                   "its longest common prefix")
    p.set_defaults(run=run)


class Session:
    """A Conversation (edgeprefill.conversation) with the terminal's printing around it."""

    def __init__(self, lm, args, console):
        from edgeprefill.conversation import Conversation

        self.lm, self.args, self.console = lm, args, console
        self.conv = Conversation(lm, args.strategy, self.build, args.system)
        self.conv.auto_heal = getattr(args, "heal", False)

    def build(self, name):
        from edgeprefill.apps.shared import build_strategy
        from edgeprefill.prefill.registry import parse

        if not parse(name)[0].workers:
            return build_strategy(self.args, self.lm, name, self.console)
        self.console.print(f"[dim]starting {self.args.workers} {name} workers ...[/dim]")
        t0 = time.perf_counter()
        new = build_strategy(self.args, self.lm, name, self.console)
        new.say = lambda msg: self.console.print(f"[yellow]{msg}[/yellow]", highlight=False)
        self.console.print(f"[dim]workers ready ({time.perf_counter() - t0:.1f} s; the first "
                           "prompt of a conversation runs on them)[/dim]")
        return new

    def turn(self, text):
        """One user message: prefill the new tokens, stream the reply, print the status."""
        from rich.progress import BarColumn, Progress, TextColumn

        from edgeprefill.apps.shared import stats_line
        from edgeprefill.generate import stream_generate

        lm, args, conv = self.lm, self.args, self.conv
        _, new = conv.prompt_ids(text)
        progress, bar = None, None
        if len(new) > 256 and self.console.is_terminal:
            bar = Progress(TextColumn("prefill"), BarColumn(), TextColumn(
                "{task.completed}/{task.total} tokens"), console=self.console, transient=True)
            task = bar.add_task("prefill", total=len(new))
            bar.start()
            progress = lambda done, total: bar.update(task, completed=done)  # noqa: E731
        result, reply, interrupted = None, [], False
        try:
            for event in stream_generate(lm.model, lm.tokenizer, new, conv.strategy,
                                         cache=conv.cache, max_tokens=args.max_tokens,
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
        conv.finish_turn(text, result.text if result else "".join(reply), result)
        if result is None:
            self.console.print("[yellow](reply stopped)[/yellow]" if interrupted else "")
            return None
        st = result.stats()
        note = " | context full" if result.finish_reason == "context" else ""
        state = "exact" if conv.exact else "approximate" + (", healing" if conv.healer else "")
        self.console.print(f"[dim]{stats_line(st)} | context {st['context_tokens']} | cache "
                           f"{state}{note}[/dim]", highlight=False)
        if result.finish_reason == "context":
            self.console.print("[yellow]the model's context window is full: /reset to start "
                               "a new conversation[/yellow]")
        return result


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
        session.conv.reset()
        say("[dim]conversation reset[/dim]")
    elif name == "strategy":
        if not arg:
            say(f"[dim]strategy: {session.conv.strategy_name}[/dim]")
        else:
            session.conv.set_strategy(arg)
            say(f"[dim]strategy {arg}: the next turn prefills the conversation with it[/dim]")
    elif name == "system":
        session.conv.system = arg or None
        session.conv.reset()
        say("[dim]system message set; conversation reset[/dim]")
    elif name == "heal":
        t0 = time.perf_counter()
        n = session.conv.heal()
        say(f"[dim]healed {n} tokens in {time.perf_counter() - t0:.1f} s: the cache is exact"
            "[/dim]" if n else "[dim]nothing to heal yet[/dim]")
    elif name == "stats":
        say(f"[dim]{session.conv.summary()}[/dim]")
    elif name == "save":
        if not arg:
            raise EdgeprefillError("/save needs a file name: /save FILE")
        with_cache = session.conv.save(arg)
        say(f"[dim]saved {len(session.conv.messages)} messages"
                f"{' and caches' if with_cache else ' (this strategy’s caches are not saved)'}"
                f" to {arg}[/dim]")
    elif name == "load":
        if not arg:
            raise EdgeprefillError("/load needs a file name: /load FILE")
        meta = session.conv.load(arg)
        say(f"[dim]loaded {len(meta['messages'])} messages ({meta['strategy']}); "
                f"{'caches restored' if session.conv.cache is not None else 'will prefill'}[/dim]")
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
    texts = None
    if one_shot:
        texts = [read_prompt(p) for p in (args.prompt or ["-"])]
        if not all(t.strip() for t in texts):
            raise EdgeprefillError("the prompt is empty: pass --prompt TEXT or pipe text in")
    elif args.stats_json:
        raise EdgeprefillError("--stats-json records the turns of --prompt: pass them with it")
    if not one_shot:
        # Ctrl-C stops a reply: restore Python's handler even if whatever started us ignored
        # SIGINT (a child inherits that, and Python then leaves Ctrl-C ignored)
        import signal

        signal.signal(signal.SIGINT, signal.default_int_handler)
    lm = load(args.model, dtype=args.dtype)
    session = Session(lm, args, console)
    if args.prompt_cache:
        start_from_cache(session, args.prompt_cache, console)
    try:
        return interact(session, console, texts)
    finally:
        session.conv.close()


def start_from_cache(session, path, console):
    """Begin the conversation with a prompt cache's tokens (full prefills the turns where the
    strategy continues only caches it made)."""
    from edgeprefill.cache import can_continue, load_cache

    conv = session.conv
    cache, info = load_cache(path, session.lm)
    if info["tokens"] is None:
        session.conv.close()
        raise EdgeprefillError(f"{path} has no token list (mlx-lm made it): chat reuses caches "
                               "made by `edgeprefill cache-prompt`")
    if not can_continue(conv.strategy):
        console.print(f"[dim]{conv.strategy_name} continues only caches it made: turns are "
                      "prefilled with full[/dim]", highlight=False)
        conv.set_strategy("full")
    conv.cache = cache
    state = "exact" if info["exact"] else f"approximate ({info['strategy']})"
    console.print(f"[dim]prompt cache: {len(cache.tokens)} tokens, {state}[/dim]",
                  highlight=False)


def interact(session, console, turns=None):
    """The read-eval loop, or the given turns one after another."""
    lm = session.lm
    if turns is not None:
        stats = []
        for text in turns:
            result = session.turn(text)
            stats.append(result.stats() if result else None)
        if session.args.stats_json:
            from edgeprefill.apps.shared import write_json

            write_json(session.args.stats_json, {"model": lm.model_id, "turns": stats})
        return 0
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    console.print(f"[bold]edgeprefill chat[/bold] · {lm.model_id} · strategy "
                  f"{session.conv.strategy_name} · /help for commands, Ctrl-D to quit")
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
