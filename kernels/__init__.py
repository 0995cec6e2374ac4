"""nanorad's fused kernels. One small dispatch function per operation: Triton on CUDA tensors, the
plain PyTorch reference on CPU or when the environment sets NANORAD_KERNELS=ref. Each kernel lives
in its own file beside its reference (attention.py, sinkhorn.py, centering.py, ema.py)."""
import os

import torch
import torch.nn.functional as F

from kernels.attention import HEAD_DIMS, attention_triton
from kernels.centering import softmax_center_reference, softmax_center_triton, update_center
from kernels.ema import ema_reference_, ema_triton_
from kernels.sinkhorn import sinkhorn_knopp_reference, sinkhorn_knopp_triton

__all__ = ["attention", "sinkhorn_knopp", "softmax_center", "update_center", "ema_"]


def _use_triton(x):
    choice = os.environ.get("NANORAD_KERNELS", "triton")
    if choice not in ("triton", "ref"):
        raise ValueError(f"environment variable NANORAD_KERNELS: expected 'triton' or 'ref', found {choice!r}")
    return x.is_cuda and choice == "triton"


def attention(q, k, v):
    """softmax(q k^T / sqrt(Dh)) v, non-causal, for (B, H, N, Dh) tensors. Triton for fp16/bf16
    CUDA tensors with Dh in 16/32/64/128; PyTorch's scaled_dot_product_attention otherwise (in fp32
    for bf16 CPU tensors, returned as bf16)."""
    if (_use_triton(q) and q.dtype in (torch.float16, torch.bfloat16) and q.dtype == k.dtype == v.dtype
            and q.shape[-1] in HEAD_DIMS and q.shape == k.shape == v.shape):
        return attention_triton(q, k, v)
    if not q.is_cuda and q.dtype == torch.bfloat16:
        # CPU bf16 autocast: PyTorch's CPU attention backward is ~5x slower in bf16 than in fp32 at
        # ViT-tiny sizes, while the bf16 win is in the matmuls around it; attend in fp32 (autocast
        # would cast the inputs straight back to bf16).
        with torch.autocast("cpu", enabled=False):
            return F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v)


def sinkhorn_knopp(teacher_logits, teacher_temp, n_iterations=3, n_samples_total=None):
    """DINOv2 Sinkhorn-Knopp teacher targets: (B, K) logits -> (B, K) fp32 assignment probabilities.
    All-reduces across ranks when torch.distributed is initialised. n_samples_total: global sample
    count (default B * world_size; iBOT passes its all-reduced number of masked patches)."""
    fn = sinkhorn_knopp_triton if _use_triton(teacher_logits) else sinkhorn_knopp_reference
    return fn(teacher_logits, teacher_temp, n_iterations, n_samples_total)


def softmax_center(teacher_logits, center, teacher_temp):
    """softmax((t - center) / temp) -> (probs (B, K) fp32, logits_sum (K,) fp32): the batch sum of the
    raw logits for the next `update_center`, all-reduced across ranks."""
    fn = softmax_center_triton if _use_triton(teacher_logits) else softmax_center_reference
    return fn(teacher_logits, center, teacher_temp)


def ema_(teacher_params, student_params, momentum):
    """In place, over two equally long lists of tensors: teacher <- m * teacher + (1 - m) * student."""
    teachers, students = list(teacher_params), list(student_params)
    fn = ema_triton_ if teachers and _use_triton(teachers[0]) else ema_reference_
    fn(teachers, students, momentum)
