"""Times nanorad's Triton kernels against their PyTorch references (and, for attention, against
PyTorch's scaled_dot_product_attention with its flash, memory-efficient and cuDNN backends) at real sizes,
and prints one table: time, speed-up over each baseline, TFLOP/s or GB/s and % of the device's peak.

    python bench/kernels.py                 # on a GPU: ViT-S/B at 224 and 518, K = 65k/131k, ViT-B/L EMA
    python bench/kernels.py --smoke=True    # on CPU: the references only, at small sizes (CI runs this)

Throughput conventions: attention forward does 4 B H N^2 Dh FLOPs, forward+backward 3.5x that (the
backward's 5 matrix products, as FlashAttention counts them); GB/s counts the fewest bytes the
operation must move (inputs read once, outputs written once), so it is comparable across versions.
Attention's inputs and output gradient are strided as model.py makes them: q, k, v slices of one
(B, N, 3, H, Dh) qkv projection, the output gradient a (B, H, N, Dh) view of the (B, N, H, Dh) gradient
that backward brings from the output projection -- not contiguous (B, H, N, Dh) tensors.
"""
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere: `python bench/kernels.py`
from kernels.attention import attention_reference, attention_triton  # noqa: E402
from kernels.centering import softmax_center_reference, softmax_center_triton  # noqa: E402
from kernels.ema import ema_reference_, ema_triton_  # noqa: E402
from kernels.sinkhorn import sinkhorn_knopp_reference, sinkhorn_knopp_triton  # noqa: E402

# config ----------------------------------------------------------------------------------------
smoke = False          # CPU smoke run: references only, small sizes
dtype = "bfloat16"     # attention inputs
attention_batch_224 = 256
attention_batch_518 = 32
prototypes = (65536, 131072)
teacher_batches = (256, 1024)
ema_models = ("base", "large")
warmup_ms = 25
rep_ms = 100
from config import configure  # noqa: E402
config = configure(globals())
# -----------------------------------------------------------------------------------------------

# dense bf16 tensor-core FLOP/s and memory bandwidth from the datasheets, matched on the device name
PEAKS = {"H100 80GB HBM3": (989e12, 3.35e12), "H100 PCIe": (756e12, 2.0e12), "H100 NVL": (835e12, 3.9e12),
         "H200": (989e12, 4.8e12), "A100-SXM4-80GB": (312e12, 2.04e12), "A100-SXM4-40GB": (312e12, 1.55e12),
         "A100-PCIE-40GB": (312e12, 1.55e12), "A100 80GB PCIe": (312e12, 1.94e12), "L40S": (362e12, 0.864e12),
         "RTX 4090": (165e12, 1.01e12)}


def device_peaks(device):
    if device.type != "cuda":
        return None, None
    name = torch.cuda.get_device_name(device)
    return next((peaks for key, peaks in PEAKS.items() if key in name), (None, None))


def time_ms(fn, device, grads=()):
    """Median milliseconds per call: triton's do_bench (CUDA events, L2 flushed) on a GPU, a wall
    clock on CPU."""
    if device.type == "cuda":
        from triton.testing import do_bench
        return do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=list(grads), return_mode="median")
    fn()
    times = []
    for _ in range(3):
        for g in grads:
            g.grad = None
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[1]


def sdpa_backend(backend):
    from torch.nn.attention import sdpa_kernel

    def run(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v)
    return run


def fwd_bwd(attn, q, k, v, grad_out):
    def run():
        attn(q, k, v).backward(grad_out)
    return run


def bench_attention(device, rows):
    from torch.nn.attention import SDPBackend
    cases = [("ViT-S/14 224", 6, 257, attention_batch_224), ("ViT-S/14 518", 6, 1370, attention_batch_518),
             ("ViT-B/14 224", 12, 257, attention_batch_224), ("ViT-B/14 518", 12, 1370, attention_batch_518)]
    if smoke:
        cases = [("ViT-S/14 56", 6, 17, 2)]
    if device.type == "cuda":
        impls = {"triton": attention_triton, "reference": attention_reference,
                 "sdpa-flash": sdpa_backend(SDPBackend.FLASH_ATTENTION),
                 "sdpa-efficient": sdpa_backend(SDPBackend.EFFICIENT_ATTENTION),
                 "sdpa-cudnn": sdpa_backend(SDPBackend.CUDNN_ATTENTION)}
    else:
        print("attention on a CPU: triton, sdpa-flash, sdpa-efficient and sdpa-cudnn rows skipped (CUDA only)")
        impls = {"reference": attention_reference, "sdpa": F.scaled_dot_product_attention}
    act_dtype = getattr(torch, dtype) if device.type == "cuda" else torch.float32
    peak_flops, _ = device_peaks(device)
    for name, H, N, B in cases:
        # q, k, v as slices of one qkv projection, as model.py makes them
        qkv = torch.randn(B, N, 3, H, 64, device=device, dtype=act_dtype, requires_grad=True)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        # and the output gradient as backward brings it through out.transpose(1, 2).reshape(B, N, D)
        grad_out = torch.randn(B, N, H, 64, device=device, dtype=act_dtype).transpose(1, 2)
        flops = 4 * B * H * N * N * 64
        for mode, mult in (("fwd", 1.0), ("fwd+bwd", 3.5)):
            times = {}
            for impl, attn in impls.items():
                fn = (lambda a=attn: a(q, k, v)) if mode == "fwd" else fwd_bwd(attn, q, k, v, grad_out)
                try:  # a backend without a kernel for this device, dtype or shape: named, not fatal
                    with torch.no_grad() if mode == "fwd" else torch.enable_grad():
                        times[impl] = time_ms(fn, device, grads=(qkv,))
                except RuntimeError as e:
                    print(f"attention {mode} {name}: {impl} skipped ({str(e).splitlines()[0]})")
            rate = lambda ms: flops * mult / (ms * 1e-3)
            add_rows(rows, f"attention {mode}", f"{name} B={B} H={H} N={N}", times, rate, peak_flops, "TFLOP/s", 1e12)


def bench_sinkhorn_centering(device, rows):
    _, peak_bw = device_peaks(device)
    sizes = [(B, K) for K in prototypes for B in teacher_batches] if not smoke else [(8, 1000)]
    for B, K in sizes:
        t = 3 * torch.randn(B, K, device=device)
        center = torch.randn(K, device=device)
        bytes_moved = 2 * B * K * 4  # read the logits, write the probabilities
        rate = lambda ms: bytes_moved / (ms * 1e-3)
        impls = {"reference": lambda: sinkhorn_knopp_reference(t, 0.04)}
        if device.type == "cuda":
            impls = {"triton": lambda: sinkhorn_knopp_triton(t, 0.04), **impls}
        add_rows(rows, "sinkhorn", f"B={B} K={K} fp32", {n: time_ms(f, device) for n, f in impls.items()},
                 rate, peak_bw, "GB/s", 1e9)
        impls = {"reference": lambda: softmax_center_reference(t, center, 0.04)}
        if device.type == "cuda":
            impls = {"triton": lambda: softmax_center_triton(t, center, 0.04), **impls}
        add_rows(rows, "softmax_center", f"B={B} K={K} fp32", {n: time_ms(f, device) for n, f in impls.items()},
                 rate, peak_bw, "GB/s", 1e9)


VIT_SIZES = {"small": (384, 12), "base": (768, 12), "large": (1024, 24)}  # (width, depth)


def vit_with_heads_shapes(dim, depth, n_prototypes=65536, head_hidden=2048):
    """Parameter shapes of a DINOv2 ViT/14 with its DINO and iBOT heads (weight-normalised last layer)."""
    shapes = [(1, 1, dim), (1, 1370, dim), (dim, 3, 14, 14), (dim,), (1, dim)]  # cls, pos, patch, its bias, mask
    block = [(dim,), (dim,), (3 * dim, dim), (3 * dim,), (dim, dim), (dim,), (dim,), (dim,), (dim,),
             (4 * dim, dim), (4 * dim,), (dim, 4 * dim), (dim,), (dim,)]
    shapes += block * depth + [(dim,), (dim,)]
    head = [(head_hidden, dim), (head_hidden,), (head_hidden, head_hidden), (head_hidden,), (256, head_hidden),
            (256,), (n_prototypes, 1), (n_prototypes, 256)]
    return shapes + head + head


def bench_ema(device, rows):
    _, peak_bw = device_peaks(device)
    models = [(f"ViT-{size[0].upper()}/14+heads", vit_with_heads_shapes(*VIT_SIZES[size])) for size in ema_models]
    if smoke:
        models = [("ViT-S/14 depth 1+small heads", vit_with_heads_shapes(384, 1, 1000, 256))]
    for name, shapes in models:
        teacher = [torch.randn(s, device=device) for s in shapes]
        student = [torch.randn(s, device=device) for s in shapes]
        n = sum(t.numel() for t in teacher)
        rate = lambda ms: n * 12 / (ms * 1e-3)  # read teacher and student, write teacher (fp32)
        impls = {"reference": lambda: ema_reference_(teacher, student, 0.996),
                 "foreach": lambda: (torch._foreach_mul_(teacher, 0.996),
                                     torch._foreach_add_(teacher, student, alpha=0.004))}
        if device.type == "cuda":
            impls = {"triton": lambda: ema_triton_(teacher, student, 0.996), **impls}
        add_rows(rows, "ema", f"{name} {n / 1e6:.0f}M fp32",
                 {impl: time_ms(fn, device) for impl, fn in impls.items()}, rate, peak_bw, "GB/s", 1e9)


def add_rows(rows, kernel, case, times, rate, peak, unit, unit_scale):
    for impl, ms in times.items():
        speedups = {base: times[base] / ms for base in times if base != impl}
        vs = " ".join(f"{base}:{s:.2f}x" for base, s in speedups.items())
        r = rate(ms)
        pct = f"{100 * r / peak:.0f}%" if peak else "n/a"
        rows.append((kernel, case, impl, f"{ms:.3f}", vs, f"{r / unit_scale:.1f} {unit}", pct))


def copy_bandwidth(device):
    """Measured device-to-device copy rate (bytes read + written per second): a practical ceiling."""
    x = torch.empty(2 ** 28, device=device)  # 1 GiB
    y = torch.empty_like(x)
    return 2 * x.numel() * 4 / (time_ms(lambda: y.copy_(x), device) * 1e-3)


def warm_up(device, seconds=1.0):
    """Clocks ramp up under load: without this the first rows of the table come out slow."""
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        a @ a
        torch.cuda.synchronize()


def print_table(rows):
    header = ("kernel", "case", "impl", "ms", "speed-up over (baseline time / this time)", "rate", "% peak")
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    for r in [header] + rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))


if __name__ == "__main__":
    device = torch.device("cuda" if torch.cuda.is_available() and not smoke else "cpu")
    torch.manual_seed(0)
    peak_flops, peak_bw = device_peaks(device)
    if device.type == "cuda":
        print(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}, "
              f"peaks: {peak_flops and peak_flops / 1e12} TFLOP/s bf16 dense, {peak_bw and peak_bw / 1e9} GB/s; "
              f"measured copy {copy_bandwidth(device) / 1e9:.0f} GB/s")
        warm_up(device)
    else:
        print(f"device: cpu (smoke: PyTorch references only), torch {torch.__version__}")
    rows, failed = [], []
    for bench in (bench_attention, bench_sinkhorn_centering, bench_ema):
        try:  # one broken kernel should not hide the others' numbers
            bench(device, rows)
        except Exception:
            traceback.print_exc()
            failed.append(bench.__name__)
    if device.type == "cuda":
        from kernels.attention import _attn_bwd_dkdv_kernel, _attn_bwd_dq_kernel, _attn_fwd_kernel
        for kern in (_attn_fwd_kernel, _attn_bwd_dq_kernel, _attn_bwd_dkdv_kernel):
            for key, cfg in kern.cache.items():
                print(f"autotuned {kern.fn.__name__} {key}: {cfg}")
    print_table(rows)
    if failed:
        sys.exit(f"bench/kernels.py: failed: {', '.join(failed)}")
