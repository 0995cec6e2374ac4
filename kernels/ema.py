"""Multi-tensor EMA of the teacher: teacher <- m * teacher + (1 - m) * student over every parameter,
in one Triton launch per (teacher dtype, student dtype) pair, beside the plain PyTorch reference.

A ViT-L with its heads has ~300 parameter tensors; one launch per tensor would leave the GPU idle
between small launches. Here a table of (tensor index, start offset) blocks covers all tensors and
each program updates one block; the teachers' and students' addresses are read from a table of
pointers. The table only depends on the tensors' addresses and sizes, which do not change during
training, so it is built once and cached.
"""
import torch
import triton
import triton.language as tl

BLOCK = 4096  # elements per program: 16 KB (fp32) read from each of teacher and student


# ----------------------------------------------------------------------------------------------
# PyTorch reference
# ----------------------------------------------------------------------------------------------

@torch.no_grad()
def ema_reference_(teacher_params, student_params, momentum):
    """In place: every teacher tensor <- momentum * teacher + (1 - momentum) * student (as DINOv2)."""
    for t, s in zip(teacher_params, student_params, strict=True):
        t.mul_(momentum).add_(s.to(t.dtype), alpha=1 - momentum)


# ----------------------------------------------------------------------------------------------
# Triton
# ----------------------------------------------------------------------------------------------

@triton.jit
def _ema_kernel(teacher_ptrs, student_ptrs, numels, block_tensor, block_start, momentum,
                teacher_like, student_like, BLOCK: tl.constexpr):
    # teacher_like / student_like are the first tensors of the group, passed only so that the
    # element types of the pointers read from the tables are known at compile time.
    pid = tl.program_id(0)
    i = tl.load(block_tensor + pid)
    start = tl.load(block_start + pid)
    n = tl.load(numels + i)
    teacher = tl.load(teacher_ptrs + i).to(tl.pointer_type(teacher_like.dtype.element_ty))
    student = tl.load(student_ptrs + i).to(tl.pointer_type(student_like.dtype.element_ty))
    # every tensor is checked to start on a 16-byte boundary: lets the compiler use 16-byte accesses
    teacher = tl.multiple_of(teacher, 16)
    student = tl.multiple_of(student, 16)
    offs = tl.multiple_of(start, BLOCK) + tl.arange(0, BLOCK)
    if start + BLOCK <= n:  # all blocks but a tensor's last one: no mask, so accesses stay vectorised
        t = tl.load(teacher + offs).to(tl.float32)
        s = tl.load(student + offs).to(tl.float32)
        tl.store(teacher + offs, (t * momentum + s * (1.0 - momentum)).to(teacher_like.dtype.element_ty))
    else:
        mask = offs < n
        t = tl.load(teacher + offs, mask=mask).to(tl.float32)
        s = tl.load(student + offs, mask=mask).to(tl.float32)
        tl.store(teacher + offs, (t * momentum + s * (1.0 - momentum)).to(teacher_like.dtype.element_ty), mask=mask)


def _fusable(t, s):
    return (t.is_contiguous() and s.is_contiguous() and t.numel() == s.numel() and t.device == s.device
            and t.data_ptr() % 16 == 0 and s.data_ptr() % 16 == 0)


_tables = {}  # (device, tensor addresses and sizes) -> launch tables; parameters never move in training


def _launch_tables(teachers, students):
    key = tuple((t.data_ptr(), s.data_ptr(), t.numel()) for t, s in zip(teachers, students))
    if key not in _tables:
        numels = torch.tensor([t.numel() for t in teachers], dtype=torch.int64)
        n_blocks = (numels + BLOCK - 1) // BLOCK
        block_tensor = torch.repeat_interleave(torch.arange(len(teachers), dtype=torch.int32), n_blocks)
        first_block = torch.cumsum(n_blocks, 0) - n_blocks
        block_start = (torch.arange(int(n_blocks.sum()), dtype=torch.int64) - first_block[block_tensor]) * BLOCK
        tables = (torch.tensor([t.data_ptr() for t in teachers], dtype=torch.int64),
                  torch.tensor([s.data_ptr() for s in students], dtype=torch.int64),
                  numels, block_tensor, block_start)
        if len(_tables) > 8:  # a long-lived process that keeps building new models
            _tables.clear()
        _tables[key] = tuple(x.to(teachers[0].device) for x in tables)
    return _tables[key]


@torch.no_grad()
def ema_triton_(teacher_params, student_params, momentum):
    """Same contract as ema_reference_. Tensors that are not contiguous or not 16-byte aligned go
    through the reference."""
    teachers, students = list(teacher_params), list(student_params)
    if len(teachers) != len(students):
        raise ValueError(f"ema_: {len(teachers)} teacher tensors but {len(students)} student tensors")
    groups, rest = {}, []
    for t, s in zip(teachers, students):
        if _fusable(t, s):
            groups.setdefault((t.dtype, s.dtype, t.device), []).append((t, s))
        else:
            rest.append((t, s))
    for pairs in groups.values():
        ts, ss = [p[0] for p in pairs], [p[1] for p in pairs]
        teacher_ptrs, student_ptrs, numels, block_tensor, block_start = _launch_tables(ts, ss)
        _ema_kernel[(len(block_tensor),)](teacher_ptrs, student_ptrs, numels, block_tensor, block_start,
                                          float(momentum), ts[0], ss[0], BLOCK=BLOCK, num_warps=4)
    ema_reference_([p[0] for p in rest], [p[1] for p in rest], momentum)
