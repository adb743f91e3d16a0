"""`edgeprefill info`: what this machine runs edgeprefill on, and its matmul GFLOPS."""

import json
import platform
import sys

from edgeprefill.apps.argtypes import positive


def add_parser(sub):
    p = sub.add_parser("info", help="show backend, BLAS and measured matmul GFLOPS")
    p.add_argument("--size", type=positive, default=1024, help="square matmul size (default 1024)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=run)


def machine_info():
    """Versions, device and BLAS of this process (the benchmark's header uses it too)."""
    import mlx.core as mx

    from edgeprefill import __version__
    from edgeprefill.blas import loaded_blas

    info = {
        "edgeprefill": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": _cpu_name(),
        "mlx": mx.__version__,
        "mlx_device": str(mx.default_device()),
        "blas": loaded_blas(),
    }
    try:
        import mlx_lm

        info["mlx_lm"] = mlx_lm.__version__
    except Exception:
        pass
    try:
        import torch

        info["torch"] = torch.__version__
        info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:
        pass
    return info


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run(args):
    from edgeprefill.blas import matmul_gflops

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
