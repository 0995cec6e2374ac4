"""pretrain.py's two kinds of data parallelism (distributed.py) on 2 gloo processes against 1 process on
the concatenated batch: ddp (bucketed all-reduce overlapped with backward) and fsdp (FSDP2 shards)."""
import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

import model
import pretrain as P
from distributed import full_state_dict, parallelize
from schedules import build_schedules, param_groups
from test_pretrain import K, rank_slice, tiny_batches, tiny_student


def run_parallel_steps(batches, parallel="ddp", freeze_steps=0, activation_checkpointing="none"):
    """run_tiny_steps of test_pretrain with the networks prepared by `parallelize`; returns (per-step
    losses, the student's gradients after the first step, student state, teacher state), states gathered."""
    student = tiny_student()
    teacher = P.make_teacher(student)
    parallelize(student, teacher, parallel, activation_checkpointing=activation_checkpointing)
    optimizer = torch.optim.AdamW(param_groups(student, 0.9, 0.2), lr=0.0, betas=(0.9, 0.999), foreach=False)
    schedules = build_schedules(len(batches), 1e-3, 1e-6, 1, 0.04, 0.4, 0.99, 1.0, 0.04, 0.07, 2, 1, freeze_steps)
    centers = {"dino": torch.zeros(1, K), "ibot": torch.zeros(1, K)}
    history, first_grads = [], None
    original_step = optimizer.step

    def step_recording_gradients():  # what the optimizer sees: the reduced gradients, before clipping
        nonlocal first_grads
        if first_grads is None:
            first_grads = {k: full(p.grad) for k, p in student.named_parameters() if p.grad is not None}
        return original_step()
    optimizer.step = step_recording_gradients
    for step, batch in enumerate(batches):
        values = {k: float(v[step]) for k, v in schedules.items()}
        losses, _ = P.train_step(student, teacher, optimizer, batch, values, centers, 0.0,
                                 freeze_backbone=step < freeze_steps)
        history.append(losses)
    return history, first_grads, full_state_dict(student), full_state_dict(teacher)


def full(t):
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def parallel_worker(r, world, tmp, parallel, freeze_steps):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=r, world_size=world)
    try:
        losses, grads, student, teacher = run_parallel_steps([rank_slice(b, r, world) for b in tiny_batches(3)],
                                                             parallel, freeze_steps)
        tensors = {**{f"grad.{k}": v for k, v in grads.items()}, **{f"student.{k}": v for k, v in student.items()},
                   **{f"teacher.{k}": v for k, v in teacher.items()}}
        model.save_safetensors_atomic(tensors, f"{tmp}/rank{r}.safetensors")
        Path(f"{tmp}/rank{r}.json").write_text(json.dumps(losses))
    finally:
        dist.destroy_process_group()


def assert_close_weights(theirs, ours, what):
    """fp32, 1e-5. The key bias has an exactly zero gradient in theory (softmax ignores a shift shared by all
    keys); its rounding noise, which Adam scales up to lr-sized steps, is compared at that scale."""
    assert set(theirs) == set(ours), what
    for k, v in ours.items():
        t = theirs[k]
        if k.endswith("attn.qkv.bias"):
            D = v.shape[0] // 3
            assert (t[D:2 * D] - v[D:2 * D]).abs().max() <= 2 * 1e-3 * 3, f"{what} {k}"
            t, v = torch.cat([t[:D], t[2 * D:]]), torch.cat([v[:D], v[2 * D:]])
        torch.testing.assert_close(t, v, atol=1e-6, rtol=1e-5, msg=f"{what} {k}")


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_match_one_process_on_the_concatenated_batch(tmp_path, parallel):
    mp.spawn(parallel_worker, args=(2, str(tmp_path), parallel, 0), nprocs=2, join=True)
    torch.set_num_threads(1)
    losses, grads, student, teacher = run_parallel_steps(tiny_batches(3))
    for r in range(2):
        for ours, theirs in zip(losses, json.loads((tmp_path / f"rank{r}.json").read_text())):
            assert theirs == pytest.approx(ours, rel=1e-5, abs=1e-6)
        saved = load_file(str(tmp_path / f"rank{r}.safetensors"))
        part = lambda prefix: {k[len(prefix):]: v for k, v in saved.items() if k.startswith(prefix)}
        assert "backbone.blocks.0.attn.qkv.weight" in grads and "dino_head.last_layer.weight_v" in grads
        for k, v in grads.items():  # the key bias's gradient: zero in theory, rounding noise in practice
            torch.testing.assert_close(part("grad.")[k], v, atol=1e-6, rtol=1e-4, msg=f"{parallel} rank {r} grad {k}")
        assert_close_weights(part("student."), student, f"{parallel} rank {r} student")
        assert_close_weights(part("teacher."), teacher, f"{parallel} rank {r} teacher")


def test_head_warmup_under_fsdp_keeps_both_backbones_bit_identical(tmp_path):
    mp.spawn(parallel_worker, args=(2, str(tmp_path), "fsdp", 3), nprocs=2, join=True)
    initial = tiny_student().state_dict()
    for r in range(2):
        saved = load_file(str(tmp_path / f"rank{r}.safetensors"))
        assert not any(k.startswith("grad.backbone.") for k in saved), "the frozen backbone got gradients"
        for prefix in ("student.", "teacher."):
            for k, v in initial.items():
                if k.endswith("weight_g"):  # fixed at 1, as in DINOv2
                    continue
                moved = not torch.equal(saved[prefix + k], v)
                assert moved != k.startswith("backbone."), f"rank {r} {prefix}{k} {'moved' if moved else 'stayed'}"
