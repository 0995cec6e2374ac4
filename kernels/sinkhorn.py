"""Sinkhorn-Knopp teacher targets (DINOv2 `sinkhorn_knopp_teacher`), fused in Triton, beside the
plain PyTorch reference.

DINOv2 works on Q = exp(t / temp).T (K prototypes x B samples): divide Q by its total, then
`n_iterations` times make every prototype row sum to 1/K and every sample column sum to 1/B,
and finally multiply by B so that each sample's column is a distribution over prototypes.

Every one of those steps scales whole rows or whole columns, so the result is
diag(a) E diag(b) with E = exp(t / temp) and two scale vectors: a (K) and b (B). The fused version
keeps E implicit, recomputes it from the logits in every pass (exp is cheaper than reading a
second B x K matrix) and only ever materialises a and b: 2 * n_iterations reading passes and one
writing pass instead of DINOv2's ~40 passes of elementwise PyTorch ops.

Numerical safety: exp(t / temp) overflows float32 once t / temp > 88, and with a 0.04
temperature teacher logits of 4 are enough (DINOv2 itself returns NaN on the logits of
../shared/oracles/dinov2_losses.safetensors). Both versions subtract each prototype's maximum over
the whole (all-rank) batch first. That is invisible in the result: a per-prototype factor is
undone by the first row normalisation. A single global maximum would not do: with a spread of
~600 in t / temp whole prototype rows underflow to zero and the normalisation divides 0 by 0.
For the same reason DINOv2's first division by the total of Q is skipped in the fused version
(the row normalisation that follows undoes any common factor).

Distributed: the batch is split across ranks, so per-prototype maxima and sums are all-reduced
between the passes; per-sample sums are local.
"""
import math

import torch
import torch.distributed as dist
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


def _distributed():
    return dist.is_available() and dist.is_initialized()


# ----------------------------------------------------------------------------------------------
# PyTorch reference
# ----------------------------------------------------------------------------------------------

@torch.no_grad()
def sinkhorn_knopp_reference(teacher_logits, teacher_temp, n_iterations=3, n_samples_total=None):
    """DINOv2's sinkhorn_knopp_teacher, line for line, plus the per-prototype max shift.
    teacher_logits: (B, K) on this rank. n_samples_total: the global number of samples (DINOv2's
    iBOT loss passes its all-reduced count of masked patches); default B * world_size."""
    t = teacher_logits.float()
    world_size = dist.get_world_size() if _distributed() else 1
    prototype_max = t.max(dim=0).values
    if _distributed():
        dist.all_reduce(prototype_max, op=dist.ReduceOp.MAX)
    Q = torch.exp((t - prototype_max) / teacher_temp).t()  # K x B as in DINOv2
    B = Q.shape[1] * world_size if n_samples_total is None else n_samples_total
    K = Q.shape[0]
    sum_Q = torch.sum(Q)
    if _distributed():
        dist.all_reduce(sum_Q)
    Q /= sum_Q
    for _ in range(n_iterations):
        sum_of_rows = torch.sum(Q, dim=1, keepdim=True)  # each prototype must weigh 1/K in total
        if _distributed():
            dist.all_reduce(sum_of_rows)
        Q /= sum_of_rows
        Q /= K
        Q /= torch.sum(Q, dim=0, keepdim=True)  # each sample must weigh 1/B in total
        Q /= B
    Q *= B  # columns sum to 1: each sample gets an assignment distribution
    return Q.t()


# ----------------------------------------------------------------------------------------------
# Triton kernels. The logits t are (B, K) row-major; E[b, k] = exp2(t[b, k] * scale - m[k]) with
# scale = log2(e) / temp and m the per-prototype maximum of t * scale.
# ----------------------------------------------------------------------------------------------

@triton.jit
def _prototype_max_sum_kernel(t_ptr, max_ptr, sum_ptr, B, K, stride_b, scale,
                              BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    # First pass, one program per block of prototypes, looping over the whole local batch:
    # online maximum and sum of exp2 (the same rescaling trick as online softmax).
    offs_k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    m = tl.full([BLOCK_K], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_K], tl.float32)
    for b0 in range(0, B, BLOCK_B):
        offs_b = b0 + tl.arange(0, BLOCK_B)
        mask = (offs_b[:, None] < B) & mask_k[None, :]
        x = tl.load(t_ptr + offs_b[:, None].to(tl.int64) * stride_b + offs_k[None, :], mask=mask, other=0.0)
        x = tl.where(offs_b[:, None] < B, x.to(tl.float32) * scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp2(m - m_new) + tl.sum(tl.exp2(x - m_new[None, :]), axis=0)
        m = m_new
    tl.store(max_ptr + offs_k, m, mask=mask_k)
    tl.store(sum_ptr + offs_k, s, mask=mask_k)


@triton.jit
def _prototype_sum_kernel(t_ptr, max_ptr, a_ptr, b_ptr, sum_ptr, B, K, stride_b, scale,
                          BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    # Row sums of Q = diag(a) E diag(b) (one per prototype), over the local batch.
    offs_k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    m = tl.load(max_ptr + offs_k, mask=mask_k, other=0.0)
    a = tl.load(a_ptr + offs_k, mask=mask_k, other=0.0)
    s = tl.zeros([BLOCK_K], tl.float32)
    for b0 in range(0, B, BLOCK_B):
        offs_b = b0 + tl.arange(0, BLOCK_B)
        mask = (offs_b[:, None] < B) & mask_k[None, :]
        x = tl.load(t_ptr + offs_b[:, None].to(tl.int64) * stride_b + offs_k[None, :], mask=mask, other=0.0)
        bs = tl.load(b_ptr + offs_b, mask=offs_b < B, other=0.0)
        # -inf, not 0, past the batch: exp2(0 - m) overflows when a prototype's maximum is very negative
        x = tl.where(mask, x.to(tl.float32) * scale - m[None, :], float("-inf"))
        s += tl.sum(tl.exp2(x) * bs[:, None], axis=0)
    tl.store(sum_ptr + offs_k, s * a, mask=mask_k)


@triton.jit
def _sample_normalize_kernel(t_ptr, max_ptr, a_ptr, b_ptr, K, stride_b, scale, n_samples_total,
                             BLOCK_K: tl.constexpr):
    # One program per sample: its column sum over all prototypes, then b[sample] is rescaled in
    # place so that the column sums to 1/B (column sums are local to a rank: no all-reduce).
    row = tl.program_id(0)
    t_row = t_ptr + row.to(tl.int64) * stride_b
    c = tl.zeros([BLOCK_K], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(t_row + offs_k, mask=mask_k, other=0.0)
        m = tl.load(max_ptr + offs_k, mask=mask_k, other=0.0)
        a = tl.load(a_ptr + offs_k, mask=mask_k, other=0.0)  # 0 past K
        c += tl.exp2(x.to(tl.float32) * scale - m) * a
    b = tl.load(b_ptr + row)
    column_sum = tl.sum(c, axis=0) * b
    tl.store(b_ptr + row, b / column_sum / n_samples_total)


@triton.jit
def _write_kernel(t_ptr, max_ptr, a_ptr, b_ptr, out_ptr, B, K, stride_b, stride_out, scale, n_samples_total,
                  BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_b = offs_b < B
    mask_k = offs_k < K
    mask = mask_b[:, None] & mask_k[None, :]
    x = tl.load(t_ptr + offs_b[:, None].to(tl.int64) * stride_b + offs_k[None, :], mask=mask, other=0.0)
    m = tl.load(max_ptr + offs_k, mask=mask_k, other=0.0)
    a = tl.load(a_ptr + offs_k, mask=mask_k, other=0.0)
    b = tl.load(b_ptr + offs_b, mask=mask_b, other=0.0)
    x = tl.where(mask, x.to(tl.float32) * scale - m[None, :], float("-inf"))  # (see _prototype_sum_kernel)
    q = tl.exp2(x) * a[None, :] * (b * n_samples_total)[:, None]
    tl.store(out_ptr + offs_b[:, None].to(tl.int64) * stride_out + offs_k[None, :], q, mask=mask)


@torch.no_grad()
def sinkhorn_knopp_triton(teacher_logits, teacher_temp, n_iterations=3, n_samples_total=None):
    """Same contract as sinkhorn_knopp_reference; teacher_logits may be fp32, fp16 or bf16."""
    t = teacher_logits if teacher_logits.stride(-1) == 1 else teacher_logits.contiguous()
    B, K = t.shape
    world_size = dist.get_world_size() if _distributed() else 1
    n_samples_total = float(B * world_size if n_samples_total is None else n_samples_total)
    scale = LOG2E / teacher_temp
    f32 = dict(device=t.device, dtype=torch.float32)
    prototype_max, prototype_sum = torch.empty(K, **f32), torch.empty(K, **f32)
    b = torch.ones(B, **f32)
    BLOCK_B, BLOCK_K = 32, 128
    grid_k = (triton.cdiv(K, BLOCK_K),)

    _prototype_max_sum_kernel[grid_k](t, prototype_max, prototype_sum, B, K, t.stride(0), scale,
                                      BLOCK_B=BLOCK_B, BLOCK_K=BLOCK_K, num_warps=4)
    if _distributed():  # sums taken against the local maximum are rescaled to the global one
        local_max = prototype_max.clone()
        dist.all_reduce(prototype_max, op=dist.ReduceOp.MAX)
        prototype_sum *= torch.exp2(local_max - prototype_max)
    for it in range(n_iterations):
        if it > 0:
            _prototype_sum_kernel[grid_k](t, prototype_max, a, b, prototype_sum, B, K, t.stride(0), scale,
                                          BLOCK_B=BLOCK_B, BLOCK_K=BLOCK_K, num_warps=4)
        if _distributed():
            dist.all_reduce(prototype_sum)
        # rows sum to 1/K. In the first iteration a is implicitly 1 (Q's total cancels here).
        a = (1.0 / K) / prototype_sum if it == 0 else a / prototype_sum / K
        _sample_normalize_kernel[(B,)](t, prototype_max, a, b, K, t.stride(0), scale, n_samples_total,
                                       BLOCK_K=2048, num_warps=8)
    out = torch.empty(B, K, **f32)
    _write_kernel[(triton.cdiv(B, BLOCK_B), triton.cdiv(K, BLOCK_K))](
        t, prototype_max, a, b, out, B, K, t.stride(0), out.stride(0), scale, n_samples_total,
        BLOCK_B=BLOCK_B, BLOCK_K=BLOCK_K, num_warps=4)
    return out
