"""schedules.py: the per-step lr schedule of the fine-tuning stages and DINOv2's schedule arrays."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from model import DINOHead, ViT, vit_config
from schedules import cosine_schedule, lr_at, param_groups


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


def test_param_groups_apply_layerwise_decay_patch_embed_multiplier_and_no_decay_on_norms():
    backbone = ViT(vit_config("tiny", depth=3, patch_size=8, img_size=32))
    student = nn.ModuleDict({"backbone": backbone, "dino_head": DINOHead(192, 16, 32, 8)})
    groups = param_groups(student, layerwise_decay=0.5, patch_embed_lr_mult=0.2)
    by_name = {n: g for g in groups for n in g["names"]}
    assert by_name["backbone.blocks.2.attn.qkv.weight"]["lr_multiplier"] == 0.5  # 0.5 ** (3 + 1 - 3)
    assert by_name["backbone.blocks.0.attn.qkv.weight"]["lr_multiplier"] == 0.125
    assert by_name["backbone.pos_embed"]["lr_multiplier"] == 0.5 ** 4
    assert by_name["backbone.patch_embed.proj.weight"]["lr_multiplier"] == pytest.approx(0.2 * 0.5 ** 4)
    assert by_name["backbone.norm.weight"]["lr_multiplier"] == 1.0
    assert by_name["backbone.blocks.1.norm1.weight"]["wd_multiplier"] == 0.0
    assert by_name["backbone.blocks.1.ls1.gamma"]["wd_multiplier"] == 0.0
    assert by_name["backbone.blocks.1.mlp.fc1.bias"]["wd_multiplier"] == 0.0
    assert by_name["backbone.blocks.1.mlp.fc1.weight"]["wd_multiplier"] == 1.0
    assert by_name["dino_head.last_layer.weight_v"]["schedule"] == "last_layer_lr"
    assert by_name["dino_head.mlp.0.weight"]["schedule"] == "lr"
    assert "dino_head.last_layer.weight_g" not in by_name
