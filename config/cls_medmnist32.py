# Fine-tuning the CPU backbones of config/medmnist_cpu.py at their pretraining resolution (32 px; MedMNIST's
# 28 px images upsampled), the recipe of RESULTS.md's "Fine-tuning against a linear probe" tables:
#   python finetune_cls.py config/cls_medmnist32.py --data_path=../shared/data/breastmnist.npz \
#       --init_from=<out_dir>/teacher_backbone.safetensors --seeds=0,1,2
dataset = "medmnist"
img_size = 32
layerscale_init = None
epochs = 40
warmup_epochs = 4.0
batch_size = 32
lr = 1e-4
head_features = "cls+mean"   # probe.py's default, so a probe and a fine-tune see the same head input
crop_scale_min = 0.5
select_on = "auc"
num_workers = 0
dtype = "bfloat16"        # CPU autocast (config/medmnist_cpu.py): 1.4x the fp32 fine-tuning step here; float32 on a CPU without bf16 matmuls
