"""Data parallelism over torch.distributed processes (torchrun), as a handful of plain functions.

Every function also works without torch.distributed, as world size 1, so a script calls them the
same way on a laptop and on 8 GPUs.
"""
import torch
import torch.distributed as dist


def distributed():
    return dist.is_available() and dist.is_initialized()


def world_size():
    return dist.get_world_size() if distributed() else 1


def rank():
    return dist.get_rank() if distributed() else 0


def all_reduce_sum(x):
    if distributed():
        dist.all_reduce(x)
    return x


def same_on_all_ranks(value):
    """Rank 0's float everywhere: decisions taken on it (best checkpoint, stop) must agree across ranks."""
    if not distributed():
        return value
    t = torch.tensor([float(value)], dtype=torch.float64,
                     device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.broadcast(t, src=0)
    return float(t.item())


def average_gradients(params):
    """Data parallelism: every rank ends with the mean of all ranks' gradients. One flat all-reduce
    instead of DDP's hooks, because the backbone runs twice per step (global and local crops) and
    is frozen (no gradients at all) during the head warm-up, two things DDP's reducer dislikes."""
    if not distributed():
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def gather_rows_keep_local_grad(x):
    """All ranks' rows of x (B, D) concatenated in rank order; only this rank's rows carry gradient."""
    if not distributed():
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    parts[rank()] = x
    return torch.cat(parts)
