"""Which process this is under torchrun (rank, world size), and one value all processes agree on.

Each also works without torch.distributed, as world size 1, so a script calls them the same way on a
laptop and on 8 GPUs. (pretrain.py's step calls torch.distributed itself, where its data moves.)
"""
import torch
import torch.distributed as dist


def distributed():
    return dist.is_available() and dist.is_initialized()


def world_size():
    return dist.get_world_size() if distributed() else 1


def rank():
    return dist.get_rank() if distributed() else 0


def same_on_all_ranks(value):
    """Rank 0's float everywhere: decisions taken on it (best checkpoint, stop) must agree across ranks."""
    if not distributed():
        return value
    t = torch.tensor([float(value)], dtype=torch.float64,
                     device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.broadcast(t, src=0)
    return float(t.item())
