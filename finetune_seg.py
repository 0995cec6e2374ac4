"""Semantic segmentation on a frozen ViT (OmniRad §3.3, RAD-DINO §4.3): only a head trains, OmniRad's dense
adapter (omnirad), DINOv2's linear head as RAD-DINO uses it (linear), mmseg's UPerHead (upernet) or ViTDet's
simple feature pyramid (vitdet); the heads are in seg_heads.py.

    python finetune_seg.py                                  # phantoms, random-init ViT-tiny/8, 64 px, CPU
    python finetune_seg.py --head=linear --linear_n_last=4  # DINOv2 / RAD-DINO linear head
    python finetune_seg.py --head=upernet --upernet_channels=64
    python finetune_seg.py --head=vitdet                    # RAD-DINO's ViTDet head (Table 6), on the last block
    python finetune_seg.py config/seg_covid_lungs.py --head=omnirad [--init_from=backbone.safetensors]
    python finetune_seg.py config/seg_omnirad_vits14.py --data_path=busi_256.npz --init_from=...  # GPU
    # each run writes results.json, table.md, metrics_seed*.json, head_seed*.safetensors, overlays/ to out_dir
"""
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import default_collate

import data
import model as vit_model
from config import configure
from figures import save_overlay
from metrics import mean_std, segmentation_metrics
from progress import format_duration
from seg_heads import HEADS, build_head, head_layers

# default config: a quick CPU run on phantoms; OmniRad's recipe (ViT-S/14, 448 px) is config/seg_omnirad_vits14.py
# data
data_path = ""                   # "" = procedural phantoms; a MedSegBench-style .npz; or a CSV (image, mask, split)
mask_threshold = 127             # CSV masks: foreground where gray > threshold; None = stored class indices
intensity = "full_range"         # 16-bit PNGs, DICOMs without a window -> [0, 1]: full_range, minmax, percentile
phantom_sizes = (256, 64, 64)    # phantom images per split (train, val, test)
phantom_px = 64                  # phantoms are drawn at this size (then resized to img_size)
img_size = 64                    # network input px, square (OmniRad: 448 with patch 14)
augment = False                  # joint random resized crop + rotation (+ flip); off = features cached once
crop_scale_min = 0.5             # augment: the smallest crop, as a fraction of the image area
rotation_deg = 10.0              # augment: the largest rotation
hflip = False                    # augment: horizontal flips swap left and right: off for chest X-rays
# model
init_from = ""                   # backbone file for model.load_backbone (nanorad/DINOv2/HF/timm); "" = random init
model_size = "tiny"              # random init only: tiny small base large giant
patch_size = 8                   # random init only
depth = 0                        # random init only: number of blocks (0 = the size's own)
head = "omnirad"                 # "omnirad", "linear", "upernet" or "vitdet"
vit_layers = ()                  # blocks the head reads (0-based); () = the head's default (omnirad: 3,7,11 of 12)
omnirad_width = 0                # fused-map / decoder width; 0 = the ViT's embed_dim (see seg_heads.OmniRadHead)
linear_n_last = 1                # linear head: the last 1 (DINOv2 "lin.") or 4 ("+ms"-style) blocks
linear_cls_token = True          # linear head: concatenate the CLS token to every patch (DINOv2)
upernet_channels = 512           # mmseg's UPerHead default; 0 = the ViT's embed_dim
vitdet_channels = 256            # detectron2's SimpleFeaturePyramid out_channels; 0 = the ViT's embed_dim
# optimisation (OmniRad §3.3: AdamW, constant lr; the epoch with the best val mIoU is tested)
epochs = 20                      # OmniRad: 20
batch_size = 16                  # OmniRad: 16; at least 2 for the heads' BatchNorm
lr = 1e-4                        # OmniRad: 1e-4, constant
weight_decay = 1e-4              # OmniRad: 1e-4
dice_weight = 0.0                # > 0 adds soft Dice of the foreground classes to the cross-entropy
seeds = (0,)                     # --seeds=0,1,2 runs repeats; the table gives mean ± std
# system
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = "bfloat16" if torch.cuda.is_available() else "float32"  # autocast; "float16" (CUDA) adds loss scaling
cpu_threads = 1                  # torch threads on a CPU (0 = torch's default); more threads than free cores stall
cache = True                     # without augmentation, compute the frozen features once and reuse them
eval_batch_size = 32             # images per forward pass when caching features and predicting
log_interval = 20                # steps between progress lines
# output
out_dir = "out/finetune_seg"
n_overlays = 6                   # test images drawn as OmniRad Fig. 3 overlays (first seed)
save_head = True                 # save the selected head's weights per seed (safetensors)

# ---- the segmenter: a frozen ViT's blocks feed one of seg_heads' decoder heads
class FrozenBackboneSegmenter(nn.Module):
    """A frozen ViT (always in eval mode, under no_grad) and a trainable head; `feats` may be passed in (a cache)."""

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

# ---- data: every source gives {"train", "val", "test"} datasets of {"image": (3,H,W) in [0,1], "mask"}
def npz_split(path, split):
    """One split of a MedSegBench-style .npz: `{split}_images` uint8 (N,H,W) or (N,H,W,3) and `{split}_label`
    (N,H,W) class indices (or `_labels`, `_masks`, `_mask`), as a list of items."""
    image_key, mask_keys = f"{split}_images", [f"{split}_{k}" for k in ("label", "labels", "masks", "mask")]
    with np.load(path) as npz:
        mask_key = next((k for k in mask_keys if k in npz), None)
        if image_key not in npz or mask_key is None:
            raise KeyError(f"{path}: expected arrays '{image_key}' and '{split}_label' (MedSegBench layout), "
                           f"found {list(npz.keys())}")
        images, masks = npz[image_key], npz[mask_key]
    masks = masks[..., 0] if masks.ndim == 4 and masks.shape[-1] == 1 else masks
    if images.dtype != np.uint8 or images.ndim not in (3, 4) or masks.shape != images.shape[:3]:
        raise ValueError(f"{path}: {image_key} is {images.dtype} {images.shape} and {mask_key} {masks.shape}; "
                         f"expected uint8 (N,H,W[,3]) images and (N,H,W) masks")
    images = torch.from_numpy(images).float().div_(255)
    images = images[:, None].expand(-1, 3, -1, -1) if images.ndim == 3 else images.permute(0, 3, 1, 2)
    return [{"image": image.contiguous(), "mask": mask} for image, mask in zip(images, torch.from_numpy(masks).long())]

def load_splits(data_path, mask_threshold=127, phantom_sizes=(256, 64, 64), phantom_px=64, intensity="full_range"):
    """{"train", "val", "test"} untransformed datasets and the class names, from "" (the phantoms), a .npz or a
    CSV index with image, mask and split columns (masks binarised at mask_threshold, or class indices if None)."""
    if not data_path:
        datasets = {s: data.PhantomDataset(n, img_size=phantom_px, split=s) for s, n in zip(data.SPLITS, phantom_sizes)}
        return datasets, list(data.PHANTOM_SEG_CLASSES)
    suffix = Path(data_path).suffix
    if suffix == ".npz":
        datasets = {s: npz_split(data_path, s) for s in data.SPLITS}
        n_classes = max(2, 1 + max(int(item["mask"].max()) for item in datasets["train"]))
    elif suffix == ".csv":
        datasets = {s: data.SegmentationPairsDataset(data_path, split=s, threshold=mask_threshold, intensity=intensity)
                    for s in data.SPLITS}
        if mask_threshold is not None:
            return datasets, ["background", "foreground"]
        n_classes = 1 + max(int(item["mask"].max()) for item in datasets["train"])
    else:
        raise ValueError(f"--data_path={data_path}: expected '' (phantoms), a .npz or a .csv")
    return datasets, ["background"] + [f"class {c}" for c in range(1, n_classes)]

def stack_split(dataset, size):
    """All items resized whole (no crop: metrics see the whole view): normalised images (N,3,S,S), masks (N,S,S)."""
    images, masks = zip(*[(data.resize(item["image"], size), data.resize_mask(item["mask"], size)) for item in dataset])
    return data.normalize(torch.stack(images)), torch.stack(masks)

# ---- training and evaluation
@torch.no_grad()
def cache_features(model, images, batch_size, device, autocast_dtype=None):
    """model.features of every image, once: per block, (patch maps (N,D,h,w), CLS (N,D)) on `device`."""
    chunks = []
    for start in range(0, len(images), batch_size):
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            feats = model.features(images[start:start + batch_size].to(device))
        # stored in the autocast dtype the head's convs cast to anyway (the ViT's final LayerNorm returns fp32)
        chunks.append([[t.to(autocast_dtype or t.dtype) for t in pair] for pair in feats])
    return [tuple(torch.cat(parts) for parts in zip(*pairs)) for pairs in zip(*chunks)]  # chunks -> blocks

def select_features(cache, index):
    return [(maps[index], cls[index]) for maps, cls in cache]

def epoch_batches(n, batch_size, generator):
    """Shuffled index batches of one epoch, without the ragged last one (BatchNorm) unless all is one batch."""
    order = torch.randperm(n, generator=generator)
    return [order] if n < batch_size else list(order[:n // batch_size * batch_size].view(-1, batch_size))

def soft_dice_loss(logits, target):
    """1 - soft Dice of the foreground classes, pooled over the batch, averaged over classes."""
    probs = logits.float().softmax(1)[:, 1:]
    onehot = F.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2)[:, 1:].float()
    intersection = (probs * onehot).sum((0, 2, 3))
    denominator = probs.sum((0, 2, 3)) + onehot.sum((0, 2, 3))
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
    scaler = scaler or torch.amp.GradScaler(enabled=False)  # fp16 needs loss scaling; a disabled scaler passes through
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss.item()

@torch.no_grad()
def predict(model, images, batch_size, device, cache=None, autocast_dtype=None):
    """Argmax label maps (N,H,W) uint8 on the CPU for normalised images (N,3,H,W); leaves the model in eval mode."""
    model.eval()
    preds = []
    for start in range(0, len(images), batch_size):
        index = slice(start, start + batch_size)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = model(images[index].to(device), select_features(cache, index) if cache is not None else None)
        preds.append(logits.argmax(1).to(torch.uint8).cpu())
    return torch.cat(preds)

def mean_std_row(name, runs):
    """OmniRad Table 11's "| model | mIoU | Dice | F1 |": mean ± population std over seeds, in %."""
    cells = [mean_std([100 * r[key] for r in runs]) for key in ("mIoU", "mDice", "mF1")]
    cells = [f"{m['mean']:.2f} ± {m['std']:.2f}" if m["n"] > 1 else f"{m['mean']:.2f} (1 seed)" for m in cells]
    return f"| {name} | " + " | ".join(cells) + " |"

def json_safe(x):
    """x with NaN (which JSON lacks) as None; tuples become lists."""
    return json.loads(json.dumps(x), parse_constant=lambda nan: None)

if __name__ == "__main__":
    config = configure(globals())

    # ---- checks: a bad setting stops here, naming its key, before any data is read
    if head not in HEADS:
        raise ValueError(f"--head={head!r}: expected one of {HEADS}")
    data.check_intensity(intensity)  # also when the phantoms, which ignore it, are the data
    if data_path and not Path(data_path).is_file():  # np.load's own error would not name the key
        raise FileNotFoundError(f"--data_path={data_path}: file not found (expected a .npz or a .csv)")
    if epochs < 1 or batch_size < 2 or linear_n_last < 1:
        raise ValueError(f"epochs, batch_size (BatchNorm), linear_n_last: expected >= 1, >= 2, >= 1, found {epochs}, "
                         f"{batch_size}, {linear_n_last}")
    if not seeds or not all(isinstance(s, int) for s in seeds):
        raise ValueError(f"--seeds={seeds!r}: expected integers, e.g. --seeds=0,1,2")
    if dtype not in ("bfloat16", "float16", "float32") or (dtype == "float16" and not device.startswith("cuda")):
        raise ValueError(f"--dtype={dtype!r}: expected bfloat16, float32, or float16 on CUDA")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"--device={device} but torch sees no CUDA device")
    if init_from:  # the checkpoint fixes the architecture (load_backbone names a missing file)
        vit_config = vit_model.load_backbone(init_from, verbose=False).config
    else:
        vit_config = vit_model.vit_config(model_size, patch_size=patch_size, img_size=img_size,
                                          **({"depth": depth} if depth else {}))
    if img_size % vit_config.patch_size:
        raise ValueError(f"--img_size={img_size}: expected a multiple of the patch size {vit_config.patch_size}")
    layers = head_layers(head, vit_config.depth, vit_layers, linear_n_last)
    dev = torch.device(device)
    if dev.type == "cpu" and cpu_threads:
        torch.set_num_threads(cpu_threads)
    autocast_dtype = None if dtype == "float32" else getattr(torch, dtype)  # None: autocast off

    # ---- data: val/test (and train without augmentation) resized whole, held as tensors
    datasets, class_names = load_splits(data_path, mask_threshold, phantom_sizes, phantom_px, intensity)
    n_classes, n_train = len(class_names), len(datasets["train"])
    t0 = time.time()
    held = ("val", "test") if augment else ("train", "val", "test")  # augmented train images are drawn per step
    tensors = {s: stack_split(datasets[s], img_size) for s in held}
    print(f"data: {data_path or 'phantoms'} ({n_classes} classes: {', '.join(class_names)}), train/val/test "
          f"{n_train}/{len(datasets['val'])}/{len(datasets['test'])}, {img_size} px, "
          f"augment={augment} hflip={hflip} (loaded in {time.time() - t0:.1f} s)")
    total_steps = epochs * (n_train // batch_size if n_train >= batch_size else 1)  # the ragged batch is dropped
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    runs, t_start = [], time.time()
    for seed_index, seed in enumerate(seeds):
        # ---- model: the frozen backbone and a fresh head
        torch.manual_seed(seed)
        np.random.seed(seed)
        if init_from:
            backbone = vit_model.load_backbone(init_from)
        else:
            backbone = vit_model.ViT(vit_config)
            print(f"backbone: RANDOM INIT (no --init_from): ViT-{model_size}/{patch_size}, depth {vit_config.depth}")
        seg_head = build_head(head, vit_config.embed_dim, n_classes, omnirad_width, linear_n_last, linear_cls_token,
                              upernet_channels, vitdet_channels)
        model = FrozenBackboneSegmenter(backbone, seg_head, layers).to(dev)
        n_head, n_backbone = count_parameters(model.head), count_parameters(model.backbone, trainable_only=False)
        print(f"seed {seed}: head {head} on blocks {layers}: {n_head:,} trainable parameters "
              f"({n_head / 1e6:.2f} M); frozen backbone {n_backbone:,}")
        optimizer = torch.optim.AdamW(model.head.parameters(), lr=lr, weight_decay=weight_decay)
        scaler = torch.amp.GradScaler("cuda") if autocast_dtype == torch.float16 else None

        # ---- frozen features, once (without augmentation every epoch would compute the same ones)
        caches = {}
        if cache:
            t0 = time.time()
            caches = {s: cache_features(model, tensors[s][0], eval_batch_size, dev, autocast_dtype) for s in tensors}
            mb = sum(t.numel() * t.element_size() for c in caches.values() for pair in c for t in pair) / 2 ** 20
            print(f"cached frozen features of {', '.join(caches)} in {time.time() - t0:.1f} s ({mb:.0f} MiB)")

        # ---- training, keeping the head of the epoch with the best val mIoU
        generator = torch.Generator().manual_seed(seed)
        if augment:
            transform = data.SegmentationTransform(img_size, train=True, scale=(crop_scale_min, 1.0),
                                                   hflip_p=0.5 if hflip else 0.0, rotation_deg=rotation_deg)
            loader = torch.utils.data.DataLoader(  # the transform draws from torch's RNG, item after item
                datasets["train"], batch_size, shuffle=True, drop_last=n_train >= batch_size, generator=generator,
                collate_fn=lambda items: default_collate([transform(it["image"], it["mask"]) for it in items]))
        best, history, step, t_seed = None, [], 0, time.time()
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
                if step % log_interval == 0 or step == total_steps:
                    elapsed = time.time() - t_seed
                    eta = elapsed / step * ((total_steps - step) + (len(seeds) - 1 - seed_index) * total_steps)
                    print(f"seed {seed} | epoch {epoch + 1}/{epochs} | step {step}/{total_steps} | loss {loss:.4f} | "
                          f"{step * min(batch_size, n_train) / elapsed:.0f} img/s | ETA {format_duration(eta)}")
            val_pred = predict(model, tensors["val"][0], eval_batch_size, dev, caches.get("val"), autocast_dtype)
            val = segmentation_metrics(val_pred, tensors["val"][1], n_classes, class_names)
            history.append({"epoch": epoch + 1, "loss": loss, "val_mIoU": val["mIoU"], "val_mDice": val["mDice"]})
            print(f"seed {seed} | epoch {epoch + 1}: val mIoU {100 * val['mIoU']:.2f} mDice {100 * val['mDice']:.2f}")
            if epoch == 0 or val["mIoU"] > best["mIoU"]:
                best = {"mIoU": val["mIoU"], "epoch": epoch + 1, "state": copy.deepcopy(model.head.state_dict())}

        # ---- test with the selected head; save its metrics, weights and (first seed) overlays
        model.head.load_state_dict(best["state"])
        test_images, test_masks = tensors["test"]
        test_pred = predict(model, test_images, eval_batch_size, dev, caches.get("test"), autocast_dtype)
        test = segmentation_metrics(test_pred, test_masks, n_classes, class_names)
        print(f"seed {seed} | test (epoch {best['epoch']} selected on val mIoU): mIoU {100 * test['mIoU']:.2f} "
              f"mDice {100 * test['mDice']:.2f} mF1 {100 * test['mF1']:.2f}")
        runs.append({"seed": seed, "selected_epoch": best["epoch"], "val_mIoU": best["mIoU"], "test": test,
                     "mIoU": test["mIoU"], "mDice": test["mDice"], "mF1": test["mF1"], "history": history,
                     "trainable_parameters": n_head, "train_seconds": time.time() - t_seed})
        vit_model.save_json_atomic(json_safe(runs[-1]), out / f"metrics_seed{seed}.json")
        if save_head:
            vit_model.save_safetensors_atomic(model.head.state_dict(), out / f"head_seed{seed}.safetensors",
                                              {"head": head, "layers": json.dumps(layers), "n_classes": n_classes})
        if seed_index == 0:
            pixels = data.denormalize(test_images[:n_overlays]).clamp(0, 1)
            for i in range(min(n_overlays, len(test_images))):
                save_overlay(pixels[i].numpy(), test_pred[i], test_masks[i], out / "overlays" / f"test_{i:02d}.png")

    # ---- results: JSON and the mean ± std row over seeds
    name = f"{head} on {Path(init_from).stem if init_from else f'random-init ViT-{model_size}/{patch_size}'}"
    table = "| Model | mIoU (%) | Dice (%) | F1 (%) |\n|---|---|---|---|\n" + mean_std_row(name, runs) + "\n"
    (out / "table.md").write_text(table)
    summary = {"model": name, "config": config, "class_names": class_names, "layers": layers,
               "trainable_parameters": runs[0]["trainable_parameters"], "seeds": list(seeds),
               "runs": [{k: v for k, v in r.items() if k != "history"} for r in runs],
               "total_seconds": time.time() - t_start}
    vit_model.save_json_atomic(json_safe(summary), out / "results.json")
    print(table + f"results: {out_dir}/results.json, table.md, overlays/ "
                  f"({format_duration(time.time() - t_start)} in all)")
