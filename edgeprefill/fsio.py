"""Atomic writes: a user never sees a half-written folder or file."""

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_folder(path):
    """Yield a temporary folder beside `path`; when the block succeeds it replaces `path`,
    when it raises the temporary folder is removed and `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def atomic_file(path):
    """Yield a temporary file path beside `path` (same suffix); when the block succeeds it
    replaces `path`, when it raises it is removed and `path` is left as it was."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path, text):
    """Write `text` to `path` through a temporary file and a rename."""
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def atomic_save_npy(path, array):
    """np.save `array` to `path` through a temporary file and a rename (folders made)."""
    import numpy as np

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        np.save(tmp, array)
