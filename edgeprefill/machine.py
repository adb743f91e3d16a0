"""What a benchmark record says about the machine it ran on."""

import datetime
import platform


def now():
    """The local time a record was made, to the second."""
    return datetime.datetime.now().isoformat(timespec="seconds")


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
