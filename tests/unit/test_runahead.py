"""KV-Runahead and tsp over real mx.distributed processes (ring backend on 127.0.0.1)."""
import json

import pytest

from edgeprefill.loading import load
from edgeprefill.prefill.runahead import (
    balanced_partition,
    even_partition,
    runahead_bytes,
    tsp_bytes,
)


@pytest.fixture(scope="module")
def lm(tiny_models):
    return load(str(tiny_models["qwen3"]))


def test_partitions_and_bytes_moved(lm):
    m = lm.model
    assert even_partition(23, 3) == [8, 8, 7] and even_partition(2, 3) == [1, 1]
    bal = balanced_partition(2048, 3, lm.config)
    assert sum(bal) == 2048 and bal[0] > bal[1] > bal[2]  # later tokens attend to more keys
    n, p = 24, 3
    per_tok_layers = 2 * m.n_kv_heads * m.head_dim * 4 * m.n_layers  # fp32 K and V
    assert runahead_bytes(m, even_partition(n, p)) == (p - 1) * n // 2 * per_tok_layers
    assert tsp_bytes(m, n, p) == (p - 1) * n * per_tok_layers


def test_partition_table_interpolates_and_falls_back(lm, tmp_path, capsys):
    from edgeprefill.distributed.partition import mixed_partition, partition_from_table

    table = tmp_path / "t.json"
    table.write_text(json.dumps({lm.model_id: {"2": {"100": 0.0, "300": 1.0}}}))
    assert partition_from_table(lm.model_id, 100, 2, lm.config, table) == [50, 50]
    mid = partition_from_table(lm.model_id, 200, 2, lm.config, table)
    assert mid == mixed_partition(200, 2, lm.config, 0.5) and sum(mid) == 200
    assert partition_from_table(lm.model_id, 999, 2, lm.config, table) == mixed_partition(
        999, 2, lm.config, 1.0)
    assert partition_from_table(lm.model_id, 10, 3, lm.config, table) == [4, 3, 3]
    assert "no tuned runahead partition" in capsys.readouterr().err


@pytest.mark.parametrize("devices,sizes", [(("cpu", "cpu"), None), (("cpu",) * 3, [11, 8, 4]),
                                           (("cpu",) * 3, [22, 1])])
def test_stream_runahead_equals_full(lm, devices, sizes):
    """Runahead across streams of one process (threads, in-memory hand-off)."""
    import mlx.core as mx
    import numpy as np

    from edgeprefill.prefill import FullPrefill, StreamRunahead, build

    ids = list(range(5, 28))
    fcache, flogits, _ = FullPrefill(lm.model).prefill(ids)
    cache, logits, stats = StreamRunahead(lm.model, devices, sizes).prefill(ids)
    np.testing.assert_allclose(np.array(logits), np.array(flogits), atol=1e-4)
    for a, b in zip(cache, fcache):
        for x, y in zip(a.keys_and_values(), b.keys_and_values()):
            np.testing.assert_allclose(np.array(x), np.array(y), atol=1e-4)
    assert cache.tokens == ids and sum(stats.extra["sizes"]) == len(ids)
    assert isinstance(build("runahead-streams", lm), StreamRunahead)
    with pytest.raises(ValueError, match="does not split"):
        StreamRunahead(lm.model, devices, [1, 1]).prefill(ids)
    mx.eval(logits)
