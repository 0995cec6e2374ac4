"""schedules.py: the per-step lr schedule of the fine-tuning stages and DINOv2's schedule arrays."""
import math

import numpy as np
import pytest
import torch

from schedules import cosine_schedule, lr_at


def test_lr_warms_up_linearly_then_decays_by_cosine_to_min_lr():
    lrs = [lr_at(s, 100, 10, 1.0, 0.1) for s in range(100)]
    np.testing.assert_allclose(lrs[:10], np.arange(1, 11) / 10)
    assert lrs[10] == pytest.approx(1.0) and lrs[55] == pytest.approx(0.55)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lr_at(100, 100, 10, 1.0, 0.1) == pytest.approx(0.1)


def test_cosine_schedule_is_dinov2s_warmup_then_half_cosine():
    s = cosine_schedule(1.0, 0.1, 20, warmup_iters=5, start_warmup_value=0.0, frozen_iters=3)
    assert len(s) == 20
    assert (s[:3] == 0).all()
    torch.testing.assert_close(torch.tensor(s[3:8]), torch.linspace(0, 1, 5, dtype=torch.float64))
    assert s[8] == 1.0 and abs(s[-1] - (0.1 + 0.45 * (1 + math.cos(math.pi * 11 / 12)))) < 1e-12
    assert all(a >= b for a, b in zip(s[8:], s[9:]))
