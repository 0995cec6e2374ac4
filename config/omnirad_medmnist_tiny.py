# OmniRad's recipe (global crops only) on the real radiographs here, small: ViT-tiny/8 at 64 px on the
# MedMNIST Pneumonia + Breast train images and the covid_cxr_xray256 train split (5580 images).
# Two crops per image instead of ten make the data loader ~5x faster than config/medmnist_tiny.py,
# so one GPU gets through ~70 epochs in a few minutes. The README's pretraining evidence rows:
#   python pretrain.py config/omnirad_medmnist_tiny.py --seed=0 --out_dir=out/omnirad_tiny_s0
# Paths are relative to the repository root, with the data beside it in ../shared/data.
train_data = ("../shared/data/pneumoniamnist.npz", "../shared/data/breastmnist.npz",
              "../shared/data/covid_cxr_xray256/images.csv")
eval_data = "../shared/data/pneumoniamnist.npz"   # k-NN monitor: train split = bank, val split = queries
out_dir = "out/pretrain_omnirad_tiny"
model_size = "tiny"
depth = 0                  # all 12 blocks
patch_size = 8
global_crops_size = 64
global_crops_only = True
head_n_prototypes = 4096
head_hidden_dim = 1024
head_bottleneck_dim = 256
batch_size = 256
max_iters = 1600           # ~73 epochs of 5580 images
warmup_iters = 100
freeze_last_layer_iters = 100
teacher_temp_warmup_iters = 480   # 30 % of training, as DINOv2
momentum_teacher = 0.99    # short run: a teacher that follows faster than OmniRad's 0.994
weight_decay_end = 0.2     # OmniRad
layerscale_init = 0.1      # DINOv2's 1e-5 makes every image's CLS token nearly identical at init, and a
                           # short run spends much of itself breaking that symmetry
eval_every = 400
eval_max_images = 2000
ckpt_every = 400
num_workers = 4
