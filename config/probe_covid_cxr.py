# covid_cxr_xray256: COVID-19 vs other findings ("todo" rows dropped), and the metadata probe
# (sex, age bins at 20/40/60/80 years) with 5-fold CV grouped by patient over all 423 images
dataset = "csv"
data_path = "../shared/data/covid_cxr_xray256/images.csv"
label_fn = "covid_vs_other"
metadata_columns = ("sex", "age")
out_dir = "out/probe_covid_cxr"
img_size = 64                  # the medmnist_tiny backbones' crop size (probe.py's default is the phantom demo's 48)
depth = 0                      # random init: all 12 blocks of ViT-tiny
