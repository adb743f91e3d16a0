"""`edgeprefill generate`: one prompt in, a streamed answer and its TTFT out."""

import json
import sys

from edgeprefill.apps.argtypes import fraction, non_negative, non_negative_float, positive
from edgeprefill.apps.shared import (add_kvp_tail_arg, add_model_args, read_prompt,
                                       stats_line, strategy_options, validate_sampling)
from edgeprefill.errors import EdgeprefillError
from edgeprefill.prefill import PARALLEL_STRATEGIES


def add_parser(sub):
    p = sub.add_parser("generate", help="generate an answer to one prompt")
    add_model_args(p)
    p.add_argument("--prompt", required=True, help="the prompt text, or '-' to read stdin")
    p.add_argument("--system", default=None, help="system message")
    p.add_argument("--strategy", default="full",
                   help="prefill strategy: full, kvp, aux-only, lazy[-<schedule>|-K1:K2:K3], "
                   "runahead, tsp, runahead-kvp (kvp whose aux prefill runs on the runahead workers; "
                   "default: full)")
    p.add_argument("--kvp", default=None, metavar="FOLDER",
                   help="KV Prediction artifact for --strategy kvp / aux-only / runahead-kvp (default: the "
                   "model's T-0.50 artifact from `edgeprefill kvp fit`; fitted on first use "
                   "for the default model)")
    add_kvp_tail_arg(p)
    p.add_argument("--workers", type=positive, default=2,
                   help="runahead / tsp / runahead-kvp: local worker processes")
    p.add_argument("--hostfile", default=None,
                   help="runahead / tsp / runahead-kvp: mlx.launch hostfile spreading workers "
                   "over machines")
    p.add_argument("--max-tokens", type=positive, default=256)
    p.add_argument("--temp", type=non_negative_float, default=0.0,
                   help="sampling temperature (0: greedy)")
    p.add_argument("--top-p", type=fraction, default=1.0)
    p.add_argument("--seed", type=non_negative, default=None)
    p.add_argument("--no-chat-template", action="store_true", help="encode the raw prompt")
    p.add_argument("--json", action="store_true", help="print one JSON object (text and stats)")
    p.set_defaults(run=run)


def run(args):
    from rich.console import Console

    from edgeprefill.generate import build_prompt, stream_generate
    from edgeprefill.loading import load
    from edgeprefill.prefill import make_strategy

    validate_sampling(args)
    prompt = read_prompt(args.prompt)
    if not prompt.strip():
        raise EdgeprefillError("the prompt is empty: pass text with --prompt, or '-' and pipe it")
    err = Console(stderr=True, soft_wrap=True)
    lm = load(args.model, dtype=args.dtype)
    ids = build_prompt(lm.tokenizer, prompt, system=args.system,
                       chat_template=not args.no_chat_template)
    if args.strategy in PARALLEL_STRATEGIES:
        return run_parallel(args, lm, ids, err)
    strategy = make_strategy(args.strategy, lm.model, **strategy_options(args, lm))
    result = None
    for event in stream_generate(lm.model, lm.tokenizer, ids, strategy,
                                 max_tokens=args.max_tokens, temp=args.temp, top_p=args.top_p,
                                 seed=args.seed):
        if not args.json:
            sys.stdout.write(event.text)
            sys.stdout.flush()
        result = event.result or result
    stats = result.stats()
    if args.json:
        print(json.dumps({"model": lm.model_id, "text": result.text, "stats": stats}))
    else:
        sys.stdout.write("\n")
        err.print(f"[dim]{stats_line(stats)}[/dim]", highlight=False)
    return 0


def run_parallel(args, lm, ids, err):
    """runahead / tsp / runahead-kvp: the workers prefill (and the last one decodes greedily); print the text."""
    from edgeprefill.apps.runahead import run_prefill
    from edgeprefill.generate import check_context

    check_context(len(ids), lm.model.max_context)
    opts = strategy_options(args, lm)
    if args.temp > 0:
        raise EdgeprefillError(f"--strategy {args.strategy} decodes greedily on the last worker: "
                               "use --temp 0")
    r = run_prefill(lm, ids, args.strategy, args.workers, max_tokens=args.max_tokens,
                    hostfile=args.hostfile, dtype=args.dtype, artifact=opts.get("artifact"),
                    tail=opts.get("tail"))
    eos = set(lm.tokenizer.eos_token_ids)
    tokens = r["tokens"]
    cut = next((k for k, t in enumerate(tokens) if t in eos), len(tokens))
    text = lm.tokenizer.decode(tokens[:cut])
    stats = {"strategy": args.strategy, "workers": r["workers"], "sizes": r["sizes"],
             "prompt_tokens": len(ids), "ttft_s": r["ttft_s"],
             "prefill_tok_s": len(ids) / r["ttft_s"], "bytes_moved": r["bytes"],
             "generated_tokens": cut, "finish_reason": "eos" if cut < len(tokens) else "length"}
    if args.json:
        print(json.dumps({"model": lm.model_id, "text": text, "stats": stats}))
    else:
        print(text)
        err.print(f"[dim]strategy {args.strategy} | workers {r['workers']} {r['sizes']} | "
                  f"prompt {len(ids)} tok | TTFT {r['ttft_s'] * 1e3:.0f} ms | prefill "
                  f"{stats['prefill_tok_s']:.1f} tok/s | moved {r['bytes'] / 2**20:.1f} MiB"
                  "[/dim]", highlight=False)
    return 0
