"""`edgeprefill eval` and `kvp sweep`: quality metrics against the exact prefill."""
import numpy as np

from edgeprefill.loading import load
from edgeprefill.prefill import FullPrefill
from edgeprefill.quality import kl_divergence, reference, score


def test_exact_strategy_scores_perfectly_and_a_worse_one_does_not(tiny_models):
    from edgeprefill.kvp.aux import layer_pruned_aux
    from edgeprefill.prefill.aux_only import AuxOnly

    lm = load(str(tiny_models["llama"]))
    m = lm.model
    ref = reference(m, [5, 17, 200, 3, 99, 42, 7], [8, 9, 10, 11], greedy_tokens=6)
    assert len(ref.greedy) == 6
    s = score(m, FullPrefill(m, chunk_size=3), ref)
    assert s["agree"] == 1.0 and s["kl"] < 1e-8 and s["greedy_match"] == 6
    assert abs(s["nll"] - ref.nll) < 1e-5
    worse = score(m, AuxOnly(m, layer_pruned_aux(m, 0.5)), ref)
    assert worse["kl"] > 1e-3 and worse["nll"] != ref.nll
    assert kl_divergence(np.array([1.0, 2.0]), np.array([1.0, 2.0])) == 0.0
    assert 0 <= s["base_margin"] <= 1 and s["second_choice"] == 0.0


def test_summary_separates_near_ties_from_clear_base_choices():
    """agreement_clear is the agreement over pairs whose base top-two margin is at least
    NEAR_TIE; near_ties counts the rest; a miss on the base's second token is counted."""
    from edgeprefill.quality import NEAR_TIE, summarize, top_two_margin

    margin, second = top_two_margin(np.log(np.array([0.1, 0.5, 0.4])))
    assert abs(margin - 0.1) < 1e-9 and second == 2
    row = dict(kl=0.1, nll=1.0, nll_exact=1.0, greedy_match=1, ttft_s=1.0, ttft_exact_s=1.0)
    rows = [dict(row, agree=0.0, second_choice=1.0, base_margin=NEAR_TIE / 2),
            dict(row, agree=1.0, second_choice=0.0, base_margin=0.5),
            dict(row, agree=0.0, second_choice=0.0, base_margin=0.3),
            dict(row, agree=1.0, second_choice=0.0, base_margin=NEAR_TIE)]
    out = summarize(rows, 4)
    assert out["first_token_agreement"] == 0.5 and out["near_ties"] == 1
    assert abs(out["agreement_clear"] - 2 / 3) < 1e-12 and out["misses_second_choice"] == 1
    assert summarize(rows[:1], 4)["agreement_clear"] is None


def test_agreement_interval_is_the_wilson_interval():
    """35 of 40 pairs: 0.875 with a 95% interval of about [0.74, 0.95] (Wilson), which is why
    one pair more or less on 40 pairs is not a measured difference."""
    from edgeprefill.quality import wilson_interval

    lo, hi = wilson_interval(35, 40)
    assert abs(lo - 0.7387) < 1e-3 and abs(hi - 0.9454) < 1e-3
    assert wilson_interval(40, 40)[1] == 1.0 and wilson_interval(0, 40)[0] == 0.0
    lo120, hi120 = wilson_interval(105, 120)
    assert lo < lo120 < 0.875 < hi120 < hi  # more pairs, a narrower interval
    assert wilson_interval(0, 0) is None
