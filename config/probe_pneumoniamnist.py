# frozen-feature probes on the official PneumoniaMNIST (28 px, resized to the backbone's 64 px)
dataset = "medmnist"
data_path = "../shared/data/pneumoniamnist.npz"
out_dir = "out/probe_pneumoniamnist"
