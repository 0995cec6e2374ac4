"""Images per second of one full pretraining step (teacher forward, student forward + backward,
gradient clipping, AdamW, teacher EMA) for the OmniRad recipe (2 global crops) and the RAD-DINO /
DINOv2 recipe (2 global + 8 local crops), and the model FLOP utilisation on a GPU. On a GPU it compares
nanorad's Triton kernels (attention, Sinkhorn-Knopp, EMA) with the PyTorch references
(NANORAD_KERNELS=ref), both under bf16 autocast; on a CPU, fp32 with bf16 autocast (`dtype`), which
pays on CPUs with native bf16 matmuls (AMX / AVX512-BF16). `speedup` is against the first row of each
model and recipe: the references on a GPU, fp32 on a CPU.

    python bench/pretrain.py                 # GPU: ViT-S/14 and ViT-B/14 at 224 (local crops 98 px), K = 65536
    python bench/pretrain.py --smoke=True    # CPU: ViT-tiny/8 at 64 px, small heads
    python bench/pretrain.py --compile=True  # adds a row with torch.compile'd backbones (compiled in the warm-up)
    python bench/pretrain.py --parallel_rows=True  # ddp / fsdp x compile x activation checkpointing, several processes

`--parallel_rows=True` spawns `nproc` processes (one per GPU with NCCL; on a CPU 2 with gloo) that time
pretrain.py's step as `parallelize` prepares it, for the multi-crop recipe: ddp and fsdp, each with
activation_checkpointing none / selective / full, each with and without compile (GPU only: on a CPU the
compile rows are skipped), beside a reference row -- the unprepared step (one blocking gradient all-reduce
after backward) with fused AdamW and a foreach EMA (torch._foreach_mul_ / _foreach_add_). The rows are
interleaved, `repeats` rounds of `timed_steps` steps each, so a machine that speeds up or slows down
meanwhile moves every row alike; each row prints its median step time and its spread (min - max over rounds).

Batches are synthetic tensors already on the device: this times the model step, not the data loader.
FLOPs are counted analytically (2 per multiply-add: patch embedding, attention projections and
scores, MLP, heads; student x3 for its backward, teacher x1) at the device's dense bf16 peak.
"""
import json
import os
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from unittest import mock

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere: `python bench/pretrain.py`
import pretrain as P  # noqa: E402  (the step it times is pretrain.py's own, as tests/test_pretrain.py tests it)
from data import MaskingGenerator, masked_patch_indices  # noqa: E402
from distributed import ACTIVATION_CHECKPOINTING, PARALLEL_MODES, parallelize  # noqa: E402
from model import ViT, vit_config  # noqa: E402
from schedules import param_groups  # noqa: E402

# config ----------------------------------------------------------------------------------------
smoke = False
sizes = ("small", "base")
patch_size = 14
global_crops_size = 224
local_crops_size = 98
n_local_crops = 8
batch_size = 64            # images per step (each gives 2 global + n local crops)
depth = 0                  # transformer blocks (0 = the size's own)
head_n_prototypes = 65536
head_hidden_dim = 2048
head_bottleneck_dim = 256
warmup_steps = 3
timed_steps = 10
compile = False            # also time the last variant (GPU: Triton, CPU: bf16) as pretrain.py --compile=True runs it
parallel_rows = False      # time ddp / fsdp x compile x activation checkpointing on nproc processes instead
nproc = 0                  # parallel_rows: processes (0 = one per GPU, 2 on a CPU)
repeats = 5                # parallel_rows: rounds over the interleaved rows
dry_run = False            # print what one GPU holds for each size under ddp / fsdp (no device needed) and stop
world = 8                  # dry_run: GPUs
gpu_gb = 80                # dry_run: memory per GPU
out_json = "out/bench_pretrain.json"
from config import configure  # noqa: E402
config = configure(globals())
# -----------------------------------------------------------------------------------------------
if smoke:
    sizes, patch_size, global_crops_size, local_crops_size, batch_size = ("tiny",), 8, 64, 32, 16
    head_n_prototypes, head_hidden_dim, head_bottleneck_dim, timed_steps, warmup_steps = 1024, 512, 128, 3, 1
if smoke and parallel_rows:  # 7 rows on 2 processes sharing 2 CPU cores: every path runs, in well under 2 min
    global_crops_size, local_crops_size, n_local_crops, batch_size, depth = 32, 16, 2, 4, 2
    head_n_prototypes, head_hidden_dim, head_bottleneck_dim, timed_steps, repeats = 256, 64, 32, 2, 2

PEAK_BF16 = {"H100 80GB HBM3": 989e12, "H100 PCIe": 756e12, "H100 NVL": 835e12, "H200": 989e12, "A100": 312e12}


def blocks_note():
    """For the table's header: a `depth` that overrides the named sizes' own."""
    return f", {depth} blocks" if depth else ""


def vit_forward_flops(cfg, img_px, n_images):
    """Matmul FLOPs of one ViT forward on n_images square crops."""
    n = 1 + cfg.n_registers + (img_px // cfg.patch_size) ** 2
    D, hidden = cfg.embed_dim, int(cfg.embed_dim * cfg.mlp_ratio)
    per_block = 2 * n * D * 3 * D + 2 * n * D * D + 2 * 2 * n * D * hidden + 2 * 2 * n * n * D
    patch_embed = 2 * (n - 1) * cfg.in_chans * cfg.patch_size ** 2 * D
    return n_images * (cfg.depth * per_block + patch_embed)


def head_flops(D, n_tokens):
    per_token = 2 * (D * head_hidden_dim + head_hidden_dim ** 2 + head_hidden_dim * head_bottleneck_dim
                     + head_bottleneck_dim * head_n_prototypes)
    return n_tokens * per_token


def step_flops(cfg, n_local, n_masked):
    B = batch_size
    student = vit_forward_flops(cfg, global_crops_size, 2 * B) + vit_forward_flops(cfg, local_crops_size, n_local * B)
    student += head_flops(cfg.embed_dim, 2 * B + n_local * B + n_masked)
    teacher = vit_forward_flops(cfg, global_crops_size, 2 * B) + head_flops(cfg.embed_dim, 2 * B + n_masked)
    return 3 * student + teacher


def head_params(D, separate_ibot):
    one = (D * head_hidden_dim + head_hidden_dim ** 2 + head_hidden_dim * head_bottleneck_dim
           + head_bottleneck_dim * head_n_prototypes)
    return one * (2 if separate_ibot else 1)


def saved_elements_per_token(cfg, checkpointing):
    """Activations one student block keeps for backward, per token, in elements (bf16: 2 bytes each).
    none: LayerNorm inputs and outputs, qkv, the attention output, the projections, the MLP's inner
    activations (fused attention keeps no T x T scores); selective: only matmul and attention outputs;
    full: the block input alone (one block's worth is recomputed at a time)."""
    D = cfg.embed_dim
    hidden = int(D * cfg.mlp_ratio)
    if cfg.ffn == "swiglu":
        hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
        mlp, mlp_matmuls = 4 * hidden, 2 * hidden  # w12 output (x1, x2), silu(x1), the product
    else:
        mlp, mlp_matmuls = 2 * hidden, hidden      # fc1 output, GELU output
    return {"none": 11 * D + mlp, "selective": 7 * D + mlp_matmuls, "full": D}[checkpointing]


def training_memory_gb(size, parallel, checkpointing, separate_ibot=True, mask_fraction=0.15):
    """Estimated GB one GPU holds while training with a per-GPU batch of batch_size images (2 global +
    n_local_crops local crops each) on `world` GPUs: fp32 weights, gradients, AdamW's two moments and the
    EMA teacher (each sharded 1/world under fsdp), the student's saved activations (bf16) and its head
    logits (fp32, with their softmax and gradient), and under ddp autocast's bf16 weight copies."""
    cfg = vit_config(size, patch_size=patch_size, img_size=global_crops_size)
    n_params = sum(p.numel() for p in ViT(cfg).parameters()) + head_params(cfg.embed_dim, separate_ibot)
    shard = world if parallel == "fsdp" else 1
    tokens = lambda px: 1 + cfg.n_registers + (px // patch_size) ** 2
    student_tokens = batch_size * (2 * tokens(global_crops_size) + n_local_crops * tokens(local_crops_size))
    per_block = saved_elements_per_token(cfg, checkpointing)
    recomputed = saved_elements_per_token(cfg, "none") if checkpointing != "none" else 0  # one block at a time
    head_rows = batch_size * (2 + n_local_crops) + mask_fraction * 2 * batch_size * (tokens(global_crops_size) - 1)
    GB = 1e9
    return {"params": 4 * n_params / shard / GB, "grads": 4 * n_params / shard / GB,
            "adamw": 8 * n_params / shard / GB, "teacher": 4 * n_params / shard / GB,
            "activations": (2 * student_tokens * (cfg.depth * per_block + recomputed)
                            + 3 * 4 * head_rows * head_n_prototypes
                            + (2 * n_params if parallel == "ddp" else 0)) / GB}


def print_memory_table():
    print(f"per-GPU memory (GB, estimated) on {world} GPUs of {gpu_gb} GB: batch {batch_size} images per GPU x "
          f"(2 x {global_crops_size} px + {n_local_crops} x {local_crops_size} px crops), K = {head_n_prototypes}, "
          f"separate iBOT head")
    print(f"{'model':8} {'parallel':8} {'checkpointing':13} {'params':>7} {'grads':>7} {'AdamW':>7} {'teacher':>7} "
          f"{'activ.':>7} {'total':>7}  fits")
    for size in ("small", "base", "large", "giant"):
        for parallel in ("ddp", "fsdp"):
            for checkpointing in ("none", "selective", "full"):
                parts = training_memory_gb(size, parallel, checkpointing)
                total = sum(parts.values())
                print(f"ViT-{'SBLg'['sblg'.index(size[0])]}/{patch_size:<3} {parallel:8} {checkpointing:13} "
                      + " ".join(f"{v:7.1f}" for v in parts.values())
                      + f" {total:7.1f}  {'yes' if total < 0.9 * gpu_gb else 'NO'}")


def synthetic_batch(n_local, device, generator):
    grid = global_crops_size // patch_size
    masker = MaskingGenerator(grid, grid)
    ratios = torch.linspace(0.1, 0.5, batch_size + 1)  # half of the 2B global crops masked, as collate does
    masks = [masker(int(grid * grid * float(ratios[i])), generator) for i in range(batch_size)]
    masks += [masker(0, generator) for _ in range(batch_size)]
    masks = torch.stack(masks).flatten(1)[torch.randperm(2 * batch_size, generator=generator)]
    return {"global_crops": torch.randn(2 * batch_size, 3, global_crops_size, global_crops_size, generator=generator).to(device),
            "local_crops": (torch.randn(n_local * batch_size, 3, local_crops_size, local_crops_size, generator=generator).to(device)
                            if n_local else None),
            "masks": masks.to(device), "mask_indices": masked_patch_indices(masks).to(device)}


def foreach_ema_(teachers, students, momentum):
    """The reference row's EMA: two multi-tensor ops over all parameters (what kernels/ema.py fuses)."""
    torch._foreach_mul_(teachers, momentum)
    torch._foreach_add_(teachers, [s.to(t.dtype) for t, s in zip(teachers, students)], alpha=1 - momentum)


def make_step(size, n_local, dtype, device, prepare=None, reference=False):
    """A closure running one pretrain.py train_step on a fixed synthetic batch; with (cfg, masked patches).
    prepare(student, teacher): compile or `parallelize` the networks before the optimizer is built.
    reference: fused AdamW and foreach_ema_ instead of pretrain.py's optimizer settings and kernels.ema_."""
    torch.manual_seed(0)
    cfg = vit_config(size, patch_size=patch_size, img_size=global_crops_size, drop_path_rate=0.1,
                     **({"depth": depth} if depth else {}))
    backbone = ViT(cfg)
    student = nn.ModuleDict({"backbone": backbone, **P.build_heads(cfg.embed_dim, head_n_prototypes, head_hidden_dim,
                                                                    head_bottleneck_dim, 3, False, 0)}).to(device)
    teacher = P.make_teacher(student)
    if prepare:
        prepare(student, teacher)
    optimizer = torch.optim.AdamW(param_groups(student, 0.9, 0.2), lr=0.0, betas=(0.9, 0.999),
                                  **({"fused": True} if reference else {"foreach": device.type == "cuda"}))
    centers = {"dino": torch.zeros(1, head_n_prototypes, device=device), "ibot": torch.zeros(1, head_n_prototypes, device=device)}
    values = {"lr": 1e-4, "last_layer_lr": 1e-4, "backbone_lr": 1e-4, "wd": 0.04, "momentum": 0.994, "teacher_temp": 0.07}
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16")
    batch = synthetic_batch(n_local, device, torch.Generator().manual_seed(0))

    def step():
        with mock.patch.object(P.kernels, "ema_", foreach_ema_) if reference else nullcontext():
            P.train_step(student, teacher, optimizer, batch, values, centers, 3.0, autocast=autocast)
    return step, cfg, len(batch["mask_indices"])


def seconds_per_step(step, device, n_steps):
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n_steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / n_steps


def bench_one(size, n_local, kernels_choice, dtype, device, compiled=False):
    os.environ["NANORAD_KERNELS"] = kernels_choice  # read by kernels/ at every call
    compile_backbones = lambda *nets: [net["backbone"].compile() for net in nets]  # compiled in the warm-up
    step, cfg, n_masked = make_step(size, n_local, dtype, device, compile_backbones if compiled else None)
    seconds_per_step(step, device, warmup_steps)
    seconds = seconds_per_step(step, device, timed_steps)
    flops = step_flops(cfg, n_local, n_masked)
    peak = next((v for k, v in PEAK_BF16.items() if device.type == "cuda" and k in torch.cuda.get_device_name(device)), None)
    row = {"model": f"ViT-{size[0].upper()}/{patch_size}", "recipe": f"2+{n_local}" if n_local else "2 global",
           "kernels": kernels_choice + ("+compile" if compiled else ""), "dtype": dtype, "batch": batch_size,
           "step_ms": 1000 * seconds, "img_per_s": batch_size / seconds,
           "tflops": flops / seconds / 1e12, "mfu": flops / seconds / peak if peak else None,
           "max_mem_gb": torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None}
    return row


# ---- ddp / fsdp x compile x activation checkpointing, on several processes ---------------------------------

def parallel_row_names(on_gpu):
    """("reference", False, "none") first, then (parallel, compiled, checkpointing) rows; compile on a GPU only."""
    return [("reference", False, "none")] + [(parallel, compiled, checkpointing) for parallel in PARALLEL_MODES
                                             for compiled in ((False, True) if on_gpu else (False,))
                                             for checkpointing in ACTIVATION_CHECKPOINTING]


def parallel_worker(r, world, store_dir):
    """One process: builds every row's networks, warms each up (compiling), then times the rows round-robin."""
    on_gpu = torch.cuda.is_available()
    device = torch.device(f"cuda:{r}" if on_gpu else "cpu")
    if on_gpu:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
    else:
        torch.set_num_threads(1)  # the processes share the cores
    dist.init_process_group("nccl" if on_gpu else "gloo", init_method=f"file://{store_dir}/store", rank=r,
                            world_size=world)
    dtype = "bfloat16" if on_gpu else "float32"
    try:
        steps = {}
        for size in sizes:
            for parallel, compiled, checkpointing in parallel_row_names(on_gpu):
                prepare = None if parallel == "reference" else (
                    lambda s, t, p=parallel, c=compiled, a=checkpointing: parallelize(s, t, p, c, a, torch.bfloat16
                                                                                   if on_gpu else torch.float32))
                step, _, _ = make_step(size, n_local_crops, dtype, device, prepare, reference=parallel == "reference")
                seconds_per_step(step, device, warmup_steps)
                steps[(size, parallel, compiled, checkpointing)] = step
        times = {key: [] for key in steps}
        for _ in range(repeats):  # interleaved: a drift of the machine's speed reaches every row alike
            for key, step in steps.items():
                dist.barrier()
                times[key].append(seconds_per_step(step, device, timed_steps))
        if r == 0:
            Path(store_dir, "times.json").write_text(json.dumps([[*key, t] for key, t in times.items()]))
    finally:
        dist.destroy_process_group()


def print_parallel_rows():
    on_gpu = torch.cuda.is_available()
    world = nproc or (torch.cuda.device_count() if on_gpu else 2)
    name = torch.cuda.get_device_name() if on_gpu else "CPU"
    print(f"pretraining step on {world} x {name} ({'nccl' if on_gpu else 'gloo, 1 thread each'}): multi-crop "
          f"2 x {global_crops_size} px + {n_local_crops} x {local_crops_size} px, batch {batch_size} per process, "
          f"K = {head_n_prototypes}{blocks_note()}; {repeats} interleaved rounds of {timed_steps} steps per row")
    if not on_gpu:
        print("compile rows skipped on a CPU: pretrain.py compiles for GPUs, and this smoke run stays short")
    with tempfile.TemporaryDirectory() as store_dir:
        mp.spawn(parallel_worker, args=(world, store_dir), nprocs=world, join=True)
        times = json.loads(Path(store_dir, "times.json").read_text())
    print(f"{'model':10} {'parallel':10} {'compile':8} {'act. ckpt':10} {'median ms':>10} {'min-max ms':>15} "
          f"{'img/s':>8} {'speedup':>7}")
    rows, reference = [], {}
    for size, parallel, compiled, checkpointing, seconds in times:
        median = statistics.median(seconds)
        reference.setdefault(size, median)  # the reference row comes first for each size
        rows.append({"model": f"ViT-{size[0].upper()}/{patch_size}", "parallel": parallel, "compile": compiled,
                     "activation_checkpointing": checkpointing, "world": world, "step_ms": [1000 * t for t in seconds],
                     "median_ms": 1000 * median, "img_per_s": world * batch_size / median,
                     "speedup": reference[size] / median})
        r = rows[-1]
        print(f"{r['model']:10} {parallel:10} {str(compiled):8} {checkpointing:10} {r['median_ms']:10.1f} "
              f"{1000 * min(seconds):7.1f}-{1000 * max(seconds):<7.1f} {r['img_per_s']:8.1f} {r['speedup']:6.2f}x")
    return name, rows


if __name__ == "__main__":
    if dry_run:
        print_memory_table()
        sys.exit()
    if parallel_rows:
        name, rows = print_parallel_rows()
        Path(out_json).parent.mkdir(parents=True, exist_ok=True)
        Path(out_json).write_text(json.dumps({"device": name, "config": config, "rows": rows}, indent=1))
        print(f"wrote {out_json}")
        sys.exit()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"pretraining step on {name}: {global_crops_size} px global crops, {local_crops_size} px local crops, "
          f"batch {batch_size}, K = {head_n_prototypes}{blocks_note()}")
    rows = []
    # (kernels, autocast dtype, compiled), the baseline first. Triton runs on CUDA only; a CPU uses the references.
    if device.type == "cuda":
        variants = [("ref", "bfloat16", False), ("triton", "bfloat16", False)]
    else:
        variants = [("ref", "float32", False), ("ref", "bfloat16", False)]
    if compile:
        variants.append((variants[-1][0], "bfloat16", True))
    print(f"{'model':10} {'recipe':9} {'kernels':14} {'dtype':8} {'step ms':>8} {'img/s':>8} {'speedup':>7} "
          f"{'TFLOP/s':>8} {'MFU':>6}")
    for size in sizes:
        for n_local in (0, n_local_crops):
            baseline = None
            for choice, dtype, compiled in variants:
                if device.type == "cuda":  # the last variant's model is gone: count this one's memory alone
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats(device)
                try:
                    row = bench_one(size, n_local, choice, dtype, device, compiled)
                except torch.cuda.OutOfMemoryError as e:
                    print(f"{size} 2+{n_local} {choice}{'+compile' if compiled else ''} {dtype}: out of memory ({e})")
                    continue
                baseline = baseline or row
                row["speedup"] = row["img_per_s"] / baseline["img_per_s"]
                rows.append(row)
                mfu = f"{100 * row['mfu']:5.1f}%" if row["mfu"] else "     -"
                print(f"{row['model']:10} {row['recipe']:9} {row['kernels']:14} {dtype:8} {row['step_ms']:8.1f} "
                      f"{row['img_per_s']:8.1f} {row['speedup']:6.2f}x {row['tflops']:8.2f} {mfu}", flush=True)
    Path(out_json).parent.mkdir(parents=True, exist_ok=True)
    Path(out_json).write_text(json.dumps({"device": name, "config": config, "rows": rows}, indent=1))
    print(f"wrote {out_json}")
