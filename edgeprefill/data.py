"""Offline text for benchmarks (and, later, fitting and evaluation).

Real text, never random tokens, so quality figures mean something: the Python standard
library's source, which every Python install carries. Named sources keep benchmark prompts
apart from any fitting text.
"""

import sysconfig
from pathlib import Path

# Modules whose source makes the benchmark prompts (fitting code must not use these).
BENCH_MODULES = ("argparse.py", "textwrap.py", "difflib.py", "fractions.py", "statistics.py",
                 "calendar.py", "pprint.py", "shlex.py")

# Modules whose source is KV Prediction fitting text: disjoint from BENCH_MODULES, so
# benchmark and evaluation prompts are never text a predictor was fitted on.
FIT_MODULES = ("ast.py", "base64.py", "bisect.py", "codecs.py", "configparser.py", "csv.py",
               "dataclasses.py", "datetime.py", "enum.py", "functools.py", "gettext.py",
               "heapq.py", "inspect.py", "ipaddress.py", "locale.py", "logging/__init__.py",
               "mailbox.py", "os.py", "pathlib.py", "pickle.py", "queue.py", "random.py",
               "re/_parser.py", "shutil.py", "smtplib.py", "string.py", "tarfile.py",
               "threading.py", "typing.py", "uuid.py", "zipfile/__init__.py")


def fit_chunks(tokenizer, n_tokens, chunk, modules=FIT_MODULES):
    """Consecutive `chunk`-token windows of fitting text, `n_tokens` in all (fewer if the
    text runs out)."""
    ids = list(tokenizer.encode(stdlib_text(modules)))[:n_tokens]
    return [ids[s:s + chunk] for s in range(0, len(ids) - chunk + 1, chunk)]


def stdlib_text(modules):
    """Concatenated source of the named standard-library modules that exist here."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts = [(root / m).read_text(encoding="utf-8", errors="replace")
             for m in modules if (root / m).is_file()]
    if not parts:
        raise FileNotFoundError(f"no standard-library sources found under {root}")
    return "\n\n".join(parts)


def bench_prompts(tokenizer, n_tokens, count=1, modules=BENCH_MODULES):
    """`count` distinct prompts of exactly `n_tokens` tokens cut from benchmark text.

    Returns:
        list of token-id lists.
    """
    ids = list(tokenizer.encode(stdlib_text(modules)))
    while len(ids) < n_tokens * count:
        ids = ids + ids
    stride = max(1, (len(ids) - n_tokens) // max(count, 1))
    return [ids[i * stride:i * stride + n_tokens] for i in range(count)]
