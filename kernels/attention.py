"""Fused attention, forward and backward (FlashAttention-2 style online softmax, non-causal), in
Triton, beside the plain PyTorch reference.

softmax(q k^T / sqrt(Dh)) v for (B, H, N, Dh) inputs, without materialising the N x N scores: each
program keeps a block of queries in registers and streams over the keys, rescaling its running
sum whenever the running maximum grows. The forward pass saves only the output and the log-sum-exp
per query; the backward pass recomputes the probabilities block by block, in two kernels: one per
block of queries (dQ; it also computes delta = rowsum(dO * O)) and one per block of keys (dK, dV).

ViT sequence lengths (197, 257, 1370, ...) are not multiples of any block size. Loops run over the
full blocks of keys without masks and finish with one masked block; rows past the end are loaded
as zeros (with dO = 0 and delta = 0 they add nothing to dK and dV).

Inputs may be strided (e.g. q, k, v sliced out of one qkv projection) as long as the head dim is
contiguous. The output is laid out (B, N, H, Dh) in memory and returned as a (B, H, N, Dh) view, so
that the usual `.transpose(1, 2).reshape(B, N, H * Dh)` that follows costs nothing.
"""
import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
HEAD_DIMS = (16, 32, 64, 128)


# ----------------------------------------------------------------------------------------------
# PyTorch reference
# ----------------------------------------------------------------------------------------------

def attention_reference(q, k, v):
    """softmax(q k^T / sqrt(Dh)) v in plain PyTorch (materialises the B x H x N x N scores)."""
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    return torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v


# ----------------------------------------------------------------------------------------------
# Triton: block-size candidates. The interpreter (CPU tests) gets one small configuration, so
# that it never benchmarks; the GPU picks the fastest per sequence length and head dim.
# ----------------------------------------------------------------------------------------------

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _configs(candidates):
    if _INTERPRET:
        candidates = [(64, 64, 4, 1)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in candidates]


_FWD_CONFIGS = _configs([(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 32, 4, 4),
                         (64, 32, 4, 4)])
# dQ: BLOCK_M queries per program, streaming BLOCK_N keys; dKdV: BLOCK_N keys per program, streaming BLOCK_M queries
_BWD_DQ_CONFIGS = _configs([(128, 32, 4, 5), (128, 32, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 4),
                            (128, 64, 4, 2)])
_BWD_DKDV_CONFIGS = _configs([(32, 128, 4, 5), (32, 128, 4, 3), (64, 128, 8, 3), (64, 64, 4, 3), (32, 64, 4, 4),
                              (64, 128, 8, 2)])


@triton.jit
def _fwd_block(q, acc, m_i, l_i, k_ptrs, v_ptrs, offs_n, N, qk_scale, MASKED: tl.constexpr):
    # one block of keys: scores, online softmax update, accumulate p @ v
    if MASKED:
        valid = offs_n < N
        k = tl.load(k_ptrs, mask=valid[None, :], other=0.0)
        v = tl.load(v_ptrs, mask=valid[:, None], other=0.0)
    else:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    qk = tl.dot(q, k)
    if MASKED:
        qk = tl.where(valid[None, :], qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    p = tl.exp2(qk * qk_scale - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    return acc, m_new, l_i


@triton.autotune(configs=_FWD_CONFIGS, key=["N", "HEAD_DIM"])
@triton.jit
def _attn_fwd_kernel(Q, K, V, O, LSE, H, N, qk_scale,
                     stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                     stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
                     HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # torch.compile hands Python floats to Triton as fp64, which would make the softmax statistics fp64 and
    # tl.dot's fp32 accumulator refuse them: keep the scale fp32 as a plain launch passes it.
    qk_scale = tl.cast(qk_scale, tl.float32)
    n_mblocks = tl.cdiv(N, BLOCK_M)
    pid = tl.program_id(0)
    bh = (pid // n_mblocks).to(tl.int64)
    b, h = bh // H, bh % H
    offs_m = (pid % n_mblocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    q = tl.load(Q + offs_m[:, None] * stride_qn + offs_d[None, :], mask=offs_m[:, None] < N, other=0.0)
    k_ptrs = K + offs_n[None, :] * stride_kn + offs_d[:, None]  # (HEAD_DIM, BLOCK_N): k transposed
    v_ptrs = V + offs_n[:, None] * stride_vn + offs_d[None, :]
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    n_full = (N // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        acc, m_i, l_i = _fwd_block(q, acc, m_i, l_i, k_ptrs + start_n * stride_kn, v_ptrs + start_n * stride_vn,
                                   start_n + offs_n, N, qk_scale, MASKED=False)
    if n_full < N:  # the tail: fewer than BLOCK_N keys left
        acc, m_i, l_i = _fwd_block(q, acc, m_i, l_i, k_ptrs + n_full * stride_kn, v_ptrs + n_full * stride_vn,
                                   n_full + offs_n, N, qk_scale, MASKED=True)
    acc = acc / l_i[:, None]
    O += b * stride_ob + h * stride_oh
    tl.store(O + offs_m[:, None] * stride_on + offs_d[None, :], acc.to(O.dtype.element_ty), mask=offs_m[:, None] < N)
    tl.store(LSE + bh * N + offs_m, m_i + tl.log2(l_i), mask=offs_m < N)  # log2 domain, scores pre-scaled


@triton.jit
def _dq_block(q, do, dq, lse, delta, kT_ptrs, vT_ptrs, offs_n, N, qk_scale, MASKED: tl.constexpr):
    if MASKED:
        valid = offs_n[None, :] < N
        kT = tl.load(kT_ptrs, mask=valid, other=0.0)
        vT = tl.load(vT_ptrs, mask=valid, other=0.0)
    else:
        kT = tl.load(kT_ptrs)
        vT = tl.load(vT_ptrs)
    p = tl.exp2(tl.dot(q, kT) * qk_scale - lse[:, None])
    if MASKED:  # a zero key scores 0, whose exp2(0 - lse) can overflow for very negative lse
        p = tl.where(valid, p, 0.0)
    ds = p * (tl.dot(do, vT) - delta[:, None])
    return tl.dot(ds.to(kT.dtype), tl.trans(kT), dq)


@triton.autotune(configs=_BWD_DQ_CONFIGS, key=["N", "HEAD_DIM"])
@triton.jit
def _attn_bwd_dq_kernel(Q, K, V, O, DO, DQ, LSE, DELTA, H, N, qk_scale, sm_scale,
                        stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                        stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
                        stride_dob, stride_doh, stride_don, stride_dqb, stride_dqh, stride_dqn,
                        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    qk_scale, sm_scale = tl.cast(qk_scale, tl.float32), tl.cast(sm_scale, tl.float32)  # fp64 under torch.compile
    n_mblocks = tl.cdiv(N, BLOCK_M)
    pid = tl.program_id(0)
    bh = (pid // n_mblocks).to(tl.int64)
    b, h = bh // H, bh % H
    offs_m = (pid % n_mblocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    mask_m = offs_m < N
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :],
                mask=mask_m[:, None], other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_don + offs_d[None, :],
                 mask=mask_m[:, None], other=0.0)
    o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :],
                mask=mask_m[:, None], other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)  # rowsum(dO * O) = rowsum(P * dP)
    tl.store(DELTA + bh * N + offs_m, delta, mask=mask_m)  # read by the dK/dV kernel, launched next
    lse = tl.load(LSE + bh * N + offs_m, mask=mask_m, other=0.0)
    kT_ptrs = K + b * stride_kb + h * stride_kh + offs_n[None, :] * stride_kn + offs_d[:, None]
    vT_ptrs = V + b * stride_vb + h * stride_vh + offs_n[None, :] * stride_vn + offs_d[:, None]
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    n_full = (N // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        dq = _dq_block(q, do, dq, lse, delta, kT_ptrs + start_n * stride_kn, vT_ptrs + start_n * stride_vn,
                       start_n + offs_n, N, qk_scale, MASKED=False)
    if n_full < N:
        dq = _dq_block(q, do, dq, lse, delta, kT_ptrs + n_full * stride_kn, vT_ptrs + n_full * stride_vn,
                       n_full + offs_n, N, qk_scale, MASKED=True)
    tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqn + offs_d[None, :],
             (dq * sm_scale).to(DQ.dtype.element_ty), mask=mask_m[:, None])


@triton.autotune(configs=_BWD_DKDV_CONFIGS, key=["N", "HEAD_DIM"])
@triton.jit
def _attn_bwd_dkdv_kernel(Q, K, V, DO, DK, DV, LSE, DELTA, H, N, qk_scale, sm_scale,
                          stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                          stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_don,
                          stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
                          HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    qk_scale, sm_scale = tl.cast(qk_scale, tl.float32), tl.cast(sm_scale, tl.float32)  # fp64 under torch.compile
    n_nblocks = tl.cdiv(N, BLOCK_N)
    pid = tl.program_id(0)
    bh = (pid // n_nblocks).to(tl.int64)
    b, h = bh // H, bh % H
    offs_n = (pid % n_nblocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    mask_n = offs_n < N
    k = tl.load(K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :],
                mask=mask_n[:, None], other=0.0)
    v = tl.load(V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :],
                mask=mask_n[:, None], other=0.0)
    qT_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[None, :] * stride_qn + offs_d[:, None]
    do_ptrs = DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_don + offs_d[None, :]
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    for start_m in range(0, N, BLOCK_M):
        # queries past the end load as zeros with dO = 0 and delta = 0: they add nothing to dK, dV
        rows = start_m + offs_m
        valid = rows < N
        qT = tl.load(qT_ptrs + start_m * stride_qn, mask=valid[None, :], other=0.0)
        do = tl.load(do_ptrs + start_m * stride_don, mask=valid[:, None], other=0.0)
        lse = tl.load(LSE + bh * N + rows, mask=valid, other=0.0)
        delta = tl.load(DELTA + bh * N + rows, mask=valid, other=0.0)
        pT = tl.exp2(tl.dot(k, qT) * qk_scale - lse[None, :])
        dv = tl.dot(pT.to(do.dtype), do, dv)
        dpT = tl.dot(v, tl.trans(do))
        dsT = pT * (dpT - delta[None, :])
        dk = tl.dot(dsT.to(qT.dtype), tl.trans(qT), dk)
    tl.store(DK + b * stride_dkb + h * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :],
             (dk * sm_scale).to(DK.dtype.element_ty), mask=mask_n[:, None])
    tl.store(DV + b * stride_dvb + h * stride_dvh + offs_n[:, None] * stride_dvn + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=mask_n[:, None])


def _strides(x):
    return x.stride(0), x.stride(1), x.stride(2)


def _head_dim_contiguous(x):
    return x if x.stride(-1) == 1 else x.contiguous()


def _empty_bnhd(like):
    """(B, H, N, Dh) tensor stored as (B, N, H, Dh): the layout the attention output is reshaped to."""
    B, H, N, D = like.shape
    return torch.empty(B, N, H, D, device=like.device, dtype=like.dtype).transpose(1, 2)


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v):
        q, k, v = _head_dim_contiguous(q), _head_dim_contiguous(k), _head_dim_contiguous(v)
        B, H, N, D = q.shape
        sm_scale = D ** -0.5
        o = _empty_bnhd(q)
        lse = torch.empty(B, H, N, device=q.device, dtype=torch.float32)
        grid = lambda meta: (triton.cdiv(N, meta["BLOCK_M"]) * B * H,)
        _attn_fwd_kernel[grid](q, k, v, o, lse, H, N, sm_scale * LOG2E,
                               *_strides(q), *_strides(k), *_strides(v), *_strides(o), HEAD_DIM=D)
        ctx.save_for_backward(q, k, v, o, lse)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        do = _head_dim_contiguous(do)
        B, H, N, D = q.shape
        sm_scale = D ** -0.5
        dq, dk, dv = _empty_bnhd(q), _empty_bnhd(k), _empty_bnhd(v)
        delta = torch.empty_like(lse)
        grid_m = lambda meta: (triton.cdiv(N, meta["BLOCK_M"]) * B * H,)
        _attn_bwd_dq_kernel[grid_m](q, k, v, o, do, dq, lse, delta, H, N, sm_scale * LOG2E, sm_scale,
                                    *_strides(q), *_strides(k), *_strides(v), *_strides(o), *_strides(do),
                                    *_strides(dq), HEAD_DIM=D)
        grid_n = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]) * B * H,)
        _attn_bwd_dkdv_kernel[grid_n](q, k, v, do, dk, dv, lse, delta, H, N, sm_scale * LOG2E, sm_scale,
                                      *_strides(q), *_strides(k), *_strides(v), *_strides(do),
                                      *_strides(dk), *_strides(dv), HEAD_DIM=D)
        return dq, dk, dv


def attention_triton(q, k, v):
    """Fused attention for (B, H, N, Dh) q, k, v of one dtype (fp16/bf16 on GPU, fp32 in the
    interpreter), Dh in HEAD_DIMS; differentiable."""
    if not (q.shape == k.shape == v.shape and q.dim() == 4):
        raise ValueError(f"attention: q, k, v must share one (B, H, N, Dh) shape, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[-1] not in HEAD_DIMS:
        raise ValueError(f"attention: head dim must be one of {HEAD_DIMS}, got {q.shape[-1]}")
    return _FlashAttention.apply(q, k, v)
