"""Numerical verification of an exported package without Core ML: every function's MIL program
runs in the numpy interpreter and is compared with the torch mirror on the same prompt, state
included (on macOS the tests also run Core ML's own predict).

The prompt is prefilled chunk by chunk through `prefill` (the last chunk padded), one token is
decoded through `decode`, and with a KV Prediction pair the prompt but its last `tail` tokens
goes through `kvp_prefill` and the tail through `decode` (one token, the paper's base step) or
`prefill` (PackageRunner.kvp_prefill), against the mirror's KVPrediction strategy.
"""

import numpy as np

from edgeprefill.converters.coreml.run import PackageRunner, empty_states


def _chunks(ids, start, chunk):
    """Yield (padded (1, chunk) ids, position, last_index) covering ids from `start`."""
    for s in range(0, len(ids), chunk):
        part = list(ids[s:s + chunk])
        n = len(part)
        yield (np.array([part + [0] * (chunk - n)], dtype=np.int32),
               np.array([start + s], dtype=np.int32), np.array([n - 1], dtype=np.int32))


def run_prompt(run, function, ids, chunk, states, start=0):
    """Run `function` (prefill or kvp_prefill) over ids in chunks; (last outputs, states)."""
    out = None
    for x, pos, last in _chunks(ids, start, chunk):
        feeds = {"input_ids": x, "position": pos}
        if function != "kvp_prefill":
            feeds["last_index"] = last
        out, states = run(function, feeds, states)
    return out, states


def decode_one(run, token, position, states):
    feeds = {"input_ids": np.array([[token]], dtype=np.int32),
             "position": np.array([position], dtype=np.int32),
             "last_index": np.array([0], dtype=np.int32)}
    return run("decode", feeds, states)


def compare(logits, ref, states=None, ref_cache=None, n=None):
    """Differences of (V,) logits against a reference, and of the states' first n positions
    against a mirror cache."""
    logits = np.asarray(logits, dtype=np.float32).reshape(-1)
    ref = np.asarray(ref, dtype=np.float32).reshape(-1)
    diff = float(np.abs(logits - ref).max())
    cos = float(logits @ ref / (np.linalg.norm(logits) * np.linalg.norm(ref) + 1e-12))
    res = {"max_abs_logit_diff": diff, "rel_logit_diff": diff / float(np.abs(ref).max()),
           "logit_cosine": cos, "top1_match": bool(logits.argmax() == ref.argmax())}
    if states is not None and ref_cache is not None:
        worst = 0.0
        for i, layer in enumerate(ref_cache):
            k, v = (t[0].float().numpy() for t in layer.keys_and_values())
            worst = max(worst, float(np.abs(states["key_cache"][i][:, :n].astype(np.float32)
                                            - k).max()),
                        float(np.abs(states["value_cache"][i][:, :n].astype(np.float32)
                                     - v).max()))
        res["max_state_diff"] = worst
    return res


def mirror_reference(mirror, ids, context, chunk):
    """(cache, last logits) of the mirror's exact chunked prefill."""
    import torch

    cache = mirror.make_cache(context)
    logits = None
    with torch.no_grad():
        for s in range(0, len(ids), chunk):
            logits = mirror(torch.tensor([ids[s:s + chunk]]), cache)[0, -1]
    return cache, logits.float().numpy()


def verify_package(path, mirror, predictor=None, aux=None, chunk=64, prompt_ids=None, tail=1):
    """{function: differences} for every function of the package at `path` (kvp_prefill
    against the mirror's KV Prediction with `predictor`, the mirror AuxModel `aux` and an
    exact tail of `tail` tokens)."""
    import torch

    from edgeprefill.converters.coreml.export import load_program
    from edgeprefill.converters.coreml.mil_interp import Interpreter

    prog = load_program(path)
    run = Interpreter(prog)
    states0 = empty_states(prog)
    context = states0["key_cache"].shape[2]
    ids = list(prompt_ids)
    n = len(ids)
    report = {}
    out, states = run_prompt(run, "prefill", ids, chunk, dict(states0))
    cache, ref = mirror_reference(mirror, ids, context, chunk)
    report["prefill"] = compare(out["logits"], ref, states, cache, n)
    if "decode" in prog.functions:
        nxt = int(np.argmax(ref))
        out, states = decode_one(run, nxt, n, states)
        with torch.no_grad():
            ref2 = mirror(torch.tensor([[nxt]]), cache)[0, -1].float().numpy()
        report["decode"] = compare(out["logits"], ref2, states, cache, n + 1)
    if "kvp_prefill" in prog.functions and predictor is not None:
        report["kvp_prefill"] = verify_kvp(path, prog, mirror, predictor, aux, chunk, ids, tail,
                                           context)
        # and against the exact prefill: what KV Prediction approximates
        report["kvp_prefill"]["top1_match_exact"] = bool(
            report["kvp_prefill"].pop("argmax") == np.argmax(ref))
    return report


def verify_kvp(path, prog, mirror, predictor, aux, chunk, ids, tail, context):
    """The package's KV Prediction of `ids` with an exact tail (PackageRunner.kvp_prefill, in
    the interpreter) against the mirror's KVPrediction; compare()'s fields and 'argmax'."""
    from edgeprefill.mirror.prefill.kv_prediction import KVPrediction

    strat = KVPrediction(mirror, aux, predictor, chunk_size=chunk, tail=tail)
    kcache = strat.make_cache(context)
    kcache, kref, _ = strat.prefill(ids, kcache)
    runner = PackageRunner(path, backend="interpreter", program=prog)
    logits = runner.kvp_prefill(ids, tail)
    res = compare(logits, kref.numpy(), runner.state, kcache, len(ids))
    res["tail"] = tail
    res["argmax"] = int(np.argmax(logits))
    return res
