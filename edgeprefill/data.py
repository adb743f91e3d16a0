"""Offline text for fitting, evaluation and benchmarks: a documented mix of code and prose.

Every Python install carries both:
- code: the standard library's source;
- English prose: the Python language reference's topic texts (pydoc_data.topics, the text
  `help('assignment')` prints).
Each source is split once into a FIT part and a HELD-OUT part (code by module, prose by topic),
so evaluation and benchmark prompts are never text a predictor was fitted or trained on.

For long gradient training there are two larger fitting sets: `wide` (every standard-library
module but the held-out ones, about 3M tokens of code) and `site` (the wide set plus the Python
sources and package descriptions of every installed package, tens of millions of tokens).
"""

import json
import sys
import sysconfig
from pathlib import Path

# Held-out code: benchmark and evaluation prompts (fitting must not use these).
BENCH_MODULES = ("argparse.py", "textwrap.py", "difflib.py", "fractions.py", "statistics.py",
                 "calendar.py", "pprint.py", "shlex.py")

# Fitting code: disjoint from BENCH_MODULES.
FIT_MODULES = ("ast.py", "base64.py", "bisect.py", "codecs.py", "configparser.py", "csv.py",
               "dataclasses.py", "datetime.py", "enum.py", "functools.py", "gettext.py",
               "heapq.py", "inspect.py", "ipaddress.py", "locale.py", "logging/__init__.py",
               "mailbox.py", "os.py", "pathlib.py", "pickle.py", "queue.py", "random.py",
               "re/_parser.py", "shutil.py", "smtplib.py", "string.py", "tarfile.py",
               "threading.py", "typing.py", "uuid.py", "zipfile/__init__.py")

# The text comes from the running Python's standard library, so it differs between Python
# versions: cards and reports name the version.
STDLIB = f"python-stdlib {sys.version_info.major}.{sys.version_info.minor}"
BUILTIN_PAIRS = f"built-in held-out pairs ({STDLIB})"
FIT_DATA = (f"code: {STDLIB} " + ",".join(FIT_MODULES)
            + "; prose: pydoc_data.topics (sorted topics, all but every 4th)")
# The wide fitting set: every standard-library module but the held-out ones, their tests and
# the packages that embed other copies of them (about 10 MB of source on Python 3.11).
WIDE_FIT_DATA = (f"code: {STDLIB} all *.py except " + ",".join(BENCH_MODULES)
                 + ", test/, tests/, idlelib/, lib2to3/, pydoc_data/, site-packages/; prose: "
                 "pydoc_data.topics (sorted topics, all but every 4th)")
# pydoc_data holds the language reference's topic texts: the held-out prose comes from there.
_WIDE_EXCLUDED_DIRS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "__pycache__",
                       "pydoc_data"}


def _held_out_name(stem):
    """Whether a module name is (or embeds) a held-out one, e.g. test_argparse-like helpers."""
    return any(Path(h).stem in stem for h in BENCH_MODULES)


def wide_fit_modules():
    """Relative paths of every stdlib module in the wide fitting set, sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for f in root.rglob("*.py"):
        rel = f.relative_to(root)
        if not (_WIDE_EXCLUDED_DIRS & set(rel.parts[:-1]) or _held_out_name(rel.stem)):
            out.append(str(rel))
    return sorted(out)


# The site set: WIDE plus the installed packages' sources and descriptions (what is installed
# differs between machines: the card names the Python and how many tokens the set held).
SITE_FIT_DATA = (WIDE_FIT_DATA + "; plus code: every *.py under site-packages except "
                 "edgeprefill, test/, tests/ and held-out module names (files in a fixed "
                 "shuffled order, as many as the token budget takes); prose: the packages' "
                 "descriptions (*.dist-info/METADATA bodies)")
FIT_SETS = ("default", "wide", "site")


def _site_roots():
    """Where installed packages live: site-packages, and any sys.path folder holding installed
    distributions (*.dist-info), e.g. a `pip install --target` folder on PYTHONPATH."""
    import site

    stdlib = Path(sysconfig.get_paths()["stdlib"]).resolve()
    roots = {Path(sysconfig.get_paths()[k]) for k in ("purelib", "platlib")}
    roots |= {Path(p) for p in site.getsitepackages()}
    for p in sys.path:
        d = Path(p or ".")
        if d.is_dir() and d.resolve() != stdlib and next(d.glob("*.dist-info"), None):
            roots.add(d)
    return sorted({r.resolve() for r in roots if r.is_dir()})


def site_fit_files():
    """(code files, description files) of the installed packages, sorted, held-out names,
    tests and edgeprefill itself excluded."""
    code, prose = set(), set()
    for root in _site_roots():
        for f in root.rglob("*.py"):
            parts = f.relative_to(root).parts
            if (_WIDE_EXCLUDED_DIRS & set(parts[:-1]) or parts[0].startswith("edgeprefill")
                    or _held_out_name(f.stem)):
                continue
            code.add(f)
        prose |= {f for f in root.glob("*.dist-info/METADATA")
                  if not f.parent.name.startswith("edgeprefill")}
    return sorted(code), sorted(prose)


def _metadata_body(text):
    """The long description of a METADATA file (after the header block)."""
    return text.partition("\n\n")[2].strip()


HELDOUT_DATA = (f"code: {STDLIB} " + ",".join(BENCH_MODULES)
                + "; prose: pydoc_data.topics (sorted topics, every 4th)")


def stdlib_text(modules):
    """Concatenated source of the named standard-library modules that exist here."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts = [(root / m).read_text(encoding="utf-8", errors="replace")
             for m in modules if (root / m).is_file()]
    if not parts:
        raise FileNotFoundError(f"no standard-library sources found under {root}")
    return "\n\n".join(parts)


def prose_text(heldout):
    """The language reference's topic texts: the held-out quarter or the fitting rest."""
    from pydoc_data.topics import topics

    keys = [k for n, k in enumerate(sorted(topics)) if (n % 4 == 3) == heldout]
    return "\n\n".join(topics[k] for k in keys)


def _interleave(a, b, chunk):
    """Alternate `chunk`-token windows of two token lists while both last, then the rest."""
    wa = [a[s:s + chunk] for s in range(0, len(a) - chunk + 1, chunk)]
    wb = [b[s:s + chunk] for s in range(0, len(b) - chunk + 1, chunk)]
    out = []
    for n in range(max(len(wa), len(wb))):
        out += wa[n:n + 1] + wb[n:n + 1]
    return out


def encode_texts(tokenizer, texts):
    """Token ids of each text (no special tokens), batched through the fast tokenizer (all
    cores) where the tokenizer has one."""
    texts = list(texts)
    fast = getattr(tokenizer, "_tokenizer", None)
    if not texts:
        return []
    if callable(fast):
        try:
            return list(fast(texts, add_special_tokens=False)["input_ids"])
        except TypeError:
            pass
    return [list(tokenizer.encode(t)) for t in texts]


def _site_code_ids(tokenizer, n_tokens, files=None):
    """About n_tokens ids of site-packages code (`files`: site_fit_files()'s code files, found
    here if not given): files in a fixed shuffled order (seeded, so every run on one machine
    reads the same ones) until the budget is met."""
    import numpy as np

    files = site_fit_files()[0] if files is None else files
    order = np.random.default_rng(0).permutation(len(files))
    texts, chars = [], 0
    for n in order:  # ~3 characters per token in code; read a margin more
        if chars >= 4 * n_tokens:
            break
        t = files[n].read_text(encoding="utf-8", errors="replace")
        texts.append(t)
        chars += len(t)
    out = []
    for ids in encode_texts(tokenizer, texts):
        out += ids
        if len(out) >= n_tokens:
            break
    return out[:n_tokens]


def fit_chunks(tokenizer, n_tokens, chunk, data="default", cache=None):
    """`chunk`-token windows of fitting text, code and prose alternating, `n_tokens` in all
    (fewer if the text runs out); `data`: one of FIT_SETS (default FIT_DATA, wide
    WIDE_FIT_DATA, site SITE_FIT_DATA). With `cache` (a folder) the windows are kept there as
    an (n, chunk) int32 .npy keyed by everything they depend on (set, budget, window, tokenizer,
    Python, and for `site` the installed files), so a resumed or repeated run skips the
    tokenizing (minutes for the site set); then an (n, chunk) array is returned."""
    if data not in FIT_SETS:
        raise ValueError(f"fitting set {data!r}: pick one of {', '.join(FIT_SETS)}")
    import numpy as np

    site = site_fit_files() if data == "site" else None  # one walk of site-packages for all
    path = None
    if cache is not None:
        path = Path(cache) / f"fit-{data}-{n_tokens}x{chunk}-{_chunks_key(tokenizer, site)}.npy"
        if path.is_file():
            try:
                return np.load(path)
            except (OSError, ValueError):  # unreadable: tokenize again and replace it
                pass
    code = list(tokenizer.encode(stdlib_text(wide_fit_modules() if data != "default"
                                             else FIT_MODULES)))
    prose = list(tokenizer.encode(prose_text(heldout=False)))
    if site is not None:
        files, meta = site
        code += _site_code_ids(tokenizer, max(0, n_tokens - len(code) - len(prose)), files)
        bodies = [_metadata_body(f.read_text(encoding="utf-8", errors="replace"))
                  for f in meta]
        for ids in encode_texts(tokenizer, [b for b in bodies if b]):
            prose += ids
    out = _interleave(code, prose, chunk)[:max(1, n_tokens // chunk)]
    if path is None:
        return out
    from edgeprefill.fsio import atomic_save_npy

    arr = np.asarray(out, dtype=np.int32).reshape(len(out), chunk)
    try:
        atomic_save_npy(path, arr)
    except OSError:  # the cache is a speed-up: a read-only or full disk must not stop a run
        pass
    return arr


def _chunks_key(tokenizer, site):
    """Hex digest of what fitting windows depend on beyond their set and size: the tokenizer
    (vocabulary size and how it splits a probe), the Python and its standard library, and for
    the site set every installed file's path, size and modification time."""
    import hashlib

    probe = "def f(x):\n    return x ** 2  # ünïcode 東京 123\nThe quick brown fox."
    h = hashlib.sha256(repr((getattr(tokenizer, "vocab_size", None), list(tokenizer.encode(probe)),
                             sys.version, sysconfig.get_paths()["stdlib"])).encode())
    for f in (site[0] + site[1]) if site else ():
        st = f.stat()
        h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def heldout_tokens(tokenizer):
    """(code ids, prose ids) of the held-out text."""
    return (list(tokenizer.encode(stdlib_text(BENCH_MODULES))),
            list(tokenizer.encode(prose_text(heldout=True))))


def bench_prompts(tokenizer, n_tokens, count=1, continuation=0):
    """`count` distinct held-out windows of exactly `n_tokens` (+ `continuation`) tokens,
    alternating code and prose (code only where prose is too short).

    Returns:
        list of token-id lists, each n_tokens + continuation long.
    """
    code, prose = heldout_tokens(tokenizer)
    need = n_tokens + continuation
    sources = [s for s in (code, prose) if len(s) >= need * ((count + 1) // 2)] or [code]
    out = []
    for n in range(count):
        ids = sources[n % len(sources)]
        per = -(-count // len(sources))
        while len(ids) < need * per:
            ids = ids + ids
        stride = max(1, (len(ids) - need) // per)
        k = n // len(sources)
        out.append(ids[k * stride:k * stride + need])
    return out


def heldout_pairs(tokenizer, count=40, prompt_tokens=384, continuation_tokens=32):
    """Evaluation pairs [{"prompt", "continuation", "source"}] cut from held-out text."""
    rows = []
    for n, ids in enumerate(bench_prompts(tokenizer, prompt_tokens, count, continuation_tokens)):
        rows.append({"prompt": tokenizer.decode(ids[:prompt_tokens]),
                     "continuation": tokenizer.decode(ids[prompt_tokens:]),
                     "source": "code" if n % 2 == 0 else "prose"})
    return rows


def read_jsonl(path, expected):
    """[(line number, object)] of a JSONL file; one-line errors name a missing file (with the
    `expected` line format) or the bad line."""
    from edgeprefill.errors import EdgeprefillError
    from edgeprefill.fsio import decode_utf8

    path = Path(path)
    if not path.is_file():
        raise EdgeprefillError(f"{path} does not exist: pass a JSONL file of {expected} lines")
    out = []
    for n, line in enumerate(decode_utf8(path.read_bytes(), str(path)).splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append((n, json.loads(line)))
        except json.JSONDecodeError as e:
            raise EdgeprefillError(f"{path}:{n} is not valid JSON ({e.msg}): one object per "
                                   "line") from None
    if not out:
        raise EdgeprefillError(f"{path} holds no rows: one {expected} object per line")
    return out


def read_pairs(path):
    """Rows of a {"prompt", "continuation"} JSONL file; one-line errors name the bad line."""
    from edgeprefill.errors import EdgeprefillError

    rows = []
    for n, row in read_jsonl(path, '{"prompt": ..., "continuation": ...}'):
        if not isinstance(row, dict) or not all(
                isinstance(row.get(k), str) and row[k] for k in ("prompt", "continuation")):
            raise EdgeprefillError(f'{path}:{n} needs non-empty string fields "prompt" and '
                                   '"continuation"')
        rows.append(row)
    return rows
