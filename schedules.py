"""Learning rates: per-step schedules (warm-up + cosine), DINOv2's schedule arrays, and its per-parameter
multipliers (layer-wise lr decay, no weight decay on norms, biases and LayerScale)."""
import math

import numpy as np


def lr_at(step, total_steps, warmup_steps, base_lr, min_lr=0.0):
    """Linear warm-up from 0 over warmup_steps, then half a cosine down to min_lr."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + 0.5 * (base_lr - min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def cosine_schedule(base_value, final_value, total_iters, warmup_iters=0, start_warmup_value=0.0, frozen_iters=0):
    """DINOv2's CosineScheduler as one array: `frozen_iters` zeros, a linear warm-up from
    start_warmup_value to base_value, then a half cosine from base_value to final_value."""
    frozen_iters = min(frozen_iters, total_iters)
    warmup_iters = min(warmup_iters, total_iters - frozen_iters)
    n = total_iters - frozen_iters - warmup_iters
    cosine = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * np.arange(n) / max(n, 1)))
    return np.concatenate([np.zeros(frozen_iters), np.linspace(start_warmup_value, base_value, warmup_iters), cosine])


def build_schedules(max_iters, lr, min_lr, warmup_iters, weight_decay, weight_decay_end, momentum_teacher,
                    final_momentum_teacher, warmup_teacher_temp, teacher_temp, teacher_temp_warmup_iters,
                    freeze_last_layer_iters, head_warmup_iters):
    """Per-iteration arrays. The heads follow the usual warm-up + cosine from step 0; the backbone's
    lr is zero during the head warm-up and then gets its own warm-up, so unfreezing is gentle."""
    head_lr = cosine_schedule(lr, min_lr, max_iters, warmup_iters)
    last_layer_lr = head_lr.copy()
    last_layer_lr[:freeze_last_layer_iters] = 0.0
    return {
        "lr": head_lr,
        "last_layer_lr": last_layer_lr,
        "backbone_lr": cosine_schedule(lr, min_lr, max_iters, warmup_iters, frozen_iters=head_warmup_iters),
        "wd": cosine_schedule(weight_decay, weight_decay_end, max_iters),
        "momentum": cosine_schedule(momentum_teacher, final_momentum_teacher, max_iters),
        "teacher_temp": cosine_schedule(teacher_temp, teacher_temp, max_iters, teacher_temp_warmup_iters,
                                        start_warmup_value=warmup_teacher_temp),
    }


def backbone_layer_id(name, depth):
    """DINOv2's layer index for layer-wise lr decay: embeddings 0, block i -> i + 1, the rest (final
    norm, registers) depth + 1."""
    if name.startswith(("pos_embed", "patch_embed", "mask_token", "cls_token")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def param_groups(parts, layerwise_decay, patch_embed_lr_mult=1.0):
    """AdamW groups keyed by (schedule, lr multiplier, wd multiplier), as DINOv2's
    get_params_groups_with_decay + fuse_params_groups. `parts` names modules: the one named "backbone"
    (a ViT) gets layer-wise lr decay, block i x layerwise_decay^(depth - i), the embeddings the most
    decayed (backbone_layer_id); every other part is a head, x1. Schedules: "backbone_lr" for the
    backbone, "last_layer_lr" for the heads' prototype layers (frozen at first), "lr" for the other
    head layers. Biases, norms and LayerScale gammas get no weight decay. Frozen parameters are left out."""
    depth = len(parts["backbone"].blocks)
    groups = {}
    for part, module in parts.items():
        for name, p in module.named_parameters():
            if not p.requires_grad:  # the heads' weight_g stays at 1, as in DINOv2
                continue
            lr_mult = 1.0
            if part == "backbone":
                lr_mult = layerwise_decay ** (depth + 1 - backbone_layer_id(name, depth))
                if "patch_embed" in name:
                    lr_mult *= patch_embed_lr_mult
                schedule = "backbone_lr"
            else:
                schedule = "last_layer_lr" if "last_layer" in name else "lr"
            full_name = f"{part}.{name}"  # a head that is one nn.Linear names its bias "bias"
            wd_mult = 0.0 if (full_name.endswith(".bias") or "norm" in name or "gamma" in name) else 1.0
            key = (schedule, lr_mult, wd_mult)
            group = groups.setdefault(key, {"params": [], "names": [], "schedule": schedule,
                                            "lr_multiplier": lr_mult, "wd_multiplier": wd_mult})
            group["params"].append(p)
            group["names"].append(full_name)
    return list(groups.values())
