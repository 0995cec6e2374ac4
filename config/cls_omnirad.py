# OmniRad §3.2 classification recipe: 224 px, 40 epochs, AdamW lr 1e-5 wd 0.01, linear warm-up over
# the first 10 epochs then cosine, batch 128, grad clip 1.0, flips/rotations/resized crops, CE.
# Give the backbone and data, e.g.
#   python finetune_cls.py config/cls_omnirad.py --init_from=dinov2_vits14.pth \
#       --dataset=medmnist --data_path=../shared/data/breastmnist.npz --seeds=0,1,2
img_size = 224
epochs = 40
warmup_epochs = 10.0
batch_size = 128
lr = 1e-5
weight_decay = 0.01
grad_clip = 1.0
model_size = "small"  # used only without --init_from
patch_size = 14
head_features = "cls"
crop_scale_min = 0.5
