# An overlay on config/medmnist_tiny.py for a 2-core CPU (~25 min): the same data and recipe, made small
# enough that DINO gets thousands of steps: ViT-tiny with 4 blocks, 32 px global / 16 px local crops
# (MedMNIST is 28 px), batch 32, K=1024.
#   python pretrain.py config/medmnist_tiny.py config/medmnist_cpu.py --seed=S
# Like every short run so far, it stays near DINO's uniform collapse (DINO loss within 0.2 of log K; README,
# "Known gap"). It freezes the prototypes for 200 steps and uses a slower teacher (0.996); with them the
# DINO loss ended ~0.1 below log K (not ablated one by one).
out_dir = "out/pretrain_medmnist_cpu"
depth = 4
global_crops_size = 32
local_crops_size = 16
batch_size = 32
head_n_prototypes = 1024
head_hidden_dim = 512
head_bottleneck_dim = 128
max_iters = 4000          # ~23 epochs of 5580 images
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
