# OmniRad §3.3 segmentation recipe: frozen ViT-S/14 at 448 px, the OmniRad adapter (widths = the
# ViT's, 17.5 M trainable parameters for 2 classes), AdamW lr 1e-4, wd 1e-4, batch 16, 20 epochs,
# bf16 autocast, selection on val mIoU, 5 seeds. Needs a GPU. Give the data and the backbone:
#   python finetune_seg.py config/seg_omnirad_vits14.py --data_path=busi_256.npz --init_from=omnirad_small.safetensors
# (for ViT-B: --model_size=base with random init, or a base checkpoint.)
img_size = 448
model_size = "small"
patch_size = 14
head = "omnirad"
omnirad_width = 0
upernet_channels = 512
epochs = 20
batch_size = 16
lr = 1e-4
weight_decay = 1e-4
dtype = "bfloat16"
seeds = (0, 1, 2, 3, 4)
cpu_threads = 0
eval_batch_size = 32
