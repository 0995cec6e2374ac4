# An overlay on config/medmnist_tiny.py for a CPU (under an hour): the same data, made small enough that
# DINO gets thousands of steps: ViT-tiny with 4 blocks, 32 px global / 16 px local crops (MedMNIST is
# 28 px), batch 32, K=1024, bf16 autocast, and no photometric augmentations (below): with DINOv2's, the
# DINO term stays in its uniform collapse on images this small (RESULTS.md, "The uniform DINO collapse with DINOv2's augmentations").
# It freezes the prototypes for 200 steps and uses a slower teacher (0.996).
#   python pretrain.py config/medmnist_tiny.py config/medmnist_cpu.py --seed=S
out_dir = "out/pretrain_medmnist_cpu"
depth = 4
global_crops_size = 32
local_crops_size = 16
batch_size = 32
head_n_prototypes = 1024
head_hidden_dim = 512
head_bottleneck_dim = 128
max_iters = 20000         # ~115 epochs of 5580 images, 46 min alone; 14000 steps gave a little less on most probes
warmup_iters = 200
freeze_last_layer_iters = 200
teacher_temp_warmup_iters = 600
momentum_teacher = 0.996
eval_every = 500
eval_max_images = 1000
ckpt_every = 500
num_workers = 0
augment_on_device = True  # on a CPU too: batched crops beat per-image crops in one process (bench/augment.py)
log_interval = 50
dtype = "bfloat16"        # CPU autocast: 1.6x the fp32 step on this CPU's AMX. On a CPU without bf16 matmuls
                          # (`lscpu | grep -E "amx|avx512_bf16"` is empty) set --dtype=float32 and expect 1.6x the time
# Photometric augmentations off: DINOv2's colour jitter and solarization change a random ViT's features
# of a gray 28 px image more than the image does (view_corr 0.2-0.4 vs 0.9). Its blur (sigma 0.1-2 px) is
# sized for 224 px crops; at 800 steps turning it off too changed no probe beyond the seed spread.
color_jitter = (0.0, 0.0, 0.0, 0.0)
solarize_p = 0.0
blur_probs = (0.0, 0.0, 0.0)
teacher_temp = 0.04       # DINO's warm-up start, kept: with mild jitter, 0.07 stayed in the uniform collapse for
                          # 800 steps and 0.04 left it
