# frozen-feature probes on the official BreastMNIST (28 px, resized to the backbone's 64 px)
dataset = "medmnist"
data_path = "../shared/data/breastmnist.npz"
out_dir = "out/probe_breastmnist"
