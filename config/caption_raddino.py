# RAD-DINO §4.2 and Appendix A (LLaVA-1.5's recipe): the frozen encoder's patch tokens -> two-layer MLP
# projector -> Vicuna-7B v1.5, which reads "<image tokens> Provide a description of the findings in the
# radiology image." and is trained with the projector (encoder frozen) on the report tokens only: 3 epochs,
# batch 128, lr 2e-5 with a cosine schedule and 3 % warm-up; decoding up to 150 tokens. Give the encoder,
# the LM folder (config.json, safetensors, tokenizer.json) and MIMIC-CXR-style image/report pairs:
#   python caption.py config/caption_raddino.py --data_path=mimic/reports.csv \
#       --init_from=rad_dino.safetensors --decoder_init=vicuna-7b-v1.5/
# A 7B LM trained fully needs ~16 bytes per parameter of GPU memory for AdamW (~112 GB) before activations:
# add --decoder_train=lora on one 80 GB GPU.
out_dir = "out/caption_raddino"
img_size = 518
model_size = "base"    # random-init encoder only (init_from sets the real one)
patch_size = 14
bridge = "mlp"
decoder = "causal_lm"
decoder_size = "7b"    # random-init LM only (decoder_init sets the real one)
max_caption_tokens = 150
epochs = 3
batch_size = 128
micro_batch_size = 4   # 32 accumulation steps
lr = 2e-5
warmup_steps = 50      # ~3 % of 3 epochs of MIMIC-CXR's ~200k training pairs would be larger: set it for your data
weight_decay = 0.0
beams = (1,)           # greedy, as LLaVA's evaluation
max_tokens = (150,)
