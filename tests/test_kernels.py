"""Every Triton kernel against its PyTorch reference (on CPU through TRITON_INTERPRET=1, or on a GPU),
the DINOv2 semantics of Sinkhorn-Knopp and centering, a 2-rank gloo run, and the bench script.

Run: TRITON_INTERPRET=1 python -m pytest -q tests/test_kernels.py   (the `cuda` tests: on a GPU, without it)
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

import kernels
from conftest import REPO
from kernels.attention import attention_reference, attention_triton
from kernels.centering import softmax_center_reference, softmax_center_triton, update_center
from kernels.ema import ema_reference_, ema_triton_
from kernels.sinkhorn import sinkhorn_knopp_reference, sinkhorn_knopp_triton

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
# The cuda tests check the compiled kernels; the interpreter is what the CPU tests check.
cuda = pytest.mark.skipif(not torch.cuda.is_available() or INTERPRETED,
                          reason="needs a CUDA GPU and compiled Triton (run without TRITON_INTERPRET=1)")
triton_on_cpu = pytest.mark.skipif(not INTERPRETED, reason="Triton on CPU tensors needs TRITON_INTERPRET=1")


def dinov2_sinkhorn_float64(teacher_logits, teacher_temp, n_samples=None, n_iterations=3):
    """DINOv2's sinkhorn_knopp_teacher transcribed without any shift, in float64: the ground truth
    for logits whose exp(t / 0.04) overflows float32 (our kernels subtract a per-prototype maximum)."""
    Q = torch.exp(teacher_logits.double() / teacher_temp).t()
    B = Q.shape[1] if n_samples is None else n_samples
    K = Q.shape[0]
    Q /= torch.sum(Q)
    for _ in range(n_iterations):
        Q /= torch.sum(Q, dim=1, keepdim=True)
        Q /= K
        Q /= torch.sum(Q, dim=0, keepdim=True)
        Q /= B
    Q *= B
    return Q.t()


# ----------------------------------------------------------------------------------------------
# attention
# ----------------------------------------------------------------------------------------------

# (batch, heads, length, head dim, logit scale): lengths with tails shorter than a block; the large
# logit scale makes the running maximum move and the log-sum-exp very negative for some queries
ATTENTION_SHAPES = [(1, 1, 1, 32, 1.0), (1, 2, 7, 64, 1.0), (2, 1, 197, 32, 1.0), (1, 1, 257, 64, 8.0)]


def qkv_slices(B, H, N, D, scale, dtype=torch.float32, device="cpu"):
    """q, k, v as strided slices of one (B, N, 3, H, D) projection, as a ViT produces them."""
    qkv = torch.randn(B, N, 3, H, D, device=device, dtype=dtype)
    qkv[:, :, 0] *= scale
    return qkv.requires_grad_(True)


@triton_on_cpu
@pytest.mark.parametrize("B,H,N,D,scale", ATTENTION_SHAPES)
def test_attention_triton_forward_matches_reference(B, H, N, D, scale):
    torch.manual_seed(N)
    qkv = qkv_slices(B, H, N, D, scale)
    out = attention_triton(*qkv.permute(2, 0, 3, 1, 4))
    expected = attention_reference(*qkv.double().permute(2, 0, 3, 1, 4))
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


@triton_on_cpu
@pytest.mark.parametrize("B,H,N,D,scale", ATTENTION_SHAPES)
def test_attention_triton_gradients_of_q_k_v_match_reference(B, H, N, D, scale):
    torch.manual_seed(N + 1)
    qkv = qkv_slices(B, H, N, D, scale)
    grad_out = torch.randn(B, H, N, D)
    out = attention_triton(*qkv.permute(2, 0, 3, 1, 4))
    grad, = torch.autograd.grad(out, qkv, grad_out)
    expected_out = attention_reference(*qkv.double().permute(2, 0, 3, 1, 4))
    expected, = torch.autograd.grad(expected_out, qkv, grad_out.double())
    # fp32 sums over N keys, in an order that depends on the interpreter's BLAS threads: dk at scale 8
    # was off by 2.1e-5 with one thread (OMP_NUM_THREADS=1), against 2e-5 allowed before.
    for i, name in enumerate("qkv"):
        torch.testing.assert_close(grad[:, :, i], expected[:, :, i], atol=5e-5, rtol=1e-4, msg=lambda m: f"d{name}: {m}")


def test_attention_dispatch_on_cpu_matches_reference():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 3, 50, 64).unbind(0)
    torch.testing.assert_close(kernels.attention(q, k, v), attention_reference(q, k, v), atol=1e-5, rtol=1e-5)


def test_attention_dispatch_under_cpu_bf16_autocast_keeps_bf16_and_matches_fp32_reference():
    torch.manual_seed(0)
    q, k, v = (2 * torch.randn(3, 2, 3, 17, 64)).bfloat16().unbind(0)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = kernels.attention(q, k, v)
    assert out.dtype == torch.bfloat16  # the fp32 detour is invisible to the caller
    out.float().pow(2).sum().backward()
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    expected = attention_reference(q32, k32, v32)
    expected.pow(2).sum().backward()
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=1e-2)  # one bf16 rounding of the output
    for name, t, t32 in zip("qkv", (q, k, v), (q32, k32, v32)):
        assert t.grad.dtype == torch.bfloat16
        torch.testing.assert_close(t.grad.float(), t32.grad, atol=0.1, rtol=5e-2, msg=lambda m: f"d{name}: {m}")


# ----------------------------------------------------------------------------------------------
# Sinkhorn-Knopp
# ----------------------------------------------------------------------------------------------

SIZES = [(1, 4099), (3, 1000), (33, 4099)]  # (B, K): B past one block of 32, K not a power of two


@triton_on_cpu
@pytest.mark.parametrize("B,K", SIZES)
def test_sinkhorn_triton_matches_reference(B, K):
    torch.manual_seed(B)
    t = 3 * torch.randn(B, K)
    torch.testing.assert_close(sinkhorn_knopp_triton(t, 0.04), sinkhorn_knopp_reference(t, 0.04), atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("fn", [sinkhorn_knopp_reference, pytest.param(sinkhorn_knopp_triton, marks=triton_on_cpu)])
@pytest.mark.parametrize("head", ["dino", "ibot"])
def test_sinkhorn_matches_dinov2_oracle(fn, head, loss_oracle):
    t = loss_oracle[f"{head}.teacher_logits"]
    n_samples = t.shape[0]  # iBOT: the number of masked patches, all of them on this one rank
    torch.testing.assert_close(fn(t, 0.04, n_samples_total=n_samples), loss_oracle[f"{head}.sinkhorn_teacher_probs"],
                               atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("fn", [sinkhorn_knopp_reference, pytest.param(sinkhorn_knopp_triton, marks=triton_on_cpu)])
def test_sinkhorn_is_unchanged_by_large_per_prototype_logit_offsets(fn):
    # Offsets of up to +-60 (+-1500 after the temperature: far past exp's float32 range) and a
    # global shift of 40 must change nothing: each scales a prototype row, undone by its normalisation.
    torch.manual_seed(1)
    t = 2 * torch.randn(17, 1000)
    shifted = t + 40 + 60 * (2 * torch.rand(1, 1000) - 1)
    expected = dinov2_sinkhorn_float64(t, 0.04)
    torch.testing.assert_close(fn(shifted, 0.04).double(), expected, atol=1e-6, rtol=1e-4)


SINKHORN_WORKER = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    from safetensors.torch import load_file, save_file
    from kernels.sinkhorn import sinkhorn_knopp_reference, sinkhorn_knopp_triton
    from kernels.centering import softmax_center_reference, softmax_center_triton
    rank, tmp = int(sys.argv[1]), sys.argv[2]
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=2)
    inputs = load_file(f"{tmp}/inputs.safetensors")
    t = inputs["logits"].chunk(2)[rank].contiguous()
    out = {"sinkhorn_reference": sinkhorn_knopp_reference(t, 0.04),
           "sinkhorn_triton": sinkhorn_knopp_triton(t, 0.04)}
    out["center_probs_reference"], out["center_sum_reference"] = softmax_center_reference(t, inputs["center"], 0.04)
    out["center_probs_triton"], out["center_sum_triton"] = softmax_center_triton(t, inputs["center"], 0.04)
    save_file(out, f"{tmp}/rank{rank}.safetensors")
    dist.destroy_process_group()
""")


@triton_on_cpu
def test_sinkhorn_and_centering_on_two_gloo_ranks_equal_one_process_on_whole_batch(tmp_path):
    torch.manual_seed(2)
    logits, center = 3 * torch.randn(10, 1000), 0.1 * torch.randn(1000)
    save_file({"logits": logits, "center": center}, str(tmp_path / "inputs.safetensors"))
    env = dict(os.environ, PYTHONPATH=str(REPO))
    workers = [subprocess.Popen([sys.executable, "-c", SINKHORN_WORKER, str(rank), str(tmp_path)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in range(2)]
    for w in workers:
        output = w.communicate(timeout=120)[0]
        assert w.returncode == 0, output
    ranks = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(2)]
    expected_probs = sinkhorn_knopp_reference(logits, 0.04)
    expected_center_probs, expected_sum = softmax_center_reference(logits, center, 0.04)
    for impl in ("reference", "triton"):
        both = torch.cat([r[f"sinkhorn_{impl}"] for r in ranks])
        torch.testing.assert_close(both, expected_probs, atol=1e-6, rtol=1e-4, msg=lambda m: f"sinkhorn {impl}: {m}")
        both = torch.cat([r[f"center_probs_{impl}"] for r in ranks])
        torch.testing.assert_close(both, expected_center_probs, atol=1e-5, rtol=1e-4, msg=lambda m: f"centering {impl}: {m}")
        for r in ranks:
            torch.testing.assert_close(r[f"center_sum_{impl}"], expected_sum, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# softmax-centering
# ----------------------------------------------------------------------------------------------

@triton_on_cpu
@pytest.mark.parametrize("B,K", SIZES)
def test_softmax_center_triton_matches_reference(B, K):
    torch.manual_seed(B)
    t, center = 3 * torch.randn(B, K), torch.randn(1, K)
    probs, logits_sum = softmax_center_triton(t, center, 0.04)
    expected_probs, expected_sum = softmax_center_reference(t, center, 0.04)
    torch.testing.assert_close(probs, expected_probs, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(logits_sum, expected_sum, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fn", [softmax_center_reference, pytest.param(softmax_center_triton, marks=triton_on_cpu)])
def test_softmax_center_with_momentum_matches_dinov2_oracle_over_three_steps(fn, loss_oracle):
    # step s centres logits + s with the center updated through step s - 1, then updates it
    oracle = loss_oracle
    t = oracle["dino.teacher_logits"]
    center = torch.zeros(1, t.shape[1])
    for step in range(3):
        probs, logits_sum = fn(t + step, center, 0.04)
        torch.testing.assert_close(probs, oracle["dino.softmax_center_step_probs"][step], atol=2e-5, rtol=1e-4,
                                   msg=lambda m: f"step {step}: {m}")
        update_center(center, logits_sum, n_total=t.shape[0], momentum=0.9)
    torch.testing.assert_close(center, oracle["dino.center_after_3_steps"], atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# EMA
# ----------------------------------------------------------------------------------------------

ODD_SIZES = [(1,), (5,), (7, 3), (4097,), (3, 3000), (10000,)]  # 4096 = one program's block


def params(sizes, dtype=torch.float32, device="cpu"):
    return [torch.randn(s, device=device).to(dtype) for s in sizes]


@triton_on_cpu
def test_ema_triton_matches_reference_on_odd_sized_tensors():
    torch.manual_seed(0)
    teacher, student = params(ODD_SIZES), params(ODD_SIZES)
    expected = [t.clone() for t in teacher]
    ema_triton_(teacher, student, 0.994)
    ema_reference_(expected, student, 0.994)
    for got, want in zip(teacher, expected):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


@triton_on_cpu
def test_ema_triton_updates_bf16_teacher_from_fp32_student_and_strided_tensors():
    torch.manual_seed(1)
    teacher, student = params(ODD_SIZES, torch.bfloat16), params(ODD_SIZES)
    strided_teacher, strided_student = torch.randn(6, 5).t(), torch.randn(5, 6)  # falls back to the reference
    expected = [(0.9 * t.float() + 0.1 * s).bfloat16() for t, s in zip(teacher, student)]
    expected_strided = 0.9 * strided_teacher + 0.1 * strided_student
    ema_triton_(teacher + [strided_teacher], student + [strided_student], 0.9)
    for got, want in zip(teacher, expected):  # one rounding to bf16, so at most one bf16 step apart
        torch.testing.assert_close(got.float(), want.float(), atol=1e-6, rtol=2 ** -7)
    torch.testing.assert_close(strided_teacher, expected_strided, atol=1e-6, rtol=1e-6)


def test_dispatch_rejects_unknown_NANORAD_KERNELS_value(monkeypatch):
    monkeypatch.setenv("NANORAD_KERNELS", "fast")
    with pytest.raises(ValueError, match="NANORAD_KERNELS"):
        kernels.ema_([torch.zeros(3)], [torch.ones(3)], 0.9)


# ----------------------------------------------------------------------------------------------
# on a GPU: the dispatch functions choose Triton; compare with the references at training sizes
# ----------------------------------------------------------------------------------------------

@cuda
@pytest.mark.parametrize("N,D,dtype", [(257, 64, torch.bfloat16), (1370, 64, torch.bfloat16),
                                       (197, 128, torch.bfloat16), (261, 32, torch.float16)])
def test_attention_cuda_matches_reference_forward_and_grads(N, D, dtype):
    torch.manual_seed(0)
    qkv = qkv_slices(4, 6, N, D, 1.0, dtype, "cuda")
    grad_out = torch.randn(4, 6, N, D, device="cuda", dtype=dtype)
    out = kernels.attention(*qkv.permute(2, 0, 3, 1, 4))
    grad, = torch.autograd.grad(out, qkv, grad_out)
    expected_out = attention_reference(*qkv.float().permute(2, 0, 3, 1, 4))
    expected, = torch.autograd.grad(expected_out, qkv, grad_out.float())
    rel = lambda a, b: ((a.float() - b).norm() / b.norm()).item()
    assert rel(out, expected_out) < 1e-2
    for i in range(3):
        assert rel(grad[:, :, i], expected[:, :, i]) < 2e-2


@cuda
def test_attention_cuda_under_torch_compile_matches_eager():
    """Inductor launches user Triton kernels itself and passes Python floats as fp64 (the softmax scale
    broke tl.dot's fp32 accumulator until the kernels cast it; seen with `pretrain.py --compile=True`)."""
    torch.manual_seed(0)
    qkv = qkv_slices(2, 3, 197, 64, 1.0, torch.bfloat16, "cuda")
    grad_out = torch.randn(2, 3, 197, 64, device="cuda", dtype=torch.bfloat16)
    compiled = torch.compile(lambda x: kernels.attention(*x.permute(2, 0, 3, 1, 4)))
    out = compiled(qkv)
    grad, = torch.autograd.grad(out, qkv, grad_out)
    expected_out = kernels.attention(*qkv.permute(2, 0, 3, 1, 4))
    expected, = torch.autograd.grad(expected_out, qkv, grad_out)
    torch.testing.assert_close(out, expected, atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(grad, expected, atol=1e-2, rtol=1e-2)


@cuda
@pytest.mark.parametrize("B,K", [(3, 4099), (256, 65536)])
def test_sinkhorn_and_centering_cuda_match_reference(B, K):
    torch.manual_seed(0)
    t, center = 3 * torch.randn(B, K, device="cuda"), torch.randn(K, device="cuda")
    torch.testing.assert_close(kernels.sinkhorn_knopp(t, 0.04), sinkhorn_knopp_reference(t, 0.04), atol=1e-6, rtol=1e-3)
    probs, logits_sum = kernels.softmax_center(t, center, 0.04)
    expected_probs, expected_sum = softmax_center_reference(t, center, 0.04)
    torch.testing.assert_close(probs, expected_probs, atol=1e-5, rtol=1e-3)
    torch.testing.assert_close(logits_sum, expected_sum, atol=1e-3, rtol=1e-4)


@cuda
def test_ema_cuda_matches_reference():
    torch.manual_seed(0)
    sizes = ODD_SIZES + [(768, 3072), (65536, 256)]
    teacher, student = params(sizes, device="cuda"), params(sizes, device="cuda")
    expected = [t.clone() for t in teacher]
    kernels.ema_(teacher, student, 0.996)
    ema_reference_(expected, student, 0.996)
    for got, want in zip(teacher, expected):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# bench/kernels.py runs (smoke mode: references at small sizes on CPU)
# ----------------------------------------------------------------------------------------------

def test_bench_script_runs_in_smoke_mode():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(REPO / "bench" / "kernels.py"), "--smoke=True"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    for name in ("attention", "sinkhorn", "softmax_center", "ema"):
        assert name in result.stdout, result.stdout
