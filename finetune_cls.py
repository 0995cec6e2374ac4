"""Classification fine-tuning of a ViT backbone (OmniRad §3.2, Table 8): full fine-tuning, a head on a
frozen backbone, or LoRA; MedMNIST 2D sets, CSV-indexed image sets or the procedural phantoms.

    python finetune_cls.py                                   # phantoms, random init, about a minute on a CPU
    python finetune_cls.py config/cls_medmnist64.py --data_path=../shared/data/pneumoniamnist.npz \
        --init_from=out/pretrain/teacher_backbone.safetensors --lr=1e-4 --seeds=0,1,2
    python finetune_cls.py ... --mode=head --head=mlp --head_features=cls+mean   # frozen backbone
    python finetune_cls.py ... --mode=lora --lora_rank=16 --lora_alpha=32        # exported merged
    python finetune_cls.py config/cls_omnirad.py --init_from=dinov2_vits14.pth \
        --dataset=medmnist --data_path=chestmnist_224.npz                        # multi-label: BCE
    python finetune_cls.py --data_path=../shared/data/covid_cxr_xray256/images.csv
    python finetune_cls.py ... --init_from=<pretrained> --head_init=probe --layerwise_decay=0.75 --select_on=auc

Model selection: the epoch with the best validation `select_on` (default macro-F1); its weights are then
evaluated once on the official test split. head_init=probe is LP-FT (Kumar et al. 2022): the head starts
as probe.py's linear probe (linear_probe.py) of the frozen features; layerwise_decay lowers the lr of
earlier blocks (BEiT; pretrain.py's grouping). The metrics (metrics.py) are hand-written (numpy) and
follow the scikit-learn definitions that the papers' numbers were computed with.
"""
import copy
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import model as vit_model
from config import configure
from figures import save_classification_figure
from linear_probe import FEATURE_KINDS, L2_GRID, pooled_features, train_linear_probe
from lora import VIT_TARGETS, add_lora, merge_lora
from metrics import as_numpy, classification_metrics, mean_std
from progress import format_duration
from schedules import lr_at, param_groups

# ----------------------------------------------------------------------------------------------
# Config. The defaults are a quick run on the procedural phantoms: random init, a 2-block ViT-tiny/8 at 32 px,
# about a minute on a CPU. The OmniRad recipe (224 px, 40 epochs, lr 1e-5, 10 warm-up epochs, batch 128) is
# config/cls_omnirad.py; the MedMNIST runs of RESULTS.md (Classification) use config/cls_medmnist64.py.
# ----------------------------------------------------------------------------------------------
# data
dataset = ""                     # "phantom" (no files), "medmnist" or "csv"; "" = by data_path ("" = phantom)
data_path = ""                   # medmnist: official .npz (or a name in ~/.medmnist); csv: index with a split column
csv_label = "covid_vs_other"     # csv: a label column, or "covid_vs_other" (COVID-19 vs other findings)
intensity = "full_range"         # csv: 16-bit PNGs, DICOMs without a window -> [0, 1]: full_range, minmax, percentile
phantom_sizes = (512, 64, 128)   # phantom images per split (train, val, test)
phantom_px = 64                  # phantoms are drawn at this size, then resized to img_size
img_size = 32                    # network input px (OmniRad: 224; MedMNIST 28 px images are upsampled)
crop_scale_min = 0.8             # random resized crop keeps 80-100% of the area: phantom lesions are small
hflip_p = 0.5                    # horizontal flip probability
rotation_deg = 10.0              # random rotation within +-rotation_deg
# model
init_from = ""                   # backbone file for model.load_backbone (nanorad/DINOv2/HF/timm); "" = random init
model_size = "tiny"              # random init only: tiny small base large giant
patch_size = 8                   # random init only
depth = 2                        # random init only: number of blocks (0 = the size's own, 12 for tiny)
layerscale_init = None           # random init only: LayerScale start (DINOv2: 1e-5; None = no LayerScale)
drop_path_rate = 0.0             # stochastic depth of the backbone
mode = "full"                    # "full", "head" (frozen backbone) or "lora"
head = "linear"                  # "linear" or "mlp"
head_features = "cls+mean"       # probe.py's feature_kind: "cls" (OmniRad, config/cls_*.py), "mean" or "cls+mean"
head_init = "random"             # "probe": LP-FT, the head starts as probe.py's linear probe of the frozen features
lora_rank = 8                    # OmniRad Table 8: r=8, alpha=16 and r=16, alpha=32
lora_alpha = 16.0                # LoRA update scale is lora_alpha / lora_rank
# optimisation (OmniRad §3.2: AdamW, wd 0.01, linear warm-up then cosine, grad clip 1.0, CE)
epochs = 12                      # passes over the training split
batch_size = 64                  # training batch; evaluation uses twice this
lr = 1e-3                        # OmniRad fine-tunes pretrained weights at 1e-5; random init needs more
min_lr = 0.0                     # end of the cosine
weight_decay = 0.01              # AdamW, on weight matrices only
warmup_epochs = 1.0              # linear warm-up length, may be fractional
layerwise_decay = 1.0            # block i's lr x decay^(depth - i), embeddings x decay^(depth + 1) (BEiT); 1.0 = off
grad_clip = 1.0                  # max gradient norm (0 = no clipping)
class_weighted = False           # inverse-frequency CE weights (BCE pos_weight for multi-label)
select_on = "f1"                 # the val metric that picks the epoch: "auc", "f1" (macro), "acc" or "loss" (lowest)
seeds = (0,)                     # --seeds=0,1,2 runs repeats and prints mean ± std
# system
device = "cuda" if torch.cuda.is_available() else "cpu"  # "cpu", "cuda" or "cuda:N"
dtype = "bfloat16" if torch.cuda.is_available() else "float32"  # autocast: "bfloat16" or "float32" (off)
cpu_threads = 1                  # torch threads on a CPU (0 = torch's default); more threads than free cores stall
num_workers = 1                  # DataLoader worker processes (each augments single-threaded)
# output
log_interval = 10                # steps between progress lines
export = True                    # save the selected model: backbone (LoRA merged) + head, per seed
out_dir = "out/finetune_cls"    # results.json, and the exported model per seed

# ----------------------------------------------------------------------------------------------
# Classifier: backbone + head, and what trains in each mode
# ----------------------------------------------------------------------------------------------

MODES = ("full", "head", "lora")
HEADS = ("linear", "mlp")
SELECT_ON = ("auc", "f1", "acc", "loss")
HEAD_FEATURES = FEATURE_KINDS    # what the head reads: the same features as the linear probe's
HEAD_INITS = ("random", "probe")


class Classifier(nn.Module):
    """A ViT and a head on the features a linear probe reads (linear_probe.pooled_features): the last
    block's normed CLS token ("cls"), mean patch token ("mean") or both ("cls+mean", DINOv2's linear
    evaluation). The head is "linear", or "mlp": a 2-layer GELU MLP."""

    def __init__(self, backbone, n_outputs, head="linear", head_features="cls", mlp_hidden_dim=512):
        super().__init__()
        self.backbone, self.head_features = backbone, head_features
        in_dim = backbone.embed_dim * (2 if head_features == "cls+mean" else 1)
        self.head = (nn.Linear(in_dim, n_outputs) if head == "linear" else
                     nn.Sequential(nn.Linear(in_dim, mlp_hidden_dim), nn.GELU(), nn.Linear(mlp_hidden_dim, n_outputs)))
        for m in self.head.modules():
            if isinstance(m, nn.Linear):  # DINOv2's linear-eval init: small weights, zero bias
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)

    def features(self, x):
        out = self.backbone.forward_features(x)
        return pooled_features(out["x_norm_clstoken"], out["x_norm_patchtokens"], self.head_features)

    def forward(self, x):
        return self.head(self.features(x))


def setup_mode(model, mode, lora_rank=8, lora_alpha=16.0):
    """Make `model` train as `mode` says and return the parameters to optimise.
    full: everything; head: the head only (backbone frozen); lora: the head and LoRA adapters."""
    if mode == "full":
        return [p for p in model.parameters() if p.requires_grad]
    if mode == "head":
        model.backbone.requires_grad_(False)
        return list(model.head.parameters())
    if mode == "lora":
        return add_lora(model.backbone, lora_rank, lora_alpha, VIT_TARGETS) + list(model.head.parameters())
    raise ValueError(f"mode {mode!r}: expected one of {MODES}")


def set_train_mode(model, mode):
    """model.train(), except that a frozen backbone stays in eval mode (no stochastic depth)."""
    model.train()
    if mode == "head":
        model.backbone.eval()


# ----------------------------------------------------------------------------------------------
# Optimisation and evaluation
# ----------------------------------------------------------------------------------------------


def make_optimizer(model, lr, weight_decay, layerwise_decay=1.0):
    """AdamW over the trainable parameters, grouped as pretraining groups them (schedules.param_groups):
    block i's lr x layerwise_decay^(depth - i), the embeddings x layerwise_decay^(depth + 1), the final
    norm and the head x1; as usual for ViTs, no weight decay on biases, norms and LayerScale. Each
    step's lr is lr_at(...) x the group's "lr_multiplier"."""
    groups = param_groups({"backbone": model.backbone, "head": model.head}, layerwise_decay)
    for group in groups:
        group["weight_decay"] = weight_decay * group["wd_multiplier"]
    return torch.optim.AdamW(groups, lr=lr)


def set_lr(optimizer, step_lr):
    """This step's lr (the head's): each group gets step_lr x its layer-wise "lr_multiplier"."""
    for group in optimizer.param_groups:
        group["lr"] = step_lr * group["lr_multiplier"]


def class_weights(labels, n_classes, multi_label):
    """single-label: n / (C * count_c) ("balanced"); multi-label: BCE pos_weight = negatives / positives.
    A class absent from the training labels gets weight 1."""
    labels = as_numpy(labels)
    if multi_label:
        pos = labels.sum(0).astype(np.float64)
        w = np.where(pos > 0, (len(labels) - pos) / np.maximum(pos, 1), 1.0)
    else:
        counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
        w = np.where(counts > 0, len(labels) / (n_classes * np.maximum(counts, 1)), 1.0)
    return torch.tensor(w, dtype=torch.float32)


def classification_loss(logits, labels, multi_label, weights=None):
    """Cross-entropy (optionally class-weighted); BCE with logits per label for multi-label sets."""
    if multi_label:
        return F.binary_cross_entropy_with_logits(logits, labels.float(), pos_weight=weights)
    return F.cross_entropy(logits, labels, weight=weights)


def train_step(model, optimizer, images, labels, multi_label, weights=None, grad_clip=1.0, autocast_dtype=None):
    """One AdamW step on one batch; returns the loss."""
    with torch.autocast(images.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        logits = model(images)
    loss = classification_loss(logits.float(), labels, multi_label, weights)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    return loss.item()


@torch.no_grad()
def head_inputs(model, loader, device, autocast_dtype=None):
    """(features on `device`, labels) of every image of `loader`: what model.head sees, in eval mode."""
    was_training = model.training
    model.eval()
    all_features, all_labels = [], []
    for images, labels in loader:
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            all_features.append(model.features(images.to(device)))
        all_labels.append(labels)
    model.train(was_training)
    return torch.cat(all_features), torch.cat(all_labels)


@torch.no_grad()
def evaluate(model, loader, multi_label, device, autocast_dtype=None, weights=None):
    """(metrics, labels, probabilities) over a loader: softmax, or sigmoid per label. The metrics are
    classification_metrics and "loss", the training loss (class-weighted with `weights`)."""
    features, labels = head_inputs(model, loader, device, autocast_dtype)
    with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        logits = model.head(features).float()
    probs = (logits.sigmoid() if multi_label else logits.softmax(-1)).cpu().numpy()
    metrics = classification_metrics(labels.numpy(), probs, multi_label)
    metrics["loss"] = classification_loss(logits, labels.to(device), multi_label, weights).item()
    return metrics, labels.numpy(), probs


def select_epoch(history, select_on):
    """The epoch (1-based) whose val metrics in `history` are best by `select_on`: the lowest loss, or the
    highest acc / F1 / AUC; the earliest on ties, and NaN (e.g. AUC on a one-class val split) never wins."""
    signed = [-val[select_on] if select_on == "loss" else val[select_on] for val in history]
    signed = [-math.inf if math.isnan(value) else value for value in signed]
    return 1 + signed.index(max(signed))


def init_head_from_probe(model, loaders, multi_label, n_classes, device, autocast_dtype=None):
    """LP-FT (Kumar et al. 2022): fit linear_probe's L2 logistic regression to the frozen features of
    loaders["train"] (unaugmented), its strength chosen on loaders["val"] as probe.py chooses it, and
    copy it into the linear head. Returns the probe."""
    (train_x, train_y), (val_x, val_y) = (head_inputs(model, loaders[split], device, autocast_dtype)
                                          for split in ("train", "val"))
    probe = train_linear_probe(train_x.float().cpu(), train_y, val_x.float().cpu(), val_y, multi_label, L2_GRID,
                               n_classes)
    model.head.load_state_dict(probe.as_linear().state_dict())
    return probe


def format_row(runs):
    """OmniRad table row: "ACC mean ± std | F1 mean ± std | AUC mean ± std" in %, std over seeds
    (population std, numpy's default)."""
    stats = {key: mean_std([100 * r[key] for r in runs]) for key in ("acc", "f1", "auc")}
    return " | ".join(f"{key.upper()} {m['mean']:.2f} ± {m['std']:.2f}" for key, m in stats.items())


# ----------------------------------------------------------------------------------------------
# Data: every source gives {"train", "val", "test"} datasets of {"image": normalised (3,S,S), "label"}
# ----------------------------------------------------------------------------------------------


def load_splits(dataset, data_path, transforms, csv_label, phantom_sizes, phantom_px, intensity="full_range"):
    """{"train", "val", "test"} datasets (each with transforms[split]), and the task: (n_classes,
    multi_label, class names). phantom: data.PhantomDataset (4 classes); medmnist: an official .npz
    (path, or a name looked up in ~/.medmnist) with its official splits; csv: an index with image and
    split columns, labelled by a column name or "covid_vs_other" (data.covid_vs_other)."""
    if dataset == "phantom":
        splits = {split: data.PhantomDataset(n, img_size=phantom_px, split=split, transform=transforms[split])
                  for split, n in zip(data.SPLITS, phantom_sizes)}
        return splits, (len(data.PHANTOM_CLASSES), False, list(data.PHANTOM_CLASSES))
    if dataset == "medmnist":
        arrays = {split: data.load_medmnist(data_path, split) for split in data.SPLITS}
        splits = {split: data.ArrayImageDataset(images, labels, transforms[split])
                  for split, (images, labels) in arrays.items()}
        info = data.MEDMNIST.get(Path(str(data_path)).stem.split("_")[0])
        if info is not None:
            return splits, (info.n_classes, info.multi_label, list(info.labels))
        multi_label = arrays["train"][1].ndim == 2  # an unofficial file: the task from its labels
        n_classes = arrays["train"][1].shape[1] if multi_label else int(max(a[1].max() for a in arrays.values())) + 1
        return splits, (n_classes, multi_label, [str(c) for c in range(n_classes)])
    if dataset == "csv":
        covid = csv_label == "covid_vs_other"
        labelling = dict(label_fn=data.covid_vs_other) if covid else dict(label_column=csv_label)
        splits = {split: data.ImageFolderDataset(data_path, split=split, transform=transforms[split],
                                                 intensity=intensity, **labelling) for split in data.SPLITS}
        classes = ["other", "COVID-19"] if covid else splits["train"].classes
        return splits, (len(classes), False, classes)
    raise ValueError(f"dataset {dataset!r}: expected one of {data.DATA_KINDS}")


def collate(items):
    images = torch.stack([item["image"] for item in items])
    labels = torch.stack([torch.as_tensor(item["label"]) for item in items])
    return images, labels


def dataset_labels(ds):
    """All labels of a dataset: its `labels` attribute when it has one (MedMNIST, CSV), else by
    reading every item (phantoms)."""
    if getattr(ds, "labels", None) is not None:
        return np.asarray(ds.labels)
    return np.array([np.asarray(ds[i]["label"]) for i in range(len(ds))])


if __name__ == "__main__":
    config = configure(globals())
    sys.stdout.reconfigure(line_buffering=True)  # progress lines show up at once in a log file

    # ---- checks: a bad setting stops here, naming its key, before any data is read or training starts
    for key, choices in (("mode", MODES), ("head", HEADS), ("head_features", HEAD_FEATURES),
                         ("head_init", HEAD_INITS), ("select_on", SELECT_ON), ("dtype", ("bfloat16", "float32")),
                         ("intensity", data.INTENSITIES)):
        if config[key] not in choices:
            raise ValueError(f"--{key}={config[key]!r}: expected one of {choices}")
    if head_init == "probe" and head != "linear":
        raise ValueError(f"--head_init='probe' fits a linear head: expected --head='linear', found {head!r}")
    dataset = data.data_kind(dataset, data_path)
    if mode == "lora" and (lora_rank < 1 or lora_alpha <= 0):
        raise ValueError(f"LoRA needs --lora_rank >= 1 and --lora_alpha > 0, got {lora_rank} and {lora_alpha}")
    if not 0 < layerwise_decay <= 1:
        raise ValueError(f"--layerwise_decay={layerwise_decay!r}: expected a number in (0, 1] (1 = off)")
    if epochs < 1 or batch_size < 1 or not 0 <= warmup_epochs <= epochs:
        raise ValueError(f"need epochs >= 1, batch_size >= 1, 0 <= warmup_epochs <= epochs; got "
                         f"{epochs}, {batch_size}, {warmup_epochs}")
    if not seeds or not all(isinstance(s, int) for s in seeds):
        raise ValueError(f"--seeds={seeds!r}: expected integers, e.g. --seeds=0,1,2")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"--device={device} but torch sees no CUDA device")
    if init_from:  # the checkpoint fixes the architecture: read it once here, to check the patch size
        vit_config = vit_model.load_backbone(init_from, verbose=False).config
    else:
        vit_config = vit_model.vit_config(model_size, patch_size=patch_size, img_size=img_size,
                                          layerscale_init=layerscale_init, **({"depth": depth} if depth else {}))
    if img_size % vit_config.patch_size:
        raise ValueError(f"--img_size={img_size}: expected a multiple of the backbone's patch size "
                         f"{vit_config.patch_size}")

    # ---- system
    dev = torch.device(device)
    if dev.type == "cpu" and cpu_threads:
        torch.set_num_threads(cpu_threads)
    autocast_dtype = None if dtype == "float32" else getattr(torch, dtype)  # None: no autocast

    # ---- data
    train_tf = data.ClassificationTransform(img_size, train=True, scale=(crop_scale_min, 1.0),
                                            hflip_p=hflip_p, rotation_deg=rotation_deg)
    eval_tf = data.ClassificationTransform(img_size, train=False)
    splits, (n_classes, multi_label, class_names) = load_splits(
        dataset, data_path, {"train": train_tf, "val": eval_tf, "test": eval_tf}, csv_label, phantom_sizes, phantom_px,
        intensity)
    task = "multi-label" if multi_label else f"{n_classes}-class"
    print(f"data: {dataset} {data_path} ({task}: {', '.join(class_names)}), "
          f"train/val/test {len(splits['train'])}/{len(splits['val'])}/{len(splits['test'])}, {img_size} px")
    weights = class_weights(dataset_labels(splits["train"]), n_classes, multi_label).to(dev) if class_weighted else None
    loader_kwargs = dict(num_workers=num_workers, collate_fn=collate, persistent_workers=num_workers > 0)
    eval_loaders = {split: torch.utils.data.DataLoader(splits[split], batch_size=2 * batch_size, **loader_kwargs)
                    for split in ("val", "test")}
    if head_init == "probe":  # the probe reads the training images unaugmented, as the head sees val and test ones
        unaugmented_train = copy.copy(splits["train"])  # the same images, not read again: only the transform differs
        unaugmented_train.transform = eval_tf
        eval_loaders["train"] = torch.utils.data.DataLoader(unaugmented_train, 2 * batch_size, **loader_kwargs)
    steps_per_epoch = math.ceil(len(splits["train"]) / batch_size)
    total_steps, warmup_steps = epochs * steps_per_epoch, round(warmup_epochs * steps_per_epoch)
    os.makedirs(out_dir, exist_ok=True)

    runs = []
    t_start = time.time()
    for seed_index, seed in enumerate(seeds):
        # ---- model: the backbone and head, and what trains in this mode
        torch.manual_seed(seed)
        np.random.seed(seed)
        if init_from:
            backbone = vit_model.load_backbone(init_from, drop_path_rate=drop_path_rate)
        else:
            backbone = vit_model.ViT(dataclasses.replace(vit_config, drop_path_rate=drop_path_rate))
            print(f"backbone: RANDOM INIT (no --init_from): ViT-{model_size}/{vit_config.patch_size}, "
                  f"depth {vit_config.depth}, {img_size} px")
        model = Classifier(backbone, n_classes, head, head_features)
        params = setup_mode(model, mode, lora_rank, lora_alpha)
        model.to(dev)
        probe_l2 = (init_head_from_probe(model, eval_loaders, multi_label, n_classes, dev, autocast_dtype).l2
                    if head_init == "probe" else None)
        if probe_l2 is not None:
            print(f"seed {seed}: head = a linear probe of the frozen features (LP-FT), l2 {probe_l2:g}")
        optimizer = make_optimizer(model, lr, weight_decay, layerwise_decay)
        lora_note = f" (LoRA r={lora_rank}, alpha={lora_alpha})" if mode == "lora" else ""
        print(f"seed {seed}: mode {mode}{lora_note}, {sum(p.numel() for p in params):,} trainable of "
              f"{sum(p.numel() for p in model.parameters()):,} parameters")

        # ---- training; the weights of the epoch with the best val `select_on` are kept
        train_loader = torch.utils.data.DataLoader(splits["train"], batch_size=batch_size, shuffle=True,
                                                   generator=torch.Generator().manual_seed(seed), **loader_kwargs)
        val_history, best_state = [], None
        step, seen, t_seed = 0, 0, time.time()
        for epoch in range(1, epochs + 1):
            set_train_mode(model, mode)
            for images, labels in train_loader:
                step_lr = lr_at(step, total_steps, warmup_steps, lr, min_lr)
                set_lr(optimizer, step_lr)
                loss = train_step(model, optimizer, images.to(dev, non_blocking=True), labels.to(dev), multi_label,
                                  weights, grad_clip, autocast_dtype)
                step, seen = step + 1, seen + len(images)
                if step % log_interval == 0 or step == total_steps:
                    elapsed = time.time() - t_seed
                    eta = elapsed / step * (total_steps - step + (len(seeds) - 1 - seed_index) * total_steps)
                    print(f"seed {seed} | epoch {epoch}/{epochs} | step {step}/{total_steps} | loss {loss:.4f} | "
                          f"lr {step_lr:.2e} | {seen / elapsed:.0f} img/s | ETA {format_duration(eta)}")
            val, _, _ = evaluate(model, eval_loaders["val"], multi_label, dev, autocast_dtype, weights)
            val_history.append(val)
            improved = select_epoch(val_history, select_on) == epoch
            print(f"seed {seed} | epoch {epoch}/{epochs} | val acc {100 * val['acc']:.2f} f1 {100 * val['f1']:.2f} "
                  f"auc {100 * val['auc']:.2f} loss {val['loss']:.4f}" + (" (best)" if improved else ""))
            if improved:
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}

        # ---- test: the official test split, once, with the weights of the selected epoch
        selected = select_epoch(val_history, select_on)
        model.load_state_dict(best_state)
        test, test_labels, test_probs = evaluate(model, eval_loaders["test"], multi_label, dev, autocast_dtype, weights)
        save_classification_figure(test_labels, test_probs, class_names, multi_label,
                                   Path(out_dir) / f"seed{seed}" / "test.png", f"test, seed {seed}")
        print(f"seed {seed} | test (epoch {selected} by val {select_on}) | acc {100 * test['acc']:.2f} "
              f"f1 {100 * test['f1']:.2f} auc {100 * test['auc']:.2f} | {format_duration(time.time() - t_seed)}")
        run = {"seed": seed, "selected_epoch": selected, "val": val_history[selected - 1], "test": test,
               "val_history": val_history, "probe_l2": probe_l2, "train_seconds": time.time() - t_seed}
        runs.append(run)
        if export:
            seed_dir = Path(out_dir) / f"seed{seed}"
            if mode != "head":  # a frozen backbone is the input file itself
                vit_model.save_backbone(merge_lora(model.backbone) if mode == "lora" else model.backbone,
                                        seed_dir / "backbone.safetensors")
            vit_model.save_safetensors_atomic(
                model.head.state_dict(), seed_dir / "head.safetensors",
                {"head": head, "head_features": head_features, "classes": json.dumps(class_names)})
            vit_model.save_json_atomic(run, seed_dir / "metrics.json")

    # ---- results: the table row over seeds, and results.json
    row = format_row([r["test"] for r in runs])
    name = f"{Path(data_path).stem if data_path else dataset} {mode}"
    name += f" r={lora_rank} a={lora_alpha:g}" if mode == "lora" else ""
    print(f"{name} | init {init_from or 'random'} | {len(runs)} seed(s) | test {row}")
    results = {"config": config, "task": task, "classes": class_names, "runs": runs, "row": row,
               "summary": {k: {"mean": float(np.mean([r["test"][k] for r in runs])),
                               "std": float(np.std([r["test"][k] for r in runs]))} for k in ("acc", "f1", "auc")},
               "device": str(dev), "total_seconds": time.time() - t_start}
    vit_model.save_json_atomic(results, Path(out_dir) / "results.json")
    print(f"wrote {Path(out_dir) / 'results.json'} ({format_duration(time.time() - t_start)} in all)")
