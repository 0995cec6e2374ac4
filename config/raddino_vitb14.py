# RAD-DINO: continual DINOv2 pretraining of ViT-B/14 on chest X-rays (RAD-DINO §2 and App. C.1).
#   torchrun --standalone --nnodes=4 --nproc_per_node=4 pretrain.py config/raddino_vitb14.py \
#       --init_from=dinov2_vitb14_pretrain.pth --train_data="('/data/cxr/index.csv',)"
# Add --init_head_from=rad-dino/dino_head.safetensors (RAD-DINO publishes its head) to skip the head warm-up.
# 16 GPUs x 40 images = 640 per step, 60k steps, base lr 1e-3, 518 px global crops drawn from
# U(259, 518) px sides (area scale ~0.25-1) and 196 px local crops from U(104, 259) (~0.04-0.25).
model_size = "base"              # read from init_from; used only without it
depth = 0
layerscale_init = 1e-5
patch_size = 14
global_crops_size = 518
local_crops_size = 196
n_local_crops = 8
global_crops_only = False
global_crops_scale = (0.25, 1.0)
local_crops_scale = (0.04, 0.25)
color_jitter = (0.4, 0.4, 0.2, 0.1)  # DINOv2's views
solarize_p = 0.2
blur_probs = (1.0, 0.1, 0.5)
head_n_prototypes = 65536
ibot_head_n_prototypes = 65536
head_hidden_dim = 2048
head_bottleneck_dim = 256
batch_size = 40
max_iters = 60000
base_lr = 1e-3
warmup_iters = 2000
freeze_last_layer_iters = 1250
teacher_temp_warmup_iters = 6000
weight_decay = 0.04
weight_decay_end = 0.4
momentum_teacher = 0.994
final_momentum_teacher = 1.0
warmup_teacher_temp = 0.04
teacher_temp = 0.07
drop_path_rate = 0.1
head_warmup_iters = None         # auto: max_iters // 10 with fresh heads, 0 with --init_head_from
rollback_drop = None             # auto: 0.05 (init_from is given)
eval_data = ""                   # a labelled CXR set (CSV with eval_label_column) enables the guard rail
ckpt_every = 1000
num_workers = 10
out_dir = "out/pretrain_raddino_vitb14"
