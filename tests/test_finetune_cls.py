"""finetune_cls.py: metrics against hand-computed values and scikit-learn (test-only oracle), LoRA
and head-only invariants, and a short phantom run that must beat chance."""
import numpy as np
import pytest
import torch

from finetune_cls import (accuracy, auprc_per_class, average_precision, macro_f1, roc_auc, roc_auc_ovr,
                          roc_auc_per_class)

# ---------------------------------------------------------------------------- metrics, by hand


def test_accuracy_counts_exact_matches():
    assert accuracy([0, 1, 2, 2], [0, 2, 2, 2]) == 0.75
    assert accuracy(torch.tensor([1, 1]), torch.tensor([0, 0])) == 0.0


def test_macro_f1_matches_hand_computed_per_class_f1():
    y_true, y_pred = [0, 0, 1, 1, 2], [0, 1, 1, 1, 0]
    # class 0: TP1 FP1 FN1 -> 1/2; class 1: TP2 FP1 FN0 -> 4/5; class 2: TP0 FP0 FN1 -> 0
    assert macro_f1(y_true, y_pred, 3) == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    # a class neither present nor predicted counts as 0 in the mean over n_classes
    assert macro_f1(y_true, y_pred, 4) == pytest.approx((0.5 + 0.8 + 0.0) / 4)


def test_roc_auc_counts_tied_pairs_as_one_half():
    # positives {0.5, 0.9} vs negatives {0.1, 0.5}: pairs 1, 1/2, 1, 1 -> 3.5 / 4
    assert roc_auc([0, 0, 1, 1], [0.1, 0.5, 0.5, 0.9]) == pytest.approx(0.875)
    assert roc_auc([0, 0, 1, 1], [0.3, 0.3, 0.3, 0.3]) == pytest.approx(0.5)
    assert roc_auc([0, 1, 0, 1], [0.1, 0.9, 0.2, 0.8]) == 1.0
    assert roc_auc([1, 0, 1, 0], [0.1, 0.9, 0.2, 0.8]) == 0.0


def test_roc_auc_rejects_a_single_class():
    with pytest.raises(ValueError, match="both classes"):
        roc_auc([1, 1, 1], [0.1, 0.2, 0.3])


def test_roc_auc_ovr_is_the_mean_of_one_vs_rest_aucs():
    y = [0, 1, 2, 0]
    p = np.array([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.5, 0.1, 0.4], [0.4, 0.4, 0.2]])
    # class 0 positives {0.6, 0.4} vs {0.2, 0.5}: 1,1,1,0 -> 3/4; class 1: 0.5 vs {0.3,0.1,0.4} -> 1;
    # class 2: 0.4 vs {0.1,0.3,0.2} -> 1
    assert roc_auc_ovr(y, p) == pytest.approx((0.75 + 1 + 1) / 3)


def test_average_precision_is_a_step_sum_without_interpolation():
    # thresholds 0.9: P=1 R=1/2; 0.8: P=1/2 R=1/2; 0.7: P=2/3 R=1 -> 1/2*1 + 1/2*2/3
    assert average_precision([1, 0, 1, 0], [0.9, 0.8, 0.7, 0.1]) == pytest.approx(0.5 + 1 / 3)
    # a tie enters at one threshold: 0.5 -> P=1/2 R=1/2; 0.2 -> P=2/3 R=1
    assert average_precision([1, 0, 1], [0.5, 0.5, 0.2]) == pytest.approx(0.25 + 1 / 3)


def test_auprc_per_class_gives_nan_for_a_class_without_positives():
    y = np.array([[1, 0], [0, 0], [1, 0]])
    s = np.array([[0.5, 0.2], [0.5, 0.1], [0.2, 0.9]])
    ap = auprc_per_class(y, s)
    assert ap[0] == pytest.approx(0.25 + 1 / 3) and np.isnan(ap[1])


# ---------------------------------------------------------------------------- metrics vs scikit-learn


@pytest.fixture(scope="module")
def sklearn_metrics():
    return pytest.importorskip("sklearn.metrics", reason="scikit-learn is the test-only oracle (tests/requirements.txt)")


def tied_scores(rng, n, levels):
    """Scores on a coarse grid, so that many samples tie."""
    return rng.integers(0, levels, size=n) / levels


@pytest.mark.parametrize("seed", range(5))
def test_binary_metrics_match_sklearn_with_many_ties(sklearn_metrics, seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, size=200)
    s = np.clip(tied_scores(rng, 200, 7) + 0.2 * y, 0, 1)
    assert roc_auc(y, s) == pytest.approx(sklearn_metrics.roc_auc_score(y, s), abs=1e-12)
    assert average_precision(y, s) == pytest.approx(sklearn_metrics.average_precision_score(y, s), abs=1e-12)
    assert roc_auc(torch.tensor(y), torch.tensor(s)) == pytest.approx(sklearn_metrics.roc_auc_score(y, s), abs=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_multiclass_metrics_match_sklearn(sklearn_metrics, seed):
    rng = np.random.default_rng(seed)
    n, c = 300, 5
    y = rng.integers(0, c, size=n)
    logits = rng.normal(size=(n, c)).round(1)
    logits[np.arange(n), y] += 1.0
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    pred = probs.argmax(1)
    assert accuracy(y, pred) == pytest.approx(sklearn_metrics.accuracy_score(y, pred))
    assert macro_f1(y, pred, c) == pytest.approx(
        sklearn_metrics.f1_score(y, pred, labels=list(range(c)), average="macro", zero_division=0))
    assert roc_auc_ovr(y, probs) == pytest.approx(
        sklearn_metrics.roc_auc_score(y, probs, multi_class="ovr", average="macro"), abs=1e-12)


def test_multilabel_metrics_match_sklearn(sklearn_metrics):
    rng = np.random.default_rng(0)
    y = (rng.random((150, 6)) < 0.3).astype(int)
    s = tied_scores(rng, (150, 6), 9) + 0.3 * y
    expect_ap = [sklearn_metrics.average_precision_score(y[:, c], s[:, c]) for c in range(6)]
    expect_auc = [sklearn_metrics.roc_auc_score(y[:, c], s[:, c]) for c in range(6)]
    np.testing.assert_allclose(auprc_per_class(y, s), expect_ap, atol=1e-12)
    np.testing.assert_allclose(roc_auc_per_class(y, s), expect_auc, atol=1e-12)
