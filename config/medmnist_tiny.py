# Real radiographs, small: ViT-tiny/8 at 64 px on the MedMNIST Pneumonia + Breast train images and the
# covid_cxr_xray256 train split (5580 images), RAD-DINO multi-crop (2 global + 8 local crops).
# One GPU (the backbones of RESULTS.md, "Frozen-feature probes"):
#   python pretrain.py config/medmnist_tiny.py
# Paths are relative to the repository root, with the data beside it in ../shared/data.
train_data = ("../shared/data/pneumoniamnist.npz", "../shared/data/breastmnist.npz",
              "../shared/data/covid_cxr_xray256/images.csv")
eval_data = "../shared/data/pneumoniamnist.npz"   # k-NN monitor: train split = bank, val split = queries
out_dir = "out/pretrain_medmnist_tiny"
model_size = "tiny"
depth = 0                 # all 12 blocks
patch_size = 8
global_crops_size = 64
local_crops_size = 32
n_local_crops = 8
global_crops_only = False
global_crops_scale = (0.32, 1.0)
color_jitter = (0.4, 0.4, 0.2, 0.1)  # DINOv2's views
solarize_p = 0.2
blur_probs = (1.0, 0.1, 0.5)
head_n_prototypes = 4096
head_hidden_dim = 1024
head_bottleneck_dim = 256
batch_size = 256
max_iters = 1500          # ~70 epochs of 5580 images
base_lr = 0.004
warmup_iters = 100
freeze_last_layer_iters = 100
teacher_temp_warmup_iters = 400
momentum_teacher = 0.99     # short run: a teacher that follows faster
final_momentum_teacher = 1.0
warmup_teacher_temp = 0.04
teacher_temp = 0.07
layerscale_init = 0.1      # DINOv2's 1e-5 makes every image's CLS token nearly identical at init, and a
                           # run of ~1000 steps spends much of itself breaking that symmetry
eval_every = 250
eval_max_images = 2000
ckpt_every = 500
num_workers = 14
augment_on_device = False  # True: crops made on the GPU in batches; about the same speed here (bench/README.md)
