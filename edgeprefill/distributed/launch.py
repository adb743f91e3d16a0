"""Starting runahead workers: local processes with mx.distributed's environment (ring or NCCL),
or over machines through `mlx.launch`; a timeout, and every worker ended with its parent."""

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from edgeprefill.errors import EdgeprefillError

# Workers run the installed package in isolated mode (-I): a folder of the user's that holds
# its own edgeprefill/ cannot stand in for it.
WORKER = (sys.executable, "-I", "-m", "edgeprefill.distributed.worker")
PARENT_ENV = "EDGEPREFILL_PARENT_PID"  # set for local workers: the process that started them
BACKENDS = ("auto", "ring", "nccl")


def resolve_backend(backend):
    """'auto': NCCL where MLX sees a CUDA GPU (one GPU per rank), else the ring (TCP)."""
    if backend != "auto":
        return backend
    import mlx.core as mx

    return "nccl" if mx.cuda.is_available() else "ring"


def free_port():
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def local_worker_limit(lm):
    """How many local workers this machine holds: each is a process with its own copy of the
    weights (plus about 0.5 GiB of runtime), within the memory available now and 8 per core."""
    from mlx.utils import tree_flatten

    weights = sum(v.nbytes for _, v in tree_flatten(lm.model.model.parameters()))
    per_worker = weights + 2**29
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(line.split()[1]) * 1024 for line in f
                         if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return max(1, min(8 * (os.cpu_count() or 1), avail // per_worker))


def check_local_workers(n, lm):
    """Refuse a local worker count below 1 or above local_worker_limit, naming the limit."""
    limit = local_worker_limit(lm)
    if not 1 <= n <= limit:
        raise EdgeprefillError(f"--workers {n}: this machine holds 1 to {limit} local workers of "
                               f"this model (memory available, 8 per core); pass fewer, or "
                               "--hostfile to spread them over machines")


def launch(n_workers, worker_args, timeout=120, hostfile=None, backend="auto"):
    """Run the worker (worker.py) on n_workers ranks: over machines through mlx.launch
    (`hostfile`), else as local processes started here with the environment mlx.launch gives
    them (ring: MLX_HOSTFILE + MLX_RANK; NCCL: rendezvous address, MLX_RANK, one GPU a rank).
    Local ranks skip mlx.launch because its output relay keeps a CPU core busy polling, which
    would slow the ranks it times. Every rank is
    killed and a one-line error raised if they do not all finish within `timeout`."""
    if n_workers < 1:
        raise EdgeprefillError("--workers must be >= 1")
    backend = resolve_backend(backend)
    worker = [*WORKER, "--backend", backend, *worker_args]
    if hostfile:
        launcher = Path(sys.executable).with_name("mlx.launch")
        cmd = [str(launcher) if launcher.exists() else "mlx.launch", "--backend", backend,
               "--hostfile", str(hostfile)]
        if backend == "nccl":  # NVLink multicast stays off (shared hosts)
            cmd += ["--nccl-port", str(free_port()), "--env", "NCCL_NVLS_ENABLE=0"]
        return _wait([subprocess.Popen(cmd + ["--", *worker], stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True,
                                       start_new_session=True)], timeout)
    with tempfile.TemporaryDirectory() as tmp:
        return _wait(start_local(n_workers, worker, backend, tmp), timeout)


def start_local(n_workers, worker, backend, tmp, output=subprocess.PIPE):
    """Start the local ranks of `worker` (a command) with mx.distributed's environment."""
    env = dict(os.environ, NCCL_NVLS_ENABLE="0", MLX_WORLD_SIZE=str(n_workers),
               **{PARENT_ENV: str(os.getpid())})
    if backend == "ring":
        ring = Path(tmp) / "ring.json"
        ring.write_text(json.dumps([[f"127.0.0.1:{free_port()}"] for _ in range(n_workers)])
                        if n_workers > 1 else "")
        env["MLX_HOSTFILE"] = str(ring)
    else:
        env.update(NCCL_HOST_IP="127.0.0.1", NCCL_PORT=str(free_port()))
    procs = []
    gpus = gpu_count()
    for rank in range(n_workers):
        renv = dict(env, MLX_RANK=str(rank))
        if gpus:  # one GPU a rank (round robin), whatever the backend
            renv["CUDA_VISIBLE_DEVICES"] = str(rank % gpus)
        procs.append(subprocess.Popen(worker, env=renv, stdout=output, stderr=output,
                                      text=True, start_new_session=True))
    return procs


def gpu_count():
    """CUDA GPUs MLX sees here (0 without CUDA)."""
    import mlx.core as mx

    if not mx.cuda.is_available():
        return 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        return len([x for x in visible.split(",") if x.strip()])
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
        return max(1, out.stdout.count("GPU "))
    except (OSError, subprocess.SubprocessError):
        return 1


def last_lines(text, n=3, width=300):
    """The last `n` non-empty lines of a worker's output on one line (for an error message)."""
    lines = [x.strip() for x in text.splitlines() if x.strip()][-n:]
    return " | ".join(lines)[-width:]


def kill_groups(procs):
    """SIGKILL each worker's process group (each was started in a session of its own)."""
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _wait(procs, timeout):
    """Wait for every process; on a failure, the timeout or an interrupt kill them all."""
    try:
        return _wait_all(procs, timeout)
    except BaseException:
        kill_groups(procs)
        raise


def _wait_all(procs, timeout):
    import threading
    import time

    outs = [[] for _ in procs]
    threads = [threading.Thread(target=lambda p=p, o=o: o.extend(p.communicate()), daemon=True)
               for p, o in zip(procs, outs)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout

    def kill_all():
        kill_groups(procs)
        for t in threads:
            t.join(5)

    failed = []
    while any(p.poll() is None for p in procs):
        failed = [r for r, p in enumerate(procs) if p.poll() not in (None, 0)]
        if failed or time.monotonic() > deadline:
            kill_all()
            if not failed:
                raise EdgeprefillError(
                    f"runahead workers did not finish within {timeout:.0f} s (a worker died or "
                    "a peer never connected): check the hosts and ports, or use fewer --workers")
            break
        time.sleep(0.05)
    for t in threads:
        t.join()
    out = "".join(o[0] for o in outs if o)
    err = "".join(o[1] for o in outs if len(o) > 1)
    died = [x for x in (out + err).splitlines() if "exited with code" in x]
    bad = failed or [r for r, p in enumerate(procs) if p.returncode != 0]
    if bad or died:
        rank, code = (bad[0], procs[bad[0]].returncode) if bad else ("?", "?")
        where = f"rank {rank}, " if len(procs) > 1 else ""
        raise EdgeprefillError(f"a runahead worker failed ({where}exit code {code}; its last "
                               f"output: {last_lines(err) or 'none'}): run with fewer --workers "
                               "or another strategy")
    return out, err


