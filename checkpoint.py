"""Training checkpoints that resume a run exactly: one safetensors file written atomically (temp file +
rename) holding the networks, the optimizer state, the centres and every process's random states,
with the run's JSON state in the file's metadata (so the two can never disagree) and copied beside it
for people to read. Under parallel="fsdp" a checkpoint is a folder (ckpt.dcp/) of torch.distributed.checkpoint
shards, every rank writing its own, with the same tensor names and the JSON state in state.json.
"""
import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from distributed import distributed, rank, world_size
from model import (ViT, ViTConfig, is_sharded_checkpoint, load_backbone, load_state_strict, read_safetensors,
                   read_state_dict, save_json_atomic, save_safetensors_atomic)


def rng_states():
    """This process's random states: torch CPU (and CUDA) generators, numpy, python."""
    numpy_state = np.random.get_state()
    state = {"torch_cpu": torch.get_rng_state(), "numpy_keys": torch.from_numpy(numpy_state[1].astype(np.int64)),
             "numpy": [numpy_state[0], int(numpy_state[2]), int(numpy_state[3]), float(numpy_state[4])],
             "python": json.loads(json.dumps(random.getstate()))}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["torch_cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_states(state):
    torch.set_rng_state(state["torch_cpu"])
    if "torch_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["torch_cuda"])
    name, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, state["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


def checkpoint_tensors(student, teacher, optimizer, centers):
    tensors = {}
    for prefix, net in (("student", student), ("teacher", teacher)):
        for part, module in net.items():
            tensors.update({f"{prefix}.{part}.{k}": v for k, v in module.state_dict().items()})
    names = {p: n for group in optimizer.param_groups for p, n in zip(group["params"], group["names"])}
    for p, state in optimizer.state.items():
        tensors.update({f"optim.{names[p]}.{k}": v for k, v in state.items()})  # AdamW: step, exp_avg, exp_avg_sq
    tensors.update({f"center.{k}": v for k, v in centers.items()})
    return tensors


def all_rng_states(state):
    """Every rank's random states, on every rank: (the JSON state with their plain values under "rng",
    their tensors as rng.<rank>.<name>)."""
    rngs = [rng_states()]
    if distributed():
        rngs = [None] * world_size()
        dist.all_gather_object(rngs, {k: (v.cpu() if torch.is_tensor(v) else v) for k, v in rng_states().items()})
    state, tensors = {**state, "rng": []}, {}
    for r, rng in enumerate(rngs):
        state["rng"].append({k: v for k, v in rng.items() if not torch.is_tensor(v)})
        tensors.update({f"rng.{r}.{k}": v for k, v in rng.items() if torch.is_tensor(v)})
    return state, tensors


def save_checkpoint(path, student, teacher, optimizer, centers, state):
    """Called on every rank (the RNG states of all ranks are gathered); rank 0 writes. A path ending in
    .dcp is a sharded checkpoint (fsdp), which every rank writes."""
    if Path(path).suffix == ".dcp":
        return save_sharded_checkpoint(path, student, teacher, optimizer, centers, state)
    state, rng_tensors = all_rng_states(state)
    if rank() != 0:
        return
    tensors = {**checkpoint_tensors(student, teacher, optimizer, centers), **rng_tensors}
    save_safetensors_atomic(tensors, path, {"nanorad_pretrain": json.dumps(state)})
    save_json_atomic({k: v for k, v in state.items() if k != "rng"}, str(path) + ".json")


def save_sharded_checkpoint(path, student, teacher, optimizer, centers, state):
    """torch.distributed.checkpoint: every rank writes its own shards (same tensor names as the single
    file) into path/step_<step>/; then rank 0 writes path/state.json, which names that folder, atomically,
    and removes the older folders. A run killed while writing keeps the previous state.json and folder."""
    import torch.distributed.checkpoint as dcp
    state, rng_tensors = all_rng_states(state)  # the same on every rank: DCP writes them once
    shards = f"step_{state['step']:06d}"
    dcp.save({**checkpoint_tensors(student, teacher, optimizer, centers), **rng_tensors},
             checkpoint_id=Path(path) / shards)
    if rank() == 0:  # DCP's coordinator: the folder's metadata is written when its save returns
        save_json_atomic({**state, "shards": shards}, Path(path) / "state.json")
        for old in Path(path).glob("step_*"):
            if old.name != shards:
                shutil.rmtree(old)


def load_sharded_checkpoint(path, student, teacher, optimizer, centers):
    """Restore what save_sharded_checkpoint wrote, in place into this run's shards (same world size)."""
    import torch.distributed.checkpoint as dcp
    state = json.loads((Path(path) / "state.json").read_text())
    if len(state["rng"]) != world_size():
        raise ValueError(f"resume: {path} holds the shards of {len(state['rng'])} processes, this run has "
                         f"{world_size()}: resume a sharded checkpoint with as many processes")
    shards = Path(path) / state["shards"]
    saved = dcp.FileSystemReader(shards).read_metadata().state_dict_metadata
    for group in optimizer.param_groups:  # AdamW's states, allocated for DCP to load into
        for p, name in zip(group["params"], group["names"]):
            if f"optim.{name}.step" in saved:
                optimizer.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                                      "exp_avg_sq": torch.zeros_like(p)}
    rng = {f"rng.{rank()}.{k}": v for k, v in rng_states().items() if torch.is_tensor(v)}
    dcp.load({**checkpoint_tensors(student, teacher, optimizer, centers), **rng}, checkpoint_id=shards)
    set_rng_states({**state["rng"][rank()], **{k.split(".", 2)[2]: v for k, v in rng.items()}})
    return state


def checkpoint_state_or_none(path):
    """The JSON state a pretrain.py checkpoint carries in its metadata; None for another safetensors file."""
    meta = read_safetensors(path, tensors=False)[1].get("nanorad_pretrain")
    return None if meta is None else json.loads(meta)


def read_checkpoint_state(path):
    state = checkpoint_state_or_none(path)
    if state is None:
        raise ValueError(f"{path}: not a pretrain.py checkpoint (no 'nanorad_pretrain' metadata)")
    return state


def load_checkpoint(path, student, teacher, optimizer, centers):
    """Restore everything save_checkpoint wrote, strictly; returns the JSON state."""
    path, other = Path(path), Path(path).with_suffix(".safetensors" if Path(path).suffix == ".dcp" else ".dcp")
    if not path.exists() and other.exists():
        raise ValueError(f"resume: {other} was written with parallel={'fsdp' if other.suffix == '.dcp' else 'ddp'}"
                         f", and this run is parallel={'fsdp' if path.suffix == '.dcp' else 'ddp'}: resume "
                         f"with --parallel={'fsdp' if other.suffix == '.dcp' else 'ddp'}")
    if path.suffix == ".dcp":
        return load_sharded_checkpoint(path, student, teacher, optimizer, centers)
    state = read_checkpoint_state(path)
    tensors, _ = read_safetensors(path)
    for prefix, net in (("student", student), ("teacher", teacher)):
        for part, module in net.items():
            head = f"{prefix}.{part}."
            load_state_strict(module, {k[len(head):]: v for k, v in tensors.items() if k.startswith(head)},
                              f"{path} [{prefix}.{part}]")
    extra = sorted({k.split(".")[1] for k in tensors if k.startswith(("student.", "teacher."))} - set(student))
    if extra:
        raise KeyError(f"{path}: checkpoint has modules {extra} that this config does not build "
                       f"(ibot_separate_head differs?)")
    for group in optimizer.param_groups:
        for p, name in zip(group["params"], group["names"]):
            head = f"optim.{name}."
            saved = {k[len(head):]: v for k, v in tensors.items() if k.startswith(head)}
            if saved:
                optimizer.state[p] = {k: (v if k == "step" else v.to(p.device)) for k, v in saved.items()}
    for k, center in centers.items():
        center.copy_(tensors[f"center.{k}"])
    saved_rng = state.get("rng", [])
    if len(saved_rng) == world_size():
        set_rng_states({**saved_rng[rank()], **{k.split(".", 2)[2]: v for k, v in tensors.items()
                                                if k.startswith(f"rng.{rank()}.")}})
    else:
        print(f"resume: {path} was written by {len(saved_rng)} processes, this run has {world_size()}: "
              f"random states are not restored (the run continues, but not bit-exactly)")
    return state


def load_init_backbone(path, **config_overrides):
    """A backbone to continue from: a pretrain.py checkpoint (its teacher, the better network; a file, or
    an fsdp run's .dcp folder) or anything model.load_backbone reads (official DINOv2 .pth, HF Dinov2, timm,
    nanorad)."""
    if is_sharded_checkpoint(path):
        ckpt_state = json.loads((Path(path) / "state.json").read_text())
    else:
        is_safetensors_file = str(path).endswith(".safetensors") and Path(path).is_file()
        ckpt_state = checkpoint_state_or_none(path) if is_safetensors_file else None
    if ckpt_state is None:
        return load_backbone(path, **config_overrides)
    backbone = ViT(ViTConfig(**{**ckpt_state["model"]["vit"], **config_overrides}))
    prefix, tensors = "teacher.backbone.", read_state_dict(path)[0]
    load_state_strict(backbone, {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}, str(path))
    print(f"init_from: {path}: teacher backbone of a pretrain.py checkpoint (step {ckpt_state['step']})")
    return backbone


def checkpoint_paths(out_dir, sharded):
    """Where a run keeps its last and its best checkpoint: single files, or DCP folders under fsdp."""
    suffix = ".dcp" if sharded else ".safetensors"
    return Path(out_dir) / f"ckpt{suffix}", Path(out_dir) / f"best{suffix}"


RUN_FILES = ("ckpt.safetensors", "ckpt.dcp", "log.jsonl", "results.json")  # what says a folder holds a run


def check_out_dir(out_dir, resume, overwrite):
    """Before any work: a new run never lands on an earlier run's files, and a resume has a checkpoint
    (ckpt.safetensors, or the sharded ckpt.dcp of parallel='fsdp')."""
    out = Path(out_dir)
    if resume and not ((out / "ckpt.safetensors").is_file() or (out / "ckpt.dcp" / "state.json").is_file()):
        raise FileNotFoundError(f"resume=True: expected {out / 'ckpt.safetensors'} or {out / 'ckpt.dcp'}, "
                                f"found neither")
    found = [name for name in RUN_FILES if (out / name).exists()]
    if found and not resume and not overwrite:
        offer = "continue it with --resume=True, " if {"ckpt.safetensors", "ckpt.dcp"} & set(found) else ""
        raise FileExistsError(f"out_dir: {out} holds an earlier run ({', '.join(found)}); {offer}replace it with "
                              f"--overwrite=True, or choose another --out_dir")


def start_run_files(out_dir, start_step):
    """The log is one run's: a new run (--overwrite=True) removes the earlier run's log, results and best
    checkpoint; a resumed run drops the log lines past the checkpoint it continues from."""
    out = Path(out_dir)
    log = out / "log.jsonl"
    if start_step == 0:
        for name in ("log.jsonl", "results.json", "best.safetensors", "best.safetensors.json"):
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(out / "best.dcp", ignore_errors=True)
    elif log.exists():
        kept = [line for line in log.read_text().splitlines() if json.loads(line)["step"] <= start_step]
        log.write_text("".join(line + "\n" for line in kept))
