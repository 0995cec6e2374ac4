# The recipe behind RESULTS.md's MedMNIST fine-tuning rows: ViT-tiny/8 at 64 px (28 px MedMNIST images
# upsampled), random init or --init_from=<nanorad backbone>. Random init needs a larger lr than
# OmniRad's 1e-5 and no LayerScale damping at the start.
#   python finetune_cls.py config/cls_medmnist64.py --data_path=../shared/data/pneumoniamnist.npz --seeds=0,1,2
dataset = "medmnist"
img_size = 64
model_size = "tiny"
patch_size = 8
layerscale_init = None
epochs = 40
warmup_epochs = 4.0
batch_size = 128
lr = 5e-4
head_features = "cls"
crop_scale_min = 0.5
