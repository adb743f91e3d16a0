"""Careless input across the commands: one line naming the fix, a non-zero exit, nothing lost."""
import pytest


def test_saved_chats_with_wrong_fields_or_caches_are_refused(tiny_models):
    import mlx.core as mx

    from edgeprefill.conversation import check_saved_chat
    from edgeprefill.errors import EdgeprefillError
    from edgeprefill.loading import load

    m = load(str(tiny_models["llama"])).model
    kv = mx.zeros((1, m.n_kv_heads, 3, m.head_dim))
    arrays = {f"base.{i}.{x}": kv for i in range(m.n_layers) for x in ("keys", "values")}
    good = {"config_hash": "h", "strategy": "full", "system": None, "tokens": [1, 2, 3],
            "messages": [{"role": "user", "content": "hi"}]}
    check_saved_chat("f", good, arrays, m)
    for change, field in ((dict(messages="hi"), "messages"),
                          (dict(messages=[{"role": "user"}]), "messages"),
                          (dict(tokens=[1, 2]), "base.0"),
                          (dict(tokens=[1, 2, 10**9]), "tokens"),
                          (dict(strategy=None), "strategy")):
        with pytest.raises(EdgeprefillError, match=f"field '{field}'"):
            check_saved_chat("f", {**good, **change}, arrays, m)
    with pytest.raises(EdgeprefillError, match="field 'base.1'"):
        check_saved_chat("f", good, {k: v for k, v in arrays.items() if ".1." not in k}, m)
