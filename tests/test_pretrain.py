"""pretrain.py: DINOv2 losses against the reference tensors, data parallelism, exact resume, atomic
checkpoints, NaN stop, a short run that learns, and the continual-pretraining safeguards."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from safetensors.torch import load_file

import model
import pretrain as P
from data import MaskingGenerator
from model import DINOHead, ViT, vit_config

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------
# Losses vs ../shared/oracles/dinov2_losses.safetensors (made by facebookresearch/dinov2's loss code)
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def loss_oracle(oracles_dir):
    return load_file(str(oracles_dir / "dinov2_losses.safetensors"))


def dinov2_sinkhorn_float64(teacher_logits, temp, n_samples, n_iterations=3):
    """dinov2's sinkhorn_knopp_teacher line for line, in float64 (exp(t / 0.04) overflows float32
    on the oracle's logits, which is why the oracle's own Sinkhorn targets are NaN)."""
    Q = torch.exp(teacher_logits.double() / temp).t()
    K = Q.shape[0]
    Q /= Q.sum()
    for _ in range(n_iterations):
        Q /= Q.sum(dim=1, keepdim=True)
        Q /= K
        Q /= Q.sum(dim=0, keepdim=True)
        Q /= n_samples
    return (Q * n_samples).t()


def test_koleo_loss_matches_dinov2_oracle(loss_oracle):
    ours = P.koleo_loss(loss_oracle["koleo.x"])
    torch.testing.assert_close(ours, loss_oracle["koleo.loss"], atol=1e-6, rtol=1e-6)


def test_softmax_centering_targets_and_center_match_dinov2_oracle_over_three_steps(loss_oracle):
    t = loss_oracle["dino.teacher_logits"]
    center = torch.zeros(1, t.shape[1])
    for s in range(3):  # the oracle feeds teacher_logits + s at step s
        probs = P.teacher_targets(t + s, 0.04, "centering", center, n_total=t.shape[0], momentum=0.9)
        torch.testing.assert_close(probs, loss_oracle["dino.softmax_center_step_probs"][s], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(center, loss_oracle["dino.center_after_3_steps"], atol=1e-6, rtol=1e-5)


def oracle_or_float64(loss_oracle, key, float64_value):
    """The oracle's value where it is finite; where dinov2 itself overflowed (NaN), the same
    computation in float64 stands in for it."""
    value = loss_oracle[key]
    return value.double() if torch.isfinite(value).all() else float64_value


def test_sinkhorn_targets_match_dinov2(loss_oracle):
    t = loss_oracle["dino.teacher_logits"]
    ours = P.teacher_targets(t, 0.04, "sinkhorn_knopp", None, n_total=t.shape[0])
    expected = oracle_or_float64(loss_oracle, "dino.sinkhorn_teacher_probs", dinov2_sinkhorn_float64(t, 0.04, t.shape[0]))
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours.double(), expected, atol=1e-6, rtol=1e-4)


def test_dino_global_and_local_losses_match_dinov2(loss_oracle):
    t = loss_oracle["dino.teacher_logits"]
    B = t.shape[0] // 2
    targets = P.teacher_targets(t, 0.04, "sinkhorn_knopp", None, n_total=2 * B)
    n_local = loss_oracle["dino.student_local"].shape[0] // B
    local = P.dino_loss(loss_oracle["dino.student_local"].chunk(n_local), targets.chunk(2))
    # the global term pairs each student crop with the teacher's *other* crop (ssl_meta_arch swaps chunks)
    swapped = torch.cat([targets[B:], targets[:B]])
    global_ = P.dino_loss([loss_oracle["dino.student_global"]], [swapped])

    t64 = dinov2_sinkhorn_float64(t, 0.04, 2 * B)
    lsm = lambda s: torch.log_softmax(s.double() / 0.1, dim=-1)
    local64 = -sum((tc * lsm(s)).sum(-1).mean() for s in loss_oracle["dino.student_local"].chunk(n_local)
                   for tc in t64.chunk(2))
    global64 = -(torch.cat([t64[B:], t64[:B]]) * lsm(loss_oracle["dino.student_global"])).sum(-1).mean()
    torch.testing.assert_close(local.double(), oracle_or_float64(loss_oracle, "dino.loss_local_sum", local64),
                               atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(global_.double(), oracle_or_float64(loss_oracle, "dino.loss_global", global64),
                               atol=1e-4, rtol=1e-5)


def test_ibot_loss_matches_dinov2_with_global_masked_count(loss_oracle):
    masks, t = loss_oracle["ibot.masks"], loss_oracle["ibot.teacher_logits"]
    n_masked = int(masks.sum())
    assert t.shape[0] == n_masked
    targets = P.teacher_targets(t, 0.04, "sinkhorn_knopp", None, n_total=n_masked)
    ours = P.ibot_loss(loss_oracle["ibot.student_logits"], targets, masks)
    t64 = dinov2_sinkhorn_float64(t, 0.04, n_masked)
    per_patch = (t64 * torch.log_softmax(loss_oracle["ibot.student_logits"].double() / 0.1, -1)).sum(-1)
    weights = (1 / masks.sum(-1).clamp(min=1).double()).unsqueeze(-1).expand_as(masks)[masks]  # dinov2 collate
    expected = oracle_or_float64(loss_oracle, "ibot.loss", -(per_patch * weights).sum() / masks.shape[0])
    torch.testing.assert_close(ours.double(), expected, atol=1e-5, rtol=1e-5)


def test_ibot_loss_weights_each_masked_crop_once_on_a_hand_case():
    # crop 0: one masked patch with cross-entropy a; crop 1: three with cross-entropy b; crop 2: none
    masks = torch.tensor([[True, False, False], [True, True, True], [False, False, False]])
    student = torch.zeros(4, 2)
    teacher = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.0, 1.0]])
    student[0] = torch.tensor([0.3, 0.0])
    student[1:] = torch.tensor([0.0, -0.2])
    a = -torch.log_softmax(student[0] / 0.1, -1)[0]
    b = -torch.log_softmax(student[1] / 0.1, -1)[1]
    torch.testing.assert_close(P.ibot_loss(student, teacher, masks), (a + b) / 3)


def test_init_head_from_reproduces_the_published_dinov2_head(oracles_dir, tmp_path):
    ref = load_file(str(oracles_dir / "dinov2_head.safetensors"))
    published = tmp_path / "dino_head.safetensors"  # as RAD-DINO publishes it: mlp.N.*, last_layer.weight_g / _v
    model.save_safetensors_atomic({k[len("weights."):]: v for k, v in ref.items() if k.startswith("weights.")}, published)
    head = model.load_dino_head(published, verbose=False)
    torch.testing.assert_close(head(ref["input.x"]), ref["out.logits"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(head.last_layer.weight_g, ref["weights.last_layer.weight_g"])  # g kept, not reset to 1
    assert not head.last_layer.weight_g.requires_grad  # and frozen, as DINOv2 trains it
    assert P.head_shape(head) == dict(in_dim=192, out_dim=1000, hidden_dim=256, bottleneck_dim=64, nlayers=3)


# ----------------------------------------------------------------------------------------------
# Schedules and parameter groups
# ----------------------------------------------------------------------------------------------

def test_cosine_schedule_is_dinov2s_warmup_then_half_cosine():
    s = P.cosine_schedule(1.0, 0.1, 20, warmup_iters=5, start_warmup_value=0.0, frozen_iters=3)
    assert len(s) == 20
    assert (s[:3] == 0).all()
    torch.testing.assert_close(torch.tensor(s[3:8]), torch.linspace(0, 1, 5, dtype=torch.float64))
    assert s[8] == 1.0 and abs(s[-1] - (0.1 + 0.45 * (1 + math.cos(math.pi * 11 / 12)))) < 1e-12
    assert all(a >= b for a, b in zip(s[8:], s[9:]))


def test_param_groups_apply_layerwise_decay_patch_embed_multiplier_and_no_decay_on_norms():
    backbone = ViT(vit_config("tiny", depth=3, patch_size=8, img_size=32))
    student = nn.ModuleDict({"backbone": backbone, "dino_head": DINOHead(192, 16, 32, 8)})
    groups = P.param_groups(student, layerwise_decay=0.5, patch_embed_lr_mult=0.2)
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


# ----------------------------------------------------------------------------------------------
# Training steps on explicit batches (tiny model)
# ----------------------------------------------------------------------------------------------

# LayerScale 1e-5 would make every CLS token nearly identical at init, leaving KoLeo's nearest
# neighbours to rounding noise; 0.5 keeps the images apart
TINY_VIT = dict(embed_dim=64, num_heads=2, depth=2, patch_size=8, img_size=32, drop_path_rate=0.0, layerscale_init=0.5)
B_TOTAL, N_LOCAL, K = 8, 2, 128


def tiny_student(seed=0, separate_ibot=False):
    torch.manual_seed(seed)
    backbone = ViT(vit_config("tiny", **TINY_VIT))
    heads = P.build_heads(64, K, 64, 32, 3, separate_ibot, K)
    return nn.ModuleDict({"backbone": backbone, **heads})


def tiny_batches(n_steps, seed=0):
    """Full-size batches in collate_dino_batch's layout (crop-major), half of the global crops masked."""
    g = torch.Generator().manual_seed(seed)
    masker = MaskingGenerator(4, 4)
    batches = []
    for _ in range(n_steps):
        masks = torch.stack([masker(int(torch.randint(2, 8, (), generator=g)), g) if i % 2 else masker(0, g)
                             for i in range(2 * B_TOTAL)]).flatten(1)
        batches.append({"global_crops": torch.randn(2 * B_TOTAL, 3, 32, 32, generator=g),
                        "local_crops": torch.randn(N_LOCAL * B_TOTAL, 3, 16, 16, generator=g), "masks": masks})
    return batches


def rank_slice(batch, r, world):
    """Rank r's share of a crop-major batch: its images' rows within every crop."""
    B = B_TOTAL // world
    rows = lambda n_crops: torch.cat([torch.arange(c * B_TOTAL + r * B, c * B_TOTAL + (r + 1) * B) for c in range(n_crops)])
    return {"global_crops": batch["global_crops"][rows(2)], "local_crops": batch["local_crops"][rows(N_LOCAL)],
            "masks": batch["masks"][rows(2)]}


def run_tiny_steps(batches, centering="sinkhorn_knopp", freeze_steps=0, separate_ibot=False, lr=1e-3):
    """A few train_step calls; returns (per-step losses, student, teacher)."""
    student = tiny_student(separate_ibot=separate_ibot)
    teacher = P.make_teacher(student)
    optimizer = P.build_optimizer(student, 0.9, 0.2, (0.9, 0.999), use_foreach=False)
    schedules = P.build_schedules(len(batches), lr, 1e-6, 1, 0.04, 0.4, 0.99, 1.0, 0.04, 0.07, 2, 1, freeze_steps)
    centers = {"dino": torch.zeros(1, K), "ibot": torch.zeros(1, K)}
    history = []
    for step, batch in enumerate(batches):
        values = {k: float(v[step]) for k, v in schedules.items()}
        losses, _ = P.train_step(student, teacher, optimizer, batch, values, centers, 3.0,
                                 freeze_backbone=step < freeze_steps, centering=centering)
        history.append(losses)
    return history, student, teacher


CENTERINGS = ("sinkhorn_knopp", "centering")


def ddp_worker(r, world, store_dir, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_dir}/store", rank=r, world_size=world)
    try:
        for centering in CENTERINGS:
            batches = [rank_slice(b, r, world) for b in tiny_batches(3)]
            losses, student, teacher = run_tiny_steps(batches, centering)
            tensors = {f"student.{k}": v for k, v in student.state_dict().items()}
            tensors.update({f"teacher.{k}": v for k, v in teacher.state_dict().items()})
            model.save_safetensors_atomic(tensors, f"{out_dir}/{centering}_rank{r}.safetensors")
            Path(f"{out_dir}/{centering}_rank{r}.json").write_text(json.dumps(losses))
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_match_one_process_on_the_concatenated_batch(tmp_path):
    mp.spawn(ddp_worker, args=(2, str(tmp_path), str(tmp_path)), nprocs=2, join=True)
    torch.set_num_threads(1)
    for centering in CENTERINGS:
        losses, student, teacher = run_tiny_steps(tiny_batches(3), centering)
        for r in range(2):
            ranked = json.loads((tmp_path / f"{centering}_rank{r}.json").read_text())
            for ours, theirs in zip(losses, ranked):
                assert set(ours) == set(theirs)
                for k in ours:
                    assert theirs[k] == pytest.approx(ours[k], rel=1e-5, abs=1e-6), (centering, k, ours[k], theirs[k])
            state = load_file(str(tmp_path / f"{centering}_rank{r}.safetensors"))
            for prefix, net in (("student", student), ("teacher", teacher)):
                for k, v in net.state_dict().items():
                    theirs = state[f"{prefix}.{k}"]
                    if k.endswith("attn.qkv.bias"):
                        # the key bias has an exactly zero gradient (softmax ignores a shift shared by all
                        # keys): only rounding noise, which Adam scales up to lr-sized steps
                        D = v.shape[0] // 3
                        assert (theirs[D:2 * D] - v[D:2 * D]).abs().max() <= 2 * 1e-3 * 3
                        theirs, v = torch.cat([theirs[:D], theirs[2 * D:]]), torch.cat([v[:D], v[2 * D:]])
                    torch.testing.assert_close(theirs, v, atol=1e-6, rtol=1e-5, msg=f"{centering} {prefix}.{k}")
