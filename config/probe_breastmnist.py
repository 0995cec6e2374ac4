# frozen-feature probes on the official BreastMNIST (28 px, resized to the backbone's 64 px)
dataset = "medmnist"
data_path = "../shared/data/breastmnist.npz"
out_dir = "out/probe_breastmnist"
img_size = 64                  # the medmnist_tiny backbones' crop size (probe.py's default is the phantom demo's 48)
depth = 0                      # random init: all 12 blocks of ViT-tiny
