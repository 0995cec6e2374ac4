"""Frozen-feature evaluation of a ViT backbone (RAD-DINO §4.1, §4.4; OmniRad §5.2): a linear probe (L2 logistic
regression), DINO's k-NN and a metadata probe (CV grouped by patient), with 95% bootstrap intervals on the test AUROC /
AUPRC; pictures: PCA / t-SNE maps, the last layer's CLS attention per head, patch similarity (RAD-DINO Fig. 3).

    python probe.py                                    # phantoms, random init (pretrain.py's start), seconds on a CPU
    python probe.py --init_from=out/pretrain/teacher_backbone.safetensors   # the same network after pretrain.py
    python probe.py config/probe_pneumoniamnist.py --init_from=out/pretrain/teacher_backbone.safetensors
    python probe.py config/probe_breastmnist.py --seeds=0,1,2        # random init, three seeds
    python probe.py config/probe_covid_cxr.py          # COVID-19 vs other + sex / age metadata probe
    python probe.py --data_path=my/index.csv --label_column=finding --metadata_columns=()

Features are cached in out_dir/features/, keyed by backbone (a checkpoint's size and mtime), data, split, kind.
"""
import hashlib
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import data
from config import configure
from figures import save_attention_figure, save_scatter, save_similarity_figure
from linear_probe import (FEATURE_KINDS, L2_GRID, fit_logistic_regression, pooled_features, single_thread,
                          train_linear_probe)
from metrics import accuracy, bootstrap_interval, knn_predict, mean_std, probe_metrics
from model import ViT, check_img_size, cls_attention_maps, load_backbone, save_json_atomic, save_safetensors_atomic, vit_config

# -----------------------------------------------------------------------------
# config: overridden by config/*.py files and --key=value; the defaults probe a random ViT-tiny/8 on phantoms
# data
dataset = ""                  # "phantom" | "medmnist" | "csv"; "" = by data_path ("" = phantom)
data_path = ""                # medmnist: an official .npz; csv: an index with image, split (+ label) columns
label_column = ""             # csv: the column holding class names ...
label_fn = "covid_vs_other"   # ... or the name of a label function in data.py (when label_column is "")
intensity = "full_range"      # csv: 16-bit PNGs, DICOMs without a window -> [0, 1]: full_range, minmax, percentile
phantom_sizes = (128, 200, 200)  # phantom images per split (train, val, test): 32 labels per class
phantom_task = "anatomy"      # "anatomy" (pretrain.py's default task) or "lesions"
img_size = 48                 # images are resized to this (centre square crop first); pretrain.py's crop size
metadata_columns = ("sex", "age")   # csv only: tabular columns probed with grouped CV (RAD-DINO Table 7)
group_column = "patientid"    # metadata probe: all images of one patient stay in one fold
numeric_bin_edges = (20.0, 40.0, 60.0, 80.0)  # numeric metadata columns (age, years) are binned here
# model
init_from = ""                # any backbone model.load_backbone reads; "" = RANDOM INIT (a baseline)
model_size = "tiny"           # random init only: ViT size, patch and the size of its position grid
patch_size = 8
depth = 6                     # random init only: number of blocks (0 = the size's own); pretrain.py's
layerscale_init = 0.1         # random init only: pretrain.py's default, so the baseline is pretraining's start
feature_kind = "cls+mean"     # "cls" | "mean" | "cls+mean" (DINOv2 linear eval)
layers = ()                   # block indices to concatenate; () = the last block
# optimisation: the probes
l2_grid = L2_GRID             # linear-probe L2 strengths (on standardised features); the lowest val NLL wins
knn_k = 20                    # DINO eval_knn defaults
knn_temperature = 0.07
n_folds = 5                   # metadata probe: cross-validation folds
bootstrap = 1000              # test-set resamples for the 95% intervals of AUROC / AUPRC (0 = none)
tsne_max_points = 600         # the PCA / t-SNE maps show the first test images, at most this many
# system / output
seeds = (0,)                  # random-init backbone seeds, and the CV fold shuffles
batch_size = 64               # feature extraction
device = "cuda" if torch.cuda.is_available() else "cpu"
out_dir = "out/probe"
# -----------------------------------------------------------------------------

HEADLINE_METRICS = ("accuracy", "auroc", "auprc_macro")

# features, cached on disk
@torch.no_grad()
def extract_features(model, dataset, batch_size=64, kind="cls", layers=None, device="cpu"):
    """(features (N, F) float32 on CPU, labels (N,) / (N, C) or None) of every item of `dataset`, in order: the
    CLS token, mean patch token or both of each block in `layers` (None = the last), normed and concatenated."""
    if kind not in FEATURE_KINDS:
        raise ValueError(f"extract_features: kind must be one of {FEATURE_KINDS}, got {kind!r}")
    layers = [len(model.blocks) - 1] if layers is None else list(layers)
    was_training = model.training
    model.eval().to(device)
    loader = torch.utils.data.DataLoader(dataset, batch_size, collate_fn=list)
    feats, labels, t0 = [], [], time.time()
    for step, batch in enumerate(loader):
        batch = [(it["image"], it.get("label")) if isinstance(it, dict) else it[:2] for it in batch]  # dict / tuple
        images = torch.stack([torch.as_tensor(img) for img, _ in batch]).to(device, torch.float32)
        labels.extend(None if lab is None else torch.as_tensor(lab) for _, lab in batch)
        per_layer = []
        for patch, cls in model.get_intermediate_layers(images, layers, return_class_token=True, norm=True):
            per_layer.append(pooled_features(cls, patch, kind))
        feats.append(torch.cat(per_layer, dim=1).float().cpu())
        if step % 10 == 0 or len(labels) == len(dataset):
            speed = len(labels) / (time.time() - t0)
            print(f"  features {len(labels)}/{len(dataset)} | {speed:.0f} img/s | "
                  f"ETA {(len(dataset) - len(labels)) / speed:.0f} s")
    model.train(was_training)
    labels = None if any(lab is None for lab in labels) else torch.stack(labels)
    return torch.cat(feats), labels

def backbone_tag(init_from, arch, seed):
    """A name that changes when the backbone does: the file's name, size and mtime, or the random-init arch and seed."""
    if not init_from:
        return f"random-{arch}-seed{seed}"
    st = os.stat(init_from)
    digest = hashlib.sha1(f"{os.path.abspath(init_from)}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:8]
    return f"{Path(init_from).stem}-{digest}"

def cached_features(cache_dir, key, model, dataset, **extract_kwargs):
    """extract_features, cached in `cache_dir/<key>.safetensors` (keyed by backbone, dataset, split, kind)."""
    path = Path(cache_dir) / f"{key}.safetensors"
    if path.exists():
        cached = load_file(str(path))
        if cached["features"].shape[0] == len(dataset):
            return cached["features"], cached.get("labels")
        print(f"cache {path} has {cached['features'].shape[0]} rows for a dataset of {len(dataset)}: re-extracting")
    feats, labels = extract_features(model, dataset, **extract_kwargs)
    tensors = {"features": feats} if labels is None else {"features": feats, "labels": labels}
    save_safetensors_atomic(tensors, path, {"key": key})
    return feats, labels

# metadata probe (RAD-DINO §4.4, Table 7): cross-validation grouped by patient
def grouped_folds(groups, n_folds=5, seed=0):
    """Fold index per sample, a group (patient) in one fold: shuffled groups go largest first into the smallest fold."""
    names, inverse, counts = np.unique(np.asarray(groups), return_inverse=True, return_counts=True)
    if len(names) < n_folds:
        raise ValueError(f"grouped_folds: {len(names)} groups cannot fill {n_folds} folds")
    order = np.random.default_rng(seed).permutation(len(names))
    order = order[np.argsort(-counts[order], kind="stable")]  # largest first, ties in shuffled order
    fold_of_group, fold_sizes = np.empty(len(names), np.int64), np.zeros(n_folds, np.int64)
    for g in order:
        fold_of_group[g] = np.argmin(fold_sizes)
        fold_sizes[fold_of_group[g]] += counts[g]
    return fold_of_group[inverse.reshape(-1)]

def cross_validate_probe(features, labels, groups, n_folds, seed, l2_grid):
    """Per held-out fold, the accuracy of the linear probe (the next fold is val, to choose the L2 strength; then
    refit on train + val) and of always answering the training folds' most common class (the floor to beat)."""
    folds = grouped_folds(groups, n_folds, seed)
    labels = torch.as_tensor(labels)
    n_classes = int(labels.max()) + 1
    accuracies, majority = [], []
    for k in range(n_folds):
        test, val = folds == k, folds == (k + 1) % n_folds
        train, fit = ~test & ~val, ~test
        chosen = train_linear_probe(features[train], labels[train], features[val], labels[val],
                                    l2_grid=l2_grid, n_classes=n_classes)
        probe = fit_logistic_regression(features[fit], labels[fit], chosen.l2, n_classes=n_classes)
        accuracies.append(accuracy(labels[test], probe.predict_proba(features[test]).argmax(dim=1)))
        majority.append(float((labels[test] == labels[fit].bincount().argmax()).float().mean()))
    return accuracies, majority

def metadata_targets(rows, column, bin_edges):
    """Class per row (None if blank) and names: numbers binned at `bin_edges` (RAD-DINO's ages), else categories."""
    values = [(row.get(column) or "").strip() for row in rows]
    present = [v for v in values if v]
    if not present:
        raise ValueError(f"metadata column '{column}': no non-blank values in {len(rows)} rows")
    try:
        numbers = [float(v) if v else None for v in values]
    except ValueError:
        names = sorted(set(present))
        return [names.index(v) if v else None for v in values], names
    edges = list(bin_edges)
    names = [f"<{edges[0]:g}"] + [f"{a:g}-{b:g}" for a, b in zip(edges, edges[1:])] + [f">={edges[-1]:g}"]
    return [None if x is None else int(np.searchsorted(edges, x, side="right")) for x in numbers], names

# 2-D maps of the latent space: PCA and exact t-SNE
def pca(x, n_components=2):
    """(projected (N, n), components (n, F)) on the top principal axes, each signed so its largest loading is > 0."""
    x = x.double() - x.double().mean(dim=0)
    eigenvalues, eigenvectors = torch.linalg.eigh(x.T @ x / max(len(x) - 1, 1))  # ascending order
    components = eigenvectors[:, -n_components:].flip(1).T
    components = components * components.gather(1, components.abs().argmax(dim=1, keepdim=True)).sign()
    return (x @ components.T).float(), components.float()

def tsne_affinities(sq_dist, perplexity, n_steps=100):
    """Gaussian affinities p_{j|i} of entropy log(perplexity): a bisection on every row's precision at once."""
    n = sq_dist.shape[0]
    off_diag = ~torch.eye(n, dtype=torch.bool)
    d = sq_dist.masked_fill(~off_diag, float("inf"))
    d = d - d.min(dim=1, keepdim=True).values  # shift per row: exp() cannot underflow to all zeros
    beta = torch.ones(n, 1, dtype=d.dtype)
    low, high = torch.zeros_like(beta), torch.full_like(beta, float("inf"))
    for _ in range(n_steps):
        p = torch.exp(-d * beta)
        p_sum = p.sum(dim=1, keepdim=True)
        entropy = torch.log(p_sum) + beta * (torch.where(off_diag, d, 0) * p).sum(dim=1, keepdim=True) / p_sum
        too_flat = entropy > math.log(perplexity)  # entropy too high: sharpen (raise beta)
        low = torch.where(too_flat, beta, low)
        high = torch.where(too_flat, high, beta)
        beta = torch.where(torch.isinf(high), beta * 2, (low + high) / 2)
    p = torch.exp(-d * beta)
    return p / p.sum(dim=1, keepdim=True)

def tsne(x, perplexity=30.0, n_iter=750, seed=0):
    """Exact t-SNE (van der Maaten & Hinton 2008) in 2-D, O(N^2) memory: early exaggeration 12 for 250 steps,
    momentum 0.5 then 0.8, adaptive gains, learning rate max(N / 48, 50) (scikit-learn's and openTSNE's 'auto')."""
    x, n = x.double(), len(x)
    perplexity = min(perplexity, (n - 1) / 3)  # more neighbours than exist makes the bisection fail
    y = torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 1e-4
    velocity, gains, lr = torch.zeros_like(y), torch.ones_like(y), max(n / 48, 50.0)
    with single_thread():
        p = tsne_affinities(torch.cdist(x, x).pow(2), perplexity)
        p = ((p + p.T) / (2 * n)).clamp_min(1e-12)
        for step in range(n_iter):
            exaggeration, momentum = (12.0, 0.5) if step < 250 else (1.0, 0.8)
            kernel = 1 / (1 + torch.cdist(y, y).pow(2))  # Student-t with one degree of freedom
            kernel.fill_diagonal_(0)
            q = (kernel / kernel.sum()).clamp_min(1e-12)
            w = (exaggeration * p - q) * kernel
            grad = 4 * (w.sum(dim=1, keepdim=True) * y - w @ y)
            gains = torch.where((grad > 0) != (velocity > 0), gains + 0.2, gains * 0.8).clamp_min(0.01)
            velocity = momentum * velocity - lr * gains * grad
            y = y + velocity
    return (y - y.mean(dim=0)).float()

# patch correspondences (RAD-DINO Fig. A.2)
@torch.no_grad()
def patch_similarity(model, image_a, image_b, query_patches):
    """Cosine similarity (Q, h, w) of the last layer's patch tokens: patches (row, col) of image_a to all of image_b."""
    tokens = model.forward_features(torch.stack([image_a, image_b]))["x_norm_patchtokens"]
    tokens = F.normalize(tokens.float(), dim=-1)
    h, w = image_b.shape[-2] // model.patch_size, image_b.shape[-1] // model.patch_size
    queries = torch.stack([tokens[0, r * w + c] for r, c in query_patches])
    return (queries @ tokens[1].T).reshape(len(query_patches), h, w)

if __name__ == "__main__":
    config = configure(globals())

    # checks, before any work (the dataset and model constructors check the rest)
    dataset = data.data_kind(dataset, data_path)
    check_img_size(img_size, init_from, patch_size)
    data.check_intensity(intensity)
    if dataset == "csv" and not label_column and not hasattr(data, label_fn):
        raise ValueError(f"config 'label_fn': expected the name of a function in data.py, got {label_fn!r}")
    if feature_kind not in FEATURE_KINDS:
        raise ValueError(f"config 'feature_kind': expected one of {FEATURE_KINDS}, got {feature_kind!r}")
    if not isinstance(bootstrap, int) or bootstrap < 0:
        raise ValueError(f"config 'bootstrap': expected a number of resamples >= 0, got {bootstrap!r}")
    out, t_start = Path(out_dir), time.time()
    out.mkdir(parents=True, exist_ok=True)

    # data: train / val / test (+ csv: every image, for the metadata probe), centre-cropped, resized, normalised
    transform = data.ClassificationTransform(img_size, train=False)
    if dataset == "phantom":
        splits = {s: data.PhantomDataset(n, img_size, seed=0, split=s, transform=transform, task=phantom_task)
                  for s, n in zip(data.SPLITS, phantom_sizes)}
        class_names = splits["train"].classes
        data_tag = f"phantom-{phantom_task}{img_size}-{'-'.join(map(str, phantom_sizes))}"
    elif dataset == "medmnist":
        splits = {s: data.ArrayImageDataset(*data.load_medmnist(data_path, s), transform) for s in data.SPLITS}
        info = data.MEDMNIST.get(Path(data_path).stem.split("_")[0])
        class_names = list(info.labels) if info else None
        data_tag = f"{Path(data_path).stem}-{img_size}"
    else:
        labelling = dict(label_column=label_column) if label_column else dict(label_fn=getattr(data, label_fn))
        splits = {s: data.ImageFolderDataset(data_path, s, transform=transform, intensity=intensity, **labelling)
                  for s in data.SPLITS}
        class_names = splits["train"].classes or (["other", "COVID-19"] if label_fn == "covid_vs_other" else None)
        data_tag = f"{Path(data_path).parent.name}-{label_column or label_fn}-{img_size}-{intensity}"
    multilabel = dataset == "medmnist" and splits["train"].labels.ndim == 2  # ChestMNIST
    if class_names is None:  # classes without names are numbered
        train_labels = np.asarray(splits["train"].labels)
        class_names = [str(c) for c in range(train_labels.shape[1] if multilabel else int(train_labels.max()) + 1)]
    print(f"data: {dataset} {data_path or ''} | " + ", ".join(f"{s} {len(d)}" for s, d in splits.items())
          + f" | classes {class_names}")
    to_extract = dict(splits)
    if dataset == "csv" and metadata_columns:  # every image, labelled or not
        to_extract["all"] = data.ImageFolderDataset(data_path, None, transform=transform, intensity=intensity)

    # one evaluation per seed: backbone, features (cached), linear probe, k-NN, metadata probe
    arch_name = f"vit-{model_size}{f'-d{depth}' if depth else ''}-p{patch_size}-{img_size}-ls{layerscale_init}"
    layer_tag = "" if not layers else "-L" + "_".join(map(str, layers))
    extract = dict(batch_size=batch_size, kind=feature_kind, layers=list(layers) or None, device=device)
    runs = []
    for seed in seeds:
        t_seed = time.time()
        torch.manual_seed(seed)
        if init_from:
            model = load_backbone(init_from)
            print(f"backbone: {init_from} (seed {seed} only shuffles the CV folds)")
        else:
            model = ViT(vit_config(model_size, patch_size=patch_size, img_size=img_size,
                                   layerscale_init=layerscale_init, **({"depth": depth} if depth > 0 else {})))
            print(f"backbone: RANDOM INIT {arch_name} seed {seed} (no init_from): a random-feature baseline")
        tag = backbone_tag(init_from, arch_name, seed)
        feats = {s: cached_features(out / "features", f"{tag}_{data_tag}_{s}_{feature_kind}{layer_tag}", model, d,
                                    **extract) for s, d in to_extract.items()}
        (x_tr, y_tr), (x_va, y_va), (x_te, y_te) = feats["train"], feats["val"], feats["test"]
        run = {"seed": seed, "backbone": tag, "feature_dim": x_tr.shape[1]}

        # linear probe and k-NN, scored on the test split
        t0 = time.time()
        probe = train_linear_probe(x_tr, y_tr, x_va, y_va, multilabel, l2_grid, n_classes=len(class_names))
        linear_probs = probe.predict_proba(x_te)
        run["linear"] = {**probe_metrics(y_te, linear_probs, class_names, multilabel), "l2": probe.l2}
        settings = {"linear": f"l2 {probe.l2:g}, {time.time() - t0:.1f} s", "knn": f"k {knn_k}, T {knn_temperature}"}
        knn_probs = knn_predict(x_tr, y_tr, x_te, len(class_names), knn_k, knn_temperature)
        run["knn"] = probe_metrics(y_te, knn_probs, class_names, multilabel)
        for method, probs in (("linear", linear_probs), ("knn", knn_probs)):
            if bootstrap:
                run[method]["ci95"] = bootstrap_interval(y_te, probs, class_names, multilabel, bootstrap, seed)
            ci = run[method].get("ci95", {})
            print(f"seed {seed} {method} ({settings[method]}): " + " ".join(
                f"{k} {run[method][k]:.4f}" + (f" [{ci[k][0]:.4f}, {ci[k][1]:.4f}]" if k in ci else "")
                for k in HEADLINE_METRICS))

        # metadata probe: sex, age, ... read from the features of every image (rows blank there left out)
        if "all" in feats:
            rows, run["metadata"] = to_extract["all"].rows, {}
            for column in metadata_columns:
                targets, names = metadata_targets(rows, column, numeric_bin_edges)
                keep = [i for i, t in enumerate(targets) if t is not None]
                y, groups = torch.tensor([targets[i] for i in keep]), [rows[i][group_column] for i in keep]
                fold_acc, majority = cross_validate_probe(feats["all"][0][keep], y, groups, n_folds, seed, l2_grid)
                counts = np.bincount(y.numpy(), minlength=len(names)).tolist()
                run["metadata"][column] = {"accuracy": mean_std(fold_acc), "majority_class": mean_std(majority),
                                           "classes": names, "counts": counts}
                print(f"seed {seed} metadata '{column}' ({len(keep)} images, {len(set(groups))} patients, "
                      f"{n_folds}-fold grouped CV): accuracy {np.mean(fold_acc):.4f} ± {np.std(fold_acc):.4f} "
                      f"(majority class {np.mean(majority):.4f})")
        run["seconds"] = time.time() - t_seed
        runs.append(run)

    # summary over seeds
    print(f"\n{'method':8s} | ACC mean ± std | AUROC mean ± std | AUPRC(macro) mean ± std | AUPRC per class  "
          f"({len(seeds)} seed(s))")
    summary = {}
    for method in ("linear", "knn"):
        m = summary[method] = {k: mean_std([r[method][k] for r in runs]) for k in HEADLINE_METRICS}
        m["auprc_per_class"] = {c: mean_std([r[method]["auprc_per_class"][c] for r in runs]) for c in class_names}
        print(f"{method:8s} | " + " | ".join(f"{m[k]['mean'] * 100:.2f} ± {m[k]['std'] * 100:.2f}"
                                              for k in HEADLINE_METRICS)
              + " | " + " ".join(f"{c}: {v['mean'] * 100:.2f}" for c, v in m["auprc_per_class"].items()))
    for column in metadata_columns if "all" in feats else ():
        acc = mean_std([r["metadata"][column]["accuracy"]["mean"] for r in runs])
        majority = runs[0]["metadata"][column]["majority_class"]
        summary.setdefault("metadata", {})[column] = {"accuracy_mean_over_seeds": acc, "majority_class": majority}
        print(f"metadata {column}: {n_folds}-fold grouped CV accuracy {acc['mean'] * 100:.2f} ± "
              f"{acc['std'] * 100:.2f} over seeds (majority class {majority['mean'] * 100:.2f})")

    # pictures, from the last seed's backbone and test features
    n_map = min(len(x_te), tsne_max_points)
    labels_map = y_te[:n_map].argmax(dim=1) if multilabel else y_te[:n_map]  # multi-label: first positive label
    pictures = {"pca": str(out / "pca_test.png"), "tsne": str(out / "tsne_test.png"),
                "attention": str(out / "attention_test0.png"), "similarity": str(out / "similarity_test0_test1.png")}
    save_scatter(pca(x_te[:n_map])[0], labels_map, class_names, pictures["pca"],
                 f"PCA of {n_map} test features ({tag})")
    t0 = time.time()
    save_scatter(tsne(x_te[:n_map], seed=seeds[-1]), labels_map, class_names, pictures["tsne"],
                 f"t-SNE of {n_map} test features ({tag})")
    print(f"t-SNE of {n_map} points: {time.time() - t0:.1f} s")
    image_a, image_b = splits["test"][0]["image"], splits["test"][1]["image"]
    model.eval()
    maps = cls_attention_maps(model, image_a[None].to(device))[0].cpu()
    save_attention_figure(image_a, maps.numpy(), pictures["attention"])
    h = w = img_size // model.patch_size
    landmarks = [(h // 3, w // 3), (h // 3, 2 * w // 3), (2 * h // 3, w // 3), (2 * h // 3, 2 * w // 3)]
    sims = patch_similarity(model, image_a.to(device), image_b.to(device), landmarks).cpu()
    save_similarity_figure(image_a, image_b, sims.numpy(), landmarks, model.patch_size, pictures["similarity"])

    # results
    results = {"config": config, "class_names": class_names, "runs": runs, "summary": summary,
               "pictures": pictures, "seconds": time.time() - t_start}
    save_json_atomic(results, out / "results.json")
    print(f"wrote {out / 'results.json'} and {', '.join(pictures.values())} in {time.time() - t_start:.0f} s")
