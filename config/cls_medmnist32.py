# Fine-tuning the CPU backbones of config/medmnist_cpu.py at their pretraining resolution (32 px; MedMNIST's
# 28 px images upsampled), the recipe of RESULTS.md's "Fine-tuning against a linear probe" tables:
#   python finetune_cls.py config/cls_medmnist32.py --data_path=../shared/data/breastmnist.npz \
#       --init_from=<out_dir>/teacher_backbone.safetensors --seeds=0,1,2
#   ... --head_init=probe --layerwise_decay=0.75     # LP-FT, the recommended recipe (lr chosen on val: 1e-5..1e-4)
# PneumoniaMNIST's 4708 training images: --epochs=10 on a CPU (RESULTS.md).
dataset = "medmnist"
img_size = 32
layerscale_init = None
epochs = 40
warmup_epochs = 4.0
batch_size = 32
lr = 1e-4
head_features = "cls+mean"   # probe.py's default, so a probe and a fine-tune see the same head input
crop_scale_min = 0.5
select_on = "auc"            # the tables select epochs and settings on val AUC
num_workers = 0
dtype = "bfloat16"           # CPU autocast as config/medmnist_cpu.py: 1.45x fp32's speed on this CPU's AMX
                             # (float32 on a CPU without bf16 matmuls)
