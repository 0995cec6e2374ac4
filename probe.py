"""Frozen-feature evaluation of a ViT backbone (RAD-DINO §4.1, §4.4; OmniRad §5.2).

Features are extracted once and cached; then a linear probe (L2 logistic regression, grid-searched on
val), a k-NN classifier (DINO's cosine, temperature-weighted votes), a metadata probe (5-fold CV
grouped by patient) and pictures: PCA / t-SNE maps of the latent space, the last layer's CLS
attention per head, and patch-to-patch similarity between two images (RAD-DINO Fig. 3).

    python probe.py                                   # phantoms, random init, < 3 min on 2 CPU cores
    python probe.py --dataset=medmnist --data_path=../shared/data/pneumoniamnist.npz \\
                    --init_from=/work/ckpt/pretrained_vit.safetensors
    python probe.py --dataset=covid_cxr --data_path=../shared/data/covid_cxr_xray256/images.csv
"""
import hashlib
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------
# Features
# ----------------------------------------------------------------------------------------------

FEATURE_KINDS = ("cls", "mean", "cls+mean")


def split_item(item):
    """(image, label) of a dataset item: a tuple/list (image, label, ...) or a dict with 'image', 'label'."""
    if isinstance(item, dict):
        return item["image"], item["label"]
    return item[0], item[1]


@torch.no_grad()
def extract_features(model, dataset, batch_size=64, kind="cls", layers=None, device="cpu"):
    """Frozen features of every item of `dataset`, in order. Returns (features (N, F) float32 on CPU,
    labels (N,) or (N, C) as the dataset gives them).

    Images must already be normalised as the backbone expects (data.py's datasets do this).
    kind: "cls" = CLS token, "mean" = mean of the patch tokens, "cls+mean" = both concatenated
    (DINOv2's linear-eval feature). layers: block indices (0-based) whose normed outputs are
    concatenated; None = the last block only."""
    if kind not in FEATURE_KINDS:
        raise ValueError(f"extract_features: kind must be one of {FEATURE_KINDS}, got {kind!r}")
    layers = [len(model.blocks) - 1] if layers is None else list(layers)
    was_training = model.training
    model.eval().to(device)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0,
                                         collate_fn=lambda items: [split_item(it) for it in items])
    feats, labels = [], []
    for batch in loader:
        images = torch.stack([torch.as_tensor(img) for img, _ in batch]).to(device, torch.float32)
        labels.extend(torch.as_tensor(lab) for _, lab in batch)
        per_layer = []
        for patch, cls in model.get_intermediate_layers(images, layers, return_class_token=True, norm=True):
            if kind in ("cls", "cls+mean"):
                per_layer.append(cls)
            if kind in ("mean", "cls+mean"):
                per_layer.append(patch.mean(dim=1))
        feats.append(torch.cat(per_layer, dim=1).float().cpu())
    model.train(was_training)
    return torch.cat(feats), torch.stack(labels)


def backbone_tag(init_from, arch, seed):
    """A short name that changes when the backbone does: the file's name, size and mtime, or the
    random-init architecture and seed."""
    if not init_from:
        return f"random-{arch}-seed{seed}"
    st = os.stat(init_from)
    digest = hashlib.sha1(f"{os.path.abspath(init_from)}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:8]
    return f"{Path(init_from).stem}-{digest}"


def cached_features(cache_dir, key, model, dataset, **extract_kwargs):
    """extract_features, cached in `cache_dir/<key>.safetensors` (keyed by backbone, dataset, split, kind)."""
    from model import save_safetensors_atomic  # only the cache needs model.py's writer
    from safetensors.torch import load_file
    path = Path(cache_dir) / f"{key}.safetensors"
    if path.exists():
        cached = load_file(str(path))
        if cached["features"].shape[0] == len(dataset):
            return cached["features"], cached["labels"]
        print(f"cache {path} has {cached['features'].shape[0]} rows for a dataset of {len(dataset)}: re-extracting")
    feats, labels = extract_features(model, dataset, **extract_kwargs)
    save_safetensors_atomic({"features": feats, "labels": labels}, path, {"key": key})
    return feats, labels


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
        raise ValueError(f"knn_predict: labels give targets {tuple(targets.shape)}, expected ({train.shape[0]}, {n_classes})")
    k = min(k, train.shape[0])
    probs = []
    for start in range(0, test.shape[0], chunk_size):  # chunks keep the (chunk, N) similarity small
        sim, idx = (test[start:start + chunk_size] @ train.T).topk(k, dim=1)
        weights = (sim / temperature).exp()                       # (m, k)
        votes = torch.einsum("mk,mkc->mc", weights, targets[idx])  # (m, C)
        probs.append(votes / weights.sum(dim=1, keepdim=True))
    return torch.cat(probs)


# ----------------------------------------------------------------------------------------------
# Linear probe: L2 logistic regression on standardised features, full-batch L-BFGS
# ----------------------------------------------------------------------------------------------

L2_GRID = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)


class LinearProbe(nn.Module):
    """Standardise, then one linear layer: softmax over classes (multinomial) or a sigmoid per
    label (one-vs-rest, multi-label)."""

    def __init__(self, mean, std, n_out, multilabel):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.linear = nn.Linear(mean.shape[0], n_out)
        nn.init.zeros_(self.linear.weight)  # zero start: the L-BFGS result is deterministic
        nn.init.zeros_(self.linear.bias)
        self.multilabel = multilabel
        self.l2 = None
        self.val_loss_by_l2 = {}

    def forward(self, x):
        return self.linear((x.float() - self.mean) / self.std)

    @torch.no_grad()
    def predict_proba(self, x):
        logits = self(x)
        return torch.sigmoid(logits) if self.multilabel else logits.softmax(dim=1)


def probe_loss(probe, x, y):
    """Mean negative log-likelihood: cross-entropy (class indices) or binary cross-entropy (multi-hot)."""
    logits = probe(x)
    if probe.multilabel:
        return F.binary_cross_entropy_with_logits(logits, y.float())
    return F.cross_entropy(logits, y.long())


def fit_logistic_regression(x, y, l2, multilabel=False, n_classes=None, max_iter=500):
    """Minimise mean NLL + l2/2 * ||W||^2 (bias not penalised) with full-batch L-BFGS."""
    x = x.float()
    mean, std = x.mean(dim=0), x.std(dim=0)
    std = torch.where(std > 1e-6 * std.max().clamp_min(1e-12), std, torch.ones_like(std))  # constant features
    n_out = y.shape[1] if multilabel else (n_classes or int(y.max()) + 1)
    probe = LinearProbe(mean, std, n_out, multilabel)
    opt = torch.optim.LBFGS(probe.linear.parameters(), lr=1.0, max_iter=max_iter, history_size=20,
                            tolerance_grad=1e-6, tolerance_change=1e-9, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = probe_loss(probe, x, y) + 0.5 * l2 * probe.linear.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    probe.l2 = l2
    return probe


def train_linear_probe(train_x, train_y, val_x, val_y, multilabel=False, l2_grid=L2_GRID, n_classes=None, max_iter=500):
    """Fit one probe per L2 strength on train, keep the one with the lowest val NLL. NLL rather than
    val accuracy: small val splits make accuracy tie across most of the grid. Returns a LinearProbe
    (call .predict_proba(x)); .l2 and .val_loss_by_l2 record the search."""
    best, losses = None, {}
    for l2 in l2_grid:
        probe = fit_logistic_regression(train_x, train_y, l2, multilabel, n_classes, max_iter)
        with torch.no_grad():
            losses[l2] = float(probe_loss(probe, val_x, val_y))
        if best is None or losses[l2] < losses[best.l2]:
            best = probe
    best.val_loss_by_l2 = losses
    return best
