"""Classification fine-tuning of a ViT backbone (OmniRad §3.2, Table 8): full fine-tuning, a head on a
frozen backbone, or LoRA; MedMNIST 2D sets, image-folder/CSV sets or the procedural phantoms.

The metrics at the top are hand-written (numpy) and shared with probe.py; they follow the
scikit-learn definitions that the papers' numbers were computed with.
"""
import numpy as np

# ----------------------------------------------------------------------------------------------
# Metrics: numpy or torch inputs, float results
# ----------------------------------------------------------------------------------------------


def as_numpy(x):
    """numpy view of a torch tensor, numpy array or list (torch is imported lazily by callers)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def accuracy(y_true, y_pred):
    """Fraction of exact matches."""
    y_true, y_pred = as_numpy(y_true), as_numpy(y_pred)
    if y_true.shape != y_pred.shape or y_true.size == 0:
        raise ValueError(f"accuracy: y_true {y_true.shape} and y_pred {y_pred.shape} must be equal, non-empty")
    return float((y_true == y_pred).mean())


def macro_f1(y_true, y_pred, n_classes):
    """Unweighted mean over all n_classes of F1 = 2TP / (2TP + FP + FN). A class that is neither
    present nor predicted scores 0, as sklearn's f1_score(labels=range(n_classes), average="macro",
    zero_division=0)."""
    y_true, y_pred = as_numpy(y_true).astype(np.int64), as_numpy(y_pred).astype(np.int64)
    if y_true.shape != y_pred.shape or y_true.ndim != 1:
        raise ValueError(f"macro_f1: expected two equal 1-D label arrays, got {y_true.shape} and {y_pred.shape}")
    f1 = []
    for c in range(n_classes):
        tp = np.sum((y_pred == c) & (y_true == c))
        fp = np.sum((y_pred == c) & (y_true != c))
        fn = np.sum((y_pred != c) & (y_true == c))
        f1.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return float(np.mean(f1))


def average_ranks(x):
    """1-based ranks of x, tied values sharing the mean of the ranks they span."""
    values, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    first_rank = np.cumsum(counts) - counts + 1  # rank of the first member of each tie group
    return (first_rank + (counts - 1) / 2.0)[inverse.reshape(-1)]


def roc_auc(y_true, scores):
    """Binary ROC AUC as the Mann-Whitney statistic: the probability that a random positive scores
    above a random negative, a tie counting one half (the trapezoid under the ROC curve)."""
    y_true, scores = as_numpy(y_true).reshape(-1), as_numpy(scores).astype(np.float64).reshape(-1)
    if y_true.shape != scores.shape:
        raise ValueError(f"roc_auc: {y_true.shape[0]} labels but {scores.shape[0]} scores")
    pos = y_true == 1
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"roc_auc: needs both classes, got {n_pos} positives and {n_neg} negatives")
    rank_sum = average_ranks(scores)[pos].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def roc_auc_ovr(y_true, probs):
    """Multi-class AUC: unweighted mean over classes of the one-vs-rest binary AUC of column c
    (sklearn's roc_auc_score(multi_class="ovr", average="macro"))."""
    y_true, probs = as_numpy(y_true).reshape(-1), as_numpy(probs)
    if probs.ndim != 2 or probs.shape[0] != y_true.shape[0]:
        raise ValueError(f"roc_auc_ovr: expected probs (N, C) for {y_true.shape[0]} labels, got {probs.shape}")
    return float(np.mean([roc_auc(y_true == c, probs[:, c]) for c in range(probs.shape[1])]))


def average_precision(y_true, scores):
    """Binary AUPRC as sklearn's average_precision_score: sum over distinct score thresholds
    (high to low) of (R_n - R_{n-1}) * P_n, a step function with no interpolation. Samples tied on a
    score enter together at one threshold."""
    y_true, scores = as_numpy(y_true).reshape(-1), as_numpy(scores).astype(np.float64).reshape(-1)
    if y_true.shape != scores.shape:
        raise ValueError(f"average_precision: {y_true.shape[0]} labels but {scores.shape[0]} scores")
    pos = (y_true == 1).astype(np.float64)
    if pos.sum() == 0:
        raise ValueError("average_precision: no positive samples, precision-recall is undefined")
    order = np.argsort(-scores, kind="stable")
    s, pos = scores[order], pos[order]
    last_of_group = np.r_[np.nonzero(np.diff(s))[0], s.size - 1]  # threshold = each distinct score
    tp = np.cumsum(pos)[last_of_group]
    seen = last_of_group + 1.0
    precision, recall = tp / seen, tp / pos.sum()
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def auprc_per_class(y_true_multi, scores):
    """AUPRC of each column of a multi-label (N, C) 0/1 target; NaN for a class with no positive
    sample (its macro mean is then np.nanmean)."""
    y_true_multi, scores = as_numpy(y_true_multi), as_numpy(scores)
    if y_true_multi.shape != scores.shape or y_true_multi.ndim != 2:
        raise ValueError(f"auprc_per_class: expected equal (N, C) targets and scores, got "
                         f"{y_true_multi.shape} and {scores.shape}")
    return np.array([average_precision(y_true_multi[:, c], scores[:, c]) if y_true_multi[:, c].any() else np.nan
                     for c in range(y_true_multi.shape[1])])


def roc_auc_per_class(y_true_multi, scores):
    """Binary AUC of each column of a multi-label (N, C) target (MedMNIST reports their mean for
    ChestMNIST); NaN for a column with only one class present."""
    y_true_multi, scores = as_numpy(y_true_multi), as_numpy(scores)
    if y_true_multi.shape != scores.shape or y_true_multi.ndim != 2:
        raise ValueError(f"roc_auc_per_class: expected equal (N, C) targets and scores, got "
                         f"{y_true_multi.shape} and {scores.shape}")
    out = []
    for c in range(y_true_multi.shape[1]):
        n_pos = int((y_true_multi[:, c] == 1).sum())
        out.append(roc_auc(y_true_multi[:, c], scores[:, c]) if 0 < n_pos < len(y_true_multi) else np.nan)
    return np.array(out)
