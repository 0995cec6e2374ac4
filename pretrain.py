"""
Self-supervised pretraining of a ViT as in DINOv2 (DINO + iBOT + KoLeo), with the two radiology recipes
nanorad reproduces: OmniRad (global crops only) and RAD-DINO (multi-crop, continued from DINOv2 weights).

    python pretrain.py                                    # phantoms, ViT-tiny/8, ~1.5 min on a CPU: k-NN gain printed
    python pretrain.py config/medmnist_tiny.py            # real MedMNIST + chest X-ray images
    torchrun --standalone --nproc_per_node=8 pretrain.py config/omnirad_vits14.py --train_data="('/data/radimagenet',)"
    torchrun --standalone --nproc_per_node=8 pretrain.py config/raddino_vitb14.py --init_from=dinov2_vitb14_pretrain.pth

A student ViT sees every crop of an image (its global crops partly masked); the teacher, an exponential
moving average of the student, sees the unmasked global crops. Both carry a DINO head mapping features to
K prototype scores. The student learns to predict the teacher's (Sinkhorn-Knopp or centred) assignment of
the *other* global crop from each crop's CLS token (DINO) and of each masked patch from its patch token
(iBOT), while KoLeo spreads the student's CLS features over the sphere.

Continual pretraining (`init_from=`): random heads send large meaningless gradients into a good backbone (dinov2 #204:
k-NN 80 % -> 10 %), so the heads first train alone for `head_warmup_iters`, and a k-NN guard rail keeps
best.safetensors and stops when the score falls `rollback_drop` below its best. Outputs in out_dir: ckpt.safetensors
(resumes exactly), best.safetensors, teacher_backbone.safetensors, hf/, dino_head.safetensors, log.jsonl, results.json.
"""
import copy
import functools
import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import kernels
from checkpoint import (check_out_dir, checkpoint_paths, load_checkpoint, load_init_backbone, save_checkpoint,
                        start_run_files)
from data import (BatchedDinoAugmentation, MaskedCollate, MultiCropDataset, SourceImageDataset, StepBatchSampler,
                  auto_source_px, eval_tensors, item_seed, open_images)
from distributed import (ACTIVATION_CHECKPOINTING, PARALLEL_MODES, average_gradients, default_parallel, full_state_dict,
                         local_shards, mean_over_ranks, parallelize, rank, same_on_all_ranks, sum_over_ranks,
                         unsharded_backbone, world_size)
from metrics import backbone_drift, format_drift, knn_predict
from figures import save_attention_rows, save_training_curves
from model import (DINOHead, ViT, backbone_features, cls_attention_maps, export_hf, head_shape, load_dino_head,
                   save_backbone, save_json_atomic, save_safetensors_atomic, vit_config)
from schedules import build_schedules, param_groups

# -----------------------------------------------------------------------------
# default config: ViT-tiny/8 (6 blocks) on the procedural anatomy phantoms, OmniRad's global crops, ~1.5 min on a CPU
# I/O
out_dir = "out/pretrain"
init_from = ""            # backbone to continue from: DINOv2 .pth, HF Dinov2 / timm / nanorad safetensors, or a
                          # pretrain.py checkpoint (its teacher). "" = random init
init_head_from = ""       # a DINOv2-format DINO head (RAD-DINO's dino_head.safetensors, or ours); "" = fresh heads
resume = False            # continue exactly from out_dir/ckpt.safetensors
overwrite = False         # start afresh in an out_dir that holds an earlier run (else that is an error)
ckpt_every = 40           # iterations between checkpoints (one more at the end)
log_interval = 10
# data
train_data = ()           # sources: MedMNIST .npz (train split), a CSV index with a split column
                          # (train rows), or a folder of images (PNG, JPEG, DICOM). () = procedural phantoms
intensity = "full_range"  # 16-bit PNGs, DICOMs without a window -> [0, 1]: full_range, minmax, percentile (data.py)
train_repeats = ()        # times each train_data source appears in an epoch, e.g. (1, 8, 14) so that a small
                          # source is seen about as often as a large one; () = once each
phantom_sizes = (2000, 500, 500)  # phantom images per split (train, val, test) when a source is "phantom"
phantom_px = 64
phantom_task = "anatomy"  # "anatomy" (heart size, effusion, lung texture: learnable without labels) or "lesions"
num_workers = 0           # DataLoader processes making the crops (0 = in the training process)
augment_on_device = False  # True: the crops are made on the training device in batches (BatchedDinoAugmentation)
                           # -- for GPUs, where the CPU loader is the bottleneck; the loader only resizes images
augment_source_px = 0     # augment_on_device: every image becomes a centre square of this size before its crops;
                          # 0 = auto, the smallest that keeps the smallest global crop at full resolution
seed = 0
# model
model_size = "tiny"       # tiny small base large giant (random init; init_from reads the size from the file)
depth = 6                 # > 0: override the size's number of blocks (0 = the size's own: tiny has 12)
patch_size = 8
n_registers = 0
drop_path_rate = 0.1      # stochastic depth of the student (OmniRad 0.3)
layerscale_init = 0.1     # DINOv2 1e-5; that makes every CLS token nearly identical at init, which a short
                          # run spends many steps undoing
head_n_prototypes = 64    # K of the DINO head (DINOv2 65536, OmniRad 131072)
head_hidden_dim = 512     # (DINOv2 2048)
head_bottleneck_dim = 128  # (DINOv2 256)
head_nlayers = 3
ibot_separate_head = False  # DINOv2 shares the DINO head for iBOT by default
ibot_head_n_prototypes = 1024  # separate iBOT head only
# crops and masks
global_crops_size = 48    # px (DINOv2 224, RAD-DINO 518)
local_crops_size = 24     # px (DINOv2 96, RAD-DINO 196)
global_crops_only = True  # True: OmniRad (2 global crops, no local crops); False: DINOv2 / RAD-DINO multi-crop
n_local_crops = 8         # RAD-DINO / DINOv2: 8 local crops (ignored when global_crops_only)
global_crops_scale = (0.5, 1.0)  # (DINOv2 0.32-1): a crop keeps the heart and both lung bases in view
local_crops_scale = (0.05, 0.32)
color_jitter = (0.2, 0.2, 0.0, 0.0)  # brightness, contrast, saturation, hue strengths, p=0.8 (DINOv2 .4 .4 .2 .1)
solarize_p = 0.0          # second global crop (DINOv2 0.2); on small radiographs solarization and blur swamp the
blur_probs = (0.0, 0.0, 0.0)  # image (view_corr; RESULTS.md). Blur of crop 1, crop 2, local crops (DINOv2 1 .1 .5)
mask_probability = 0.5    # fraction of global crops that get iBOT masks
mask_ratio_min_max = (0.1, 0.5)
# losses
dino_loss_weight = 1.0
ibot_loss_weight = 1.0
koleo_loss_weight = 0.1
centering = "sinkhorn_knopp"  # "sinkhorn_knopp" (DINOv2 ViT-L/g recipes) or "centering" (softmax centering)
student_temp = 0.1
center_momentum = 0.9     # softmax centering only
# optimisation (AdamW; every schedule is a per-iteration array indexed by the global step)
batch_size = 32           # images per process; each image gives 2 global (+ local) crops
max_iters = 120
base_lr = 0.01            # for a global batch of 1024: lr = base_lr * sqrt(global batch / 1024) (DINOv2)
min_lr = 1e-6
warmup_iters = 15         # linear lr warm-up (of the backbone, after the head warm-up)
weight_decay = 0.04       # cosine from weight_decay to weight_decay_end
weight_decay_end = 0.4    # (OmniRad 0.2)
layerwise_decay = 0.9     # block i's lr *= layerwise_decay ** (depth - i); embeddings the most decayed
patch_embed_lr_mult = 0.2
clip_grad = 3.0           # per module (backbone, each head), as DINOv2
adamw_betas = (0.9, 0.999)
freeze_last_layer_iters = 15  # the prototypes stay fixed at first: DINO's stability trick (DINOv2: 1 epoch)
momentum_teacher = 0.9    # cosine to final_momentum_teacher (DINOv2 0.992 -> 1, OmniRad 0.994 -> 1): a short run
final_momentum_teacher = 0.98  # needs a teacher that keeps up with the student
warmup_teacher_temp = 0.02  # linear to teacher_temp over teacher_temp_warmup_iters, then constant
teacher_temp = 0.02         # (DINOv2 0.04 -> 0.07); the default's values: RESULTS.md, "The default run"
teacher_temp_warmup_iters = 40
# continual pretraining safeguards
head_warmup_iters = None  # iterations with frozen backbones, training only the heads. None: max_iters // 10
                          # when init_from is given without init_head_from, else 0
eval_data = "phantom"     # labelled set for the k-NN monitor: "phantom", a MedMNIST .npz (train split = memory
                          # bank, val split = queries) or a CSV index (with eval_label_column); "" = none
eval_label_column = "label"  # CSV eval_data only
eval_every = 40           # iterations between k-NN evaluations (0 = never)
eval_max_images = 500     # per split, for the k-NN memory bank and queries
knn_k = 20
rollback_drop = None      # stop when the k-NN accuracy falls this far below its best (e.g. 0.05), pointing at
                          # best.safetensors. None: 0.05 when init_from is given, else off
# system
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = "bfloat16" if torch.cuda.is_available() else "float32"  # autocast dtype. On a CPU, bfloat16 pays only
                          # with native bf16 matmuls (`lscpu | grep -E "amx|avx512_bf16"`); float32 is exact
parallel = ""             # several processes: "ddp" (replicas; gradient all-reduce overlapped with backward) or
                          # "fsdp" (sharded, DCP checkpoints in ckpt.dcp/); "" = fsdp above 250M params, else ddp
activation_checkpointing = "none"  # "full" or "selective" (keeps matmul outputs): recompute activations, save memory
compile = False           # torch.compile each transformer block
# -----------------------------------------------------------------------------


# ---- Losses, exactly as DINOv2 (dinov2/loss/*.py; pinned by ../shared/oracles/dinov2_losses.safetensors) ----

def dino_loss(student_logits_chunks, teacher_probs_chunks, student_temp=0.1):
    """DINOLoss.forward: sum over every (student chunk, teacher chunk) pair of the batch-mean
    cross-entropy -sum_k t_k log softmax(s / student_temp)_k. Chunks are crops (B, K) each."""
    total = 0.0
    for s in student_logits_chunks:
        log_probs = F.log_softmax(s.float() / student_temp, dim=-1)
        for t in teacher_probs_chunks:
            total = total - (t * log_probs).sum(dim=-1).mean()
    return total


def ibot_loss(student_masked_logits, teacher_masked_probs, masks, student_temp=0.1):
    """iBOTPatchLoss.forward_masked: cross-entropy per masked patch, weighted 1/#masked of its crop
    (so every masked crop counts once whatever its mask size), summed and divided by the number of
    crops. Rows are the masked patches in masks.flatten() order; masks: bool (n_crops, N)."""
    per_patch = (teacher_masked_probs * F.log_softmax(student_masked_logits.float() / student_temp, dim=-1)).sum(-1)
    n_masked = masks.sum(dim=-1)  # output_size: the row count is known, so the device need not be asked
    weights = (1.0 / n_masked.clamp(min=1).float()).repeat_interleave(n_masked, output_size=len(per_patch))
    return -(per_patch * weights).sum() / masks.shape[0]


def koleo_loss(x, eps=1e-8):
    """KoLeoLoss: -mean log distance of each L2-normalised row to its nearest other row (the Kozachenko-Leonenko
    entropy estimator), spreading the features over the sphere. Under torchrun, over the global batch (DINOv2:
    each GPU's; ours does not depend on the GPU count): every rank computes the same value, only its rows carry
    gradient, and scaling the gradient (not the value) by the world size makes the rank average the full one."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world > 1:
        rows = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(rows, x.detach().contiguous())
        rows[dist.get_rank()] = x
        x = torch.cat(rows)
    x = F.normalize(x.float(), p=2, dim=-1, eps=eps)
    with torch.no_grad():
        dots = x @ x.t()
        dots.fill_diagonal_(-1)
        nearest = dots.argmax(dim=1)
    distances = (x - x[nearest] + eps).norm(dim=-1)  # nn.PairwiseDistance adds eps to the difference
    loss = -torch.log(distances + eps).mean()
    return loss if world == 1 else loss * world - loss.detach() * (world - 1)


def teacher_targets(logits, temp, method, center, n_total, momentum=0.9):
    """Teacher probabilities (B, K) fp32 from teacher head logits, across all ranks. Sinkhorn-Knopp
    (3 iterations) spreads each batch evenly over the prototypes; softmax centering subtracts a
    running mean of the logits (with the centre of steps < s) and then moves the centre."""
    if method == "sinkhorn_knopp":
        return kernels.sinkhorn_knopp(logits, temp, n_iterations=3, n_samples_total=n_total)
    probs, logits_sum = kernels.softmax_center(logits, center, temp)
    kernels.update_center(center, logits_sum, n_total, momentum)
    return probs


# ---- Student and teacher -----------------------------------------------------------------------------------

def build_heads(embed_dim, n_prototypes, hidden_dim, bottleneck_dim, nlayers, separate_ibot, ibot_n_prototypes):
    heads = {"dino_head": DINOHead(embed_dim, n_prototypes, hidden_dim, bottleneck_dim, nlayers)}
    if separate_ibot:
        heads["ibot_head"] = DINOHead(embed_dim, ibot_n_prototypes, hidden_dim, bottleneck_dim, nlayers)
    return heads


def make_teacher(student):
    """The teacher starts as an exact copy of the student and never gets gradients."""
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad = False
    return teacher.eval()


# ---- One training step -------------------------------------------------------------------------------------

def ssl_losses(student, teacher, batch, teacher_temp, centers, *, centering="sinkhorn_knopp", student_temp=0.1,
               center_momentum=0.9, dino_loss_weight=1.0, ibot_loss_weight=1.0, koleo_loss_weight=0.1,
               freeze_backbone=False, autocast=nullcontext):
    """Forward both networks on a batch (MaskedCollate layout: global crops crop-major, mask_indices made on the
    host) and return the loss terms as DINOv2's SSLMetaArch.forward_backward weighs them, plus monitors (0-d)."""
    global_crops, local_crops, masks = batch["global_crops"], batch["local_crops"], batch["masks"]
    B = global_crops.shape[0] // 2
    n_local = 0 if local_crops is None else local_crops.shape[0] // B
    mask_indices = batch["mask_indices"]  # every rank must agree on running iBOT, whose targets divide by the count
    n_masked_total = sum_over_ranks(len(mask_indices), masks.device)
    do_ibot = ibot_loss_weight > 0 and n_masked_total > 0
    separate = "ibot_head" in student

    with torch.no_grad():
        with autocast():
            out = teacher["backbone"].forward_features(global_crops)
            cls = out["x_norm_clstoken"].chunk(2)
            cls = torch.cat([cls[1], cls[0]])  # swapped: the student's crop A is matched to the teacher's crop B
            patches = out["x_norm_patchtokens"].flatten(0, 1)[mask_indices]
            if separate:
                t_cls_logits = teacher["dino_head"](cls)
                t_patch_logits = teacher["ibot_head"](patches) if do_ibot else None
            else:
                t_logits = teacher["dino_head"](torch.cat([cls, patches]) if do_ibot else cls)
                t_cls_logits, t_patch_logits = t_logits[:2 * B], t_logits[2 * B:]
        dino_targets = teacher_targets(t_cls_logits.float(), teacher_temp, centering, centers["dino"],
                                       2 * B * world_size(), center_momentum)
        ibot_targets = None
        if do_ibot:
            ibot_targets = teacher_targets(t_patch_logits.float(), teacher_temp, centering, centers["ibot"],
                                           n_masked_total, center_momentum)

    backbone_grad = torch.no_grad() if freeze_backbone else nullcontext()
    with autocast():
        with backbone_grad:
            s_global = student["backbone"].forward_features(global_crops, masks=masks)
            s_local = student["backbone"].forward_features(local_crops) if n_local else None
        head_inputs = [s_global["x_norm_clstoken"]]
        if n_local:
            head_inputs.append(s_local["x_norm_clstoken"])
        s_patches = s_global["x_norm_patchtokens"].flatten(0, 1)[mask_indices] if do_ibot else None
        if do_ibot and not separate:
            head_inputs.append(s_patches)
        # one head call for every token type, as DINOv2's block-diagonal batching
        s_logits = student["dino_head"](torch.cat(head_inputs)).float()
        s_global_logits = s_logits[:2 * B]
        s_local_logits = s_logits[2 * B:2 * B + n_local * B]
        if do_ibot:
            s_patch_logits = (student["ibot_head"](s_patches).float() if separate
                              else s_logits[2 * B + n_local * B:])

    # DINOv2 divides by the number of (student, teacher) crop pairs; max(., 1) is its own choice and
    # makes the global-only loss 2/3 of the pair mean, kept so that the weights match DINOv2's.
    n_terms = 2 + max(2 * n_local, 1)
    losses = {}
    if n_local:
        losses["dino_local"] = dino_loss_weight * dino_loss(s_local_logits.chunk(n_local), dino_targets.chunk(2),
                                                            student_temp) / n_terms
    losses["dino_global"] = dino_loss_weight * dino_loss([s_global_logits], [dino_targets], student_temp) * 2 / n_terms
    if koleo_loss_weight > 0:  # per global crop: never between two crops of the same image
        losses["koleo"] = koleo_loss_weight * sum(koleo_loss(c) for c in s_global["x_norm_clstoken"].chunk(2))
    if do_ibot:
        losses["ibot"] = ibot_loss_weight * ibot_loss(s_patch_logits, ibot_targets, masks, student_temp)
    losses["total"] = sum(losses.values())

    monitors = collapse_monitors(out["x_norm_clstoken"], dino_targets,
                                 F.softmax(s_global_logits.detach() / student_temp, dim=-1))
    return losses, monitors


@torch.no_grad()
def collapse_monitors(teacher_cls, teacher_probs, student_probs):
    """Numbers that tell a learning run from a collapsing one (this rank's batch, 0-d; README, "Pretraining").
    teacher_cls (2B, D): the teacher's CLS features of both global crops, crop-major; teacher_probs
    (2B, K): its DINO targets; student_probs (2B, K): the student's DINO head softmax. head_info, the
    mutual information H(mean p) - mean H(p) / log K, is 0 for both of DINO's collapses (every image on
    one prototype, or every image uniform); view_corr is the agreement of the two crops of an image
    beyond what all images share (1 agree, ~0 the augmentation swamps the image)."""
    def entropy(p):
        return -(p * p.clamp_min(1e-12).log()).sum(-1)

    feats = F.normalize(teacher_cls.float(), dim=-1)
    student_probs = student_probs.float()
    a, b = (teacher_cls.float() - teacher_cls.float().mean(0)).chunk(2)
    return {
        "feat_std": feats.std(dim=0).mean() * math.sqrt(feats.shape[1]),
        "teacher_entropy": entropy(teacher_probs).mean() / math.log(teacher_probs.shape[1]),
        "head_info": ((entropy(student_probs.mean(0)) - entropy(student_probs).mean())
                      / math.log(student_probs.shape[1])),
        "view_corr": (a * b).sum() / (a.norm() * b.norm()).clamp_min(1e-12),
    }


def as_floats(tensors):  # 0-d tensors (loss terms, monitors) as Python floats by one host sync, for log lines
    return dict(zip(tensors, torch.stack([t.float() for t in tensors.values()]).tolist()))


def train_step(student, teacher, optimizer, batch, values, centers, clip_grad=3.0, freeze_backbone=False,
               **loss_kwargs):
    """Schedules -> losses -> backward (+ gradient reduction) -> per-module clipping -> AdamW -> EMA. Returns (finite,
    losses averaged over ranks, monitors), as 0-d tensors; a non-finite loss skips the update (the caller stops)."""
    for group in optimizer.param_groups:  # this step's schedule values, times the group's multipliers
        group["lr"] = values[group["schedule"]] * group["lr_multiplier"]
        group["weight_decay"] = values["wd"] * group["wd_multiplier"]
    optimizer.zero_grad(set_to_none=True)
    losses, monitors = ssl_losses(student, teacher, batch, values["teacher_temp"], centers,
                                  freeze_backbone=freeze_backbone, **loss_kwargs)
    reduced = dict(zip(losses, mean_over_ranks(torch.stack([v.detach().float() for v in losses.values()])).unbind()))
    # the step's one host sync: a NaN loss must never reach the weights; by the rank mean all ranks stop together
    if not torch.isfinite(reduced["total"]):
        return False, reduced, monitors
    losses["total"].backward()
    average_gradients(student)  # ddp: awaits the bucket all-reduces launched in backward; fsdp: done in backward
    for part in student.values():
        params = [p for p in part.parameters() if p.grad is not None]
        if params and clip_grad:
            torch.nn.utils.clip_grad_norm_(params, clip_grad)
    optimizer.step()
    with torch.no_grad():  # frozen backbones are left alone: m * x + (1 - m) * x is not always x in floats
        parts = [k for k in student if not (freeze_backbone and k == "backbone")]
        kernels.ema_(local_shards(p for k in parts for p in teacher[k].parameters()),
                     local_shards(p for k in parts for p in student[k].parameters()), values["momentum"])
    return True, reduced, monitors


def guard_rail(guard, step, score):
    """The guard rail on the teacher's k-NN score: records a new best (the caller saves best.safetensors) and says
    whether the score fell more than rollback_drop below it (the caller stops). Returns (is_best, stop)."""
    is_best = score > guard["best_score"]
    if is_best:
        guard.update(best_score=score, best_step=step)
    return is_best, bool(guard["rollback_drop"]) and score < guard["best_score"] - guard["rollback_drop"]


# ---- The run -----------------------------------------------------------------------------------------------

if __name__ == "__main__":
    from config import configure
    config = configure(globals())

    # -------------------------------------------------------------------- checks, before any work
    for key, choices in (("dtype", ("bfloat16", "float32")), ("centering", ("sinkhorn_knopp", "centering")),
                         ("parallel", ("",) + PARALLEL_MODES), ("activation_checkpointing", ACTIVATION_CHECKPOINTING)):
        if config[key] not in choices:  # (float16 would need a gradient scaler)
            raise ValueError(f"{key}: expected one of {choices}, found {config[key]!r}")
    for key, value in (("global_crops_size", global_crops_size), ("local_crops_size", local_crops_size)):
        if value % patch_size:
            raise ValueError(f"{key}={value}: expected a multiple of the patch size {patch_size}")
    if len(mask_ratio_min_max) != 2 or not 0 <= mask_ratio_min_max[0] <= mask_ratio_min_max[1] <= 1:
        raise ValueError(f"mask_ratio_min_max: expected (min, max) in [0, 1], found {mask_ratio_min_max}")
    if batch_size < 2 and koleo_loss_weight > 0:
        raise ValueError(f"batch_size={batch_size}: KoLeo needs at least 2 images per batch (or koleo_loss_weight=0)")
    if train_repeats and (len(train_repeats) != len(train_data) or not all(
            isinstance(r, int) and r >= 1 for r in train_repeats)):
        raise ValueError(f"train_repeats: expected one whole number >= 1 per train_data source "
                         f"({len(train_data)}), found {train_repeats}")
    for path in [init_from, init_head_from] + [s for s in train_data if s != "phantom"]:
        if path and not Path(path).exists():
            raise FileNotFoundError(f"{path} not found (from init_from / init_head_from / train_data)")
    check_out_dir(out_dir, resume, overwrite)
    n_local = 0 if global_crops_only else n_local_crops
    if augment_on_device:
        if augment_source_px == 0 and not global_crops_scale[0] > 0:
            raise ValueError(f"augment_source_px=0 (auto) needs global_crops_scale[0] > 0, found {global_crops_scale}; "
                             f"set augment_source_px")
        source_px = augment_source_px or auto_source_px(global_crops_size, global_crops_scale)
        if source_px < global_crops_size:
            raise ValueError(f"augment_source_px={augment_source_px}: expected 0 (auto) or at least "
                             f"global_crops_size={global_crops_size}, found {source_px}")
    if head_warmup_iters is None:  # continual pretraining is safe by default
        head_warmup_iters = max_iters // 10 if (init_from and not init_head_from) else 0
    if rollback_drop is None:
        rollback_drop = 0.05 if init_from else 0.0

    # -------------------------------------------------------------------- processes and devices
    ddp = int(os.environ.get("RANK", -1)) != -1  # started by torchrun
    if ddp:
        if device.startswith("cuda"):
            device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    master = rank() == 0
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    autocast = functools.partial(torch.autocast, device_type, dtype=torch.bfloat16, enabled=dtype == "bfloat16")
    if device_type == "cpu" and dtype == "bfloat16" and master and not torch.cpu._is_avx512_bf16_supported():
        print("note: dtype=bfloat16 on a CPU without native bf16 matmuls (AVX512-BF16/AMX): likely slower than float32")
    out = Path(out_dir)
    if master:
        out.mkdir(parents=True, exist_ok=True)
    global_batch = batch_size * world_size()
    lr = base_lr * math.sqrt(global_batch / 1024)

    # -------------------------------------------------------------------- data
    sources = list(train_data) or ["phantom"]
    repeats = list(train_repeats) or [1] * len(sources)
    opened = [open_images(s, "train", phantom_sizes, phantom_px, None, phantom_task, intensity) for s in sources]
    train_images = torch.utils.data.ConcatDataset([d for d, r in zip(opened, repeats) for _ in range(r)])
    augmentation = dict(global_crops_size=global_crops_size, local_crops_size=local_crops_size, n_local_crops=n_local,
                        global_crops_scale=tuple(global_crops_scale), local_crops_scale=tuple(local_crops_scale),
                        jitter=tuple(color_jitter), blur_probs=tuple(blur_probs), solarize_p=solarize_p)
    if augment_on_device:  # the loader only resizes; the training loop makes the crops
        crops = SourceImageDataset(train_images, source_px)
        device_augmentation = BatchedDinoAugmentation(**augmentation)
    else:
        crops = MultiCropDataset(train_images, **augmentation)
    eval_sets = None
    if eval_data and eval_every > 0:
        label_column = eval_label_column if str(eval_data).endswith(".csv") else None
        bank, query = (eval_tensors(open_images(eval_data, s, phantom_sizes, phantom_px, label_column, phantom_task,
                                                intensity), global_crops_size, eval_max_images)
                       for s in ("train", "val"))
        n_classes = int(max(bank[1].max(), query[1].max())) + 1
        eval_sets = (bank, query, n_classes)
    if master:
        print(f"data: {len(train_images)} training images from "
              f"{', '.join(s if r == 1 else f'{s} x{r}' for s, r in zip(sources, repeats))}; {global_batch} images "
              f"x (2 global + {n_local} local crops) per step on {world_size()} process(es)"
              + (f"; crops made on {device} from {source_px} px squares" if augment_on_device else "")
              + (f"; k-NN monitor on {eval_data}: {len(bank[1])} bank / {len(query[1])} queries" if eval_sets else ""))

    # -------------------------------------------------------------------- model
    torch.manual_seed(seed)  # identical initial weights on every rank
    if init_from:
        backbone = load_init_backbone(init_from, drop_path_rate=drop_path_rate)
    else:
        overrides = dict(patch_size=patch_size, img_size=global_crops_size, n_registers=n_registers,
                         drop_path_rate=drop_path_rate, layerscale_init=layerscale_init)
        backbone = ViT(vit_config(model_size, **overrides, **({"depth": depth} if depth > 0 else {})))
    heads = build_heads(backbone.embed_dim, head_n_prototypes, head_hidden_dim, head_bottleneck_dim, head_nlayers,
                        ibot_separate_head, ibot_head_n_prototypes)
    if init_head_from:
        heads["dino_head"] = load_dino_head(init_head_from, in_dim=backbone.embed_dim)
    student = nn.ModuleDict({"backbone": backbone, **heads}).to(device)
    teacher = make_teacher(student)
    initial_backbone = {k: v.detach().cpu().clone() for k, v in backbone.state_dict().items()}
    centers = {k: torch.zeros(1, head.last_layer.weight_v.shape[0], device=device)  # softmax centering's
               for k, head in (("dino", heads["dino_head"]), ("ibot", heads.get("ibot_head", heads["dino_head"])))}
    parallel = parallel or default_parallel(world_size(), backbone)  # before the optimizer: fsdp replaces parameters
    parallelize(student, teacher, parallel, compile, activation_checkpointing,
                torch.bfloat16 if dtype == "bfloat16" and device_type == "cuda" else torch.float32)
    ckpt_path, best_path = checkpoint_paths(out, sharded=parallel == "fsdp")
    optimizer = torch.optim.AdamW(param_groups(student, layerwise_decay, patch_embed_lr_mult), lr=0.0,
                                  betas=tuple(adamw_betas), foreach=device_type == "cuda")
    schedules = build_schedules(max_iters, lr, min_lr, warmup_iters, weight_decay, weight_decay_end, momentum_teacher,
                                final_momentum_teacher, warmup_teacher_temp, teacher_temp, teacher_temp_warmup_iters,
                                freeze_last_layer_iters, head_warmup_iters)
    model_info = {"vit": asdict(backbone.config), "heads": {k: head_shape(h) for k, h in heads.items()}}
    torch.manual_seed(seed + rank())  # drop-path differs between ranks, as in DINOv2
    guard = {"rollback_drop": rollback_drop, "best_score": -math.inf, "best_step": -1}
    history, start_step = [], 0
    if resume:
        state = load_checkpoint(ckpt_path, student, teacher, optimizer, centers)
        start_step, history = state["step"], state["history"]
        guard.update(best_score=state["guard"]["best_score"], best_step=state["guard"]["best_step"])
        as_saved = json.loads(json.dumps(config))  # tuples become lists, as in the checkpoint
        changed = {k: (state["config"].get(k), v) for k, v in as_saved.items()
                   if k not in ("resume", "log_interval", "num_workers") and state["config"].get(k) != v}
        if master:
            print(f"resumed from {ckpt_path} at step {start_step}"
                  + (f"; config changed since: {changed}" if changed else ""))
    if master:
        c, n_params = backbone.config, sum(p.numel() for p in backbone.parameters())
        print(f"model: ViT D={c.embed_dim} depth={c.depth} patch={c.patch_size} ({n_params / 1e6:.1f}M params), "
              f"DINO head K={centers['dino'].shape[1]}{' + iBOT head' if 'ibot_head' in heads else ''}; lr {lr:.2e} "
              f"(base {base_lr} x sqrt({global_batch}/1024)); head warm-up {head_warmup_iters} it; "
              f"{centering}; device {device} {dtype}; {parallel} x {world_size()}")

    loader = torch.utils.data.DataLoader(
        crops, batch_sampler=StepBatchSampler(len(train_images), batch_size, seed, start_step, max_iters, rank(),
                                              world_size()),
        collate_fn=MaskedCollate(global_crops_size // backbone.patch_size, mask_probability, mask_ratio_min_max),
        num_workers=num_workers, pin_memory=device_type == "cuda", persistent_workers=False,
        generator=torch.Generator().manual_seed(seed),  # else the loader draws its worker seed from the global RNG
        prefetch_factor=4 if num_workers else None)
    loss_kwargs = dict(centering=centering, student_temp=student_temp, center_momentum=center_momentum,
                       dino_loss_weight=dino_loss_weight, ibot_loss_weight=ibot_loss_weight,
                       koleo_loss_weight=koleo_loss_weight, autocast=autocast)

    # -------------------------------------------------------------------- training
    log_path = out / "log.jsonl"
    if master:
        start_run_files(out, start_step)
    last_ckpt_step = start_step if resume else None
    stopped = None
    if eval_sets:  # the drift monitor compares the teacher's features with its features at the start
        drift_images = eval_sets[1][0][:256]
        initial_feats = backbone_features(teacher["backbone"], drift_images, device, autocast)
    t0 = t_last = time.time()
    done_last, step_seconds, first_losses, losses = start_step, None, None, None
    data_iter = iter(loader)
    step = start_step
    while True:
        # evaluation: the teacher's k-NN accuracy (DINO's weighted k-NN) and drift; the guard rail on the score
        is_best = False
        if eval_sets and (step > start_step or step == 0) and (step % eval_every == 0 or step == max_iters):
            (bank, bank_labels), (query, query_labels), n_classes = eval_sets
            bank_feats, query_feats, feats = (backbone_features(teacher["backbone"], x, device, autocast)
                                              for x in (bank, query, drift_images))
            probs = knn_predict(bank_feats, bank_labels, query_feats, n_classes, k=knn_k, temperature=0.07)
            score = same_on_all_ranks(float((probs.argmax(1) == query_labels).float().mean()))
            is_best, stop = guard_rail(guard, step, score)
            stopped = "rollback" if stop else None
            drift = backbone_drift(full_state_dict(teacher["backbone"]), initial_backbone, feats, initial_feats)
            history.append({"step": step, "knn_acc": score, "feature_cos": drift["feature_cos"], "cka": drift["cka"]})
            if master:
                print(f"eval step {step}: k-NN acc {score:.4f} (best {guard['best_score']:.4f} at step "
                      f"{guard['best_step']}) | " + format_drift(drift))
        state = {"step": step, "samples_seen": step * global_batch, "config": config, "model": model_info,
                 "guard": dict(guard), "history": history, "world_size": world_size()}
        if is_best:
            save_checkpoint(best_path, student, teacher, optimizer, centers, state)
        if step > start_step and (step % ckpt_every == 0 or step == max_iters or stopped):
            save_checkpoint(ckpt_path, student, teacher, optimizer, centers, state)
            last_ckpt_step = step
        if step == max_iters or stopped:
            break

        # one training step
        batch = {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in next(data_iter).items()}
        if augment_on_device:  # drawn from (seed, step, rank): a resumed run makes the same crops, ranks differ
            generator = torch.Generator(device).manual_seed(item_seed(seed, step, rank(), 2))
            batch.update(device_augmentation(batch.pop("images"), generator))
        values = {k: float(v[step]) for k, v in schedules.items()}
        finite, losses, monitors = train_step(student, teacher, optimizer, batch, values, centers, clip_grad,
                                              freeze_backbone=step < head_warmup_iters, **loss_kwargs)
        if not finite:
            where = (f"the last good checkpoint is {ckpt_path} (step {last_ckpt_step}), left untouched"
                     if last_ckpt_step is not None else "no checkpoint was written yet")
            terms = ", ".join(f"{k} {v:.4g}" for k, v in as_floats(losses).items())
            raise SystemExit(f"step {step}: the loss is not finite ({terms}); stopping. {where}. Try a lower base_lr, "
                             f"a longer warmup_iters, clip_grad, or dtype='float32'.")
        step += 1
        if master and (step % log_interval == 0 or step == max_iters or step == start_step + 1):
            logged = as_floats({**losses, **monitors})  # every loss term and collapse monitor, by one host sync
            first_losses = first_losses or {k: logged[k] for k in losses}
            recent = (time.time() - t_last) / (step - done_last)  # seconds per step since the last line
            step_seconds = recent if step_seconds is None else 0.5 * step_seconds + 0.5 * recent
            t_last, done_last, speed = time.time(), step, global_batch / max(recent, 1e-9)
            eta = int(step_seconds * (max_iters - step))
            print(f"step {step}/{max_iters} | loss {logged['total']:.4f} | lr {values['lr']:.2e} | {speed:.0f} img/s "
                  f"| ETA {eta // 60}m{eta % 60:02d}s" + (" [heads only]" if step <= head_warmup_iters else ""),
                  flush=True)
            with open(log_path, "a") as f:
                f.write(json.dumps({"step": step, **logged, **values, "img_per_s": speed}) + "\n")

    # -------------------------------------------------------------------- results
    elapsed = time.time() - t0
    export_backbone, export_head = unsharded_backbone(teacher["backbone"]), full_state_dict(teacher["dino_head"])
    if master:
        if stopped == "rollback":
            print(f"GUARD RAIL: k-NN accuracy fell more than {rollback_drop} below its best {guard['best_score']:.4f} "
                  f"(step {guard['best_step']}); stopped. Continue from {best_path} (init_from= and "
                  f"init_head_from= that path) with a lower base_lr or a longer head_warmup_iters.")
        else:  # what downstream scripts load, and the DINO head for the next continual run's init_head_from=
            save_backbone(export_backbone, out / "teacher_backbone.safetensors")
            export_hf(export_backbone, out / "hf")
            save_safetensors_atomic(export_head, out / "dino_head.safetensors")
        results = {"config": config, "steps_done": last_ckpt_step, "seconds": elapsed, "first_losses": first_losses,
                   "last_losses": losses and as_floats(losses), "knn_history": history, "guard": guard, "stopped": stopped}
        save_json_atomic(results, out / "results.json")
        save_training_curves([json.loads(line) for line in open(log_path)], history, out / "curves.png")
        if eval_sets:  # where the teacher's last block looks, per head, on three held-out images
            images = eval_sets[1][0][:3]
            save_attention_rows(images, cls_attention_maps(export_backbone, images.to(device)).cpu(),
                                out / "attention.png")
        print(f"done in {elapsed / 60:.1f} min: loss {first_losses['total'] if first_losses else float('nan'):.4f} "
              f"-> {results['last_losses']['total'] if losses else float('nan'):.4f}; outputs in {out}")
        if history and history[0]["step"] == 0:  # what pretraining bought, on images it never trained on
            first, last = history[0]["knn_acc"], history[-1]["knn_acc"]
            print(f"k-NN accuracy on held-out {eval_data} images: {first:.4f} at step 0 ({init_from or 'random init'}) "
                  f"-> {last:.4f} at step {history[-1]['step']} ({100 * (last - first):+.1f} points)")
    if ddp:
        dist.destroy_process_group()
    if stopped == "rollback":
        raise SystemExit(3)
