"""Fast BLAS for MLX on Linux, chosen by the library itself.

The mlx[cpu] wheel bundles the netlib reference BLAS, far slower than an optimized one
(`make bench-blas` measures both). Debian's OpenBLAS (libopenblas0-pthread) exports the same
CBLAS symbols: loaded into the process's global symbol scope before MLX's library is, it is the
one MLX's matmuls bind to. `import edgeprefill` does this
(`use_fast_blas`), so the CLI, the Python API and the runahead workers all get it; it is too
late once mlx has been imported, and then a warning names the fix. On macOS MLX uses
Accelerate and nothing is done. EDGEPREFILL_BLAS=bundled keeps the bundled BLAS (for
comparisons).
"""

import ctypes
import glob
import os
import sys
import warnings

OPENBLAS_GLOB = "/usr/lib/*-linux-gnu/openblas-pthread/libblas.so.3"
OPENBLAS_FIX = "apt-get install libopenblas0-pthread"
_state = {"blas": None}  # what use_fast_blas found: 'openblas', 'bundled' or None (not run)


def find_openblas():
    """Path of Debian's OpenBLAS libblas.so.3, or None."""
    hits = sorted(glob.glob(OPENBLAS_GLOB))
    return hits[0] if hits else None


def _global_symbol_file(name):
    """The file that defines `name` in the process's global symbol scope, or None."""
    class DlInfo(ctypes.Structure):
        _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p),
                    ("dli_sname", ctypes.c_char_p), ("dli_saddr", ctypes.c_void_p)]

    libc = ctypes.CDLL(None)
    libc.dlsym.restype = ctypes.c_void_p
    libc.dlsym.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    addr = libc.dlsym(None, name.encode())
    if not addr:
        return None
    info = DlInfo()
    if not libc.dladdr(ctypes.c_void_p(addr), ctypes.byref(info)) or not info.dli_fname:
        return None
    return info.dli_fname.decode()


def _wants_bundled():
    if os.environ.get("EDGEPREFILL_BLAS") == "bundled":
        return True
    # The torch mirror brings its own BLAS; OpenBLAS in the global scope slows it.
    argv = getattr(sys, "orig_argv", sys.argv)
    return "--backend" in argv and "mirror" in argv


def use_fast_blas():
    """Make MLX bind to OpenBLAS on Linux; call before mlx is first imported.

    Returns:
        'openblas' when MLX will use OpenBLAS, 'bundled' when it keeps its reference BLAS,
        'accelerate' on macOS.
    """
    if sys.platform == "darwin":
        return "accelerate"
    if not sys.platform.startswith("linux"):
        return "unknown"
    if _state["blas"] is not None:
        return _state["blas"]
    blas = "bundled"
    if "openblas" in os.environ.get("LD_PRELOAD", ""):
        blas = "openblas"
    elif _wants_bundled():
        pass
    elif "mlx.core" in sys.modules:
        warnings.warn("mlx was imported before edgeprefill, so MLX runs on its bundled reference "
                      "BLAS (about 20x slower prefill on Linux): import edgeprefill first",
                      RuntimeWarning, stacklevel=3)
    else:
        lib = find_openblas()
        if lib is None:
            warnings.warn("MLX runs on its bundled reference BLAS (about 20x slower prefill on "
                          f"Linux): run `{OPENBLAS_FIX}` (or `make setup`)", RuntimeWarning,
                          stacklevel=3)
        else:
            ctypes.CDLL(lib, mode=ctypes.RTLD_GLOBAL)
            found = _global_symbol_file("cblas_sgemm") or ""
            blas = "openblas" if "openblas" in found else "bundled"
    _state["blas"] = blas
    return blas


def loaded_blas():
    """The BLAS MLX's matmuls run on in this process: 'openblas', 'bundled', 'accelerate' or
    'unknown'."""
    if sys.platform == "darwin":
        return "accelerate"
    return _state["blas"] or use_fast_blas()


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
