"""`edgeprefill serve-bench`: the server measured from outside: TTFT cold and with a warm
prefix per strategy, then concurrent load rounds checked against answers run alone."""

import sys

from edgeprefill.apps.argtypes import positive
from edgeprefill.apps.shared import add_model_args, parse_list


def add_parser(sub):
    p = sub.add_parser("serve-bench", help="start `edgeprefill serve` and measure it: TTFT "
                       "cold / warm prefix per strategy, and a concurrent load test")
    add_model_args(p)
    p.add_argument("--strategies", default="full,kvp",
                   help="comma list of strategies for the TTFT table")
    p.add_argument("--prompt-tokens", type=positive, default=4096,
                   help="the document's length for the TTFT table")
    p.add_argument("--question-tokens", type=positive, default=64,
                   help="the new question's length after the document")
    p.add_argument("--trials", type=positive, default=1, help="documents per strategy")
    p.add_argument("--clients", type=positive, default=8, help="concurrent clients in the load test")
    p.add_argument("--requests", type=positive, default=50, help="requests per load round")
    p.add_argument("--rounds", type=positive, default=3, help="load rounds")
    p.add_argument("--load-tokens", type=positive, default=1024,
                   help="the longest prompt in the load test")
    p.add_argument("--no-load", action="store_true", help="the TTFT table only")
    p.add_argument("--no-ttft", action="store_true", help="the load test only")
    p.add_argument("--prompt-cache-mb", type=positive, default=1024)
    p.add_argument("--json", default=None, metavar="FILE", help="write the results as JSON")
    p.set_defaults(run=run)


def run(args):
    from rich.console import Console
    from rich.table import Table

    from edgeprefill.apps.shared import write_json
    from edgeprefill.loading import load
    from edgeprefill.machine import machine_info, now
    from edgeprefill.prefill.registry import parse
    from edgeprefill.server import app as server_app
    from edgeprefill.server.load import Server, load_bodies, load_rounds, ttft_records

    server_app._require()
    strategies = parse_list(args.strategies, str, "--strategies")
    for s in strategies:
        parse(s)
    tokenizer = load(args.model, dtype=args.dtype).tokenizer
    result = {"date": now(), "machine": machine_info(), "model": args.model,
              "prompt_tokens": args.prompt_tokens, "question_tokens": args.question_tokens}
    console = Console(stderr=True)
    cmd = ["--model", args.model, "--dtype", args.dtype, "--prompt-cache-mb",
           str(args.prompt_cache_mb), "--max-queue", str(max(16, 2 * args.clients))]
    with Server(cmd) as server:
        if not args.no_ttft:
            console.print(f"[dim]TTFT: {len(strategies)} x {args.trials} documents of "
                          f"{args.prompt_tokens} tokens, cold then warm[/dim]")
            result["ttft"] = ttft_records(server.base, tokenizer, strategies,
                                          args.prompt_tokens, args.question_tokens, args.trials)
        if not args.no_load:
            console.print(f"[dim]load: {args.rounds} rounds of {args.requests} requests from "
                          f"{args.clients} clients[/dim]")
            bodies = load_bodies(tokenizer, args.load_tokens)
            result["load"] = load_rounds(server, bodies, args.requests, args.clients,
                                         args.rounds)
        status = server.stop()
    result["server_exit"] = status
    if "ttft" in result:
        t = Table(title=f"TTFT through the server, {args.prompt_tokens}-token document + "
                  f"{args.question_tokens}-token question")
        for col in ("strategy", "prompt tok", "cold ms", "warm ms", "cached", "warm x faster",
                    "warm prefilled with"):
            t.add_column(col)
        for r in result["ttft"]:
            c, w = r["cold"], r["warm"]
            t.add_row(r["strategy"], str(c["prompt_tokens"]), f"{c['ttft_ms']:.0f}",
                      f"{w['ttft_ms']:.0f}", str(w["cached_tokens"]), f"{r['warm_speedup']:.1f}",
                      w["prefilled_with"])
        Console().print(t)
    if "load" in result:
        t = Table(title=f"load: {args.clients} clients, answers checked against each run alone")
        for col in ("round", "requests", "wall s", "errors", "mismatches", "TTFT p50 ms",
                    "TTFT p90 ms", "server RSS MiB"):
            t.add_column(col)
        for r in result["load"]["rounds"]:
            t.add_row(str(r["round"]), str(r["requests"]), f"{r['wall_s']:.1f}", str(r["errors"]),
                      str(r["mismatches"]), str(r["ttft_ms"].get("p50")),
                      str(r["ttft_ms"].get("p90")), f"{r['rss_mb']:.0f}")
        Console().print(t)
        print(f"server RSS growth over the rounds: {result['load']['rss_growth']:.1%}")
    if args.json:
        write_json(args.json, result)
        print(f"wrote {args.json}", file=sys.stderr)
    bad = sum(r["errors"] + r["mismatches"] for r in result.get("load", {}).get("rounds", []))
    return 1 if bad else 0
