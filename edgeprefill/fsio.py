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


def decode_utf8(data, what):
    """`data` (bytes) as text; a one-line error naming `what` and the first bad byte if it is
    not UTF-8."""
    from edgeprefill.errors import EdgeprefillError

    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise EdgeprefillError(f"{what} is not valid UTF-8 (byte 0x{data[e.start]:02x} at offset "
                               f"{e.start}): convert it to UTF-8, e.g. with iconv -t UTF-8") from None


def check_utf8(text, what):
    """Refuse a str that holds undecodable bytes (Python keeps a command-line argument's bad
    bytes as lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        from edgeprefill.errors import EdgeprefillError

        raise EdgeprefillError(f"{what} is not valid UTF-8 (at character {e.start}): convert it "
                               "to UTF-8, e.g. with iconv -t UTF-8") from None
    return text
