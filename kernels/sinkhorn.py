"""Sinkhorn-Knopp teacher targets (DINOv2 `sinkhorn_knopp_teacher`), fused in Triton, beside the
plain PyTorch reference.

DINOv2 works on Q = exp(t / temp).T (K prototypes x B samples): divide Q by its total, then
`n_iterations` times make every prototype row sum to 1/K and every sample column sum to 1/B,
and finally multiply by B so that each sample's column is a distribution over prototypes.

Every one of those steps scales whole rows or whole columns, so the result is
diag(a) E diag(b) with E = exp(t / temp) and two scale vectors: a (K) and b (B). The fused version
keeps E implicit, recomputes it from the logits in every pass (exp is cheaper than reading a
second B x K matrix) and only ever materialises log a and log b: 2 * n_iterations reading passes
and one writing pass instead of DINOv2's ~40 passes of elementwise PyTorch ops, and no PyTorch
ops between the kernels on a single process (each launch costs ~30 us of CPU).

Numerical safety: exp(t / temp) overflows float32 once t / temp > 88, and with a 0.04
temperature teacher logits of 4 are enough (DINOv2 itself returns NaN on the logits of
../shared/oracles/dinov2_losses.safetensors). Both versions subtract each prototype's maximum over
the whole (all-rank) batch first. That is invisible in the result: a per-prototype factor is
undone by the first row normalisation (tests/test_kernels.py checks both against DINOv2 in float64).
A single global maximum would not do: with a spread of ~600 in t / temp whole prototype rows
underflow to zero and the normalisation divides 0 by 0.
For the same reason DINOv2's first division by the total of Q is skipped in the fused version
(the row normalisation that follows undoes any common factor). The fused version goes further and
takes each pass's log-sum-exp against its own running maximum (see the kernels).

Distributed: the batch is split across ranks, so per-prototype maxima and sums are all-reduced
between the passes (DINOv2 all-reduces Q's total and the per-prototype sums; the total cancels);
per-sample sums are local.
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
# Triton kernels, in the log2 domain. The logits t are (B, K) row-major and x = t * log2(e) / temp.
# Q[k, b] = exp2(x[b, k] + u[k] + v[b]): u and v are the logs of the prototype and sample scales.
# Normalising rows undoes the old u entirely (and columns the old v), so each pass computes the
# new u from v alone (and the new v from u alone), as a log-sum-exp with its own running maximum:
# nothing overflows, and no row or column sum underflows to 0.
# ----------------------------------------------------------------------------------------------

@triton.jit
def _prototype_pass_kernel(t_ptr, v_ptr, max_ptr, sum_ptr, u_ptr, B, K, stride_b, scale, log2_K,
                           BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    # One program per block of prototypes, looping over the local batch: rows of Q normalised to
    # 1/K, i.e. u[k] = -log2(K * sum_b exp2(x[b, k] + v[b])), via an online maximum.
    offs_k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    m = tl.full([BLOCK_K], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_K], tl.float32)
    for b0 in range(0, B, BLOCK_B):
        offs_b = b0 + tl.arange(0, BLOCK_B)
        mask_b = offs_b < B
        x = tl.load(t_ptr + offs_b[:, None].to(tl.int64) * stride_b + offs_k[None, :],
                    mask=mask_b[:, None] & mask_k[None, :], other=0.0)
        v = tl.load(v_ptr + offs_b, mask=mask_b, other=0.0)
        x = tl.where(mask_b[:, None], x.to(tl.float32) * scale + v[:, None], float("-inf"))
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp2(m - m_new) + tl.sum(tl.exp2(x - m_new[None, :]), axis=0)
        m = m_new
    # max and sum are kept for the cross-rank reduction; u is final on a single process
    tl.store(max_ptr + offs_k, m, mask=mask_k)
    tl.store(sum_ptr + offs_k, s, mask=mask_k)
    tl.store(u_ptr + offs_k, -(m + tl.log2(s) + log2_K), mask=mask_k)


@triton.jit
def _sample_pass_kernel(t_ptr, u_ptr, v_ptr, K, stride_b, scale, log2_B, BLOCK_K: tl.constexpr):
    # One program per sample (columns are local to a rank): the column of Q normalised to 1/B,
    # i.e. v[b] = -log2(B * sum_k exp2(x[b, k] + u[k])). Each lane keeps its own running maximum,
    # so the loop needs no reduction across lanes until the end.
    row = tl.program_id(0)
    t_row = t_ptr + row.to(tl.int64) * stride_b
    m = tl.full([BLOCK_K], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_K], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(t_row + offs_k, mask=mask_k, other=0.0)
        u = tl.load(u_ptr + offs_k, mask=mask_k, other=0.0)
        z = tl.where(mask_k, x.to(tl.float32) * scale + u, float("-inf"))
        m_new = tl.maximum(m, z)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # lanes that saw nothing yet: no -inf - -inf
        s = s * tl.exp2(m - m_safe) + tl.exp2(z - m_safe)
        m = m_new
    row_max = tl.max(m, axis=0)
    total = tl.sum(s * tl.exp2(m - row_max), axis=0)
    tl.store(v_ptr + row, -(row_max + tl.log2(total) + log2_B))


@triton.jit
def _write_kernel(t_ptr, u_ptr, v_ptr, out_ptr, B, K, stride_b, stride_out, scale, log2_B,
                  BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    # Q * B, transposed back to (B, K): each sample's row is its assignment distribution
    offs_b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_b = offs_b < B
    mask_k = offs_k < K
    mask = mask_b[:, None] & mask_k[None, :]
    x = tl.load(t_ptr + offs_b[:, None].to(tl.int64) * stride_b + offs_k[None, :], mask=mask, other=0.0)
    u = tl.load(u_ptr + offs_k, mask=mask_k, other=0.0)
    v = tl.load(v_ptr + offs_b, mask=mask_b, other=0.0)
    z = tl.where(mask, x.to(tl.float32) * scale + u[None, :] + (v + log2_B)[:, None], float("-inf"))
    tl.store(out_ptr + offs_b[:, None].to(tl.int64) * stride_out + offs_k[None, :], tl.exp2(z), mask=mask)


@torch.no_grad()
def sinkhorn_knopp_triton(teacher_logits, teacher_temp, n_iterations=3, n_samples_total=None):
    """Same contract as sinkhorn_knopp_reference; teacher_logits may be fp32, fp16 or bf16."""
    if n_iterations < 1:
        raise ValueError(f"sinkhorn_knopp: n_iterations must be at least 1, got {n_iterations}")
    t = teacher_logits if teacher_logits.stride(-1) == 1 else teacher_logits.contiguous()
    B, K = t.shape
    world_size = dist.get_world_size() if _distributed() else 1
    n_samples_total = B * world_size if n_samples_total is None else n_samples_total
    scale, log2_K, log2_B = LOG2E / teacher_temp, math.log2(K), math.log2(n_samples_total)
    f32 = dict(device=t.device, dtype=torch.float32)
    prototype_max, prototype_sum, u = torch.empty(K, **f32), torch.empty(K, **f32), torch.empty(K, **f32)
    v = torch.zeros(B, **f32)  # the first row normalisation sees Q as exp(t / temp) itself
    BLOCK_B, BLOCK_K = 32, 128
    for _ in range(n_iterations):
        _prototype_pass_kernel[(triton.cdiv(K, BLOCK_K),)](t, v, prototype_max, prototype_sum, u, B, K, t.stride(0),
                                                           scale, log2_K, BLOCK_B=BLOCK_B, BLOCK_K=BLOCK_K, num_warps=4)
        if _distributed():  # each rank's sums are against its own maxima: rescale to the global ones
            local_max = prototype_max.clone()
            dist.all_reduce(prototype_max, op=dist.ReduceOp.MAX)
            prototype_sum *= torch.exp2(local_max - prototype_max)
            dist.all_reduce(prototype_sum)
            u = -(prototype_max + torch.log2(prototype_sum) + log2_K)
        _sample_pass_kernel[(B,)](t, u, v, K, t.stride(0), scale, log2_B, BLOCK_K=4096, num_warps=8)
    out = torch.empty(B, K, **f32)
    _write_kernel[(triton.cdiv(B, BLOCK_B), triton.cdiv(K, BLOCK_K))](
        t, u, v, out, B, K, t.stride(0), out.stride(0), scale, log2_B, BLOCK_B=BLOCK_B, BLOCK_K=BLOCK_K, num_warps=4)
    return out
