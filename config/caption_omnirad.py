# OmniRad §3.4 / Table 12: frozen OmniRad-base (ViT-B/14) -> Linear + LayerNorm -> Patch Merger (K=64)
# -> BART-base, trained 20 epochs with AdamW at 5e-5, effective batch 64, mixed precision; beam search
# with 5 beams and 64 tokens. Give the encoder, the BART weights and BART's tokenizer:
#   python caption.py config/caption_omnirad.py --data_path=roco/captions.csv \
#       --init_from=omnirad_base.safetensors --decoder_init=bart-base/
# (BART's tokenizer.json is read from that folder; without decoder_init, BART-base starts random and the BPE
# tokenizer is trained on the captions)
out_dir = "out/caption_omnirad"
img_size = 224
model_size = "base"    # random-init encoder only (init_from sets the real one)
patch_size = 14
decoder_size = "base"
n_queries = 64
max_caption_tokens = 64
epochs = 20
batch_size = 64
micro_batch_size = 16  # 4 accumulation steps
lr = 5e-5
warmup_steps = 100
beams = (1, 4, 5)      # Table 12's rows: (1, 64), (4, 64), (5, 64), (5, 128)
max_tokens = (64, 128)
query_std = 1.0        # the public Patch Merger's unit queries (the sharper 4.0 default is for random-init smoke runs)
dropout = 0.1          # BART's own, when BART-base starts random
