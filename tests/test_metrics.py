"""metrics.py: every metric on hand-computed cases and against the packages that the papers' numbers come
from: scikit-learn, sacrebleu, rouge-score and NLTK (test-only oracles, tests/requirements.txt)."""
import math

import numpy as np
import pytest
import sacrebleu
import torch
import torch.nn.functional as F
from nltk.stem.porter import PorterStemmer
from nltk.translate.meteor_score import single_meteor_score
from rouge_score import rouge_scorer

from metrics import (accuracy, confusion_matrix, roc_curve, auprc_per_class, average_precision, bootstrap_interval, caption_metrics,
                     classification_metrics, confusion_counts, corpus_bleu, iou_and_dice, knn_predict, macro_f1,
                     mean_std, porter_stem, probe_metrics, roc_auc, roc_auc_ovr, roc_auc_per_class, rouge_l,
                     segmentation_metrics, sentence_meteor, tokenize_13a)


# ---------------------------------------------------------------------------- classification, by hand


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


# ---------------------------------------------------------------------------- classification vs scikit-learn


@pytest.fixture(scope="module")
def sklearn_metrics():
    return pytest.importorskip("sklearn.metrics",
                               reason="scikit-learn is the test-only oracle (tests/requirements.txt)")


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


def test_classification_metrics_use_p_class1_for_binary_auc_and_labelwise_acc_for_multilabel():
    probs = np.array([[0.9, 0.1], [0.4, 0.6], [0.7, 0.3], [0.2, 0.8]])
    m = classification_metrics([0, 1, 1, 0], probs, multi_label=False)
    assert m["acc"] == 0.5 and m["auc"] == pytest.approx(roc_auc([0, 1, 1, 0], probs[:, 1]))
    y = np.array([[1, 0], [0, 1], [1, 1]])
    p = np.array([[0.8, 0.2], [0.6, 0.7], [0.9, 0.4]])  # thresholded: [1,0] [1,1] [1,0] -> 4 of 6 right
    assert classification_metrics(y, p, multi_label=True)["acc"] == pytest.approx(4 / 6)


# ---------------------------------------------------------------------------- probe metrics and bootstrap intervals


def test_probe_metrics_on_a_hand_computed_binary_case():
    y = torch.tensor([0, 1, 1, 0])
    p1 = torch.tensor([0.1, 0.8, 0.4, 0.6])
    m = probe_metrics(y, torch.stack([1 - p1, p1], dim=1), ["neg", "pos"])
    assert m["accuracy"] == pytest.approx(0.5)
    assert m["auroc"] == pytest.approx(3 / 4)  # positive > negative in 3 of 4 pairs
    assert m["f1_macro"] == pytest.approx(0.5)  # argmax 0 1 0 1: each class TP 1, FP 1, FN 1 -> 2/4
    # ranked 0.8(+) 0.6(-) 0.4(+) 0.1(-): AP = 1/2 * 1 + 1/2 * 2/3
    assert m["auprc_per_class"]["pos"] == pytest.approx(0.5 + 1 / 3)
    # class 0 scored by 1 - p: ranked 0.9(-) 0.6(-)... negatives of class 1 are its positives:
    # 0.9(+) 0.6(-) 0.4(+) 0.2(-)
    assert m["auprc_per_class"]["neg"] == pytest.approx(0.5 + 1 / 3)
    assert m["auprc_macro"] == pytest.approx(0.5 + 1 / 3)


def test_bootstrap_interval_is_as_wide_as_the_hanley_mcneil_standard_error():
    # 300 negatives ~ N(0, 1), 200 positives ~ N(1, 1): AUROC ~0.76. Hanley & McNeil (1982) give its
    # standard error; a 95% percentile interval should span about 2 * 1.96 of it around the estimate.
    gen = torch.Generator().manual_seed(0)
    y = torch.cat([torch.zeros(300), torch.ones(200)]).long()
    score = torch.randn(500, generator=gen) + y
    probs = torch.stack([1 - score.sigmoid(), score.sigmoid()], dim=1)
    a = probe_metrics(y, probs, ["neg", "pos"])["auroc"]
    n_pos, n_neg, q1, q2 = 200, 300, a / (2 - a), 2 * a * a / (1 + a)
    se = math.sqrt((a * (1 - a) + (n_pos - 1) * (q1 - a * a) + (n_neg - 1) * (q2 - a * a)) / (n_pos * n_neg))
    lo, hi = bootstrap_interval(y, probs, ["neg", "pos"], n_resamples=400)["auroc"]
    assert lo < a < hi
    assert hi - lo == pytest.approx(2 * 1.96 * se, rel=0.2)
    assert (lo + hi) / 2 == pytest.approx(a, abs=0.25 * se)


def test_bootstrap_interval_keeps_both_classes_when_positives_are_rare():
    # 2 positives in 40: an unstratified resample often has none (AUROC undefined); each class is resampled
    # on its own, and a perfect separation stays perfect in every resample
    y = torch.tensor([1, 1] + [0] * 38)
    probs = torch.stack([1 - y.float(), y.float()], dim=1) * 0.8 + 0.1
    ci = bootstrap_interval(y, probs, ["neg", "pos"], n_resamples=200)
    assert ci == {"auroc": [1.0, 1.0], "auprc_macro": [1.0, 1.0]}


# ---------------------------------------------------------------------------- k-NN


def knn_by_loops(train, labels, test, n_classes, k, temperature):
    out = []
    for q in test:
        sims = [float(F.cosine_similarity(q, t, dim=0)) for t in train]
        order = sorted(range(len(train)), key=lambda i: -sims[i])[:k]
        votes = [0.0] * n_classes
        for i in order:
            votes[int(labels[i])] += math.exp(sims[i] / temperature)
        out.append([v / sum(votes) for v in votes])
    return torch.tensor(out)


def test_knn_equals_a_brute_force_reference():
    g = torch.Generator().manual_seed(0)
    train, test = torch.randn(120, 16, generator=g) * 3, torch.randn(25, 16, generator=g)
    labels = torch.randint(0, 4, (120,), generator=g)
    fast = knn_predict(train, labels, test, 4, k=20, temperature=0.07, chunk_size=7)  # chunks of 7: 4 chunks
    assert torch.allclose(fast, knn_by_loops(train, labels, test, 4, 20, 0.07), atol=1e-5)


def test_knn_with_multi_hot_labels_gives_the_weighted_fraction_of_neighbours():
    g = torch.Generator().manual_seed(1)
    train, test = torch.randn(60, 8, generator=g), torch.randn(9, 8, generator=g)
    multi = torch.randint(0, 2, (60, 3), generator=g)
    probs = knn_predict(train, multi, test, 3, k=10, temperature=0.1)
    per_column = torch.stack([knn_by_loops(train, multi[:, c], test, 2, 10, 0.1)[:, 1] for c in range(3)], dim=1)
    assert torch.allclose(probs, per_column, atol=1e-5)


# ---------------------------------------------------------------------------- segmentation


PRED = np.array([[0, 1, 1], [0, 1, 2], [2, 2, 0]])
TARGET = np.array([[0, 1, 0], [1, 1, 2], [2, 0, 0]])


def test_confusion_counts_match_hand_counted_pixels():
    tp, fp, fn = confusion_counts(PRED, TARGET, 3)
    assert tp.tolist() == [2, 2, 2]
    assert fp.tolist() == [1, 1, 1]
    assert fn.tolist() == [2, 1, 0]


def test_iou_and_dice_match_hand_computed_values():
    iou, dice = iou_and_dice(*confusion_counts(torch.tensor(PRED), torch.tensor(TARGET), 3))
    np.testing.assert_allclose(iou, [2 / 5, 2 / 4, 2 / 3])
    np.testing.assert_allclose(dice, [4 / 7, 4 / 6, 4 / 5])


def test_class_absent_from_prediction_and_target_is_skipped_not_scored():
    empty = np.zeros((4, 4), dtype=np.int64)           # image A: background only, predicted so
    lung = empty.copy()
    lung[1:3, 1:3] = 1                                  # image B: class 1 present, predicted absent
    iou, dice = iou_and_dice(*confusion_counts(empty, empty, 3))
    assert iou[0] == 1.0 and dice[0] == 1.0
    assert np.isnan(iou[1:]).all() and np.isnan(dice[1:]).all()
    m = segmentation_metrics([empty, empty], [empty, lung], 3)
    assert m["per_class"]["1"]["dice"] == 0.0            # missed entirely: 0, not skipped
    assert m["per_class"]["1"]["n_images_scored"] == 1   # image A does not count for class 1
    assert math.isnan(m["per_class"]["2"]["dice"]) and m["per_class"]["2"]["n_images_scored"] == 0
    assert m["mDice"] == 0.0 and m["mIoU"] == 0.0        # the mean skips class 2 instead of failing


def test_empty_prediction_of_nonempty_target_scores_zero_and_empty_pair_is_skipped():
    target = np.zeros((2, 2), dtype=np.int64)
    target[0, 0] = 1
    m = segmentation_metrics([np.zeros((2, 2)), np.zeros((2, 2))], [target, np.zeros((2, 2))], 2)
    assert m["mDice"] == 0.0 and m["per_class"]["1"]["n_images_scored"] == 1


def test_dice_is_an_image_mean_while_iou_and_f1_pool_pixels():
    t1, p1 = np.zeros((4, 4), np.int64), np.zeros((4, 4), np.int64)
    t1[:2, :2] = 1
    p1[:2, :2] = 1                                      # image 1: perfect, 4 px
    t2, p2 = np.zeros((4, 4), np.int64), np.zeros((4, 4), np.int64)
    t2[3, :2] = 1
    p2[3, 2:] = 1                                       # image 2: 2 px target, 2 px wrong guess
    m = segmentation_metrics(np.stack([p1, p2]), np.stack([t1, t2]), 2)
    assert m["mDice"] == pytest.approx(0.5)              # (1 + 0) / 2
    assert m["mIoU"] == pytest.approx(4 / 8)             # tp 4, fp 2, fn 2 pooled
    assert m["mF1"] == pytest.approx(8 / 12)
    assert m["dice_std_over_images"] == pytest.approx(0.5)
    # background is reported but kept out of the means
    assert m["mIoU_with_background"] == pytest.approx((4 / 8 + 24 / 28) / 2)


def test_confusion_counts_reject_labels_outside_the_class_range():
    with pytest.raises(ValueError, match="labels span"):
        confusion_counts(np.array([0, 3]), np.array([0, 1]), 3)


# ---------------------------------------------------------------------------- captioning


HYPS = [
    "The lungs are clear. No pleural effusion.",
    "Bilateral patchy opacities in the lower lobes, more on the right.",
    "a nodule in the left upper lung",
    "Heart size is normal",
    "consolidation in the right middle lung with air bronchograms",
    "",
    "3.5 cm mass, T2-weighted hyperintense; follow-up in 3-6 months.",
    "no no no no",
]
REFS = [
    "The lungs are clear; there is no pleural effusion.",
    "Patchy bilateral opacities in both lower lobes, predominantly right-sided.",
    "a nodule in the left lower lung",
    "The cardiomediastinal silhouette is within normal limits.",
    "consolidation in the right middle lung",
    "no lesion, clear lungs",
    "A 3.5 cm T2-hyperintense mass; follow-up MRI in 3-6 months is advised.",
    "no focal consolidation",
]


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_corpus_bleu_matches_sacrebleu(order):
    expected = sacrebleu.metrics.BLEU(max_ngram_order=order).corpus_score(HYPS, [REFS])
    ours = corpus_bleu(HYPS, REFS, max_order=order)
    assert ours["bleu"] == pytest.approx(expected.score, abs=1e-9)
    assert ours["precisions"] == pytest.approx(expected.precisions, abs=1e-9)
    assert ours["bp"] == pytest.approx(expected.bp, abs=1e-12)


def test_bleu_of_single_pairs_matches_sacrebleu_including_smoothing():
    for hyp, ref in zip(HYPS, REFS):  # single pairs hit the zero-match and brevity cases
        expected = sacrebleu.metrics.BLEU().corpus_score([hyp], [[ref]]).score
        assert corpus_bleu([hyp], [ref])["bleu"] == pytest.approx(expected, abs=1e-9), (hyp, ref)


def test_13a_tokenizer_matches_sacrebleu():
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a
    reference = Tokenizer13a()
    for line in HYPS + REFS + ["x&amp;y &lt;3 1,000.5 (a/b) -7 a-b [c] {d} 'e' \"f\""]:
        assert tokenize_13a(line) == reference(line).split()


def test_rouge_l_matches_rouge_score():
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    expected = [scorer.score(ref, hyp)["rougeL"].fmeasure for hyp, ref in zip(HYPS, REFS)]
    assert rouge_l(HYPS, REFS) == pytest.approx(100 * sum(expected) / len(expected), abs=1e-9)


WORDS = """caresses ponies ties caress cats feed agreed plastered bled motoring sing conflated troubled sized
hopping tanned falling hissing fizzed failing filing happy sky relational conditional rational valenci
hesitanci digitizer conformabli radicalli differentli vileli analogousli vietnamization predication operator
feudalism decisiveness hopefulness callousness formaliti sensitiviti sensibiliti triplicate formative
formalize electriciti electrical hopeful goodness revival allowance inference airliner gyroscopic adjustable
defensible irritant replacement adjustment dependent adoption homologou communism activate angulariti
homologous effective bowdlerize probate rate cease controll roll generalizations oscillators toy syzygy
opacities consolidation nodules bilateral pneumonia infiltrates effusion enlarged cardiomegaly intubated
lungs findings showing reticular interstitial markings alveolar progressed is a by y yyyy enjoy""".split()


def test_porter_stemmer_matches_nltk_original_algorithm():
    nltk_porter = PorterStemmer(PorterStemmer.ORIGINAL_ALGORITHM)
    assert [porter_stem(w) for w in WORDS] == [nltk_porter.stem(w) for w in WORDS]


class NoSynonyms:
    """Stands in for WordNet, so that NLTK's METEOR runs only its exact and stem stages, like ours."""
    def synsets(self, word):
        return []


def test_meteor_matches_nltk_exact_and_stem_stages():
    porter = PorterStemmer(PorterStemmer.ORIGINAL_ALGORITHM)
    for hyp, ref in zip(HYPS, REFS):
        expected = single_meteor_score(tokenize_13a(ref.lower()), tokenize_13a(hyp.lower()),
                                       stemmer=porter, wordnet=NoSynonyms())
        assert sentence_meteor(hyp, ref) == pytest.approx(expected, abs=1e-12), (hyp, ref)


def test_meteor_on_hand_computed_cases():
    # identical: P = R = 1, one chunk of 6 matches: 1 - 0.5 (1/6)^3
    assert sentence_meteor("the cat sat on the mat", "the cat sat on the mat") == pytest.approx(1 - 0.5 / 216)
    # stems only (cats/cat, running/runs -> run): 2 matches in one chunk: 1 - 0.5 (1/2)^3
    assert sentence_meteor("cats running", "cat runs") == pytest.approx(1 - 0.5 / 8)
    # 2 of 3 hypothesis words match 2 of 4 reference words, in 2 chunks:
    # P = 2/3, R = 1/2, F = PR / (0.9 P + 0.1 R) = (1/3) / (0.6 + 0.05), penalty 0.5 (2/2)^3 = 0.5
    assert sentence_meteor("nodule left big", "left lung has nodule") == pytest.approx((1 / 3) / 0.65 * 0.5)
    assert sentence_meteor("completely different", "no overlap here") == 0.0


def test_caption_metrics_are_perfect_for_perfect_captions():
    scores = caption_metrics(REFS, REFS)
    for name in ("BLEU", "BLEU-1", "BLEU-4", "ROUGE-L"):
        assert scores[name] == pytest.approx(100.0)
    assert 90 < scores["METEOR"] < 100  # the fragmentation penalty never reaches 0


# ---------------------------------------------------------------------------- over seeds


def test_mean_std_is_the_population_std_over_seeds():
    assert mean_std([0.80, 0.84]) == {"mean": pytest.approx(0.82), "std": pytest.approx(0.02), "n": 2}
    assert mean_std([0.5]) == {"mean": 0.5, "std": 0.0, "n": 1}


def test_roc_curve_equals_scikit_learn_and_its_trapezoids_sum_to_roc_auc(sklearn_metrics):
    g = np.random.default_rng(0)
    y = g.integers(0, 2, 300)
    scores = np.round(g.random(300) + 0.4 * y, 1)  # rounded: many ties
    fpr, tpr = roc_curve(y, scores)
    ref_fpr, ref_tpr, _ = sklearn_metrics.roc_curve(y, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, ref_fpr)
    np.testing.assert_allclose(tpr, ref_tpr)
    assert np.trapezoid(tpr, fpr) == pytest.approx(roc_auc(y, scores))


def test_confusion_matrix_equals_scikit_learn(sklearn_metrics):
    g = np.random.default_rng(1)
    y_true, y_pred = g.integers(0, 4, 200), g.integers(0, 4, 200)
    np.testing.assert_array_equal(confusion_matrix(y_true, y_pred, 4),
                                  sklearn_metrics.confusion_matrix(y_true, y_pred, labels=range(4)))
