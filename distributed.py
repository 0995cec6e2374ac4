"""Which process this is under torchrun (rank, world size), what all processes agree on, and how the
networks of pretrain.py are spread over them.

rank / world_size / same_on_all_ranks also work without torch.distributed, as world size 1, so a script
calls them the same way on a laptop and on 8 GPUs. `parallelize` prepares pretrain.py's student and
teacher, in DINOv3's order (dinov3/fsdp/ac_compile_parallelize.py): activation checkpointing on each
block, then torch.compile of each block, then the data parallelism:

- "ddp": every rank holds everything; the gradients are averaged by all-reduces of ~25 MB buckets
  launched from hooks as backward produces them, so the communication overlaps the rest of backward.
  (Not torch's DistributedDataParallel: it expects one forward per step, and the student's backbone
  runs twice -- global and local crops -- and has no gradients at all in the head warm-up.)
- "fsdp": FSDP2 (`fully_shard`) per transformer block, per backbone (its embeddings and last norm) and
  per head, student and teacher alike: each rank keeps 1/world of every parameter, gradient and AdamW
  state, and gathers a block's parameters only while it runs.
"""
import functools

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

PARALLEL_MODES = ("ddp", "fsdp")
ACTIVATION_CHECKPOINTING = ("none", "full", "selective")
FSDP_ABOVE_PARAMS = 250e6  # ViT-L and larger: 16 bytes of training state per parameter fill a GPU's memory
BUCKET_BYTES = 25 * 2**20  # DDP's default bucket size


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


def mean_over_ranks(t):
    """The mean of a tensor over all ranks (itself on one process)."""
    if not distributed():
        return t
    dist.all_reduce(t)
    return t / world_size()


def sum_over_ranks(count, device):
    """An integer summed over all ranks: a host sync under torchrun (the device holds the sum), none alone."""
    if not distributed():
        return count
    total = torch.tensor(float(count), device=device)
    dist.all_reduce(total)
    return int(total.item())


def default_parallel(world, backbone):
    """fsdp when several processes share a backbone whose replicated training state would crowd a GPU."""
    return "fsdp" if world > 1 and sum(p.numel() for p in backbone.parameters()) > FSDP_ABOVE_PARAMS else "ddp"


# ---- activation checkpointing and compilation, per transformer block --------------------------------------

def matmuls_and_attention():
    """What selective checkpointing keeps (DINOv3's list): the outputs of the expensive ops; the
    cheap elementwise ones (norms, GELU, residual adds) are recomputed in backward."""
    ops = [torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
           torch.ops.aten._scaled_dot_product_flash_attention.default,
           torch.ops.aten._scaled_dot_product_efficient_attention.default,
           torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default]
    return functools.partial(torch.utils.checkpoint.create_selective_checkpoint_contexts, ops)


def checkpoint_activations(blocks, mode):
    """Recompute each block's activations in backward instead of keeping them ("full": all of them;
    "selective": all but matmul and attention outputs). The block's forward method, not the module, runs
    under torch.utils.checkpoint, the checkpoint inside the FSDP unit as DINOv3's checkpoint_wrapper puts
    it: FSDP's hooks around the module's call (gathers, casts, profiler ranges) stay out of the recomputed
    region. (Composable checkpoint(block) recomputes the hooked call, and selective checkpointing, which
    replays exactly the forward's ops, then fails on FSDP's ops.) The parameter names stay the same, so
    checkpoints do not depend on the mode. Drop-path masks are redrawn identically (RNG preserved)."""
    from torch.utils.checkpoint import checkpoint
    context = {"context_fn": matmuls_and_attention()} if mode == "selective" else {}
    for block in blocks:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False, **context)


def parallelize(student, teacher, parallel, compile_blocks=False, activation_checkpointing="none",
                param_dtype=torch.float32):
    """Prepare both networks in place before the optimizer is built (fsdp replaces the parameters).
    param_dtype: what fsdp gathers parameters in for compute (bfloat16 on GPUs; fp32 master weights)."""
    if activation_checkpointing != "none":  # the teacher never runs backward: nothing to recompute
        checkpoint_activations(student["backbone"].blocks, activation_checkpointing)
    if compile_blocks:  # the heads stay eager
        for net in (student, teacher):
            for block in net["backbone"].blocks:
                block.compile()
    if parallel == "fsdp":
        for net in (student, teacher):
            shard_fsdp(net, param_dtype)
    elif world_size() > 1:
        student.gradient_reduction = OverlappedGradientReduction(student.parameters())


# ---- ddp: gradient all-reduce overlapped with backward ----------------------------------------------------

class OverlappedGradientReduction:
    """Averages gradients over ranks in buckets, each all-reduced (asynchronously) as soon as backward
    has produced all its gradients. Buckets hold parameters in reverse order, the order backward meets
    them, and are launched strictly in bucket order so that every rank issues the same collectives."""

    def __init__(self, params, bucket_bytes=BUCKET_BYTES):
        params = [p for p in params if p.requires_grad]
        self.buckets, bucket, size = [], [], 0
        for p in reversed(params):
            bucket.append(p)
            size += p.numel() * p.element_size()
            if size >= bucket_bytes:
                self.buckets.append(bucket)
                bucket, size = [], 0
        self.buckets += [bucket] if bucket else []
        self.bucket_of = {p: i for i, b in enumerate(self.buckets) for p in b}
        self.n_ready, self.in_flight = [0] * len(self.buckets), []
        for p in params:  # fires once per backward, after the gradients of both backbone calls are summed
            p.register_post_accumulate_grad_hook(self.gradient_ready)

    def gradient_ready(self, p):
        self.n_ready[self.bucket_of[p]] += 1
        while (len(self.in_flight) < len(self.buckets)
               and self.n_ready[len(self.in_flight)] == len(self.buckets[len(self.in_flight)])):
            self.launch(len(self.in_flight))

    def launch(self, i):
        grads = [p.grad for p in self.buckets[i] if p.grad is not None]
        self.in_flight.append((grads, *(flat_all_reduce(grads, async_op=True) if grads else (None, None))))

    def wait(self):
        """After backward. Buckets still unfilled hold parameters without a gradient this step (the frozen
        backbone of the head warm-up, an unused head): the same on every rank, so they go now, in order."""
        for i in range(len(self.in_flight), len(self.buckets)):
            self.launch(i)
        for grads, flat, work in self.in_flight:
            if work is not None:
                work.wait()
                copy_mean_(grads, flat)
        self.n_ready, self.in_flight = [0] * len(self.buckets), []


def average_gradients(student):
    """After backward, every rank's gradients become the mean over ranks: fsdp's reduce-scatter ran in
    backward; ddp's bucket all-reduces were launched during it and are awaited here; a student that
    `parallelize` did not prepare (the step's tests) gets one blocking all-reduce of all its gradients."""
    if world_size() == 1 or is_sharded(student):
        return
    if hasattr(student, "gradient_reduction"):
        return student.gradient_reduction.wait()
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    copy_mean_(grads, flat_all_reduce(grads)[0])


def flat_all_reduce(grads, async_op=False):
    """The sum over ranks of the gradients, as one flat tensor (one collective); with its work handle."""
    flat = torch.cat([g.reshape(-1) for g in grads])
    return flat, dist.all_reduce(flat, async_op=async_op)


def copy_mean_(grads, flat_sum):
    for g, mean in zip(grads, (flat_sum / world_size()).split([g.numel() for g in grads])):
        g.copy_(mean.view_as(g))


# ---- fsdp: sharded parameters, gradients and optimizer states --------------------------------------------

def shard_fsdp(net, param_dtype=torch.float32):
    """fully_shard each block, then each part of the ModuleDict (the backbone's own parameters form its
    root group; each head is one group). Gradients are reduced in fp32 whatever param_dtype."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
    device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
    mesh = init_device_mesh(device_type, (world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for name, part in net.items():  # every group resharded after its forward, roots included: the teacher
        # runs no backward to reshard them, and its EMA must meet the same shards as the student's
        for block in getattr(part, "blocks", ()):
            fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=True)
        fully_shard(part, mesh=mesh, mp_policy=policy, reshard_after_forward=True)
        if name == "backbone":  # the step calls forward_features, which FSDP must treat as a forward
            register_fsdp_forward_method(part, "forward_features")


def is_sharded(net):
    return any(isinstance(p, DTensor) for p in net.parameters())


def local_shards(tensors):
    """This rank's part of each (sharded) tensor, in place-updatable: the EMA runs on the shards."""
    return [t.to_local() if isinstance(t, DTensor) else t for t in tensors]


def full_state_dict(module):
    """The module's state with every shard gathered (a collective: every rank calls it), on the CPU."""
    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu()
            for k, v in module.state_dict().items()}


def unsharded_backbone(backbone):
    """The backbone itself, or for an fsdp one a plain ViT holding its gathered weights (a collective)."""
    if not is_sharded(backbone):
        return backbone
    from model import ViT
    with torch.random.fork_rng():  # its random initialisation, replaced at once, leaves the run's RNG alone
        plain = ViT(backbone.config)
    plain.load_state_dict(full_state_dict(backbone))
    return plain.to(next(backbone.parameters()).device).eval()
