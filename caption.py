"""Image captioning and report generation with a frozen ViT, in two papers' layouts and their mixes:
- OmniRad (§3.4, Table 12), `--bridge=merger --decoder=bart`: ViT patch tokens -> Linear + LayerNorm -> Patch
  Merger (K learned queries) -> BART encoder (as input embeddings) -> BART decoder.
- RAD-DINO (§4.2, LLaVA-1.5), `--bridge=mlp --decoder=causal_lm`: every patch token through a two-layer MLP
  into a decoder-only LM (Llama format, e.g. Vicuna-7B), which reads [<s>, image, instruction] and continues
  with the report; only the report tokens carry loss.
The ViT stays frozen; the bridge and the decoder (fully, LoRA or frozen) train. Captions come from greedy or
beam search, and the test split is scored with METEOR, BLEU, BLEU-1..4 and ROUGE-L (metrics.py; RAD-DINO's
Table 5 lexical metrics are among them) beside the constant caption that a model blind to the image would
learn. RAD-DINO's factuality metrics (CheXpert F1 via CheXbert, RadGraph F1) need those trained models and
are not computed here.

    python caption.py                                   # tiny random ViT + tiny BART on phantoms, CPU, ~2 min
    python caption.py --bridge=mlp --decoder=causal_lm  # the same ViT + a tiny random Llama-format LM
    python caption.py config/caption_covid_cxr.py --init_from=out/pretrain/backbone.safetensors
    python caption.py config/caption_omnirad.py --data_path=roco/captions.csv --init_from=omnirad_base.safetensors \\
        --decoder_init=bart-base/
    python caption.py config/caption_raddino.py --data_path=mimic/reports.csv --init_from=rad_dino.safetensors \\
        --decoder_init=vicuna-7b-v1.5/

The defaults are a CPU smoke recipe; config/caption_omnirad.py is the paper's (ViT-B/14 at 224 px, BART-base,
AdamW lr 5e-5, 20 epochs, effective batch 64, bf16 on CUDA). A random ViT shows a phantom's lesion in about one
patch of 64, so the smoke recipe departs from DINOv2/OmniRad init at layerscale_init and query_std (why: their
comments below; measurements: RESULTS.md, "Captioning"). Writes to out_dir: results.json, table.md (Table 12's
layout), samples.png, captioner.safetensors (+ .json) and tokenizer.json.
"""
import json
import math
import sys
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from config import configure
from data import (CaptionDataset, PhantomDataset, center_square, check_intensity, normalize, read_image,
                  read_jsonl_pairs)
from figures import sample_sheet
from metrics import caption_metrics, corpus_bleu
from lora import BART_TARGETS, LLAMA_TARGETS, add_lora, merge_lora
from model import (BRIDGES, Bart, Captioner, Llama, ViT, bart_config, beam_search, check_img_size, greedy_search,
                   llama_beam_search, llama_config, llama_greedy_search, load_backbone, load_bart, load_llama,
                   make_bridge, save_json_atomic, save_safetensors_atomic, vit_config)
from schedules import lr_at  # linear warm-up, then cosine to zero

# -----------------------------------------------------------------------------
# config: plain globals, overridden by config/*.py files and --key=value
# data
data_path = ""               # "" = phantoms (captions name the lesions); else a CSV / JSONL of image,caption[,split]
image_column = "image"       # index columns; image paths are relative to the index file
caption_column = "caption"
train_split = "train"        # index `split` values to train on and to score in the results table
test_split = "test"
phantom_sizes = (3000, 100)  # phantoms (train, test); with fewer the prefix overfits (RESULTS.md, "Captioning")
img_size = 64                # images are centre-cropped to a square and resized to this
intensity = "full_range"     # 16-bit PNGs, DICOMs without a window -> [0, 1]: full_range, minmax, percentile (data.py)
# model
init_from = ""               # frozen ViT weights, any file model.load_backbone reads; "" = random init (a baseline)
model_size = "tiny"          # random-init ViT only: size, patch and LayerScale
patch_size = 8
layerscale_init = 1.0        # DINOv2's 1e-5 leaves a random ViT's blocks no-ops; at 1.0 they mix context into tokens
bridge = "merger"            # "merger": OmniRad's Linear + LN + Patch Merger; "mlp": RAD-DINO's (LLaVA's) 2-layer MLP
decoder = "bart"             # "bart": OmniRad's encoder-decoder; "causal_lm": a Llama-format LM (RAD-DINO)
decoder_size = "tiny"        # random-init decoder: BART tiny | base | large, causal LM tiny | 7b | 13b
decoder_init = ""            # a HF BART or Llama-family folder / safetensors (bart-base, vicuna-7b-v1.5); "" = random
decoder_train = "full"       # "full", "lora" (adapters on its attention and MLP linears) or "frozen" (bridge only)
lora_rank = 8                # decoder_train="lora": update scale lora_alpha / lora_rank
lora_alpha = 16.0
instruction = "Provide a description of the findings in the radiology image."  # causal_lm: RAD-DINO's prompt
tokenizer = ""               # a tokenizer.json; "" = decoder_init's own, or byte-level BPE trained on the captions
bpe_vocab_size = 1000
n_queries = 16               # K, the Patch Merger's output length (OmniRad: 64)
query_std = 4.0              # Patch Merger query init: at 1 every query averages most patches and misses the lesion
max_caption_tokens = 64      # training captions are cut to this many tokens, <s> and </s> included
dropout = 0.0                # random-init BART only (a decoder_init keeps its config.json's)
cache_vit_tokens = True      # the ViT is frozen and sees no augmentation: run it once per image
# optimisation
epochs = 18
batch_size = 32              # effective batch (OmniRad: 64) ...
micro_batch_size = 32        # ... reached by gradient accumulation over micro batches
lr = 3e-4                    # above OmniRad's 5e-5 for a tiny random BART; at 1e-3 it learns the caption prior first
weight_decay = 0.01
warmup_steps = 100           # BART is post-norm: with a short warm-up its encoder stops passing the image on
grad_clip = 1.0
# evaluation
beams = (1, 3, 5)            # the results table: every beams x max_tokens pair (OmniRad: 5 beams, 64 tokens)
max_tokens = (32, 64)
length_penalty = 1.0
n_samples = 8                # images on the sample sheet
# system / output
out_dir = "out/caption"
seed = 0
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = "bfloat16" if torch.cuda.is_available() else "float32"  # autocast: "bfloat16" (OmniRad) or "float32" (off)
cpu_threads = 0              # torch threads on a CPU (0 = torch's default)
log_interval = 10            # steps between progress lines
# -----------------------------------------------------------------------------

SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>"]  # BART's ids: bos 0, pad 1, eos 2, unk 3
DECODERS = ("bart", "causal_lm")
DECODER_TRAINING = ("full", "lora", "frozen")


# tokenizer: byte-level BPE with BART's special tokens, or a given tokenizer.json

def train_tokenizer(captions, vocab_size):
    """Byte-level BPE (as GPT-2 / BART) trained on `captions`; special tokens take ids 0..3 as in BART."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(captions, trainer)
    return tok


def special_token_ids(tok, source):
    """{"bos_token_id", "pad_token_id", "eos_token_id"} of a tokenizer, which must have BART's tokens."""
    ids = {name: tok.token_to_id(token) for name, token in
           (("bos_token_id", "<s>"), ("pad_token_id", "<pad>"), ("eos_token_id", "</s>"))}
    missing = [name for name, i in ids.items() if i is None]
    if missing:
        raise ValueError(f"tokenizer {source}: expected BART's special tokens <s> <pad> </s>, missing {missing}")
    return ids


def caption_ids(tok, caption, max_len, ids, bos=True):
    """<s> caption </s> (BART), or caption </s> (a causal LM, whose <s> opens the prefix instead), cut to
    max_len tokens (the </s> kept)."""
    body = tok.encode(caption, add_special_tokens=False).ids[:max_len - 1 - bos]
    return [ids["bos_token_id"]] * bos + [*body, ids["eos_token_id"]]


def teacher_forcing_batch(token_lists, pad_id, decoder_start_id):
    """BART's training layout: labels = <s> w1 .. wn </s>, padding ignored (-100); the decoder reads
    the labels shifted right behind the start token (HF's shift_tokens_right). Right padding needs
    no attention mask: causal attention keeps real positions from seeing the padded tail, and the
    padded positions are left out of the loss. Returns (decoder_input_ids, labels)."""
    T = max(len(t) for t in token_lists)
    labels = torch.full((len(token_lists), T), -100, dtype=torch.long)
    for i, t in enumerate(token_lists):
        labels[i, :len(t)] = torch.tensor(t)
    decoder_input = torch.cat([torch.full((len(token_lists), 1), decoder_start_id), labels[:, :-1]], dim=1)
    return decoder_input.masked_fill(decoder_input == -100, pad_id), labels


def report_batch(token_lists, n_prefix, pad_id):
    """LLaVA's training layout: input_ids (B, T) = the report tokens (right-padded with pad_id) that follow
    the LM's prefix of n_prefix embeddings; labels (B, n_prefix + T) in HF's convention (the target of each
    position, shifted inside report_loss): -100 for the prefix and the padding, the report's tokens."""
    T = max(len(t) for t in token_lists)
    input_ids = torch.full((len(token_lists), T), pad_id, dtype=torch.long)
    labels = torch.full((len(token_lists), n_prefix + T), -100, dtype=torch.long)
    for i, t in enumerate(token_lists):
        input_ids[i, :len(t)] = torch.tensor(t)
        labels[i, n_prefix:n_prefix + len(t)] = torch.tensor(t)
    return input_ids, labels


def report_loss(logits, labels, n_prefix):
    """Next-token cross entropy on the report only: position t predicts label t + 1, from the prefix's last
    position (which predicts the first report token) on. The labels of the image and instruction positions
    are never read, whatever they hold: the LM learns to write reports, not to predict its prompt."""
    logits = logits[:, n_prefix - 1:-1].float()
    return F.cross_entropy(logits.flatten(0, 1), labels[:, n_prefix:].flatten(), ignore_index=-100)


def decode_captions(tok, sequences):
    return [tok.decode(seq.tolist(), skip_special_tokens=True).strip() for seq in sequences]


# data: phantoms, or an image/caption index

def load_pairs(data_path, split, n_phantoms, img_size, seed, image_column="image", caption_column="caption",
               intensity="full_range"):
    """(images (3,S,S) in [0,1], captions) of one split: n_phantoms phantoms when data_path is "",
    else the rows of a CSV or JSONL index (16-bit images mapped to [0,1] by `intensity`, data.read_image)."""
    def square(img):
        return center_square(img, img_size)

    if not data_path:
        items = PhantomDataset(n_phantoms, img_size=img_size, seed=seed, split=split)
    elif data_path.endswith(".jsonl"):
        items = [{"image": square(read_image(row["image"], intensity)), "caption": row["caption"]}
                 for row in read_jsonl_pairs(data_path, split, image_column, caption_column)]
    else:
        items = CaptionDataset(data_path, split, transform=square, image_column=image_column,
                               caption_column=caption_column, intensity=intensity)
    items = [(item["image"], item["caption"]) for item in items]
    return [img for img, _ in items], [caption for _, caption in items]


# training and evaluation

@torch.no_grad()
def frozen_vit_tokens(model, images, device, autocast, batch=64):
    """The frozen ViT's patch tokens (N, T, Dv), float32 on the CPU, for a list of images in [0,1]."""
    chunks = []
    for i in range(0, len(images), batch):
        x = normalize(torch.stack(images[i:i + batch])).to(device)
        with autocast:
            chunks.append(model.vit_tokens(x).float().cpu())
    return torch.cat(chunks)


def caption_loss(model, vit_tokens, token_lists):
    """Mean next-token cross entropy over the caption tokens (OmniRad's L_cap; for a causal LM, over the
    report after its prefix). token_lists: caption_ids of each image, <s> included for BART only."""
    cfg, device = model.decoder.config, vit_tokens.device
    if model.causal_lm:
        prefix = model.lm_prefix(vit_tokens)
        input_ids, labels = report_batch(token_lists, prefix.shape[1], cfg.pad_token_id)
        return report_loss(model.decoder(input_ids.to(device), inputs_embeds=prefix), labels.to(device),
                           prefix.shape[1])
    dec_in, labels = teacher_forcing_batch(token_lists, cfg.pad_token_id, cfg.decoder_start_token_id)
    logits = model.decoder.decode(dec_in.to(device), model.encode_tokens(vit_tokens))
    return F.cross_entropy(logits.float().flatten(0, 1), labels.to(device).flatten(), ignore_index=-100)


@torch.no_grad()
def mean_caption_loss(model, vit_tokens, token_lists, batch, device, autocast):
    """caption_loss averaged over batches of `batch` captions (the test loss of every epoch)."""
    losses = []
    for idx in torch.arange(len(token_lists)).split(batch):
        with autocast:
            losses.append(caption_loss(model, vit_tokens[idx].to(device), [token_lists[i] for i in idx]).item())
    return sum(losses) / len(losses)


@torch.no_grad()
def generate_captions(model, tok, vit_tokens, num_beams, max_length, length_penalty, device, batch=32):
    """Captions for cached ViT tokens (N, T, Dv); greedy when num_beams is 1 (beam search with one
    beam is the same search, only slower). A causal LM writes up to max_length new tokens."""
    texts = []
    for i in range(0, len(vit_tokens), batch):
        tokens = vit_tokens[i:i + batch].to(device)
        if model.causal_lm:
            prefix = model.lm_prefix(tokens)
            seqs = (llama_greedy_search(model.decoder, prefix, max_length) if num_beams == 1 else
                    llama_beam_search(model.decoder, prefix, num_beams, max_length, length_penalty))
        else:
            states = model.encode_tokens(tokens)
            seqs = (greedy_search(model.decoder, states, max_length) if num_beams == 1 else
                    beam_search(model.decoder, states, num_beams, max_length, length_penalty))
        texts += decode_captions(tok, seqs.cpu())
    return texts


def constant_caption_baseline(train_captions, n_candidates=50):
    """The training caption with the best corpus BLEU-4 against all training captions, among the
    n_candidates most frequent ones: the caption a model that ignores the image should learn."""
    candidates = [c for c, _ in Counter(train_captions).most_common(n_candidates)]
    return max(candidates, key=lambda c: corpus_bleu([c] * len(train_captions), train_captions)["bleu"])


def format_table(rows, encoder_name, baseline):
    """Markdown in OmniRad Table 12's layout, with the constant-caption baseline as a last row."""
    cols = ("METEOR", "BLEU", "BLEU-1", "BLEU-4", "ROUGE-L")
    lines = ["| Image encoder | beams | max_tokens | " + " | ".join(cols) + " |",
             "|---|---|---|" + "---|" * len(cols)]
    for row in rows:
        lines.append(f"| {encoder_name} | {row['beams']} | {row['max_tokens']} | "
                     + " | ".join(f"{row[c]:.2f}" for c in cols) + " |")
    lines.append("| constant caption (no image) | - | - | " + " | ".join(f"{baseline[c]:.2f}" for c in cols) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    config = configure(globals())

    # checks: bad settings fail here, before any work
    if batch_size % micro_batch_size:
        raise ValueError(f"batch_size: expected a multiple of micro_batch_size {micro_batch_size}, found {batch_size}")
    if len(phantom_sizes) != 2:
        raise ValueError(f"phantom_sizes: expected (train, test), found {phantom_sizes}")
    for key, path in (("data_path", data_path), ("init_from", init_from), ("decoder_init", decoder_init),
                      ("tokenizer", tokenizer)):
        if path and not Path(path).exists():  # the loaders check too, but only after the data is loaded
            raise FileNotFoundError(f"{key}: expected an existing file or folder, found '{path}'")
    for key, value, choices in (("dtype", dtype, ("bfloat16", "float32")), ("bridge", bridge, BRIDGES),
                                ("decoder", decoder, DECODERS), ("decoder_train", decoder_train, DECODER_TRAINING)):
        if value not in choices:
            raise ValueError(f"{key}: expected one of {choices}, found {value!r}")
    if decoder_train == "lora" and (lora_rank < 1 or lora_alpha <= 0):
        raise ValueError(f"lora_rank, lora_alpha: expected >= 1 and > 0, found {lora_rank} and {lora_alpha}")
    if decoder_init and not tokenizer:  # a pretrained decoder only understands its own token ids
        own = (Path(decoder_init) if Path(decoder_init).is_dir() else Path(decoder_init).parent) / "tokenizer.json"
        if not own.exists():
            raise ValueError(f"tokenizer: expected decoder_init's own tokenizer.json (none at {own}), found ''")
        tokenizer = str(own)
    check_img_size(img_size, init_from, patch_size)
    check_intensity(intensity)
    t_start = time.time()
    torch.manual_seed(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if device == "cpu" and cpu_threads:
        torch.set_num_threads(cpu_threads)
    amp = torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=dtype == "bfloat16")
    print(f"caption.py: device {device}, data {data_path or 'phantoms'}, out_dir {out}")

    # data
    train_images, train_captions = load_pairs(data_path, train_split, phantom_sizes[0], img_size, seed,
                                              image_column, caption_column, intensity)
    test_images, test_captions = load_pairs(data_path, test_split, phantom_sizes[1], img_size, seed,
                                            image_column, caption_column, intensity)
    print(f"data: {len(train_images)} train / {len(test_images)} test pairs at {img_size} px")

    # tokenizer
    if tokenizer:
        tok = Tokenizer.from_file(tokenizer)
        print(f"tokenizer: {tokenizer} ({tok.get_vocab_size()} tokens)")
    else:
        tok = train_tokenizer(train_captions, bpe_vocab_size)
        print(f"tokenizer: byte-level BPE trained on the training captions ({tok.get_vocab_size()} tokens)")
    tok.save(str(out / "tokenizer.json"))

    # model: frozen ViT -> bridge -> decoder
    if init_from:
        vit = load_backbone(init_from)
    else:
        vit = ViT(vit_config(model_size, patch_size=patch_size, img_size=img_size, layerscale_init=layerscale_init))
        print(f"ViT: RANDOM INIT ({model_size}, patch {patch_size}, LayerScale {layerscale_init}) -- a baseline, "
              "not a pretrained encoder")
    n_image_tokens = n_queries if bridge == "merger" else (img_size // vit.config.patch_size) ** 2
    if decoder == "causal_lm" and decoder_init:  # its special tokens are its config's (Llama's have no <pad>)
        dec = load_llama(decoder_init)
        ids = {name: getattr(dec.config, name) for name in ("bos_token_id", "pad_token_id", "eos_token_id")}
    else:  # BART's <s> <pad> </s>, which a trained BPE has too
        ids = special_token_ids(tok, tokenizer or "trained BPE")
        if decoder_init:
            dec = load_bart(decoder_init)
        elif decoder == "bart":
            dec = Bart(bart_config(decoder_size, vocab_size=tok.get_vocab_size(), dropout=dropout, **ids,
                                   max_position_embeddings=max(n_image_tokens, max(max_tokens), max_caption_tokens)))
        else:
            dec = Llama(llama_config(decoder_size, vocab_size=tok.get_vocab_size(), **ids))
        for name, value in ids.items():
            if getattr(dec.config, name) != value:
                raise ValueError(f"tokenizer: expected {name}={getattr(dec.config, name)} (the decoder's config), "
                                 f"found {value}")
    if tok.get_vocab_size() > dec.config.vocab_size:
        raise ValueError(f"tokenizer: expected at most the decoder's {dec.config.vocab_size} embeddings, found "
                         f"{tok.get_vocab_size()} tokens in {tokenizer}")
    if decoder == "bart" and n_image_tokens > dec.config.max_position_embeddings:
        raise ValueError(f"bridge: {n_image_tokens} image tokens, expected at most BART's "
                         f"{dec.config.max_position_embeddings} positions (use --bridge=merger or a smaller image)")
    if decoder_train == "lora":
        add_lora(dec, lora_rank, lora_alpha, LLAMA_TARGETS if decoder == "causal_lm" else BART_TARGETS)
    elif decoder_train == "frozen":
        dec.requires_grad_(False)
    width = dec.config.d_model if decoder == "bart" else dec.config.hidden_size
    instruction_ids = tok.encode(instruction, add_special_tokens=False).ids if decoder == "causal_lm" else ()
    model = Captioner(vit, make_bridge(bridge, vit.embed_dim, width, n_queries, query_std), dec,
                      instruction_ids).to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    print(f"model: ViT {sum(p.numel() for p in vit.parameters()):,} params (frozen) -> {bridge} bridge "
          f"({n_image_tokens} tokens) -> {decoder} d={width} ({decoder_train}); trainable "
          f"{sum(p.numel() for p in trainable):,}")
    train_ids = [caption_ids(tok, c, max_caption_tokens, ids, bos=decoder == "bart") for c in train_captions]
    test_ids = [caption_ids(tok, c, max_caption_tokens, ids, bos=decoder == "bart") for c in test_captions]

    # the frozen ViT's tokens, computed once
    test_tokens = frozen_vit_tokens(model, test_images, device, amp)
    train_tokens = frozen_vit_tokens(model, train_images, device, amp) if cache_vit_tokens else None

    # training
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=weight_decay, fused=device == "cuda")
    steps_per_epoch = math.ceil(len(train_images) / batch_size)
    total_steps = epochs * steps_per_epoch
    generator = torch.Generator().manual_seed(seed)
    print(f"training: {epochs} epochs x {steps_per_epoch} steps, batch {batch_size} = "
          f"{batch_size // micro_batch_size} x {micro_batch_size}")
    step, history, t_train = 0, [], time.time()
    model.train()
    for epoch in range(epochs):
        for batch in torch.randperm(len(train_images), generator=generator).split(batch_size):
            step_lr = lr_at(step, total_steps, warmup_steps, lr)
            for g in optimizer.param_groups:
                g["lr"] = step_lr
            loss_sum = 0.0
            for micro in batch.split(micro_batch_size):
                if cache_vit_tokens:
                    vit_in = train_tokens[micro]
                else:
                    vit_in = frozen_vit_tokens(model, [train_images[i] for i in micro], device, amp)
                with amp:
                    loss = caption_loss(model, vit_in.to(device), [train_ids[i] for i in micro])
                (loss * len(micro) / len(batch)).backward()  # the mean over the whole batch
                loss_sum += loss.item() * len(micro) / len(batch)
            torch.nn.utils.clip_grad_norm_(trainable, grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step % log_interval == 0 or step == total_steps:
                elapsed = time.time() - t_train
                print(f"step {step}/{total_steps} epoch {epoch + 1} loss {loss_sum:.4f} lr {step_lr:.2e} "
                      f"{step * batch_size / elapsed:.0f} img/s ETA {elapsed / step * (total_steps - step):.0f}s")
        model.eval()
        test_loss = mean_caption_loss(model, test_tokens, test_ids, micro_batch_size, device, amp)
        model.train()
        history.append({"epoch": epoch + 1, "train_loss": loss_sum, "test_loss": test_loss})
        print(f"epoch {epoch + 1}: last train loss {loss_sum:.4f}, test loss {test_loss:.4f}")
    train_s = time.time() - t_train
    model.eval()

    # checkpoint: the frozen ViT too, so that a random-init run can be reproduced; LoRA merged into the decoder
    merge_lora(model.decoder)
    meta = {"vit_config": json.dumps(asdict(vit.config)), "decoder_config": json.dumps(asdict(dec.config)),
            "bridge": bridge, "decoder": decoder, "n_queries": str(n_queries), "init_from": init_from or "random"}
    save_safetensors_atomic(model.state_dict(), out / "captioner.safetensors", meta)
    save_json_atomic({"format": "nanorad-captioner", **{k: json.loads(v) if k.endswith("config") else v
                                                        for k, v in meta.items()}}, out / "captioner.safetensors.json")

    # evaluation: every beams x max_tokens pair, and the constant caption
    t_eval = time.time()
    table = []
    for num_beams in beams:
        for max_len in max_tokens:
            hyps = generate_captions(model, tok, test_tokens, num_beams, max_len, length_penalty, device)
            scores = caption_metrics(hyps, test_captions)
            table.append({"beams": num_beams, "max_tokens": max_len, **scores})
            print(f"beams {num_beams} max_tokens {max_len}: " + " ".join(f"{k} {v:.2f}" for k, v in scores.items()))
    constant = constant_caption_baseline(train_captions)
    baseline = {"caption": constant, **caption_metrics([constant] * len(test_captions), test_captions)}
    print(f"constant-caption baseline '{constant}': BLEU-4 {baseline['BLEU-4']:.2f} METEOR {baseline['METEOR']:.2f}")
    eval_s = time.time() - t_eval

    # results
    best_beams = 5 if 5 in beams else beams[-1]  # OmniRad's setting for the samples
    samples = generate_captions(model, tok, test_tokens[:n_samples], best_beams, max(max_tokens), length_penalty,
                                device)
    sample_sheet(test_images[:n_samples], samples, test_captions[:n_samples], out / "samples.png")
    encoder_name = (Path(init_from).stem if init_from else f"random-init ViT-{model_size}") + f" ({bridge}, {decoder})"
    markdown = format_table(table, encoder_name, baseline)
    (out / "table.md").write_text(markdown + "\n")
    results = {"config": config, "table": table, "constant_baseline": baseline, "history": history,
               "samples": [{"generated": g, "reference": r} for g, r in zip(samples, test_captions[:n_samples])],
               "n_train": len(train_images), "n_test": len(test_images), "device": device,
               "torch_threads": torch.get_num_threads(),
               "train_seconds": train_s, "eval_seconds": eval_s, "total_seconds": time.time() - t_start,
               "command": " ".join(sys.argv)}
    save_json_atomic(results, out / "results.json")
    print(markdown)
    print(f"done in {time.time() - t_start:.0f}s (train {train_s:.0f}s, eval {eval_s:.0f}s); wrote {out}/results.json, "
          f"table.md, samples.png, captioner.safetensors, tokenizer.json")
