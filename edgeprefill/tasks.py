"""Long-prompt tasks: generated, seeded rows whose answer sits somewhere in a long prompt, and
their scoring by greedy generation of the answer span (what a user loses to an approximate
prefill at the lengths where TTFT matters).

Tasks (RULER-style, Hsieh et al. 2024, plus a code task):
    niah-single      one key-value needle in the haystack; asked for its value.
    niah-multikey    four needles with different keys; asked for one key's value.
    niah-multivalue  four values for one key; asked for all of them.
    vartrack         a chain of assignments VAR X1 = 12345 ... VAR X5 = VAR X4 spread in the
                     haystack; asked which variables hold 12345.
    vartrack-K       the same with K names in the chain (K = 1..5; vartrack is vartrack-5).
                     vartrack-1 is one assignment, asked which variable holds the value: the
                     one tracking the default 135M model can do (it scores 0 from K = 2).
    code-line        a long prefix of a standard-library module; complete the next line.
Haystacks (`haystack=`): filler (one repeated paragraph), prose (held-out language-reference
text), code (held-out standard-library source). Prompt lengths are measured in the model's own
tokens, chat template included.

A row: {"task", "id", "prompt" (text), "answers" (every string must appear in the output),
"answer_prefix" (the start of the reply, after the chat template), "line" (code-line: the exact
next line), "chat" (through the chat template or raw), "prompt_tokens"}.
"""

import difflib
import random
import re

from edgeprefill.errors import EdgeprefillError

TASKS = ("niah-single", "niah-multikey", "niah-multivalue", "vartrack", "vartrack-1", "code-line")
VARTRACK_MAX = 5
HAYSTACKS = ("filler", "prose", "code")
FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back "
          "again. ")
WORDS = ("amber", "basil", "cedar", "delta", "ember", "fjord", "garnet", "harbor", "indigo",
         "juniper", "kelp", "lumen", "maple", "nectar", "onyx", "pepper", "quartz", "raven",
         "saffron", "tundra", "umber", "velvet", "willow", "xenon", "yarrow", "zephyr")
TOLERANCE = 0.02  # a row's prompt is within 2% of the asked length, in the model's tokens
ANSWER_TOKENS = {"niah-single": 16, "niah-multikey": 16, "niah-multivalue": 48,
                 "vartrack": 32, "vartrack-1": 16, "code-line": 32}


def check_task(task):
    """Refuse a task name that is not in TASKS or a vartrack-K with K in 1..VARTRACK_MAX."""
    m = re.fullmatch(r"vartrack-(\d+)", task or "")
    if task in TASKS or (m and 1 <= int(m.group(1)) <= VARTRACK_MAX):
        return task
    raise EdgeprefillError(f"unknown task '{task}': choose one of {', '.join(TASKS)} "
                           f"(or vartrack-K, K = 1..{VARTRACK_MAX})")


def answer_tokens(task):
    """Greedy tokens generated for a row of `task`: room for its whole answer span."""
    if task in ANSWER_TOKENS:
        return ANSWER_TOKENS[task]
    return ANSWER_TOKENS["vartrack"] if (task or "").startswith("vartrack-") else 32


def _haystack_text(kind):
    from edgeprefill.data import BENCH_MODULES, prose_text, stdlib_text

    if kind == "filler":
        return FILLER * 4000
    if kind == "prose":
        return prose_text(heldout=True)
    if kind == "code":
        return stdlib_text(BENCH_MODULES)
    raise EdgeprefillError(f"unknown haystack '{kind}': choose one of {', '.join(HAYSTACKS)}")


def _pieces(text):
    """The haystack cut where a needle may go in: after sentences (prose) or lines (code)."""
    return [p for p in re.split(r"(?<=[.!?\n])\s+", text) if p.strip()]


def _number(rng):
    return str(rng.randrange(1_000_000, 10_000_000))


def _key(rng, used):
    while True:
        k = f"{rng.choice(WORDS)}-{rng.choice(WORDS)}"
        if k not in used:
            used.add(k)
            return k


def _multikey_followup(key, value):
    """A second question of a niah-multikey row, about another of its keys (a next turn)."""
    return {"question": f"And what is the special magic number for {key} mentioned in the "
                        "text above?",
            "answers": [value],
            "answer_prefix": f"The special magic number for {key} mentioned in the text above is"}


def _needles(task, rng):
    """(needle sentences, question, answers, answer prefix[, follow-up]) of one row. The answer
    prefix starts the model's reply (as RULER does), so the first generated tokens are the
    answer. niah-multikey adds a follow-up question about another key (no random draw: the
    rows stay those of earlier versions)."""
    used = set()
    if task == "niah-single":
        k, v = _key(rng, used), _number(rng)
        return ([f"One of the special magic numbers for {k} is: {v}."],
                f"What is the special magic number for {k} mentioned in the text above?", [v],
                f"The special magic number for {k} mentioned in the text above is")
    if task == "niah-multikey":
        pairs = [(_key(rng, used), _number(rng)) for _ in range(4)]
        asked = rng.randrange(4)
        k, v = pairs[asked]
        return ([f"One of the special magic numbers for {a} is: {b}." for a, b in pairs],
                f"What is the special magic number for {k} mentioned in the text above?", [v],
                f"The special magic number for {k} mentioned in the text above is",
                _multikey_followup(*pairs[(asked + 1) % 4]))
    if task == "niah-multivalue":
        k = _key(rng, used)
        vals = [_number(rng) for _ in range(4)]
        return ([f"One of the special magic numbers for {k} is: {v}." for v in vals],
                f"What are all the special magic numbers for {k} mentioned in the text above?",
                vals, f"The special magic numbers for {k} mentioned in the text above are")
    if task.startswith("vartrack"):
        v = str(rng.randrange(10_000, 100_000))
        count = int(task.split("-")[1]) if "-" in task else VARTRACK_MAX
        names = []
        while len(names) < count:  # distinct names, drawn in order
            name = (f"{rng.choice('ABCDEFGHJKMNPQRSTUVWXYZ')}"
                    f"{rng.choice('ABCDEFGHJKMNPQRSTUVWXYZ')}{rng.randrange(10, 100)}")
            if name not in names:
                names.append(name)
        chain = [f"VAR {names[0]} = {v}."] + [f"VAR {b} = VAR {a}." for a, b in
                                            zip(names, names[1:])]
        if count == 1:
            return (chain, f"Which variable is assigned the value {v} in the text above?",
                    names, f"The variable assigned the value {v} in the text above is VAR")
        return (chain, f"Which variables are assigned the value {v}, directly or through "
                "other variables, in the text above?", names,
                f"According to the chain of variable assignments in the text above, "
                f"{len(names)} variables are assigned the value {v}, they are:")
    raise EdgeprefillError(f"unknown task '{task}': choose one of {', '.join(TASKS)}")


def _render(tokenizer, text, chat, prefix=""):
    """Prompt ids: the text (through the chat template when `chat`), then the answer prefix
    (the start of the model's reply)."""
    from edgeprefill.generate import build_prompt

    ids = build_prompt(tokenizer, text, chat_template=chat)
    return ids + (list(tokenizer.encode(prefix, add_special_tokens=False)) if prefix else [])


def _fit(tokenizer, make, n_pieces, n_tokens):
    """The prompt ids from make(k) (k haystack pieces) whose length is closest to n_tokens,
    by bisection on k (the length grows with k)."""
    lo, hi = 0, n_pieces
    best = None
    while lo <= hi:
        mid = (lo + hi) // 2
        ids, row = make(mid)
        if best is None or abs(len(ids) - n_tokens) < abs(len(best[0]) - n_tokens):
            best = (ids, row)
        if len(ids) < n_tokens:
            lo = mid + 1
        elif len(ids) > n_tokens:
            hi = mid - 1
        else:
            break
    return best


def _retrieval_row(tokenizer, task, n_tokens, pieces, rng, index):
    needles, question, answers, prefix, *followup = _needles(task, rng)
    start = rng.randrange(len(pieces))
    depths = sorted(rng.random() for _ in needles)  # in order: vartrack's chain reads forward
    words, bounds = [], [0]  # the haystack's words; where each of its pieces starts
    i = 0
    while len(words) < 2 * n_tokens:
        words += pieces[(start + i) % len(pieces)].split()
        bounds.append(len(words))
        i += 1

    def make(w):
        """The prompt with the haystack's first w words, needles at piece boundaries."""
        cuts = [max(b for b in bounds if b <= max(0, round(d * w))) for d in depths]
        out, last = [], 0
        for cut, needle in zip(cuts, needles):
            out += words[last:cut] + [needle]
            last = cut
        text = " ".join(out + words[last:w]) + "\n\n" + question
        return _render(tokenizer, text, True, prefix), text

    ids, text = _fit(tokenizer, make, len(words), n_tokens)
    row = {"task": task, "id": index, "prompt": text, "answers": answers, "chat": True,
           "answer_prefix": prefix, "prompt_tokens": len(ids)}
    if followup:
        row["followup"] = followup[0]
    return row


def _code_row(tokenizer, n_tokens, code_lines, rng, index):
    """A prefix of the code that ends before a line worth completing (a non-trivial one)."""
    need, total, first = 6 * n_tokens, 0, len(code_lines)  # chars of code before the line
    for i, line in enumerate(code_lines):
        total += len(line) + 1
        if total >= need:
            first = i + 1
            break
    if first >= len(code_lines):
        raise EdgeprefillError(f"code-line: the code cannot make a {n_tokens}-token prompt: "
                               "pick a shorter length")
    for _ in range(1000):
        end = rng.randrange(max(50, first), len(code_lines))
        line = code_lines[end]
        if len(line.strip()) >= 12 and not line.strip().startswith("#"):
            break

    source = "\n".join(code_lines[max(0, end - 4 * n_tokens):end]) + "\n"

    def make(c):
        """The last c characters before the line (the first line may start mid-line)."""
        text = source[len(source) - c:]
        return _render(tokenizer, text, False), text

    ids, text = _fit(tokenizer, make, len(source), n_tokens)
    return {"task": "code-line", "id": index, "prompt": text, "answers": [line.strip()],
            "line": line, "chat": False, "prompt_tokens": len(ids)}


def make_rows(tokenizer, task, n_tokens, count, haystack="prose", seed=0):
    """`count` rows of `task` whose prompts are `n_tokens` long (within 2%) in this tokenizer.

    The same (task, length, haystack, seed) gives the same rows. code-line's haystack is the
    code itself.
    """
    check_task(task)
    rng = random.Random(f"{task}/{n_tokens}/{haystack}/{seed}")
    rows = []
    if task == "code-line":
        from edgeprefill.data import BENCH_MODULES, stdlib_text

        lines = stdlib_text(BENCH_MODULES).splitlines()
        rows = [_code_row(tokenizer, n_tokens, lines, rng, i) for i in range(count)]
    else:
        pieces = _pieces(_haystack_text(haystack))
        rows = [_retrieval_row(tokenizer, task, n_tokens, pieces, rng, i) for i in range(count)]
    short = [r for r in rows if abs(r["prompt_tokens"] - n_tokens) > TOLERANCE * n_tokens]
    if short:
        where = "the code" if task == "code-line" else f"the {haystack} haystack"
        raise EdgeprefillError(f"{task}: {where} cannot make a {n_tokens}-token "
                               f"prompt (got {short[0]['prompt_tokens']}): pick another length "
                               "or haystack")
    return rows


def score_output(row, text):
    """{"match": 1.0 if every answer string appears in the output (code-line: the first line
    equals the expected line, stripped), "similarity": edit similarity for code-line}."""
    if row.get("task") == "code-line" or "line" in row:
        first = text.strip("\n").split("\n")[0].strip()
        want = row["answers"][0]
        return {"match": float(first == want),
                "similarity": difflib.SequenceMatcher(None, first, want).ratio()}
    return {"match": float(all(a in text for a in row["answers"]))}


def wilson(hits, n):
    from edgeprefill.quality import wilson_interval

    return wilson_interval(hits, n)


def row_ids(tokenizer, row):
    """The prompt ids of a row (through the chat template unless the row says otherwise)."""
    return _render(tokenizer, row["prompt"], row.get("chat", True), row.get("answer_prefix", ""))


def answered(row, text):
    """Whether `text` already settles the row's score: every answer string is in it, or (code-line)
    its first line is complete. More tokens cannot change the score from there."""
    if row.get("task") == "code-line" or "line" in row:
        return "\n" in text.lstrip("\n")
    return all(a in text for a in row["answers"])


def answer_row(lm, strategy, row, max_tokens=None, kv_bits=None, ids=None, cache=None):
    """One row's greedy answer: {"id", "prompt_tokens", "output", "ttft_s", "match", ...}.
    Decoding stops at the task's answer length or as soon as the row is `answered` (the same
    score as decoding on, in fewer tokens). ids, cache: the tokens to prefill over a cache of
    earlier ones (default: the row's prompt, from scratch)."""
    from edgeprefill.generate import stream_generate

    ids = ids or row_ids(lm.tokenizer, row)
    n = max_tokens or answer_tokens(row.get("task"))
    text, ttft = "", None
    for event in stream_generate(lm.model, lm.tokenizer, ids, strategy, cache=cache,
                                 max_tokens=n, temp=0.0, kv_bits=kv_bits):
        text += event.text
        ttft = event.prefill.ttft_s
        if event.result is not None or answered(row, text):
            break
    return {"id": row.get("id"), "prompt_tokens": len(ids), "output": text, "ttft_s": ttft,
            **score_output(row, text)}


def run_rows(lm, strategy, rows, max_tokens=None, progress=None, kv_bits=None):
    """Greedy answers of `strategy` on `rows` (answer_row each). max_tokens: answer length
    (default: the task's); kv_bits: decode over a 4- or 8-bit cache."""
    out = []
    for row in rows:
        r = answer_row(lm, strategy, row, max_tokens, kv_bits)
        out.append({**r, "id": row.get("id", len(out))})
        if progress:
            progress(len(out), len(rows))
    return out


def followup_ids(tokenizer, row):
    """(first, second): the row's first-turn prompt ids (its question and answer prefix), and
    the conversation's ids at the follow-up: the first turn, the right answer as the
    assistant's reply (the same history for every strategy), the follow-up question and its
    answer prefix."""
    from edgeprefill.generate import build_prompt

    f = row["followup"]
    reply = f"{row['answer_prefix']} {', '.join(row['answers'])}."
    history = [{"role": "user", "content": row["prompt"]},
               {"role": "assistant", "content": reply}]
    second = build_prompt(tokenizer, f["question"], history=history)
    second += list(tokenizer.encode(f["answer_prefix"], add_special_tokens=False))
    return row_ids(tokenizer, row), second


def run_followup(lm, strategy, rows, heal=False, progress=None):
    """The follow-up question's greedy answers in a two-turn conversation: `strategy`
    prefills the first turn (the document and its question), then, after `heal` (the first
    turn's cache recomputed exactly, edgeprefill.cache.heal) or not, the rest of the
    conversation over that cache. Scored as answer_row; ttft_s is the follow-up's."""
    from edgeprefill.cache import CannotHeal, common_prefix, heal as heal_cache

    out = []
    for row in rows:
        if "followup" not in row:
            raise EdgeprefillError(f"{row.get('task')} rows have no follow-up question: use "
                                   "niah-multikey")
        first, second = followup_ids(lm.tokenizer, row)
        n = min(common_prefix(first, second), len(second) - 1)
        cache, _, _ = strategy.prefill(second[:n])
        if heal:
            if getattr(strategy, "base_cache", True) is False:  # aux-only: the aux's cache
                raise CannotHeal(f"{getattr(strategy, 'name', 'this')} caches the aux's K/V, "
                                 "not the base's: nothing to heal")
            cache = heal_cache(lm, cache)
        r = answer_row(lm, strategy, {"task": row["task"], **row["followup"]},
                       ids=second[n:], cache=cache)
        out.append({**r, "id": row.get("id", len(out)), "prompt_tokens": len(second),
                    "first_turn_tokens": n})
        if progress:
            progress(len(out), len(rows))
    return out


def evaluate_followup(lm, strategies, row_sets, progress=None):
    """Healing's effect on a next turn: for every row set, the follow-up's accuracy after each
    strategy's first turn, unhealed and (where its cache can heal) healed, relative to full's
    (full prefills both turns). Records as evaluate_task's, with "healed" (bool)."""
    from edgeprefill.cache import CannotHeal
    from edgeprefill.prefill.registry import build, is_exact

    if "full" not in strategies:
        strategies = {"full": build("full", lm), **strategies}
    records = []
    for label, rows in row_sets.items():
        full = run_followup(lm, strategies["full"], rows, progress=progress)
        records.append({"strategy": "full", "set": label, "healed": False,
                        "summary": summarize_rows(full, full), "rows": full})
        for name, strategy in strategies.items():
            if name == "full":
                continue
            for heal in (False, True) if not is_exact(name) else (False,):
                try:
                    res = run_followup(lm, strategy, rows, heal=heal, progress=progress)
                except CannotHeal:
                    continue  # lazy and selection caches skip positions: nothing to heal
                records.append({"strategy": name, "set": label, "healed": heal,
                                "summary": summarize_rows(res, full), "rows": res})
    return records


def summarize_rows(results, reference=None):
    """Accuracy with its 95% Wilson interval (and mean edit similarity where scored); with
    `reference` (full's results on the same rows), accuracy (and similarity) relative to it."""
    hits = sum(r["match"] for r in results)
    n = len(results)
    s = {"rows": n, "accuracy": hits / n if n else None, "accuracy_ci95": wilson(hits, n),
         "ttft_s": sum(r["ttft_s"] for r in results) / n if n else None}
    if results and "similarity" in results[0]:
        s["similarity"] = sum(r["similarity"] for r in results) / n
    if reference is not None:
        ref = sum(r["match"] for r in reference)
        s["accuracy_full"] = ref / len(reference) if reference else None
        s["relative_accuracy"] = hits / ref if ref else None
        if "similarity" in s and reference and "similarity" in reference[0]:
            ref_sim = sum(r["similarity"] for r in reference) / len(reference)
            s["relative_similarity"] = s["similarity"] / ref_sim if ref_sim else None
    return s


def read_task_rows(path):
    """Rows of a user's {"prompt", "answer"} JSONL file (answer: a string or a list of strings
    that must all appear in the output; optional "chat": false for raw prompts)."""
    from edgeprefill.data import read_jsonl

    rows = []
    for n, row in read_jsonl(path, '{"prompt": ..., "answer": ...}'):
        answer = row.get("answer") if isinstance(row, dict) else None
        answers = [answer] if isinstance(answer, str) else answer
        if not (isinstance(row, dict) and isinstance(row.get("prompt"), str) and row["prompt"]
                and isinstance(answers, list) and answers
                and all(isinstance(a, str) and a for a in answers)):
            raise EdgeprefillError(f'{path}:{n} needs a non-empty "prompt" and an "answer" '
                                   "(a string or a list of strings)")
        rows.append({"task": "data", "id": row.get("id", n), "prompt": row["prompt"],
                     "answers": answers, "chat": row.get("chat", True) is not False})
    return rows


def evaluate_task(lm, strategies, row_sets, progress=None, kv_bits=None):
    """Every strategy on every row set: records with per-row results and a summary relative to
    `full` on the same rows (full runs first, added if missing).

    Args:
        strategies: {name: built strategy}.
        row_sets: {label (e.g. the prompt length): [rows]}.
        kv_bits: the strategies (not full, the reference) decode over a 4- or 8-bit cache.
    Returns:
        [{"strategy", "set", "summary", "rows": [...]}].
    """
    from edgeprefill.prefill.registry import build

    names = list(strategies)
    if "full" not in strategies:
        strategies = {"full": build("full", lm), **strategies}
    records = []
    for label, rows in row_sets.items():
        full = run_rows(lm, strategies["full"], rows, progress=progress)
        for name in names:
            res = full if name == "full" and not kv_bits else run_rows(
                lm, strategies[name], rows, progress=progress, kv_bits=kv_bits)
            records.append({"strategy": name, "set": label,
                            "summary": summarize_rows(res, full), "rows": res})
    return records
