# Lung segmentation on 123 real chest X-rays (../shared/data/covid_cxr_lungseg, patient splits
# 96/8/19), sized for a CPU: ViT-tiny/8 (the architecture of nanorad's pretrained evidence
# backbone; add --init_from=... for it, leave it out for random init) at 128 px, frozen features
# computed once (no augmentation), OmniRad's optimiser (AdamW lr 1e-4, wd 1e-4, batch 16).
# 40 epochs because 96 images give only 6 steps per epoch. The heads are narrowed for the CPU:
# OmniRad width 96 (not D = 192), UPerNet 64 channels (not 512). No horizontal flips: left and
# right lungs differ (the heart).
#   python finetune_seg.py config/seg_covid_lungs.py --head=omnirad
data_path = "../shared/data/covid_cxr_lungseg/pairs.csv"
mask_threshold = 127             # 3 of the masks are anti-aliased
img_size = 128
hflip = False
model_size = "tiny"
patch_size = 8
epochs = 40
omnirad_width = 96
upernet_channels = 64
seeds = (0, 1, 2)
n_overlays = 6
