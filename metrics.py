"""Every metric a stage reports, hand-written (numpy, torch) so that the stages need no metric packages.
tests/test_metrics.py checks them against scikit-learn, sacrebleu, rouge-score and NLTK, and on
hand-computed cases.

    classification  accuracy, F1, ROC AUC and AUPRC as scikit-learn defines them; the sets that
                    finetune_cls.py and probe.py report; bootstrap intervals of test metrics
    k-NN            DINO's temperature-weighted k-NN classifier (probe.py, pretrain.py's k-NN monitor)
    segmentation    IoU, Dice and F1 of label maps (finetune_seg.py)
    captioning      BLEU, ROUGE-L and METEOR on a 0-100 scale as in OmniRad Table 12 (caption.py)
    over seeds      mean and population std of a metric over repeated runs
"""
import math
import re
from collections import Counter

import numpy as np
import torch
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------
# Classification: numpy or torch inputs, float results
# ----------------------------------------------------------------------------------------------


def as_numpy(x):
    """numpy view of a torch tensor, numpy array or list."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def accuracy(y_true, y_pred):
    """Fraction of exact matches."""
    y_true, y_pred = as_numpy(y_true), as_numpy(y_pred)
    if y_true.shape != y_pred.shape or y_true.size == 0:
        raise ValueError(f"accuracy: y_true {y_true.shape} and y_pred {y_pred.shape} must be equal, non-empty")
    return float((y_true == y_pred).mean())


def f1_per_class(y_true, y_pred, n_classes):
    """F1 = 2TP / (2TP + FP + FN) of each class; 0 for a class neither present nor predicted."""
    y_true, y_pred = as_numpy(y_true).astype(np.int64), as_numpy(y_pred).astype(np.int64)
    if y_true.shape != y_pred.shape or y_true.ndim != 1:
        raise ValueError(f"f1_per_class: expected two equal 1-D label arrays, got {y_true.shape} and {y_pred.shape}")
    f1 = np.zeros(n_classes)
    for c in range(n_classes):
        tp = np.sum((y_pred == c) & (y_true == c))
        fp = np.sum((y_pred == c) & (y_true != c))
        fn = np.sum((y_pred != c) & (y_true == c))
        f1[c] = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
    return f1


def macro_f1(y_true, y_pred, n_classes):
    """Unweighted mean of f1_per_class over all n_classes, as sklearn's
    f1_score(labels=range(n_classes), average="macro", zero_division=0)."""
    return float(f1_per_class(y_true, y_pred, n_classes).mean())


def mean_positive_f1(labels, preds):
    """Multi-label F1: the positive-class F1 of each label (column), averaged over the labels."""
    return float(np.mean([f1_per_class(labels[:, c], preds[:, c], 2)[1] for c in range(labels.shape[1])]))


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


def roc_curve(y_true, scores):
    """(fpr, tpr) at every distinct score threshold, from (0, 0) to (1, 1), as scikit-learn's
    roc_curve(drop_intermediate=False): the points whose trapezoids sum to roc_auc."""
    y_true, scores = as_numpy(y_true).reshape(-1) == 1, as_numpy(scores).astype(np.float64).reshape(-1)
    order = np.argsort(-scores, kind="mergesort")
    y_true, scores = y_true[order], scores[order]
    last_of_tie = np.r_[np.diff(scores) != 0, True]
    tps, fps = np.cumsum(y_true)[last_of_tie], np.cumsum(~y_true)[last_of_tie]
    return np.r_[0, fps] / max(fps[-1], 1), np.r_[0, tps] / max(tps[-1], 1)


def confusion_matrix(y_true, y_pred, n_classes):
    """counts[i, j]: images of class i predicted as class j."""
    counts = np.zeros((n_classes, n_classes), np.int64)
    np.add.at(counts, (as_numpy(y_true).astype(np.int64), as_numpy(y_pred).astype(np.int64)), 1)
    return counts


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


def classification_metrics(labels, probs, multi_label):
    """Test/val metrics in [0, 1] as MedMNIST and OmniRad report them.
    single-label: ACC of the argmax, macro-F1, AUC (binary: on P(class 1); else one-vs-rest macro).
    multi-label (ChestMNIST): threshold 0.5; ACC = label-wise accuracy (MedMNIST's getACC), F1 = mean
    over labels of the positive-class F1, AUC = mean per-label AUC, AUPRC per label and its mean."""
    labels, probs = as_numpy(labels), as_numpy(probs).astype(np.float64)
    if multi_label:
        pred = (probs >= 0.5).astype(np.int64)
        return {"acc": accuracy(labels.ravel(), pred.ravel()),
                "f1": mean_positive_f1(labels, pred),
                "auc": float(np.nanmean(roc_auc_per_class(labels, probs))),
                "auprc": float(np.nanmean(auprc_per_class(labels, probs))),
                "auprc_per_class": auprc_per_class(labels, probs).tolist()}
    n_classes = probs.shape[1]
    pred = probs.argmax(1)
    auc = roc_auc(labels, probs[:, 1]) if n_classes == 2 else roc_auc_ovr(labels, probs)
    return {"acc": accuracy(labels, pred), "f1": macro_f1(labels, pred, n_classes), "auc": auc}


def probe_metrics(y_true, probs, class_names, multilabel=False):
    """Accuracy, AUROC (binary; one-vs-rest macro for multi-class; mean per label for multi-label)
    and AUPRC per class (one-vs-rest) with its macro mean, the figures RAD-DINO reports; and macro-F1 as
    classification_metrics computes it, so that a probe row reads like a fine-tuning row."""
    probs = probs.double()
    if multilabel:
        targets, preds = y_true.long(), (probs > 0.5).long()
        acc = float((preds == targets).double().mean())  # mean per-label accuracy
        auroc = float(np.nanmean(roc_auc_per_class(targets, probs)))
        f1 = mean_positive_f1(targets, preds)
    else:
        targets = F.one_hot(y_true.long(), probs.shape[1])
        acc = accuracy(y_true.long(), probs.argmax(dim=1))
        auroc = roc_auc(y_true == 1, probs[:, 1]) if probs.shape[1] == 2 else roc_auc_ovr(y_true, probs)
        f1 = macro_f1(y_true, probs.argmax(dim=1), probs.shape[1])
    per_class = auprc_per_class(targets, probs)
    return {"accuracy": acc, "f1_macro": f1, "auroc": auroc, "auprc_macro": float(np.nanmean(per_class)),
            "auprc_per_class": {str(name): float(v) for name, v in zip(class_names, per_class)}}


def bootstrap_interval(y_true, probs, class_names, multilabel=False, n_resamples=1000, seed=0):
    """95% percentile intervals of the test AUROC and macro AUPRC over `n_resamples` resamples of the
    test set with replacement. Single-label sets are resampled within each class (the class counts stay
    fixed, so every resample has both classes and the AUROC stays defined); multi-label sets as a whole."""
    rng = np.random.default_rng(seed)
    y_np = y_true.numpy()
    strata = [np.arange(len(y_np))] if multilabel else [np.flatnonzero(y_np == c) for c in np.unique(y_np)]
    values = {"auroc": [], "auprc_macro": []}
    for _ in range(n_resamples):
        index = torch.from_numpy(np.concatenate([rng.choice(s, len(s)) for s in strata]))
        m = probe_metrics(y_true[index], probs[index], class_names, multilabel)
        for k in values:
            values[k].append(m[k])
    return {k: [float(np.nanpercentile(v, 2.5)), float(np.nanpercentile(v, 97.5))] for k, v in values.items()}


# ----------------------------------------------------------------------------------------------
# k-NN (DINO eval_knn)
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def knn_predict(train_feats, train_labels, test_feats, n_classes, k=20, temperature=0.07, chunk_size=1024):
    """Class probabilities (M, n_classes) from the k nearest training features by cosine similarity,
    each neighbour voting with weight exp(sim / temperature) (DINO's eval_knn), votes normalised to
    sum to 1. train_labels: (N,) class indices, or (N, C) multi-hot for multi-label targets (then
    each column is the weighted fraction of neighbours carrying that label)."""
    train = F.normalize(train_feats.float(), dim=1)
    test = F.normalize(test_feats.float(), dim=1)
    if train_labels.ndim == 1:
        targets = F.one_hot(train_labels.long(), n_classes).float()
    else:
        targets = train_labels.float()
    if targets.shape != (train.shape[0], n_classes):
        raise ValueError(f"knn_predict: labels give targets {tuple(targets.shape)}, "
                         f"expected ({train.shape[0]}, {n_classes})")
    k = min(k, train.shape[0])
    probs = []
    for start in range(0, test.shape[0], chunk_size):  # chunks keep the (chunk, N) similarity small
        sim, idx = (test[start:start + chunk_size] @ train.T).topk(k, dim=1)
        weights = (sim / temperature).exp()                       # (m, k)
        votes = torch.einsum("mk,mkc->mc", weights, targets[idx])  # (m, C)
        probs.append(votes / weights.sum(dim=1, keepdim=True))
    return torch.cat(probs)


# ----------------------------------------------------------------------------------------------
# Feature similarity
# ----------------------------------------------------------------------------------------------

def linear_cka(x, y):
    """Linear centred kernel alignment of two feature sets (N, D): 1 = the same up to rotation and scale."""
    x, y = x - x.mean(0), y - y.mean(0)
    return float((y.t() @ x).norm() ** 2 / ((x.t() @ x).norm() * (y.t() @ y).norm()))


@torch.no_grad()
def backbone_drift(state, initial_state, feats, initial_feats):
    """How far a backbone moved from where a run started: relative L2 distance of the weights per
    block (and of the embeddings), cosine of the CLS features of a fixed batch, linear CKA."""
    groups = {}
    for name, p in state.items():
        group = ".".join(name.split(".")[:2]) if name.startswith("blocks.") else (
            "embed" if name.startswith(("pos_embed", "patch_embed", "cls_token", "mask_token", "register_tokens"))
            else "norm")
        diff, ref = groups.get(group, (0.0, 0.0))
        w0 = initial_state[name].float()
        groups[group] = (diff + float((p.detach().float().cpu() - w0).pow(2).sum()), ref + float(w0.pow(2).sum()))
    rel = {g: math.sqrt(d) / max(math.sqrt(r), 1e-12) for g, (d, r) in groups.items()}
    cos = float(F.cosine_similarity(feats, initial_feats, dim=-1).mean())
    return {"rel_l2": rel, "feature_cos": cos, "cka": linear_cka(feats.double(), initial_feats.double())}


def format_drift(drift):
    blocks = [v for k, v in sorted((kv for kv in drift["rel_l2"].items() if kv[0].startswith("blocks.")),
                                   key=lambda kv: int(kv[0].split(".")[1]))]
    return (f"drift: rel-L2 embed {drift['rel_l2'].get('embed', 0):.3f} blocks "
            + " ".join(f"{v:.3f}" for v in blocks)
            + f" norm {drift['rel_l2'].get('norm', 0):.3f} | CLS cos {drift['feature_cos']:.3f} CKA {drift['cka']:.3f}")


# ----------------------------------------------------------------------------------------------
# Segmentation: label maps in (numpy or torch, any equal shapes), floats out; NaN = not scored
# ----------------------------------------------------------------------------------------------


def as_label_array(x):
    """int64 numpy array of a label map given as a torch tensor, numpy array or list."""
    return as_numpy(x).astype(np.int64)


def confusion_counts(pred, target, n_classes):
    """Per-class pixel counts (tp, fp, fn), int64 arrays of shape (n_classes,), of one prediction
    against its target (label maps of equal shape)."""
    pred, target = as_label_array(pred).reshape(-1), as_label_array(target).reshape(-1)
    if pred.shape != target.shape:
        raise ValueError(f"confusion_counts: prediction has {pred.size} pixels, target {target.size}")
    for name, x in (("prediction", pred), ("target", target)):
        if x.size and (x.min() < 0 or x.max() >= n_classes):
            raise ValueError(f"confusion_counts: {name} labels span [{x.min()}, {x.max()}], expected [0, {n_classes})")
    tp = np.bincount(target[pred == target], minlength=n_classes)
    fp = np.bincount(pred, minlength=n_classes) - tp
    fn = np.bincount(target, minlength=n_classes) - tp
    return tp, fp, fn


def iou_and_dice(tp, fp, fn):
    """IoU = TP/(TP+FP+FN) and Dice = 2TP/(2TP+FP+FN) per class; NaN where the class is absent from
    both prediction and target (nothing to score), so a mean over classes or images skips it."""
    tp, fp, fn = (np.asarray(a, dtype=np.float64) for a in (tp, fp, fn))
    union = tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
        dice = np.where(union > 0, 2 * tp / (2 * tp + fp + fn), np.nan)
    return iou, dice


def nanmean(x, axis=None):
    """Mean that skips NaN, and is NaN (no warning) when there is nothing to average."""
    x = np.asarray(x, dtype=np.float64)
    count = np.sum(~np.isnan(x), axis=axis)
    total = np.nansum(x, axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def segmentation_metrics(preds, targets, n_classes, class_names=None):
    """Scores of a split: `preds` and `targets` are sequences of label maps (or (N,H,W) arrays).

    iou[c]   pooled over the whole split: TP / (TP + FP + FN), pixel counts summed over all images,
             as mmseg computes IoU.
    dice[c]  per image 2TP / (2TP + FP + FN), averaged over the images; an image where class c is
             absent from both prediction and target is skipped for c (NaN, neither 1 nor 0).
    f1[c]    pooled over the split, 2PR / (P + R) (= pooled Dice), so it differs from the image-mean
             Dice as the papers' F1 and Dice columns differ.
    mIoU, mDice, mF1: means over the foreground classes 1..K-1, background excluded (RAD-DINO scores
             its structures only; OmniRad does not say); a class never present in prediction or
             target is skipped. mIoU_with_background (mmseg's all-class mean) is reported as well.
    The returned dict repeats these conventions."""
    if len(preds) != len(targets) or len(preds) == 0:
        raise ValueError(f"segmentation_metrics: {len(preds)} predictions for {len(targets)} targets (need >= 1)")
    class_names = list(class_names) if class_names else [str(c) for c in range(n_classes)]
    pooled = np.zeros((3, n_classes), dtype=np.int64)
    image_dice = np.empty((len(preds), n_classes))
    for i, (pred, target) in enumerate(zip(preds, targets)):
        counts = np.stack(confusion_counts(pred, target, n_classes))
        pooled += counts
        image_dice[i] = iou_and_dice(*counts)[1]
    iou, f1 = iou_and_dice(*pooled)
    dice = nanmean(image_dice, axis=0)
    fg = slice(1, None)
    image_fg_dice = nanmean(image_dice[:, fg], axis=1)  # each image's mean over its scored classes
    scored = image_fg_dice[~np.isnan(image_fg_dice)]
    return {
        "mIoU": float(nanmean(iou[fg])), "mDice": float(nanmean(dice[fg])), "mF1": float(nanmean(f1[fg])),
        "mIoU_with_background": float(nanmean(iou)),
        "dice_std_over_images": float(scored.std()) if scored.size else float("nan"),
        "per_class": {name: {"iou": float(iou[c]), "dice": float(dice[c]), "f1": float(f1[c]),
                             "n_images_scored": int(np.sum(~np.isnan(image_dice[:, c])))}
                      for c, name in enumerate(class_names)},
        "n_images": len(preds),
        "conventions": ("iou, f1: pooled pixel counts over the split; dice: mean over images of "
                        "per-image Dice; a class absent from both prediction and target is skipped "
                        "(NaN), per image for dice, over the split for iou/f1; mIoU/mDice/mF1 average "
                        "the foreground classes 1..K-1 only (background excluded)"),
    }


# ----------------------------------------------------------------------------------------------
# Captioning: sacreBLEU's BLEU, rouge-score's ROUGE-L and NLTK's METEOR (exact and stem stages)
# ----------------------------------------------------------------------------------------------


def tokenize_13a(line):
    """sacreBLEU's default tokenizer (mteval-v13a): split off punctuation and symbols, keep the
    period and comma inside numbers, split a dash that follows a digit."""
    line = line.replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    if "&" in line:
        line = line.replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">")
    line = f" {line} "
    line = re.sub(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])", r" \1 ", line)
    line = re.sub(r"([^0-9])([\.,])", r"\1 \2 ", line)
    line = re.sub(r"([\.,])([^0-9])", r" \1 \2", line)
    line = re.sub(r"([0-9])(-)", r"\1 \2 ", line)
    return line.split()


def ngram_counts(tokens, max_order):
    return Counter(tuple(tokens[i:i + n]) for n in range(1, max_order + 1) for i in range(len(tokens) - n + 1))


def corpus_bleu(hypotheses, references, max_order=4):
    """Corpus BLEU with sacreBLEU's defaults (13a tokens, case-sensitive, 'exp' smoothing, one
    reference per hypothesis). max_order=n is the cumulative BLEU-n of captioning papers.
    Returns {"bleu", "precisions" (per order, %), "bp", "sys_len", "ref_len"}."""
    correct, total = [0] * max_order, [0] * max_order
    sys_len = ref_len = 0
    for hyp, ref in zip(hypotheses, references, strict=True):
        hyp, ref = tokenize_13a(hyp.rstrip()), tokenize_13a(ref.rstrip())
        sys_len, ref_len = sys_len + len(hyp), ref_len + len(ref)
        ref_counts = ngram_counts(ref, max_order)
        for ngram, count in ngram_counts(hyp, max_order).items():
            total[len(ngram) - 1] += count
            correct[len(ngram) - 1] += min(count, ref_counts[ngram])
    bp = 1.0 if sys_len >= ref_len else (math.exp(1 - ref_len / sys_len) if sys_len else 0.0)
    precisions = [0.0] * max_order
    result = dict(bleu=0.0, precisions=precisions, bp=bp, sys_len=sys_len, ref_len=ref_len)
    if not any(correct):
        return result
    smooth = 1.0  # mteval's smoothing: the k-th order with no match counts 1 / (2^k * total)
    for n in range(max_order):
        if total[n] == 0:
            break  # hypotheses too short for this order: its precision stays 0, so BLEU is ~0
        if correct[n] == 0:
            smooth *= 2
            precisions[n] = 100.0 / (smooth * total[n])
        else:
            precisions[n] = 100.0 * correct[n] / total[n]
    log_mean = sum(math.log(p) if p > 0 else -9999999999 for p in precisions) / max_order
    result["bleu"] = bp * math.exp(log_mean)
    return result


def rouge_tokens(text):
    """rouge-score's default tokenizer: lower case, alphanumeric runs only, no stemming."""
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).split()


def lcs_length(a, b):
    row = [0] * (len(b) + 1)  # one row of the LCS table, updated in place
    for x in a:
        diagonal = 0
        for j, y in enumerate(b):
            diagonal, row[j + 1] = row[j + 1], (diagonal + 1 if x == y else max(row[j + 1], row[j]))
    return row[-1]


def rouge_l(hypotheses, references):
    """Mean sentence ROUGE-L F-measure (beta 1), as rouge-score's RougeScorer(["rougeL"])."""
    scores = []
    for hyp, ref in zip(hypotheses, references, strict=True):
        hyp, ref = rouge_tokens(hyp), rouge_tokens(ref)
        lcs = lcs_length(ref, hyp) if hyp and ref else 0
        p, r = (lcs / len(hyp), lcs / len(ref)) if lcs else (0.0, 0.0)
        scores.append(2 * p * r / (p + r) if lcs else 0.0)
    return 100.0 * sum(scores) / max(len(scores), 1)


def porter_stem(word):
    """The Porter (1980) stemmer as published (NLTK's ORIGINAL_ALGORITHM mode): five steps of suffix
    rules, each guarded by the measure m of the remaining stem (its number of vowel-consonant runs)."""
    word = word.lower()

    def consonant_flags(w):
        flags = []
        for i, ch in enumerate(w):  # y is a consonant at the start or after a vowel
            flags.append(ch not in "aeiou" and (ch != "y" or i == 0 or not flags[i - 1]))
        return flags

    def measure(stem):
        return "".join("c" if c else "v" for c in consonant_flags(stem)).count("vc")

    def has_vowel(stem):
        return not all(consonant_flags(stem))

    def ends_cvc(w):  # *o: consonant-vowel-consonant, the last not w, x or y (-hop, -wil)
        f = consonant_flags(w)
        return len(w) >= 3 and f[-3] and not f[-2] and f[-1] and w[-1] not in "wxy"

    def first_rule(w, rules, condition):
        """Apply the first rule whose suffix matches; if its condition fails, the step does nothing."""
        for suffix, replacement in rules:
            if w.endswith(suffix):
                stem = w[:len(w) - len(suffix)]
                return stem + replacement if condition(stem) else w
        return w

    # step 1a: plurals
    word = first_rule(word, [("sses", "ss"), ("ies", "i"), ("ss", "ss"), ("s", "")], lambda s: True)
    # step 1b: -eed, -ed, -ing; then repair the stem so that later steps see -ate, -ble, -ize
    if word.endswith("eed"):
        if measure(word[:-3]) > 0:
            word = word[:-1]
    else:
        for suffix in ("ed", "ing"):
            if word.endswith(suffix) and has_vowel(word[:-len(suffix)]):
                word = word[:-len(suffix)]
                if word.endswith(("at", "bl", "iz")):
                    word += "e"
                elif len(word) >= 2 and word[-1] == word[-2] and consonant_flags(word)[-1] and word[-1] not in "lsz":
                    word = word[:-1]  # hopp(ing) -> hop
                elif measure(word) == 1 and ends_cvc(word):
                    word += "e"  # fil(ing) -> file
                break
    # step 1c: y -> i when the stem has a vowel
    if word.endswith("y") and has_vowel(word[:-1]):
        word = word[:-1] + "i"
    # step 2: double suffixes to single ones (m > 0)
    word = first_rule(word, [
        ("ational", "ate"), ("tional", "tion"), ("enci", "ence"), ("anci", "ance"), ("izer", "ize"),
        ("abli", "able"), ("alli", "al"), ("entli", "ent"), ("eli", "e"), ("ousli", "ous"),
        ("ization", "ize"), ("ation", "ate"), ("ator", "ate"), ("alism", "al"), ("iveness", "ive"),
        ("fulness", "ful"), ("ousness", "ous"), ("aliti", "al"), ("iviti", "ive"), ("biliti", "ble"),
    ], lambda s: measure(s) > 0)
    # step 3: -icate, -ful, -ness ... (m > 0)
    word = first_rule(word, [("icate", "ic"), ("ative", ""), ("alize", "al"), ("iciti", "ic"),
                             ("ical", "ic"), ("ful", ""), ("ness", "")], lambda s: measure(s) > 0)
    # step 4: strip one last suffix (m > 1); -ion only after s or t
    word = first_rule(word, [(s, "") for s in ("al", "ance", "ence", "er", "ic", "able", "ible", "ant", "ement",
                                               "ment", "ent", "ion", "ou", "ism", "ate", "iti", "ous", "ive", "ize")],
                      lambda s: measure(s) > 1 and (not word.endswith("ion") or s.endswith(("s", "t"))))
    # step 5: a final -e (m > 1, or m = 1 unless the stem ends cvc), then -ll -> -l (m > 1)
    if word.endswith("e"):
        stem = word[:-1]
        if measure(stem) > 1 or (measure(stem) == 1 and not ends_cvc(stem)):
            word = stem
    if word.endswith("ll") and measure(word[:-1]) > 1:
        word = word[:-1]
    return word


def match_unigrams(hyp, ref, matched):
    """One METEOR matching stage, as NLTK does it: from the last hypothesis word backwards, each
    unmatched word takes the last unmatched reference position holding the same string.
    `matched` ({hyp i: ref j}) is extended in place."""
    taken = set(matched.values())
    positions = {}
    for j, word in enumerate(ref):
        if j not in taken:
            positions.setdefault(word, []).append(j)
    for i in range(len(hyp) - 1, -1, -1):
        if i not in matched and positions.get(hyp[i]):
            matched[i] = positions[hyp[i]].pop()


def sentence_meteor(hypothesis, reference, alpha=0.9, beta=3.0, gamma=0.5):
    """METEOR (Banerjee & Lavie 2005, with NLTK's parameters) on lower-cased 13a tokens: unigrams are
    matched in two stages, exact then Porter stem; F_mean = P R / (alpha P + (1 - alpha) R), times
    1 - gamma (chunks / matches)^beta, where a chunk is a run of matches adjacent in both sentences.
    Left out: WordNet synonyms (NLTK's third stage) and METEOR 1.5's paraphrase tables and
    function-word weights, so synonyms score as misses."""
    hyp, ref = tokenize_13a(hypothesis.lower()), tokenize_13a(reference.lower())
    matched = {}
    match_unigrams(hyp, ref, matched)
    match_unigrams([porter_stem(w) for w in hyp], [porter_stem(w) for w in ref], matched)
    if not matched:
        return 0.0
    precision, recall = len(matched) / len(hyp), len(matched) / len(ref)
    f_mean = precision * recall / (alpha * precision + (1 - alpha) * recall)
    pairs = sorted(matched.items())
    chunks = 1 + sum(1 for (i, j), (k, l) in zip(pairs, pairs[1:]) if (k, l) != (i + 1, j + 1))
    return f_mean * (1 - gamma * (chunks / len(pairs)) ** beta)


def meteor(hypotheses, references):
    """Mean sentence METEOR (0-100)."""
    scores = [sentence_meteor(h, r) for h, r in zip(hypotheses, references, strict=True)]
    return 100.0 * sum(scores) / max(len(scores), 1)


def caption_metrics(hypotheses, references):
    """Table 12's columns and BLEU-2/3. BLEU is sacreBLEU's corpus BLEU (so it equals BLEU-4 here);
    BLEU-n is the cumulative corpus BLEU of order n."""
    scores = {"METEOR": meteor(hypotheses, references), "BLEU": corpus_bleu(hypotheses, references)["bleu"]}
    for n in range(1, 5):
        scores[f"BLEU-{n}"] = corpus_bleu(hypotheses, references, max_order=n)["bleu"]
    scores["ROUGE-L"] = rouge_l(hypotheses, references)
    return scores


# ----------------------------------------------------------------------------------------------
# Over seeds
# ----------------------------------------------------------------------------------------------


def mean_std(values):
    """Mean and population standard deviation (numpy's default, ddof=0) of one metric over seeds, and
    the number of seeds."""
    values = np.asarray(values, np.float64)
    return {"mean": float(values.mean()), "std": float(values.std()), "n": len(values)}
