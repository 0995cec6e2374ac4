# covid_cxr_captions: 134 chest X-ray / CT images with clinical notes (117 train / 4 val / 13 test
# images, split by patient). A small real set that shows the pipeline works on real reports, not a
# benchmark. Compare encoders with --init_from (e.g. out/pretrain/teacher_backbone.safetensors).
data_path = "../shared/data/covid_cxr_captions/captions.csv"
out_dir = "out/caption_covid_cxr"
img_size = 64
epochs = 30
max_caption_tokens = 64
bpe_vocab_size = 2000
beams = (1, 3, 5)
max_tokens = (32, 64)
# the recipe of RESULTS.md, "Captioning" (caption.py's defaults are tuned for the phantoms instead)
batch_size = 16
micro_batch_size = 16
warmup_steps = 20
dropout = 0.1
query_std = 1.0
layerscale_init = 1e-5
lr = 1e-3
