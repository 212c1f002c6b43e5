"""Metrics of the reference trainer on hand-made predictions; expected values worked out by hand."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from samkernels.train import metrics

# Four examples, two classes.  Predictions 0, 0, 1, 1; labels 0, 1, 1, 0 -> correct, wrong, correct,
# wrong.  Confidences 0.9, 0.6, 0.7, 0.8; probabilities of the true class 0.9, 0.4, 0.7, 0.2.
PROBS = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.2, 0.8]])
LABELS = torch.tensor([0, 1, 1, 0])


def test_accuracy():
    assert metrics.accuracy(PROBS, LABELS) == 0.5


def test_nll():
    expected = -(math.log(0.9) + math.log(0.4) + math.log(0.7) + math.log(0.2)) / 4
    assert metrics.nll(PROBS, LABELS) == pytest.approx(expected, rel=1e-6)


def test_nll_of_zero_probability_is_large_but_finite():
    value = metrics.nll(torch.tensor([[1.0, 0.0]]), torch.tensor([1]))
    assert math.isfinite(value) and value > 700  # -log(smallest positive float64) ~ 708.4


def test_ece_twenty_bins_one_example_per_bin():
    # each confidence sits alone in its 0.05-wide bin: |1-0.9|, |0-0.6|, |1-0.7|, |0-0.8|
    assert metrics.ece(PROBS, LABELS) == pytest.approx((0.1 + 0.6 + 0.3 + 0.8) / 4)


def test_ece_two_bins_pools_examples():
    # all confidences in (0.5, 1]: accuracy 0.5, mean confidence 0.75
    assert metrics.ece(PROBS, LABELS, bins=2) == pytest.approx(0.25)


def test_ece_weights_each_bin_by_its_count():
    # 2 bins, 3 classes.  (0.5, 1]: confidences 0.9, 0.8, 0.7, right, right, wrong -> |2/3 - 0.8|
    # on 3 of 4 examples; (0, 0.5]: confidence 0.4, right -> |1 - 0.4| on 1 of 4.
    # ECE = 3/4 * 2/15 + 1/4 * 0.6 = 0.25 (the unweighted mean over bins would be 11/30).
    probs = torch.tensor([[0.9, 0.05, 0.05], [0.8, 0.1, 0.1], [0.7, 0.2, 0.1], [0.4, 0.3, 0.3]])
    assert metrics.ece(probs, torch.tensor([0, 0, 1, 0]), bins=2) == pytest.approx(0.25)


def test_ece_perfectly_calibrated_is_zero():
    # confidence 0.75 on four examples, three of them right
    probs = torch.tensor([[0.75, 0.25]] * 4)
    assert metrics.ece(probs, torch.tensor([0, 0, 0, 1])) == pytest.approx(0.0, abs=1e-12)


def test_calibration_bins_are_right_closed():
    # 0.7 lies on an edge: it belongs to (0.65, 0.70], bin 13 of 20; 0.7000001 to bin 14
    probs = torch.tensor([[0.7, 0.3], [0.7000001, 0.2999999]], dtype=torch.float64)
    cal = metrics.calibration_bins(probs, torch.tensor([0, 1]))
    assert len(cal["count"]) == 20 and len(cal["edges"]) == 21
    assert cal["count"][13] == 1 and cal["count"][14] == 1 and sum(cal["count"]) == 2
    assert cal["accuracy"][13] == 1.0 and cal["accuracy"][14] == 0.0
    assert cal["confidence"][13] == pytest.approx(0.7)
    assert math.isnan(cal["accuracy"][0])  # empty bins are nan, not 0


def test_confidence_one_goes_to_last_bin():
    cal = metrics.calibration_bins(torch.tensor([[1.0, 0.0]]), torch.tensor([0]))
    assert cal["count"][19] == 1


def test_auroc_counts_ordered_pairs():
    # correct {0.9, 0.7} vs wrong {0.6, 0.8}: 0.9>0.6, 0.9>0.8, 0.7>0.6, 0.7<0.8 -> 3/4
    assert metrics.auroc(PROBS, LABELS) == pytest.approx(0.75)


def test_auroc_ties_count_half():
    # correct {0.8} vs wrong {0.8, 0.6}: tie (1/2) and win (1) -> 1.5/2
    probs = torch.tensor([[0.8, 0.2], [0.2, 0.8], [0.6, 0.4]])
    assert metrics.auroc(probs, torch.tensor([0, 0, 1])) == pytest.approx(0.75)


def test_auroc_perfect_and_inverted():
    probs = torch.tensor([[0.9, 0.1], [0.6, 0.4]])
    assert metrics.auroc(probs, torch.tensor([0, 1])) == 1.0  # the confident one is right
    assert metrics.auroc(probs, torch.tensor([1, 0])) == 0.0  # the confident one is wrong


def test_auroc_undefined_when_all_correct_or_all_wrong():
    # documented: no positive/negative pair exists, so AUROC is nan (tables print "n/a")
    assert math.isnan(metrics.auroc(PROBS, torch.tensor([0, 0, 1, 1])))
    assert math.isnan(metrics.auroc(PROBS, torch.tensor([1, 1, 0, 0])))


def test_posterior_average_then_metrics():
    # two sampled models that disagree average to 0.5/0.5: NLL log 2, confidence 0.5
    mean = torch.stack([torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])]).mean(0)
    assert metrics.nll(mean, torch.tensor([0])) == pytest.approx(math.log(2))
    assert metrics.ece(mean, torch.tensor([0])) == pytest.approx(0.5)  # accuracy 1, confidence 0.5


def test_all_metrics_keys_and_shape_errors():
    out = metrics.all_metrics(PROBS, LABELS)
    assert set(out) == {"accuracy", "nll", "ece", "auroc"}
    with pytest.raises(ValueError, match="expected probs"):
        metrics.accuracy(PROBS, LABELS[:3])
    with pytest.raises(ValueError, match="at least one"):
        metrics.nll(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.floats(0.05, 0.95), st.booleans()), min_size=2, max_size=40))
def test_auroc_matches_pairwise_count(rows):
    # two classes: confidence c for class 0 (c >= 0.5) or class 1; `right` decides the label
    conf = [max(c, 1 - c) for c, _ in rows]
    probs = torch.tensor([[c, 1 - c] for c, _ in rows], dtype=torch.float64)
    pred = probs.argmax(1)
    labels = torch.where(torch.tensor([r for _, r in rows]), pred, 1 - pred)
    pos = [c for c, (_, r) in zip(conf, rows) if r]
    neg = [c for c, (_, r) in zip(conf, rows) if not r]
    value = metrics.auroc(probs, labels)
    if not pos or not neg:
        assert math.isnan(value)
        return
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    assert value == pytest.approx(wins / (len(pos) * len(neg)))
    assert 0.0 <= metrics.ece(probs, labels) <= 1.0
