"""Semantic segmentation on a frozen ViT (OmniRad §3.3, RAD-DINO §4.3): only a head trains.

Heads (`--head=`):
  omnirad  OmniRad's dense adapter: a parallel conv branch (3x3 stride-2 conv-BN-ReLU) gives 1/8,
           1/16, 1/32 maps; ViT tokens of blocks {3, 7, 11} are reshaped to maps, resized to those
           scales and fused with them; two upsampling blocks (2x bilinear, concat with the finer
           scale, two 3x3 conv-BN-ReLU), a 1x1 classifier at 1/8, bilinear up to the input.
  linear   DINOv2's linear head (as RAD-DINO): BatchNorm + 1x1 conv on the patch tokens of the last
           (or last 4) blocks, concatenated with the CLS token broadcast over the grid.
  upernet  UPerNet (mmseg's UPerHead: PPM + FPN) on 4 blocks turned into a 4-scale pyramid by
           deconv x4, deconv x2, identity and max-pool /2, as mmseg's BEiT/MAE recipes do.

OmniRad head width. The paper gives the conv-branch stride, the fusion scales, the decoder, and
totals of 14.27 M (ViT-S) / 69.76 M (ViT-B) trainable parameters, but no channel widths. Our
reading: every fused map and decoder block is as wide as the ViT (w = D, `omnirad_width=0`); the
conv branch widens D/4, D/4 (1/2, 1/4), D/2 (1/8), D (1/16), D (1/32); fusion at each scale is
concat [ViT map, conv map] + 3x3 conv-BN-ReLU. With 2 classes that is 70.03 M for ViT-B (paper
69.76 M, +0.4 %) and 17.51 M for ViT-S (paper 14.27 M, +23 %). No one design with widths in
proportion to D can match both: every weight is a product of two widths, so the count grows at most
4x from D=384 to D=768, while the paper's ratio is 69.76 / 14.27 = 4.89; its small head must be
relatively narrower than its base head (a 1x1 fusion instead gives 11.02 M / 44.07 M, and
`--omnirad_width=336` on ViT-S gives 13.84 M).

Metrics (metrics.segmentation_metrics, whose docstring gives the conventions; the JSON repeats them):
IoU and F1 pool the pixel counts of the whole split, Dice is a mean over images, and mIoU, mDice, mF1
average the foreground classes 1..K-1 (background excluded); mIoU_with_background is mmseg's mean.

Run (each writes results.json, table.md and overlays/ under out_dir):
  python finetune_seg.py                                       # phantoms, random-init ViT-tiny/8, 64 px
  python finetune_seg.py --head=linear                         # DINOv2 linear head (--linear_n_last=4)
  python finetune_seg.py --head=upernet --upernet_channels=64
  python finetune_seg.py config/seg_covid_lungs.py --head=omnirad [--init_from=backbone.safetensors]
  python finetune_seg.py config/seg_omnirad_vits14.py --data_path=busi_256.npz --init_from=...  # GPU
"""
import copy
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from figures import save_overlay
from metrics import mean_std, segmentation_metrics
from progress import format_duration

# ----------------------------------------------------------------------------------------------
# Heads. Each takes (images (B,3,H,W), feats) where feats is the backbone's
# get_intermediate_layers(..., reshape=True, return_class_token=True) output for its blocks, in
# increasing block order, and returns logits (B, n_classes, H, W).
# ----------------------------------------------------------------------------------------------


def conv_bn_relu(in_channels, out_channels, kernel_size=3, stride=1):
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


def resize_to(x, like):
    """Bilinear resize of x to the spatial size of `like`. Where the paper says "2x bilinear" we
    resize to the finer map's exact size, which is 2x when the input divides by 32 and keeps odd
    sizes (518 px: 65, 33, 17) aligned."""
    return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=False)


class OmniRadHead(nn.Module):
    """OmniRad's conv branch + token fusion + two-block decoder (module docstring: widths)."""

    n_layers = 3

    def __init__(self, embed_dim, n_classes, width=None):
        super().__init__()
        w = width or embed_dim
        # the parallel convolutional branch (spatial prior): 3x3 stride-2 convs down to 1/32
        self.stem = nn.Sequential(conv_bn_relu(3, w // 4, 3, 2), conv_bn_relu(w // 4, w // 4, 3, 2))
        self.down8 = conv_bn_relu(w // 4, w // 2, 3, 2)
        self.down16 = conv_bn_relu(w // 2, w, 3, 2)
        self.down32 = conv_bn_relu(w, w, 3, 2)
        # token adapter: [ViT map resized to the scale, conv map] -> one fused map per scale
        self.fuse = nn.ModuleList([conv_bn_relu(embed_dim + c, w) for c in (w // 2, w, w)])
        # decoder: U16 = psi(Up(F32) (+) F16), U8 = psi(Up(U16) (+) F8), psi = two 3x3 conv-BN-ReLU
        self.up16 = nn.Sequential(conv_bn_relu(2 * w, w), conv_bn_relu(w, w))
        self.up8 = nn.Sequential(conv_bn_relu(2 * w, w), conv_bn_relu(w, w))
        self.classifier = nn.Conv2d(w, n_classes, 1)

    def forward(self, images, feats):
        c8 = self.down8(self.stem(images))
        c16 = self.down16(c8)
        c32 = self.down32(c16)
        # earlier blocks feed the finer scales (OmniRad: more local spatial sensitivity)
        f8, f16, f32 = [fuse(torch.cat([resize_to(tokens, conv), conv], dim=1))
                        for fuse, (tokens, _), conv in zip(self.fuse, feats, (c8, c16, c32))]
        u16 = self.up16(torch.cat([resize_to(f32, f16), f16], dim=1))
        u8 = self.up8(torch.cat([resize_to(u16, f8), f8], dim=1))
        return resize_to(self.classifier(u8), images)


class LinearHead(nn.Module):
    """DINOv2's BNHead: BatchNorm + 1x1 conv on concatenated patch maps (+ the CLS token broadcast
    over the grid, as DINOv2's linear configs concatenate it)."""

    def __init__(self, embed_dim, n_classes, n_layers=1, cls_token=True):
        super().__init__()
        self.n_layers, self.cls_token = n_layers, cls_token
        in_channels = embed_dim * n_layers * (2 if cls_token else 1)
        self.bn = nn.BatchNorm2d(in_channels)
        self.classifier = nn.Conv2d(in_channels, n_classes, 1)

    def forward(self, images, feats):
        maps = [patches for patches, _ in feats]
        if self.cls_token:
            maps += [cls[:, :, None, None].expand_as(patches) for patches, cls in feats]
        return resize_to(self.classifier(self.bn(torch.cat(maps, dim=1))), images)


class UPerNetHead(nn.Module):
    """UPerNet on a plain ViT: 4 blocks' maps (all at 1/patch) become a pyramid at 4x, 2x, 1x and
    1/2x their resolution; then mmseg's UPerHead: PPM (pool scales 1,2,3,6) on the coarsest level,
    1x1 laterals, top-down sum, 3x3 FPN convs, all levels resized to the finest, concatenated, 3x3
    bottleneck, Dropout2d(0.1), 1x1 classifier; bilinear up to the input."""

    n_layers = 4

    def __init__(self, embed_dim, n_classes, channels=512, pool_scales=(1, 2, 3, 6), dropout=0.1):
        super().__init__()
        D, C = embed_dim, channels
        self.pyramid = nn.ModuleList([
            nn.Sequential(nn.ConvTranspose2d(D, D, 2, 2), nn.BatchNorm2d(D), nn.GELU(), nn.ConvTranspose2d(D, D, 2, 2)),
            nn.ConvTranspose2d(D, D, 2, 2),
            nn.Identity(),
            nn.MaxPool2d(2),
        ])
        self.ppm = nn.ModuleList([nn.Sequential(nn.AdaptiveAvgPool2d(s), conv_bn_relu(D, C, 1)) for s in pool_scales])
        self.ppm_bottleneck = conv_bn_relu(D + len(pool_scales) * C, C)
        self.laterals = nn.ModuleList([conv_bn_relu(D, C, 1) for _ in range(3)])
        self.fpn_convs = nn.ModuleList([conv_bn_relu(C, C) for _ in range(3)])
        self.fpn_bottleneck = conv_bn_relu(4 * C, C)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(C, n_classes, 1)

    def forward(self, images, feats):
        levels = [to_level(patches) for to_level, (patches, _) in zip(self.pyramid, feats)]
        top = levels[3]
        top = self.ppm_bottleneck(torch.cat([top] + [resize_to(pool(top), top) for pool in self.ppm], dim=1))
        laterals = [lateral(x) for lateral, x in zip(self.laterals, levels[:3])] + [top]
        for i in range(3, 0, -1):  # top-down: each level adds the coarser one
            laterals[i - 1] = laterals[i - 1] + resize_to(laterals[i], laterals[i - 1])
        outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals[:3])] + [laterals[3]]
        fused = self.fpn_bottleneck(torch.cat([outs[0]] + [resize_to(x, outs[0]) for x in outs[1:]], dim=1))
        return resize_to(self.classifier(self.dropout(fused)), images)


HEADS = ("omnirad", "linear", "upernet")


def evenly_spaced_layers(depth, n):
    """n block indices spread over the depth, ending at the last: (3, 7, 11) for 12 blocks and n=3
    (OmniRad's choice), (2, 5, 8, 11) for n=4, (1, 3, 5) for 6 blocks."""
    if n > depth:
        raise ValueError(f"cannot pick {n} distinct blocks from a ViT of depth {depth}")
    return tuple(math.ceil((k + 1) * depth / n) - 1 for k in range(n))


def head_layers(head, depth, layers=(), linear_n_last=1):
    """The blocks a head reads: `layers` if given (checked), else OmniRad's evenly spaced 3, UPerNet's
    evenly spaced 4, or the linear head's last n."""
    wanted = {"omnirad": 3, "upernet": 4, "linear": linear_n_last}[head]
    if layers:
        layers = tuple(sorted(set(int(i) for i in layers)))
        if len(layers) != wanted or not all(0 <= i < depth for i in layers):
            raise ValueError(f"--vit_layers={layers}: the {head} head needs {wanted} distinct block indices "
                             f"in [0, {depth})")
        return layers
    if head == "linear":
        return tuple(range(depth - linear_n_last, depth))
    return evenly_spaced_layers(depth, wanted)


def build_head(head, embed_dim, n_classes, omnirad_width=0, linear_n_last=1, linear_cls_token=True,
               upernet_channels=512):
    if head == "omnirad":
        return OmniRadHead(embed_dim, n_classes, omnirad_width or embed_dim)
    if head == "linear":
        return LinearHead(embed_dim, n_classes, linear_n_last, linear_cls_token)
    if head == "upernet":
        return UPerNetHead(embed_dim, n_classes, upernet_channels or embed_dim)
    raise ValueError(f"--head={head!r}: expected one of {HEADS}")


class FrozenBackboneSegmenter(nn.Module):
    """A frozen ViT (always in eval mode, run under no_grad, no gradients) and a trainable head.
    `features` may be computed once and passed back in (the cache of a run without augmentation)."""

    def __init__(self, backbone, head, layers):
        super().__init__()
        self.backbone = backbone.requires_grad_(False).eval()
        self.head = head
        self.layers = tuple(layers)

    def train(self, mode=True):
        super().train(mode)
        self.backbone.eval()  # no dropout / drop-path in a frozen feature extractor
        return self

    @torch.no_grad()
    def features(self, images):
        return self.backbone.get_intermediate_layers(images, self.layers, reshape=True, return_class_token=True)

    def forward(self, images, feats=None):
        return self.head(images, self.features(images) if feats is None else feats)


def count_parameters(module, trainable_only=True):
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


# ----------------------------------------------------------------------------------------------
# Data: every source gives {"train", "val", "test"} datasets of {"image": (3,H,W) in [0,1], "mask"}
# ----------------------------------------------------------------------------------------------


class NpzSegmentationDataset(torch.utils.data.Dataset):
    """A MedSegBench-style .npz: `{split}_images` uint8 (N,H,W) or (N,H,W,3) and `{split}_label`
    (N,H,W) class indices (binary sets store {0,1}); `_labels` and `_masks` are accepted too."""

    MASK_KEYS = ("label", "labels", "masks", "mask")

    def __init__(self, path, split):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"segmentation .npz {path} not found")
        with np.load(path) as npz:
            keys = list(npz.keys())
            image_key = f"{split}_images"
            mask_key = next((f"{split}_{k}" for k in self.MASK_KEYS if f"{split}_{k}" in keys), None)
            if image_key not in keys or mask_key is None:
                raise KeyError(f"{path}: expected arrays '{image_key}' and '{split}_label' (MedSegBench "
                               f"layout), found {keys}")
            self.images, self.masks = npz[image_key], npz[mask_key]
        if self.masks.ndim == 4 and self.masks.shape[-1] == 1:
            self.masks = self.masks[..., 0]
        if self.images.ndim not in (3, 4) or self.masks.shape != self.images.shape[:3]:
            raise ValueError(f"{path}: {image_key} has shape {self.images.shape} and {mask_key} "
                             f"{self.masks.shape}; expected (N,H,W[,3]) images and (N,H,W) masks")
        if self.images.dtype != np.uint8:
            raise ValueError(f"{path}: {image_key} has dtype {self.images.dtype}, expected uint8")

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        image = torch.from_numpy(self.images[i].copy()).float().div_(255)
        image = image[None].expand(3, -1, -1) if image.ndim == 2 else image.permute(2, 0, 1)
        return {"image": image.contiguous(), "mask": torch.from_numpy(self.masks[i].astype(np.int64))}


def load_splits(data_path, mask_threshold=127, n_phantom=(256, 64, 64), phantom_px=64):
    """{"train", "val", "test"} untransformed datasets, and the class names. data_path: "" for the
    procedural phantoms (background, lung, lesion), a MedSegBench-style .npz, or a CSV index with
    image, mask and split columns (masks binarised at mask_threshold, or class indices if None)."""
    import data
    splits = ("train", "val", "test")
    if not data_path:
        datasets = {s: data.PhantomDataset(n, img_size=phantom_px, split=s) for s, n in zip(splits, n_phantom)}
        return datasets, list(data.PHANTOM_SEG_CLASSES)
    path = Path(data_path)
    if path.suffix == ".npz":
        datasets = {s: NpzSegmentationDataset(path, s) for s in splits}
        n_classes = int(datasets["train"].masks.max()) + 1
        return datasets, ["background"] + [f"class {c}" for c in range(1, max(n_classes, 2))]
    if path.suffix == ".csv":
        datasets = {s: data.SegmentationPairsDataset(path, split=s, threshold=mask_threshold) for s in splits}
        for s, ds in datasets.items():
            if len(ds) == 0:
                raise ValueError(f"{path}: no rows with split '{s}' (expected train, val and test rows)")
        if mask_threshold is not None:
            return datasets, ["background", "foreground"]
        train = datasets["train"]
        n_classes = 1 + max(int(train[i]["mask"].max()) for i in range(len(train)))
        return datasets, ["background"] + [f"class {c}" for c in range(1, n_classes)]
    raise ValueError(f"--data_path={data_path}: expected '' (phantoms), a .npz or a .csv")


def resize_pair(item, size):
    """Whole image to size x size (bicubic) and its mask (nearest), ImageNet-normalised: the eval
    transform, with no crop so the metric covers the whole field of view."""
    import data
    return data.normalize(data.resize(item["image"], size)), data.resize_mask(item["mask"], size)


def stack_split(dataset, size):
    """All items of a dataset at size x size: normalised images (N,3,S,S) and masks (N,S,S)."""
    pairs = [resize_pair(dataset[i], size) for i in range(len(dataset))]
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


class AugmentedSplit(torch.utils.data.Dataset):
    """Train items through data.SegmentationTransform (the same random crop / rotation / optional
    flip for image and mask; nearest for the mask)."""

    def __init__(self, dataset, transform):
        self.dataset, self.transform = dataset, transform

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        item = self.dataset[i]
        return self.transform(item["image"], item["mask"])


# ----------------------------------------------------------------------------------------------
# Training and evaluation
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def cache_features(model, images, batch_size, device, autocast_dtype=None):
    """The frozen backbone's features of every image, computed once: a list (one per block) of
    (patch maps (N,D,h,w), CLS (N,D)) on `device`."""
    chunks = []
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size].to(device)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            feats = model.features(x)
        # the ViT's final LayerNorm returns fp32 even under autocast; the head's convs cast to the
        # autocast dtype anyway, so store that: half the memory of a 448 px ViT-S cache
        dtype = autocast_dtype or feats[0][0].dtype
        chunks.append([(patches.to(dtype), cls.to(dtype)) for patches, cls in feats])
    return [(torch.cat([c[i][0] for c in chunks]), torch.cat([c[i][1] for c in chunks])) for i in range(len(model.layers))]


def epoch_batches(n, batch_size, generator):
    """Shuffled index batches of one epoch. The ragged last batch is dropped (a BatchNorm batch of
    one sample fails), unless the whole set is smaller than a batch."""
    order = torch.randperm(n, generator=generator)
    if n < batch_size:
        return [order]
    return list(order[:n // batch_size * batch_size].view(-1, batch_size))


def select_features(cache, index):
    return [(maps[index], cls[index]) for maps, cls in cache]


def soft_dice_loss(logits, target):
    """1 - soft Dice of the foreground classes, pooled over the batch, averaged over classes."""
    probs = logits.float().softmax(1)[:, 1:]
    onehot = F.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2)[:, 1:].float()
    dims = (0, 2, 3)
    intersection = (probs * onehot).sum(dims)
    denominator = probs.sum(dims) + onehot.sum(dims)
    return (1 - (2 * intersection + 1.0) / (denominator + 1.0)).mean()


def seg_loss(logits, masks, dice_weight=0.0):
    loss = F.cross_entropy(logits.float(), masks)
    return loss + dice_weight * soft_dice_loss(logits, masks) if dice_weight else loss


def train_step(model, optimizer, images, masks, feats=None, dice_weight=0.0, autocast_dtype=None, scaler=None):
    """One AdamW step on the head; the backbone stays frozen (no grad, eval mode). Returns the loss."""
    model.train()
    with torch.autocast(images.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        logits = model(images, feats)
    loss = seg_loss(logits, masks, dice_weight)
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:  # fp16 needs loss scaling; bf16 does not
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    return loss.item()


@torch.no_grad()
def predict(model, images, batch_size, device, cache=None, autocast_dtype=None):
    """Argmax label maps (N,H,W) uint8 on the CPU for normalised images (N,3,H,W)."""
    was_training = model.training
    model.eval()
    preds = []
    for start in range(0, len(images), batch_size):
        index = slice(start, start + batch_size)
        feats = select_features(cache, index) if cache is not None else None
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = model(images[index].to(device), feats)
        preds.append(logits.argmax(1).to(torch.uint8).cpu())
    model.train(was_training)
    return torch.cat(preds)


# ----------------------------------------------------------------------------------------------
# Outputs: OmniRad Fig. 3 overlays and Tables 9-11 rows
# ----------------------------------------------------------------------------------------------

def mean_std_row(name, runs):
    """One row of OmniRad Table 11: "| model | mIoU | Dice | F1 |", each mean ± std over seeds in %
    (population std, numpy's default); a single seed has no std and says so."""
    cells = []
    for key in ("mIoU", "mDice", "mF1"):
        m = mean_std([100 * r[key] for r in runs])
        cells.append(f"{m['mean']:.2f} ± {m['std']:.2f}" if m["n"] > 1 else f"{m['mean']:.2f} (1 seed)")
    return f"| {name} | " + " | ".join(cells) + " |"


def json_safe(x):
    """NaN -> None (JSON has no NaN), recursively."""
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if isinstance(x, float) and math.isnan(x):
        return None
    return x


# ----------------------------------------------------------------------------------------------
# Config. The defaults are a quick run on the procedural phantoms (a random-init ViT-tiny/8 at 64 px,
# about 1.5 min on a CPU, 1 thread) with OmniRad's optimiser settings (AdamW, lr 1e-4, wd 1e-4,
# batch 16, 20 epochs). The full OmniRad recipe (448 px, patch 14, ViT-S) is config/seg_omnirad_vits14.py.
# ----------------------------------------------------------------------------------------------
# data
data_path = ""                   # "" = procedural phantoms; a MedSegBench-style .npz; or a CSV (image, mask, split)
mask_threshold = 127             # CSV masks: foreground where gray > threshold; None = stored class indices
phantom_sizes = (256, 64, 64)    # phantom images per split (train, val, test)
phantom_px = 64                  # phantoms are drawn at this size (then resized to img_size)
img_size = 64                    # network input px, square (OmniRad: 448 with patch 14)
augment = False                  # joint random resized crop + rotation (+ flip); off = features cached once
crop_scale_min = 0.5
rotation_deg = 10.0
hflip = False                    # horizontal flips swap left and right: off for chest X-rays
# model
init_from = ""                   # backbone file for model.load_backbone (nanorad/DINOv2/HF/timm); "" = random init
model_size = "tiny"              # random init only: tiny small base large giant
patch_size = 8                   # random init only
depth = 0                        # random init only: number of blocks (0 = the size's own)
head = "omnirad"                 # "omnirad", "linear" or "upernet"
vit_layers = ()                  # blocks the head reads (0-based); () = the head's default (omnirad: 3,7,11 of 12)
omnirad_width = 0                # fused-map / decoder width; 0 = the ViT's embed_dim
linear_n_last = 1                # linear head: the last 1 (DINOv2 "lin.") or 4 ("+ms"-style) blocks
linear_cls_token = True          # linear head: concatenate the CLS token to every patch (DINOv2)
upernet_channels = 512           # mmseg's UPerHead default; 0 = the ViT's embed_dim
# optimisation (OmniRad §3.3: AdamW lr 1e-4, wd 1e-4, batch 16, 20 epochs, constant lr)
epochs = 20
batch_size = 16
lr = 1e-4
weight_decay = 1e-4
dice_weight = 0.0                # > 0 adds soft Dice of the foreground classes to the cross-entropy
seeds = (0,)                     # --seeds=0,1,2 runs repeats; the table gives mean ± std
# system
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = "bfloat16" if torch.cuda.is_available() else "float32"  # autocast: "bfloat16", "float16" (CUDA, with loss scaling) or "float32" (off)
cpu_threads = 1                  # torch threads on a CPU (0 = torch's default); more threads than free cores stall
cache = True                     # without augmentation, compute the frozen features once and reuse them
eval_batch_size = 32
log_interval = 20                # steps between progress lines
n_overlays = 6                   # test images drawn as OmniRad Fig. 3 overlays (first seed)
save_head = True                 # save the selected head's weights per seed (safetensors + JSON)
out_dir = "out/finetune_seg"

if __name__ == "__main__":
    from config import configure
    config = configure(globals())
    import data
    import model as vit_model

    # ---- checks, before anything slow
    if head not in HEADS:
        raise ValueError(f"--head={head!r}: expected one of {HEADS}")
    if data_path and not Path(data_path).is_file():
        raise FileNotFoundError(f"--data_path={data_path}: file not found (expected a .npz or a .csv)")
    if init_from and not Path(init_from).exists():
        raise FileNotFoundError(f"--init_from={init_from}: backbone file not found")
    if epochs < 1 or batch_size < 2:
        raise ValueError(f"need epochs >= 1 and batch_size >= 2 (BatchNorm), got {epochs} and {batch_size}")
    if linear_n_last < 1:
        raise ValueError(f"--linear_n_last={linear_n_last}: expected >= 1")
    if not seeds or not all(isinstance(s, int) for s in seeds):
        raise ValueError(f"--seeds={seeds!r}: expected integers, e.g. --seeds=0,1,2")
    if dtype not in ("bfloat16", "float16", "float32") or (dtype == "float16" and not device.startswith("cuda")):
        raise ValueError(f"--dtype={dtype!r}: expected bfloat16, float32, or float16 on CUDA")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"--device={device} but torch sees no CUDA device")
    dev = torch.device(device)
    if dev.type == "cpu" and cpu_threads:
        torch.set_num_threads(cpu_threads)
    autocast_dtype = None if dtype == "float32" else getattr(torch, dtype)
    if init_from:
        # the checkpoint fixes the architecture; its position grid is resampled to img_size
        vit_config = vit_model.load_backbone(init_from, verbose=False).config
        backbone_name = Path(init_from).stem
    else:
        overrides = dict(patch_size=patch_size, img_size=img_size) | ({"depth": depth} if depth else {})
        vit_config = vit_model.vit_config(model_size, **overrides)
        backbone_name = f"random-init ViT-{model_size}/{patch_size}"
    if img_size % vit_config.patch_size:
        raise ValueError(f"--img_size={img_size} is not a multiple of the backbone's patch size {vit_config.patch_size}")
    layers = head_layers(head, vit_config.depth, vit_layers, linear_n_last)

    # ---- data: val/test (and train without augmentation) resized whole, held as tensors
    datasets, class_names = load_splits(data_path, mask_threshold,
                                        phantom_sizes, phantom_px)
    n_classes = len(class_names)
    t0 = time.time()
    tensors = {s: stack_split(datasets[s], img_size) for s in (("val", "test") if augment else ("train", "val", "test"))}
    print(f"data: {data_path or 'phantoms'} ({n_classes} classes: {', '.join(class_names)}), train/val/test "
          f"{len(datasets['train'])}/{len(datasets['val'])}/{len(datasets['test'])}, {img_size} px, "
          f"augment={augment} hflip={hflip} (loaded in {time.time() - t0:.1f} s)")
    n_train = len(datasets["train"])
    steps_per_epoch = n_train // batch_size if n_train >= batch_size else 1  # drop the ragged batch (BatchNorm)
    total_steps = epochs * steps_per_epoch
    os.makedirs(out_dir, exist_ok=True)

    runs, t_start = [], time.time()
    for seed_index, seed in enumerate(seeds):
        # ---- model
        torch.manual_seed(seed)
        np.random.seed(seed)
        if init_from:
            backbone = vit_model.load_backbone(init_from)
        else:
            backbone = vit_model.ViT(vit_config)
            print(f"backbone: RANDOM INIT (no --init_from): ViT-{model_size}/{patch_size}, depth {vit_config.depth}")
        seg_head = build_head(head, vit_config.embed_dim, n_classes, omnirad_width, linear_n_last,
                              linear_cls_token, upernet_channels)
        model = FrozenBackboneSegmenter(backbone, seg_head, layers).to(dev)
        n_head, n_backbone = count_parameters(model.head), count_parameters(model.backbone, trainable_only=False)
        print(f"seed {seed}: head {head} on blocks {layers}: {n_head:,} trainable parameters "
              f"({n_head / 1e6:.2f} M); frozen backbone {n_backbone:,}")
        optimizer = torch.optim.AdamW(model.head.parameters(), lr=lr, weight_decay=weight_decay)
        scaler = torch.amp.GradScaler("cuda") if autocast_dtype == torch.float16 else None

        # ---- frozen features, once (no augmentation: every epoch would compute the same ones)
        caches = {}
        if cache:
            t0 = time.time()
            for s, (images, _) in tensors.items():
                caches[s] = cache_features(model, images, eval_batch_size, dev, autocast_dtype)
            mb = sum(t.numel() * t.element_size() for c in caches.values() for pair in c for t in pair) / 2 ** 20
            print(f"cached frozen features of {', '.join(caches)} in {time.time() - t0:.1f} s ({mb:.0f} MiB)")

        # ---- training, selecting the epoch with the best val mIoU
        generator = torch.Generator().manual_seed(seed)
        if augment:
            transform = data.SegmentationTransform(img_size, train=True, scale=(crop_scale_min, 1.0),
                                                   hflip_p=0.5 if hflip else 0.0, rotation_deg=rotation_deg)
            loader = torch.utils.data.DataLoader(AugmentedSplit(datasets["train"], transform), batch_size=batch_size,
                                                 shuffle=True, drop_last=n_train >= batch_size, generator=generator)
        best, history = {"mIoU": -1.0}, []
        step, t_seed, seen = 0, time.time(), 0
        for epoch in range(epochs):
            if augment:
                batches = ((x.to(dev), y.to(dev), None) for x, y in loader)
            else:
                images, masks = tensors["train"]
                batches = ((images[idx].to(dev), masks[idx].to(dev),
                            select_features(caches["train"], idx.to(dev)) if cache else None)
                           for idx in epoch_batches(n_train, batch_size, generator))
            for x, y, feats in batches:
                loss = train_step(model, optimizer, x, y, feats, dice_weight, autocast_dtype, scaler)
                step += 1
                seen += len(x)
                if step % log_interval == 0 or step == total_steps:
                    elapsed = time.time() - t_seed
                    eta = elapsed / step * (total_steps - step) + (len(seeds) - 1 - seed_index) * elapsed / step * total_steps
                    print(f"seed {seed} | epoch {epoch + 1}/{epochs} | step {step}/{total_steps} | loss {loss:.4f} | "
                          f"{seen / elapsed:.0f} img/s | ETA {format_duration(eta)}")
            val_pred = predict(model, tensors["val"][0], eval_batch_size, dev, caches.get("val"), autocast_dtype)
            val = segmentation_metrics(val_pred, tensors["val"][1], n_classes, class_names)
            history.append({"epoch": epoch + 1, "loss": loss, "val_mIoU": val["mIoU"], "val_mDice": val["mDice"]})
            print(f"seed {seed} | epoch {epoch + 1}: val mIoU {100 * val['mIoU']:.2f} mDice {100 * val['mDice']:.2f}")
            if val["mIoU"] > best["mIoU"] or epoch == 0:
                best = {"mIoU": val["mIoU"], "epoch": epoch + 1, "state": copy.deepcopy(model.head.state_dict())}

        # ---- test with the selected head
        model.head.load_state_dict(best["state"])
        test_images, test_masks = tensors["test"]
        test_pred = predict(model, test_images, eval_batch_size, dev, caches.get("test"), autocast_dtype)
        test = segmentation_metrics(test_pred, test_masks, n_classes, class_names)
        print(f"seed {seed} | test (epoch {best['epoch']} selected on val mIoU): mIoU {100 * test['mIoU']:.2f} "
              f"mDice {100 * test['mDice']:.2f} mF1 {100 * test['mF1']:.2f}")
        run = {"seed": seed, "selected_epoch": best["epoch"], "val_mIoU": best["mIoU"], "test": test,
               "mIoU": test["mIoU"], "mDice": test["mDice"], "mF1": test["mF1"], "history": history,
               "trainable_parameters": n_head, "train_seconds": time.time() - t_seed}
        runs.append(run)
        vit_model.save_json_atomic(json_safe(run), Path(out_dir) / f"metrics_seed{seed}.json")
        if save_head:
            vit_model.save_safetensors_atomic(model.head.state_dict(), Path(out_dir) / f"head_seed{seed}.safetensors",
                                              {"head": head, "layers": json.dumps(layers), "n_classes": n_classes})
        if seed_index == 0:
            pixels = data.denormalize(test_images[:n_overlays]).clamp(0, 1)
            for i in range(min(n_overlays, len(test_images))):
                save_overlay(pixels[i].numpy(), test_pred[i], test_masks[i], Path(out_dir) / "overlays" / f"test_{i:02d}.png")

    # ---- results: JSON and the mean ± std row over seeds
    name = f"{head} on {backbone_name}"
    row = mean_std_row(name, runs)
    table = "| Model | mIoU (%) | Dice (%) | F1 (%) |\n|---|---|---|---|\n" + row + "\n"
    (Path(out_dir) / "table.md").write_text(table)
    summary = {"model": name, "config": config, "class_names": class_names, "layers": layers,
               "trainable_parameters": runs[0]["trainable_parameters"], "seeds": list(seeds),
               "runs": [{k: v for k, v in r.items() if k != "history"} for r in runs],
               "total_seconds": time.time() - t_start}
    vit_model.save_json_atomic(json_safe(summary), Path(out_dir) / "results.json")
    print(table + f"results: {out_dir}/results.json, table.md, overlays/ ({format_duration(time.time() - t_start)} in all)")
