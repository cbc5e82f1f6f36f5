"""Wilson intervals and McNemar's exact test against scipy's (test-only oracle) and hand cases."""

import pytest

from fasteval.evaluation.stats import mcnemar_exact, percent_interval, wilson_interval

scipy_stats = pytest.importorskip("scipy.stats")


@pytest.mark.parametrize("k,n", [(0, 1), (1, 1), (0, 10), (10, 10), (7, 13), (693, 1000), (49999, 50000),
                                 (1, 3), (34879, 50000)])
def test_wilson_matches_scipy(k, n):
    ci = scipy_stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    low, high = wilson_interval(k, n)
    assert low == pytest.approx(ci.low, abs=1e-12) and high == pytest.approx(ci.high, abs=1e-12)
    assert 0.0 <= low <= k / n <= high <= 1.0


def test_wilson_edges():
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        wilson_interval(3, 2)
    assert percent_interval(5, 10) == pytest.approx([100 * x for x in wilson_interval(5, 10)])
    # Symmetric around one half; narrower with more trials.
    low, high = wilson_interval(50, 100)
    assert low + high == pytest.approx(1.0)
    assert wilson_interval(500, 1000)[1] - wilson_interval(500, 1000)[0] < high - low


@pytest.mark.parametrize("b,c", [(0, 0), (0, 1), (1, 0), (3, 3), (2, 9), (9, 2), (0, 25), (40, 61), (1200, 1310),
                                 (12345, 12001)])
def test_mcnemar_matches_scipy_binomtest(b, c):
    expected = 1.0 if b + c == 0 else scipy_stats.binomtest(min(b, c), b + c, 0.5).pvalue
    assert mcnemar_exact(b, c) == pytest.approx(expected, rel=1e-9, abs=1e-300)
    assert mcnemar_exact(b, c) == mcnemar_exact(c, b)


def test_mcnemar_hand_case():
    # 0 against 5 discordant: P = 2 * (1/2)^5 = 1/16.
    assert mcnemar_exact(0, 5) == pytest.approx(1 / 16)
    assert mcnemar_exact(4, 4) == 1.0
    assert 0.0 <= mcnemar_exact(0, 5000) < 1e-300  # 2 / 2**5000 underflows: no error, no NaN
    with pytest.raises(ValueError):
        mcnemar_exact(-1, 2)
