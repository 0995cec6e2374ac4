"""pretrain.py's two kinds of data parallelism (distributed.py) on 2 gloo processes against 1 process on
the concatenated batch: ddp (bucketed all-reduce overlapped with backward) and fsdp (FSDP2 shards)."""
import json
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
from safetensors.torch import load_file

import model
import pretrain as P
from distributed import full_state_dict, parallelize
from schedules import build_schedules, param_groups
from conftest import REPO, TINY_RUN, cpu_env, run_tiny_pretrain
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
        _, losses, _ = P.train_step(student, teacher, optimizer, batch, values, centers, 0.0,
                                    freeze_backbone=step < freeze_steps)
        history.append(P.as_floats(losses))
    return history, first_grads, full_state_dict(student), full_state_dict(teacher)


def full(t):
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def parallel_worker(r, world, tmp, parallel, freeze_steps, activation_checkpointing="none", n_steps=3):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=r, world_size=world)
    try:
        losses, grads, student, teacher = run_parallel_steps([rank_slice(b, r, world) for b in tiny_batches(n_steps)],
                                                             parallel, freeze_steps, activation_checkpointing)
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


def test_fsdp_with_selective_checkpointing_matches_fsdp_without(tmp_path):
    """The recomputation in backward must stay clear of FSDP's own ops (it once failed on them)."""
    for checkpointing in ("none", "selective"):
        (tmp_path / checkpointing).mkdir()
        mp.spawn(parallel_worker, args=(2, str(tmp_path / checkpointing), "fsdp", 0, checkpointing, 2), nprocs=2,
                 join=True)
    for r in range(2):
        ours, theirs = (json.loads((tmp_path / c / f"rank{r}.json").read_text()) for c in ("none", "selective"))
        assert len(theirs) == 2 and theirs == [pytest.approx(step, rel=1e-5, abs=1e-6) for step in ours]
        saved = [load_file(str(tmp_path / c / f"rank{r}.safetensors")) for c in ("none", "selective")]
        assert_close_weights(*saved, f"rank {r}")


# ----------------------------------------------------------------------------------------------
# pretrain.py itself under torchrun with parallel=fsdp: sharded checkpoints, resume, consolidated exports
# ----------------------------------------------------------------------------------------------

# without drop-path and iBOT masks (both drawn per rank), 2 processes see exactly what 1 process sees
SAME_ON_1_OR_2 = TINY_RUN + ["--drop_path_rate=0", "--mask_probability=0", "--max_iters=8", "--ckpt_every=1"]


def torchrun_fsdp(args, out_dir):
    """pretrain.py on 2 gloo processes, parallel=fsdp, the tiny run's global batch (4 + 4 images)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "pretrain.py",
               *SAME_ON_1_OR_2, "--batch_size=4", "--parallel=fsdp", f"--out_dir={out_dir}", *args]
    return subprocess.Popen(command, cwd=REPO, env=cpu_env(OMP_NUM_THREADS="1", PYTHONHASHSEED="0"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finished(proc):
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return out


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("fsdp") / "run"
    finished(torchrun_fsdp([], out_dir))
    return out_dir


def sharded_step(out_dir):
    try:
        return json.loads((out_dir / "ckpt.dcp" / "state.json").read_text())["step"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return -1


def descendants(pid):
    """The processes a process started, and theirs (torchrun gives its workers sessions of their own)."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [d for c in children for d in (int(c), *descendants(int(c)))]


def test_fsdp_run_killed_mid_run_resumes_to_the_uninterrupted_runs_weights(tmp_path, fsdp_run):
    killed_dir = tmp_path / "killed"
    proc = torchrun_fsdp([], killed_dir)
    deadline = time.time() + 240
    while sharded_step(killed_dir) < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    for pid in [*descendants(proc.pid), proc.pid]:  # both workers and torchrun, no clean-up
        os.kill(pid, signal.SIGKILL)
    proc.communicate()
    killed_at = sharded_step(killed_dir)
    assert 3 <= killed_at < 8, f"the run was not killed in time (checkpoint at step {killed_at})"
    resumed = finished(torchrun_fsdp(["--resume=True"], killed_dir))
    assert f"resumed from {killed_dir / 'ckpt.dcp'} at step {killed_at}" in resumed
    full, again = (model.read_sharded_checkpoint(d / "ckpt.dcp") for d in (fsdp_run, killed_dir))
    weights = [k for k in full if k.startswith(("student.", "teacher.", "optim.", "center."))]
    assert any(k.startswith("optim.backbone.") for k in weights) and set(weights) <= set(again)
    for k in weights:
        assert torch.equal(full[k], again[k]), f"{k} differs after resume"


def test_fsdp_exports_equal_the_one_process_runs(tmp_path, fsdp_run):
    one = run_tiny_pretrain(SAME_ON_1_OR_2[len(TINY_RUN):] + [f"--out_dir={tmp_path}"])
    assert one.returncode == 0, one.stderr[-3000:]
    for name in ("teacher_backbone.safetensors", "dino_head.safetensors", "hf/model.safetensors"):
        ours, theirs = load_file(str(tmp_path / name)), load_file(str(fsdp_run / name))
        assert set(ours) == set(theirs), name
        for k, v in ours.items():  # fp32; sharded gradient norms round differently
            torch.testing.assert_close(theirs[k], v, atol=1e-5, rtol=1e-5, msg=f"{name} {k}")


def test_init_from_and_init_head_from_read_an_fsdp_checkpoint_folder(fsdp_run):
    """The guard rail of an fsdp run points at best.dcp for init_from= and init_head_from=: one process
    reads the folder's teacher backbone and DINO head, the weights the run exported at its last step."""
    from checkpoint import load_init_backbone
    backbone = load_init_backbone(fsdp_run / "ckpt.dcp").state_dict()
    head = model.load_dino_head(fsdp_run / "ckpt.dcp").state_dict()
    exported = model.load_backbone(fsdp_run / "teacher_backbone.safetensors", verbose=False).state_dict()
    exported_head = load_file(str(fsdp_run / "dino_head.safetensors"))
    assert backbone.keys() == exported.keys() and head.keys() == exported_head.keys()
    assert all(torch.equal(backbone[k], exported[k]) for k in exported)
    assert all(torch.equal(head[k], exported_head[k]) for k in exported_head)


def test_an_unsharded_checkpoint_under_fsdp_names_the_mode_to_resume_it_with(tmp_path):
    one = run_tiny_pretrain(["--max_iters=2", f"--out_dir={tmp_path}"])
    assert one.returncode == 0, one.stderr[-3000:]
    proc = torchrun_fsdp(["--resume=True"], tmp_path)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert any(line.startswith("error: resume: ") and line.endswith("resume with --parallel=ddp")
               for line in err.splitlines()), err[-3000:]
