"""Atomic writes: a user never sees a half-written folder or file."""

import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from edgeprefill.errors import EdgeprefillError


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def clean_stale(folder, prefix):
    """Remove the temporaries `<prefix><pid>.*` in `folder` whose process is gone (a run killed
    mid-write leaves its temporary behind; the next run that writes there removes it)."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return
    for p in entries:
        m = pattern.match(p.name)
        if m and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1))):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


_held = set()  # lock files this process holds (path_lock is re-entrant)


@contextmanager
def path_lock(path):
    """Hold an exclusive lock on `path` for the block (a `.<name>.lock` file beside it), so two
    processes writing the same destination take turns; re-entrant within a process."""
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = path.with_name(f".{path.name}.lock").resolve()
    if lock in _held:
        yield
        return
    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        _held.add(lock)
        try:
            yield
        finally:
            _held.discard(lock)
            fcntl.flock(f, fcntl.LOCK_UN)


@contextmanager
def atomic_folder(path):
    """Yield a temporary folder beside `path`; when the block succeeds it replaces `path`,
    when it raises the temporary folder is removed and `path` is left as it was. The swap is
    done under `path_lock`, so concurrent writers of one destination both succeed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path.parent, f".{path.name}.")
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}.", dir=path.parent))
    try:
        yield tmp
        with path_lock(path):
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
    clean_stale(path.parent, f".{path.name}.")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{path.suffix}")
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


def decode_utf8(data, what):
    """`data` (bytes) as text; a one-line error naming `what` and the first bad byte if it is
    not UTF-8."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise EdgeprefillError(f"{what} is not valid UTF-8 (byte 0x{data[e.start]:02x} at "
                               f"offset {e.start}): convert it to UTF-8, e.g. with iconv -t UTF-8"
                               ) from None


def check_utf8(text, what):
    """Refuse a str that holds undecodable bytes (Python keeps a command-line argument's bad
    bytes as lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise EdgeprefillError(f"{what} is not valid UTF-8 (at character {e.start}): convert it "
                               "to UTF-8, e.g. with iconv -t UTF-8") from None
    return text


def cache_dir():
    """edgeprefill's cache folder: $EDGEPREFILL_CACHE, else $XDG_CACHE_HOME/edgeprefill (made
    if missing); a one-line error names the variable when it cannot be written."""
    if os.environ.get("EDGEPREFILL_CACHE"):
        path, origin = Path(os.environ["EDGEPREFILL_CACHE"]).expanduser(), "EDGEPREFILL_CACHE"
    else:
        base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        path, origin = Path(base) / "edgeprefill", "the default"
    try:
        path.mkdir(parents=True, exist_ok=True)
        writable = os.access(path, os.W_OK | os.X_OK)
        reason = "no write permission"
    except OSError as e:
        writable, reason = False, e.strerror or type(e).__name__
    if not writable:
        raise EdgeprefillError(f"the cache folder {path} ({origin}) cannot be written ({reason}): "
                               "set EDGEPREFILL_CACHE to a writable folder")
    return path
