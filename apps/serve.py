"""`edgeprefill serve`: an OpenAI-compatible local server on one model."""

import os
import signal
import sys

from edgeprefill.apps.argtypes import fraction, non_negative, non_negative_float, positive
from edgeprefill.apps.shared import add_model_args, add_strategy_args, strategy_flags


def add_parser(sub):
    p = sub.add_parser("serve", help="an OpenAI-compatible server (/v1/chat/completions, "
                       "/v1/completions) sharing one prefix cache")
    add_model_args(p)
    add_strategy_args(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=non_negative, default=8080, help="port (0: any free one)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on every request")
    p.add_argument("--max-tokens", type=positive, default=512,
                   help="answer length when a request sets none")
    p.add_argument("--temp", type=non_negative_float, default=0.0,
                   help="temperature when a request sets none (0: greedy)")
    p.add_argument("--top-p", type=fraction, default=1.0)
    p.add_argument("--max-queue", type=positive, default=16,
                   help="requests held at once (running and waiting); more get 503")
    p.add_argument("--prompt-cache-mb", type=non_negative, default=1024,
                   help="the shared prefix cache's budget in MiB (0: none)")
    p.add_argument("--kv-bits", type=int, choices=[4, 8], default=None,
                   help="decode over a 4- or 8-bit quantized cache")
    p.add_argument("--log-level", default="info", choices=["warning", "info", "debug"],
                   help="uvicorn's log (info: one line per request)")
    p.set_defaults(run=run)


def _interrupt(*_):
    raise KeyboardInterrupt


def run(args):
    from edgeprefill.loading import load
    from edgeprefill.prefill.registry import parse
    from edgeprefill.server import app as server
    from edgeprefill.server.engine import Engine
    from edgeprefill.server.protocol import Defaults

    server._require()
    parse(args.strategy)  # an unknown name fails before anything loads
    sock = server.bind(args.host, args.port)  # a taken port fails before the model loads
    lm = load(args.model, dtype=args.dtype)
    engine = Engine(lm, strategy_flags(args), cache_bytes=args.prompt_cache_mb * 2**20,
                    max_queue=args.max_queue, kv_bits=args.kv_bits)
    # SIGTERM unwinds like Ctrl-C, so worker processes and the socket are closed either way
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        engine.strategy(args.strategy, {})  # a default that cannot build fails now
        app = server.create_app(engine, lm.model_id, Defaults(
            args.strategy, args.max_tokens, args.temp, args.top_p), api_key=args.api_key)
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        if args.api_key is None and host not in ("127.0.0.1", "::1", "localhost"):
            print(f"edgeprefill serve: warning: listening on {host} without --api-key: anyone "
                  "who can reach this machine can use the model", file=sys.stderr)
        print(f"edgeprefill serve: {lm.model_id} on http://{shown}:{port}/v1 (strategy "
              f"{args.strategy}, prefix cache {args.prompt_cache_mb} MiB); Ctrl-C stops",
              file=sys.stderr, flush=True)
        server.serve(app, sock, args.log_level)
    except KeyboardInterrupt:
        pass
    finally:
        engine.close()
        sock.close()
    print("edgeprefill serve: stopped", file=sys.stderr)
    # Everything is closed. Leave without the interpreter's teardown: once the engine thread
    # has used MLX, its native threads can still be joinable then, and C++ aborts the process
    # ("terminate called without an active exception") after a clean stop.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
