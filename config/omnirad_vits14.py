# OmniRad-small (OmniRad Table 1): DINOv2 with global crops only, ViT-S/14 at 224, 131072 prototypes.
#   torchrun --standalone --nproc_per_node=2 pretrain.py config/omnirad_vits14.py --train_data="('/data/radimagenet',)"
# OmniRad trains 10 epochs of RadImageNet (~1.35 M images) on 2 A100s with 256 images per GPU:
# 1.35e6 / 512 = ~2640 iterations per epoch. OmniRad-base: model_size="base", batch_size=196.
model_size = "small"
depth = 0                      # the size's own 12 blocks
patch_size = 14
drop_path_rate = 0.3
layerscale_init = 1e-5
global_crops_size = 224
global_crops_only = True
global_crops_scale = (0.32, 1.0)     # DINOv2's views
color_jitter = (0.4, 0.4, 0.2, 0.1)
solarize_p = 0.2
blur_probs = (1.0, 0.1, 0.5)
head_n_prototypes = 131072
ibot_head_n_prototypes = 131072
head_hidden_dim = 2048
head_bottleneck_dim = 256
batch_size = 256
max_iters = 26400
warmup_iters = 2640            # 1 epoch
freeze_last_layer_iters = 2640  # 1 epoch, as DINOv2
teacher_temp_warmup_iters = 7920  # 30 % of training, as DINOv2's 30 of 100 epochs
base_lr = 2e-4                 # the table's "base learning rate"; scaled by sqrt(global batch / 1024) as DINOv2
min_lr = 1e-6
weight_decay = 0.04
weight_decay_end = 0.2
momentum_teacher = 0.994
final_momentum_teacher = 1.0
warmup_teacher_temp = 0.04
teacher_temp = 0.07
dino_loss_weight = 1.0
ibot_loss_weight = 1.0
eval_data = ""                 # give a labelled set (MedMNIST .npz or CSV) to get the k-NN monitor
ckpt_every = 1000
num_workers = 10
out_dir = "out/pretrain_omnirad_vits14"
