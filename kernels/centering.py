"""Softmax-centering of teacher outputs (DINOv2 `softmax_center_teacher` + `update_center`), fused
in Triton, beside the plain PyTorch reference.

probs = softmax((t - center) / temp) row by row, and the batch sum of the raw logits t that the
next center update needs. The fused version reads t twice (statistics, then probabilities) and
writes the probabilities once; the batch sum comes out of the first read for free.

Order, as in DINOv2: the probabilities at step s use the center updated through step s - 1; the
batch sum of step s is all-reduced (DINOv2 does it asynchronously, overlapping the student's
forward pass) and applied with `update_center` before the next step's centering.
"""
import torch
import torch.distributed as dist
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


def _distributed():
    return dist.is_available() and dist.is_initialized()


@torch.no_grad()
def update_center(center, logits_sum, n_total, momentum=0.9):
    """center <- momentum * center + (1 - momentum) * logits_sum / n_total, in place.
    n_total: number of samples summed over all ranks (B * world_size)."""
    center.mul_(momentum).add_(logits_sum.reshape(center.shape) / n_total, alpha=1 - momentum)


# ----------------------------------------------------------------------------------------------
# PyTorch reference
# ----------------------------------------------------------------------------------------------

@torch.no_grad()
def softmax_center_reference(teacher_logits, center, teacher_temp):
    """(B, K) logits, (K,) or (1, K) center -> (probs (B, K) fp32, logits_sum (K,) fp32, all-reduced)."""
    t = teacher_logits.float()
    probs = torch.softmax((t - center.reshape(1, -1)) / teacher_temp, dim=-1)
    logits_sum = t.sum(dim=0)
    if _distributed():
        dist.all_reduce(logits_sum)
    return probs, logits_sum


# ----------------------------------------------------------------------------------------------
# Triton kernels: the statistics pass loops over the batch for a block of classes (giving the
# batch sum of that block whole, and per-row partial max / sum-of-exp for it); a small kernel
# combines those into each row's log-sum-exp; the probabilities pass works on 2-D tiles.
# ----------------------------------------------------------------------------------------------

@triton.jit
def _stats_kernel(t_ptr, center_ptr, logits_sum_ptr, part_max_ptr, part_sum_ptr, B, K, stride_b, scale,
                  BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_k = tl.program_id(0)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    c = tl.load(center_ptr + offs_k, mask=mask_k, other=0.0)
    batch_sum = tl.zeros([BLOCK_K], tl.float32)
    for b0 in range(0, B, BLOCK_B):
        offs_b = b0 + tl.arange(0, BLOCK_B)
        mask_b = offs_b < B
        mask = mask_b[:, None] & mask_k[None, :]
        t = tl.load(t_ptr + offs_b[:, None].to(tl.int64) * stride_b + offs_k[None, :], mask=mask, other=0.0)
        t = t.to(tl.float32)
        batch_sum += tl.sum(t, axis=0)
        x = tl.where(mask, (t - c[None, :]) * scale, float("-inf"))
        row_max = tl.max(x, axis=1)
        row_max = tl.where(mask_b, row_max, 0.0)  # rows past the batch: avoid -inf - -inf
        row_sum = tl.sum(tl.exp2(x - row_max[:, None]), axis=1)
        # partial statistics laid out (K blocks, B): combined over K blocks on the host side
        tl.store(part_max_ptr + pid_k * B + offs_b, row_max, mask=mask_b)
        tl.store(part_sum_ptr + pid_k * B + offs_b, row_sum, mask=mask_b)
    tl.store(logits_sum_ptr + offs_k, batch_sum, mask=mask_k)


@triton.jit
def _lse_kernel(part_max_ptr, part_sum_ptr, lse_ptr, B, n_parts, BLOCK_P: tl.constexpr, BLOCK_B: tl.constexpr):
    # combines the statistics of the K blocks into each row's log2-sum-exp2 (a few KB: one small
    # kernel instead of half a dozen PyTorch ops, whose launches would cost more than the work)
    offs_b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_b = offs_b < B
    m = tl.full([BLOCK_B], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_B], tl.float32)
    for p0 in range(0, n_parts, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        mask = (offs_p[:, None] < n_parts) & mask_b[None, :]
        part_max = tl.load(part_max_ptr + offs_p[:, None] * B + offs_b[None, :], mask=mask, other=float("-inf"))
        part_sum = tl.load(part_sum_ptr + offs_p[:, None] * B + offs_b[None, :], mask=mask, other=0.0)
        m_new = tl.maximum(m, tl.max(part_max, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows past the batch
        s = s * tl.exp2(m - m_safe) + tl.sum(part_sum * tl.exp2(part_max - m_safe[None, :]), axis=0)
        m = m_new
    tl.store(lse_ptr + offs_b, m + tl.log2(tl.where(mask_b, s, 1.0)), mask=mask_b)


@triton.jit
def _probs_kernel(t_ptr, center_ptr, lse_ptr, out_ptr, B, K, stride_b, stride_out, scale,
                  BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_b = offs_b < B
    mask_k = offs_k < K
    mask = mask_b[:, None] & mask_k[None, :]
    t = tl.load(t_ptr + offs_b[:, None].to(tl.int64) * stride_b + offs_k[None, :], mask=mask, other=0.0)
    c = tl.load(center_ptr + offs_k, mask=mask_k, other=0.0)
    lse = tl.load(lse_ptr + offs_b, mask=mask_b, other=0.0)
    x = tl.where(mask, (t.to(tl.float32) - c[None, :]) * scale - lse[:, None], float("-inf"))  # no overflow past the edges
    p = tl.exp2(x)
    tl.store(out_ptr + offs_b[:, None].to(tl.int64) * stride_out + offs_k[None, :], p, mask=mask)


@torch.no_grad()
def softmax_center_triton(teacher_logits, center, teacher_temp):
    """Same contract as softmax_center_reference; teacher_logits may be fp32, fp16 or bf16."""
    t = teacher_logits if teacher_logits.stride(-1) == 1 else teacher_logits.contiguous()
    B, K = t.shape
    center = center.reshape(-1).float().contiguous()
    scale = LOG2E / teacher_temp
    BLOCK_B, BLOCK_K = 32, 128
    n_kblocks = triton.cdiv(K, BLOCK_K)
    f32 = dict(device=t.device, dtype=torch.float32)
    logits_sum = torch.empty(K, **f32)
    part_max, part_sum = torch.empty(n_kblocks, B, **f32), torch.empty(n_kblocks, B, **f32)
    _stats_kernel[(n_kblocks,)](t, center, logits_sum, part_max, part_sum, B, K, t.stride(0), scale,
                                BLOCK_B=BLOCK_B, BLOCK_K=BLOCK_K, num_warps=4)
    if _distributed():
        handle = dist.all_reduce(logits_sum, async_op=True)  # overlaps with the probabilities
    lse = torch.empty(B, **f32)
    _lse_kernel[(triton.cdiv(B, 32),)](part_max, part_sum, lse, B, n_kblocks, BLOCK_P=128, BLOCK_B=32, num_warps=4)
    probs = torch.empty(B, K, **f32)
    _probs_kernel[(triton.cdiv(B, BLOCK_B), n_kblocks)](t, center, lse, probs, B, K, t.stride(0), probs.stride(0),
                                                         scale, BLOCK_B=BLOCK_B, BLOCK_K=BLOCK_K, num_warps=4)
    if _distributed():
        handle.wait()
    return probs, logits_sum
