"""`edgeprefill info`: what this machine runs edgeprefill on, and its matmul GFLOPS."""

import json
import sys

from edgeprefill.apps.argtypes import positive


def add_parser(sub):
    p = sub.add_parser("info", help="show backend, BLAS and measured matmul GFLOPS")
    p.add_argument("--size", type=positive, default=1024, help="square matmul size (default 1024)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=run)


def run(args):
    from edgeprefill.blas import matmul_gflops

    from edgeprefill.machine import machine_info

    info = machine_info()
    info["matmul_size"] = args.size
    info["matmul_gflops_fp32"] = round(matmul_gflops(args.size), 1)
    if args.json:
        print(json.dumps(info))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(show_header=False, box=None)
    for k, v in info.items():
        table.add_row(f"[bold]{k}[/bold]", str(v))
    Console().print(table)
    if info["blas"] == "bundled":
        print("note: MLX is on its bundled reference BLAS; install libopenblas0-pthread "
              "(or unset EDGEPREFILL_BLAS) for the fast path", file=sys.stderr)
    return 0
