"""Learning-rate and other per-step training schedules."""
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
