"""Fast BLAS for MLX on Linux.

The mlx[cpu] wheel bundles the netlib reference BLAS (about 7 GFLOPS fp32 matmul on the
project's 2-core machines). Preloading the libblas.so.3 of Debian's OpenBLAS package
(libopenblas0-pthread) makes MLX's matmuls run on OpenBLAS (about 120-170 GFLOPS there). The
preload must happen before the process starts, so the CLI re-executes itself once with
LD_PRELOAD set. Set EDGEPREFILL_BLAS=bundled to keep the bundled BLAS (for comparisons).
"""

import glob
import os
import sys

OPENBLAS_GLOB = "/usr/lib/*-linux-gnu/openblas-pthread/libblas.so.3"
_MARK = "EDGEPREFILL_BLAS_REEXEC"


def find_openblas():
    """Path of Debian's OpenBLAS libblas.so.3, or None."""
    hits = sorted(glob.glob(OPENBLAS_GLOB))
    return hits[0] if hits else None


def loaded_blas():
    """Which BLAS this process has mapped: 'openblas', 'bundled', 'accelerate' or 'unknown'."""
    if sys.platform == "darwin":
        return "accelerate"
    try:
        with open("/proc/self/maps") as f:
            maps = f.read()
    except OSError:
        return "unknown"
    if "openblas" in maps:
        return "openblas"
    if "mlx_cpu.libs/libblas" in maps:
        return "bundled"
    return "unknown"


def ensure_fast_blas(warn=True):
    """Re-execute this process with OpenBLAS preloaded when it is needed and possible.

    Call before mlx is imported. Returns only when no re-exec happens.
    """
    if not sys.platform.startswith("linux") or os.environ.get("EDGEPREFILL_BLAS") == "bundled":
        return
    if "openblas" in os.environ.get("LD_PRELOAD", "") or os.environ.get(_MARK):
        return
    argv = list(getattr(sys, "orig_argv", [sys.executable] + sys.argv))
    if "mirror" in argv and "--backend" in argv:
        # torch brings its own BLAS; a preloaded OpenBLAS slows it (measured 250 -> 100 tok/s).
        return
    lib = find_openblas()
    if lib is None:
        if warn:
            print("edgeprefill: warning: MLX is using its bundled reference BLAS (about 20x slower "
                  "prefill); fix: `apt-get install libopenblas0-pthread` (or `make setup`)",
                  file=sys.stderr)
        return
    env = dict(os.environ)
    env["LD_PRELOAD"] = ":".join(p for p in (lib, env.get("LD_PRELOAD")) if p)
    env[_MARK] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable] + argv[1:], env)


def matmul_gflops(n=1024, repeats=5, dtype="float32"):
    """Measured MLX matmul throughput (n x n x n, default device) in GFLOPS."""
    import time

    import mlx.core as mx

    a = mx.random.normal((n, n)).astype(getattr(mx, dtype))
    b = mx.random.normal((n, n)).astype(getattr(mx, dtype))
    mx.eval(a, b)
    for _ in range(2):
        mx.eval(a @ b)
    t = time.perf_counter()
    for _ in range(repeats):
        mx.eval(a @ b)
    dt = (time.perf_counter() - t) / repeats
    return 2 * n**3 / dt / 1e9
