"""nanorad models, hand-written: a DINOv2-style ViT (with loaders for the official DINOv2, HuggingFace
Dinov2 and timm key formats), a BART-lite encoder-decoder for captioning, a Llama decoder-only LM in
HuggingFace's key format (the LM of LLaVA-style report generation, fed an image prefix as input
embeddings), and greedy / beam-search decoding shared by BART and the LM."""

# ----------------------------------------------------------------------------------------------
# ViT (DINOv2 layout)
# ----------------------------------------------------------------------------------------------

import json
import math
import os
import tempfile
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

import kernels

# name -> (embed_dim, depth, num_heads); DINOv2 keeps a head dim of 64 at every size
VIT_SIZES = {
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
    "giant": (1536, 40, 24),
}


@dataclass
class ViTConfig:
    img_size: int = 224            # the size the position embedding is stored for
    patch_size: int = 14
    in_chans: int = 3
    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    ffn: str = "mlp"               # "mlp" (GELU) or "swiglu" (ViT-g)
    n_registers: int = 0
    layerscale_init: float | None = 1e-5   # None: no LayerScale (plain timm ViT)
    drop_path_rate: float = 0.0
    drop_path_uniform: bool = False        # DINOv2 ViT-L/g recipes use the same rate in every block
    qkv_bias: bool = True
    # position-embedding resampling: DINOv2 official = offset 0.1, no antialias; DINOv2 _reg4 and
    # timm = offset 0 (explicit output size) with antialias; HF Dinov2 = offset 0, no antialias
    interpolate_offset: float = 0.1
    interpolate_antialias: bool = False


def vit_config(size="small", **overrides):
    """ViTConfig for a named size; giant uses SwiGLU as in DINOv2."""
    if size not in VIT_SIZES:
        raise ValueError(f"unknown ViT size '{size}', expected one of {list(VIT_SIZES)}")
    embed_dim, depth, num_heads = VIT_SIZES[size]
    base = dict(embed_dim=embed_dim, depth=depth, num_heads=num_heads, ffn="swiglu" if size == "giant" else "mlp")
    base.update(overrides)
    return ViTConfig(**base)


def resample_pos_embed(patch_pos_embed, grid_hw, offset=0.1, antialias=False):
    """Bicubic resampling of a square (1, M*M, D) position grid to (1, h*w, D).

    offset > 0 is DINOv2's historical kludge (dino issue #8): it passes scale factors (h+offset)/M
    instead of an output size, which changes the sampling positions slightly. Official DINOv2 uses
    0.1 without antialias; DINOv2 _reg4 and timm pass the size (offset 0) with antialias; HF Dinov2
    passes the size without antialias.
    """
    n, dim = patch_pos_embed.shape[1], patch_pos_embed.shape[2]
    m = int(math.sqrt(n))
    if m * m != n:
        raise ValueError(f"position embedding has {n} patch positions, expected a square grid")
    h, w = grid_hw
    if (h, w) == (m, m):
        return patch_pos_embed
    grid = patch_pos_embed.float().reshape(1, m, m, dim).permute(0, 3, 1, 2)
    if offset:
        size_or_scale = dict(scale_factor=((h + offset) / m, (w + offset) / m))
    else:
        size_or_scale = dict(size=(h, w))
    grid = F.interpolate(grid, mode="bicubic", antialias=antialias, **size_or_scale)
    assert grid.shape[-2:] == (h, w), f"resampled grid {tuple(grid.shape[-2:])} != {(h, w)}"
    return grid.permute(0, 2, 3, 1).reshape(1, h * w, dim).to(patch_pos_embed.dtype)


class PatchEmbed(nn.Module):
    def __init__(self, patch_size, in_chans, embed_dim):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        H, W = x.shape[-2:]
        if H % self.patch_size or W % self.patch_size:
            raise ValueError(f"image size {H}x{W} is not a multiple of the patch size {self.patch_size}")
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, h*w, D), row-major patches


class Attention(nn.Module):
    def __init__(self, dim, num_heads, qkv_bias=True):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        out = kernels.attention(qkv[0], qkv[1], qkv[2])  # fused kernel on CUDA, SDPA elsewhere
        return self.proj(out.transpose(1, 2).reshape(B, N, D))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class SwiGLU(nn.Module):
    """DINOv2's SwiGLUFFNFused: 2/3 of the MLP width, rounded up to a multiple of 8."""
    def __init__(self, dim, hidden):
        super().__init__()
        hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x):
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(x1) * x2)


class LayerScale(nn.Module):
    def __init__(self, dim, init_value):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_value)))

    def forward(self, x):
        return x * self.gamma


def drop_path(x, rate, training):
    """Stochastic depth: drop the whole residual branch for a random subset of samples."""
    if rate == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - rate)
    return x * keep / (1 - rate)


class Block(nn.Module):
    def __init__(self, cfg, drop_path_rate):
        super().__init__()
        dim, hidden = cfg.embed_dim, int(cfg.embed_dim * cfg.mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, cfg.num_heads, cfg.qkv_bias)
        self.ls1 = LayerScale(dim, cfg.layerscale_init) if cfg.layerscale_init is not None else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = SwiGLU(dim, hidden) if cfg.ffn == "swiglu" else Mlp(dim, hidden)
        self.ls2 = LayerScale(dim, cfg.layerscale_init) if cfg.layerscale_init is not None else nn.Identity()
        self.drop_path_rate = drop_path_rate

    def forward(self, x):
        x = x + drop_path(self.ls1(self.attn(self.norm1(x))), self.drop_path_rate, self.training)
        x = x + drop_path(self.ls2(self.mlp(self.norm2(x))), self.drop_path_rate, self.training)
        return x


class ViT(nn.Module):
    """DINOv2 vision transformer. Parameter names are the official torch.hub ones, so an official
    checkpoint loads with no renaming (and a timm one nearly so)."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        if config.ffn not in ("mlp", "swiglu"):
            raise ValueError(f"ViTConfig.ffn: expected 'mlp' or 'swiglu', got {config.ffn!r}")
        if config.embed_dim % config.num_heads:
            raise ValueError(f"embed_dim {config.embed_dim} is not divisible by num_heads {config.num_heads}")
        self.config = config
        self.embed_dim, self.patch_size, self.n_registers = config.embed_dim, config.patch_size, config.n_registers
        D = config.embed_dim
        grid = config.img_size // config.patch_size
        self.patch_embed = PatchEmbed(config.patch_size, config.in_chans, D)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, D))  # no positions for registers
        self.register_tokens = nn.Parameter(torch.zeros(1, config.n_registers, D)) if config.n_registers else None
        self.mask_token = nn.Parameter(torch.zeros(1, D))
        if config.drop_path_uniform:
            rates = [config.drop_path_rate] * config.depth
        else:
            rates = torch.linspace(0, config.drop_path_rate, config.depth).tolist()
        self.blocks = nn.ModuleList([Block(config, r) for r in rates])
        self.norm = nn.LayerNorm(D, eps=1e-6)
        self.init_weights()

    def init_weights(self):
        # as DINOv2: truncated-normal positions and linears, tiny CLS/registers, zero mask token
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def interpolate_pos_encoding(self, grid_hw):
        pos = self.pos_embed
        patch_pos = resample_pos_embed(pos[:, 1:], grid_hw, self.config.interpolate_offset,
                                       self.config.interpolate_antialias)
        return torch.cat([pos[:, :1], patch_pos], dim=1)

    def prepare_tokens(self, x, masks=None):
        B, _, H, W = x.shape
        x = self.patch_embed(x)
        if masks is not None:  # iBOT: masked patches see the learned mask token instead of the image
            x = torch.where(masks.unsqueeze(-1), self.mask_token.to(x.dtype).unsqueeze(0), x)
        x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1)
        x = x + self.interpolate_pos_encoding((H // self.patch_size, W // self.patch_size)).to(x.dtype)
        if self.register_tokens is not None:
            x = torch.cat([x[:, :1], self.register_tokens.expand(B, -1, -1), x[:, 1:]], dim=1)
        return x

    def forward_features(self, x, masks=None):
        x = self.prepare_tokens(x, masks)
        for block in self.blocks:
            x = block(x)
        x_norm = self.norm(x)
        R = self.n_registers
        return {
            "x_norm_clstoken": x_norm[:, 0],
            "x_norm_regtokens": x_norm[:, 1:R + 1],
            "x_norm_patchtokens": x_norm[:, R + 1:],
            "x_prenorm": x,
            "masks": masks,
        }

    def forward(self, x, masks=None):
        return self.forward_features(x, masks)["x_norm_clstoken"]

    def get_intermediate_layers(self, x, layers=1, reshape=False, return_class_token=False, norm=True):
        """Outputs of the chosen blocks: `layers` is a list of 0-based block indices or an int n
        (the last n blocks). Patch tokens (B, N, D), or (B, D, h, w) with reshape=True."""
        depth = len(self.blocks)
        wanted = range(depth - layers, depth) if isinstance(layers, int) else list(layers)
        for i in wanted:
            if not 0 <= i < depth:
                raise ValueError(f"layer index {i} out of range for a ViT of depth {depth}")
        B, _, H, W = x.shape
        x = self.prepare_tokens(x)
        outputs = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in wanted:
                outputs.append(self.norm(x) if norm else x)
            if i >= max(wanted):
                break  # later blocks would not change any requested output
        cls_tokens = [out[:, 0] for out in outputs]
        patches = [out[:, 1 + self.n_registers:] for out in outputs]
        if reshape:
            h, w = H // self.patch_size, W // self.patch_size
            patches = [p.reshape(B, h, w, -1).permute(0, 3, 1, 2).contiguous() for p in patches]
        if return_class_token:
            return tuple(zip(patches, cls_tokens))
        return tuple(patches)


# ---------------------------------------------------------------------------- what a backbone sees: features, attention

@torch.no_grad()
def last_block_input(model, images):
    """The tokens (B, 1+R+N, D) entering the last block."""
    x = model.prepare_tokens(images)
    for block in model.blocks[:-1]:
        x = block(x)
    return x


def block_attention(block, x):
    """softmax(q k^T / sqrt(d_head)) of `block`: (B, heads, T, T), from qkv, as the fused kernel never stores it."""
    B, T, D = x.shape
    heads = block.attn.num_heads
    q, k, _ = block.attn.qkv(block.norm1(x)).reshape(B, T, 3, heads, D // heads).permute(2, 0, 3, 1, 4)
    return (q @ k.transpose(-2, -1) / math.sqrt(D // heads)).softmax(dim=-1)


@torch.no_grad()
def cls_attention_maps(model, images):
    """The last layer's attention from the CLS token to each patch, per head: (B, heads, h, w)."""
    attn = block_attention(model.blocks[-1], last_block_input(model, images))
    h, w = images.shape[-2] // model.patch_size, images.shape[-1] // model.patch_size
    return attn[:, :, 0, 1 + model.n_registers:].reshape(len(images), -1, h, w)


def check_img_size(img_size, init_from, patch_size):
    """Before any work: images must tile into patches of the backbone a stage will run (init_from's, read
    from the file, or a new one's patch_size)."""
    patch = load_backbone(init_from, verbose=False).patch_size if init_from else patch_size
    if img_size % patch:
        raise ValueError(f"img_size: expected a multiple of the backbone's patch size {patch}, found {img_size}")


@torch.no_grad()
def backbone_features(backbone, images, device, autocast=nullcontext, batch_size=256):
    """CLS features (N, D) fp32 on the CPU of normalised images (N, 3, H, W), in eval mode, in batches."""
    was_training = backbone.training
    backbone.eval()
    feats = []
    for i in range(0, len(images), batch_size):
        with autocast():
            feats.append(backbone(images[i:i + batch_size].to(device)).float().cpu())
    backbone.train(was_training)
    return torch.cat(feats)


# ---------------------------------------------------------------------------- checkpoints on disk

def save_safetensors_atomic(tensors, path, metadata=None):
    """Write to a temp file in the same folder, fsync, then rename: a crash leaves the old file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        save_file(tensors, tmp, metadata={k: str(v) for k, v in (metadata or {}).items()})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_json_atomic(obj, path):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_backbone(model, path):
    """nanorad format: official DINOv2 key names in safetensors, the config in its metadata and in
    a JSON beside it (`<path>.json`) for people to read."""
    config = asdict(model.config)
    save_safetensors_atomic(model.state_dict(), path, {"nanorad_vit_config": json.dumps(config)})
    save_json_atomic({"format": "nanorad-vit", "config": config}, str(path) + ".json")


def read_safetensors(path, tensors=True):
    """(tensors, metadata) of a .safetensors file (tensors None when not asked for). A truncated or
    foreign file is a one-line error naming it and the checkpoints beside it that could serve instead."""
    path = Path(path)
    try:
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
        return (load_file(str(path)) if tensors else None), metadata
    except SafetensorError as e:
        others = sorted(p.name for p in path.parent.glob("*.safetensors") if p.name != path.name)
        raise ValueError(f"{path}: expected a complete safetensors file, found an incomplete or foreign one ({e}); "
                         + (f"other checkpoints in {path.parent}: {', '.join(others)}" if others
                            else "no other checkpoint beside it")) from None


def read_hf_safetensors(path):
    """Tensors of a safetensors file, or of a HF folder's model.safetensors or its shards (7B models are
    published in several files listed by model.safetensors.index.json)."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if path.is_dir() and index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return {k: v for shard in shards for k, v in read_safetensors(path / shard)[0].items()}
    file = path / "model.safetensors" if path.is_dir() else path
    if not file.exists():
        raise FileNotFoundError(f"checkpoint '{file}' not found")
    return read_safetensors(file)[0]


def is_sharded_checkpoint(path):
    """Whether path is a pretrain.py fsdp checkpoint folder (ckpt.dcp / best.dcp with its state.json)."""
    return Path(path).suffix == ".dcp" and (Path(path) / "state.json").is_file()


def read_sharded_checkpoint(path):
    """Every tensor of a pretrain.py fsdp checkpoint folder (ckpt.dcp / best.dcp: the torch.distributed.checkpoint
    shards of the step its state.json names), whole, read in one process without a process group."""
    # as torch's own dcp_to_torch_save reads one: dcp.load would fill a copy of the (empty) dict it is given
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner  # every saved key
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict
    path = Path(path)
    shards = path / json.loads((path / "state.json").read_text())["shards"]
    tensors = {}
    _load_state_dict(tensors, storage_reader=FileSystemReader(shards), planner=_EmptyStateDictLoadPlanner(), no_dist=True)
    return tensors


def read_state_dict(path):
    """Tensors and safetensors metadata from .safetensors, an official .pth (never unpickled beyond
    plain tensors: weights_only=True), or a pretrain.py fsdp checkpoint folder (.dcp)."""
    path = Path(path)
    if is_sharded_checkpoint(path):
        return read_sharded_checkpoint(path), {}
    if path.is_dir():  # a HuggingFace model folder
        path = path / "model.safetensors"
    if not path.exists():
        raise FileNotFoundError(f"backbone file '{path}' not found")
    if path.suffix in (".pth", ".pt"):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (RuntimeError, EOFError, ValueError) as e:  # torn zip, truncated pickle, a forbidden object
            raise ValueError(f"{path}: expected a complete PyTorch state dict, found an unreadable file ({e})") from None
        for key in ("teacher", "model", "state_dict"):  # common wrappers around a state dict
            if isinstance(state, dict) and key in state and isinstance(state[key], dict):
                state = state[key]
        return state, {}
    return read_safetensors(path)


def strip_prefix(state):
    """The backbone's tensors from a checkpoint that wraps it with heads and other networks
    (a DINOv2 training checkpoint's `teacher.backbone.*` beside `teacher.dino_head.*`, a
    `Dinov2ForImageClassification`'s `dinov2.*` beside `classifier.*`, DDP's `module.*`)."""
    for prefix in ("teacher.backbone.", "student.backbone.", "backbone.", "dinov2.", "module."):
        if any(k in state for k in (prefix + "cls_token", prefix + "embeddings.cls_token")):
            return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return state


def rename_prefix(name, mapping):
    """Replace the first mapping key that is `name` or a dotted prefix of it; None if none is."""
    for src, dst in mapping.items():
        if name == src or name.startswith(src + "."):
            return dst + name[len(src):]
    return None


# official DINOv2 name -> HuggingFace Dinov2 name: one table serves loading (inverted) and export
HF_TOP_LEVEL_NAMES = {
    "cls_token": "embeddings.cls_token",
    "mask_token": "embeddings.mask_token",
    "register_tokens": "embeddings.register_tokens",
    "pos_embed": "embeddings.position_embeddings",
    "patch_embed.proj": "embeddings.patch_embeddings.projection",
    "norm": "layernorm",
}
HF_BLOCK_NAMES = {  # inside blocks.N. / encoder.layer.N.; qkv is split into query/key/value separately
    "norm1": "norm1", "norm2": "norm2", "attn.proj": "attention.output.dense",
    "ls1.gamma": "layer_scale1.lambda1", "ls2.gamma": "layer_scale2.lambda1",
    "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2", "mlp.w12": "mlp.weights_in", "mlp.w3": "mlp.weights_out",
}
HF_QKV = ("query", "key", "value")


def hf_to_official(state):
    """HuggingFace Dinov2 key names -> official DINOv2 names (q, k, v fused back into qkv)."""
    top_level = {hf: ours for ours, hf in HF_TOP_LEVEL_NAMES.items()}
    block = {hf: ours for ours, hf in HF_BLOCK_NAMES.items()}
    out, consumed = {}, set()
    for key, value in state.items():
        renamed = rename_prefix(key, top_level)
        if renamed is not None:
            out[renamed] = value
            consumed.add(key)
    depth = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.layer."))
    for i in range(depth):
        hf, ours = f"encoder.layer.{i}.", f"blocks.{i}."
        for kind in ("weight", "bias"):
            qkv_keys = [f"{hf}attention.attention.{n}.{kind}" for n in HF_QKV]
            if all(k in state for k in qkv_keys):
                out[f"{ours}attn.qkv.{kind}"] = torch.cat([state[k] for k in qkv_keys], dim=0)
                consumed.update(qkv_keys)
        for key in state:
            if key.startswith(hf) and key not in consumed:
                renamed = rename_prefix(key[len(hf):], block)
                if renamed is not None:
                    out[ours + renamed] = state[key]
                    consumed.add(key)
    unknown = sorted(set(state) - consumed)
    if unknown:
        raise KeyError(f"unexpected keys in HuggingFace Dinov2 checkpoint: {unknown[:8]}")
    return out


def official_to_hf(state, depth):
    """Official DINOv2 key names -> HuggingFace Dinov2 names (qkv split into query/key/value)."""
    out = {}
    for key, value in state.items():
        if key.startswith("blocks."):
            continue
        renamed = rename_prefix(key, HF_TOP_LEVEL_NAMES)
        if renamed is None:
            raise KeyError(f"no HuggingFace name for '{key}'")
        out[renamed] = value
    for i in range(depth):
        ours, hf = f"blocks.{i}.", f"encoder.layer.{i}."
        for key, value in state.items():
            if not key.startswith(ours):
                continue
            rest = key[len(ours):]
            if rest.startswith("attn.qkv."):
                kind = rest.rsplit(".", 1)[1]
                for name, part in zip(HF_QKV, value.chunk(3, dim=0)):
                    out[f"{hf}attention.attention.{name}.{kind}"] = part
                continue
            renamed = rename_prefix(rest, HF_BLOCK_NAMES)
            if renamed is None:
                raise KeyError(f"no HuggingFace name for '{key}'")
            out[hf + renamed] = value
    return out


def infer_vit_config(state, **overrides):
    """Everything the tensors' shapes say; the head count assumes DINOv2's head dim of 64 unless given."""
    D = state["cls_token"].shape[-1]
    patch_size = state["patch_embed.proj.weight"].shape[-1]
    n_pos = state["pos_embed"].shape[1] - 1
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    swiglu = "blocks.0.mlp.w12.weight" in state
    if swiglu:
        hidden = state["blocks.0.mlp.w3.weight"].shape[1]
        mlp_ratio = 4.0  # SwiGLU's width is derived from 4*D (checked by strict loading)
    else:
        hidden = state["blocks.0.mlp.fc1.weight"].shape[0]
        mlp_ratio = hidden / D
    inferred = dict(
        img_size=int(math.isqrt(n_pos)) * patch_size, patch_size=patch_size,
        in_chans=state["patch_embed.proj.weight"].shape[1], embed_dim=D, depth=depth,
        num_heads=max(1, D // 64), mlp_ratio=mlp_ratio, ffn="swiglu" if swiglu else "mlp",
        n_registers=state["register_tokens"].shape[1] if "register_tokens" in state else 0,
        layerscale_init=1e-5 if "blocks.0.ls1.gamma" in state else None,
        qkv_bias="blocks.0.attn.qkv.bias" in state,
    )
    inferred.update(overrides)
    return ViTConfig(**inferred)


def load_state_strict(model, state, source, allow_missing=()):
    """load_state_dict that names every missing, unexpected or mis-shaped key."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state) - set(allow_missing))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in set(state) & set(own) if state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise KeyError(f"{source}: checkpoint does not match the {type(model).__name__} config. missing={missing[:8]} "
                       f"unexpected={unexpected[:8]} shape mismatches={shapes[:8]}")
    model.load_state_dict(state, strict=False)


def detect_format(state, metadata):
    if "nanorad_vit_config" in metadata:
        return "nanorad"
    if any(k.startswith("embeddings.") for k in state):
        return "hf"
    if "cls_token" in state and "mask_token" not in state:
        return "timm"  # timm ViTs have no mask token
    if "cls_token" in state:
        return "dinov2"
    raise KeyError(f"unrecognised backbone key format (first keys: {sorted(state)[:5]})")


def load_backbone(path, verbose=True, **config_overrides):
    """A ViT from any of: official DINOv2 torch.hub .pth (or RAD-DINO's backbone_compatible
    .safetensors), HuggingFace Dinov2 safetensors (file or folder with config.json), timm ViT
    safetensors (OmniRad), or a nanorad file. Strict: a missing or unexpected key is an error."""
    state, metadata = read_state_dict(path)
    state = strip_prefix(dict(state))
    fmt = detect_format(state, metadata)
    if fmt == "nanorad":
        config = ViTConfig(**{**json.loads(metadata["nanorad_vit_config"]), **config_overrides})
    else:
        if fmt == "hf":
            hf_config = Path(path) / "config.json" if Path(path).is_dir() else Path(path).with_name("config.json")
            hf_config = json.loads(hf_config.read_text()) if hf_config.exists() else {}
            if "num_attention_heads" in hf_config:
                config_overrides.setdefault("num_heads", hf_config["num_attention_heads"])
            state = hf_to_official(state)
            # the HF class decides the resampling; plain Dinov2Model has no place for register tokens
            with_registers = hf_config.get("model_type") == "dinov2_with_registers" or "register_tokens" in state
            for key, value in hf_resampling(with_registers).items():
                config_overrides.setdefault(key, value)
        if fmt == "timm":
            skipped = sorted(k for k in state if k.startswith(("head.", "fc_norm.", "head_drop.")))
            if skipped and verbose:
                print(f"load_backbone: {path}: skipping classifier keys {skipped}")
            state = {k: v for k, v in state.items() if k not in skipped}
            # timm resamples positions to an explicit size, without DINOv2's 0.1 offset, antialiased
            config_overrides.setdefault("interpolate_offset", 0.0)
            config_overrides.setdefault("interpolate_antialias", True)
        if fmt == "dinov2" and "register_tokens" in state:
            # the _reg4 recipe switched to explicit sizes with antialias
            config_overrides.setdefault("interpolate_offset", 0.0)
            config_overrides.setdefault("interpolate_antialias", True)
        config = infer_vit_config(state, **config_overrides)
    model = ViT(config)
    # timm ViTs carry no mask token: it keeps DINOv2's zero init
    load_state_strict(model, state, str(path), allow_missing=("mask_token",) if fmt == "timm" else ())
    if verbose:
        n = sum(p.numel() for p in model.parameters())
        print(f"load_backbone: {path} ({fmt} format): ViT D={config.embed_dim} depth={config.depth} "
              f"heads={config.num_heads} patch={config.patch_size} registers={config.n_registers}, {n:,} params")
    return model


def hf_resampling(with_registers):
    """How HF's Dinov2 classes resample positions, as ViTConfig fields: both pass an explicit size
    (no 0.1 offset) and skip the stored grid; Dinov2WithRegistersEmbeddings antialiases, Dinov2Embeddings not."""
    return dict(interpolate_offset=0.0, interpolate_antialias=bool(with_registers))


def warn_if_hf_resamples_otherwise(cfg, img_size):
    """One line when HF will resample positions differently from this model (DINOv2's official 0.1
    offset has no HF setting): the export then equals the model only at the size its grid is stored for."""
    hf = hf_resampling(cfg.n_registers)
    ours = dict(interpolate_offset=float(cfg.interpolate_offset), interpolate_antialias=bool(cfg.interpolate_antialias))
    if ours == hf:
        return
    hf_class = "Dinov2WithRegistersModel" if cfg.n_registers else "Dinov2Model"
    print(f"export_hf: warning: {hf_class} resamples positions with offset 0 antialias {hf['interpolate_antialias']}, "
          f"this model with offset {cfg.interpolate_offset} antialias {cfg.interpolate_antialias}: the export equals "
          f"it only at {img_size} px (img_size= picks that size)")


def export_hf(model, out_dir, img_size=None):
    """Write a HuggingFace Dinov2 folder (model.safetensors + config.json) so that
    `transformers.Dinov2Model.from_pretrained(out_dir)` (Dinov2WithRegistersModel with registers) and
    other tools can load our backbone. img_size (default: the stored size) stores the position grid
    resampled by this model for that size, so the export equals it there whatever HF's resampling;
    HF then resamples from that grid at other sizes."""
    cfg = model.config
    img_size = cfg.img_size if img_size is None else img_size
    if img_size % cfg.patch_size:
        raise ValueError(f"export_hf: img_size {img_size} is not a multiple of the patch size {cfg.patch_size}")
    if not float(cfg.mlp_ratio).is_integer():
        raise ValueError(f"export_hf: mlp_ratio {cfg.mlp_ratio} is not an integer, and HF Dinov2Config's is an int")
    warn_if_hf_resamples_otherwise(cfg, img_size)
    state = model.state_dict()
    if img_size != cfg.img_size:
        grid = img_size // cfg.patch_size
        state["pos_embed"] = model.interpolate_pos_encoding((grid, grid)).detach()
    out_dir = Path(out_dir)
    save_safetensors_atomic(official_to_hf(state, cfg.depth), out_dir / "model.safetensors", {"format": "pt"})
    # Dinov2Config is a strict dataclass: each value must have the declared type (mlp_ratio 4.0 is a TypeError)
    hf_config = {
        "model_type": "dinov2_with_registers" if cfg.n_registers else "dinov2",
        "architectures": ["Dinov2WithRegistersModel" if cfg.n_registers else "Dinov2Model"],
        "hidden_size": int(cfg.embed_dim), "num_hidden_layers": int(cfg.depth),
        "num_attention_heads": int(cfg.num_heads), "mlp_ratio": int(cfg.mlp_ratio), "hidden_act": "gelu",
        "layer_norm_eps": 1e-6, "image_size": int(img_size), "patch_size": int(cfg.patch_size),
        "num_channels": int(cfg.in_chans), "qkv_bias": bool(cfg.qkv_bias),
        "layerscale_value": float(cfg.layerscale_init or 1.0), "use_swiglu_ffn": cfg.ffn == "swiglu",
        "drop_path_rate": 0.0,
    }
    if cfg.n_registers:
        hf_config["num_register_tokens"] = int(cfg.n_registers)
    save_json_atomic(hf_config, out_dir / "config.json")


# ---------------------------------------------------------------------------- DINO / iBOT projection head

class WeightNormLinear(nn.Module):
    """Linear without bias whose rows are v / ||v|| scaled by g (torch's weight_norm, hand-written
    so the parameters keep DINOv2's names `weight_g` and `weight_v`)."""
    def __init__(self, in_dim, out_dim):
        super().__init__()
        v = nn.Linear(in_dim, out_dim, bias=False).weight.detach().clone()  # PyTorch default init, as DINOv2
        self.weight_v = nn.Parameter(v)
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1))

    def forward(self, x):
        weight = self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True)
        return F.linear(x, weight)


class DINOHead(nn.Module):
    """DINOv2's projection head: MLP (GELU) -> bottleneck -> L2-normalise -> weight-normalised
    linear onto K prototypes. DINOv2 trains with weight_g frozen at 1."""
    def __init__(self, in_dim, out_dim=65536, hidden_dim=2048, bottleneck_dim=256, nlayers=3):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (nlayers - 1) + [bottleneck_dim]
        layers = []
        for i in range(nlayers):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < nlayers - 1:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)
        self.last_layer.weight_g.requires_grad = False

    def forward(self, x):
        x = self.mlp(x)
        x = F.normalize(x, dim=-1, p=2, eps=1e-6 if x.dtype == torch.float16 else 1e-12)
        return self.last_layer(x)


def head_shape(head):
    """DINOHead constructor arguments read back from its weights."""
    linears = [m for m in head.mlp if isinstance(m, nn.Linear)]
    return dict(in_dim=linears[0].in_features, out_dim=head.last_layer.weight_v.shape[0],
                hidden_dim=linears[0].out_features if len(linears) > 1 else 0,
                bottleneck_dim=head.last_layer.weight_v.shape[1], nlayers=len(linears))


def load_dino_head(path, verbose=True, in_dim=None):
    """A DINOHead from a DINOv2-format state dict (`mlp.N.*`, `last_layer.weight_g/_v`), as RAD-DINO
    publishes it (`dino_head.safetensors`) or inside a DINOv2 checkpoint (`teacher.dino_head.*`).
    in_dim: the backbone's embed_dim the head must take (checked)."""
    state, _ = read_state_dict(path)
    for prefix in ("teacher.dino_head.", "student.dino_head.", "dino_head.", "head."):
        if any(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            break
    linears = sorted(int(k.split(".")[1]) for k in state if k.startswith("mlp.") and k.endswith(".weight"))
    if not linears or "last_layer.weight_v" not in state:
        raise KeyError(f"{path}: not a DINO head (expected mlp.N.weight and last_layer.weight_v; found {sorted(state)[:6]})")
    first, last = state[f"mlp.{linears[0]}.weight"], state[f"mlp.{linears[-1]}.weight"]
    if in_dim is not None and first.shape[1] != in_dim:
        raise ValueError(f"{path}: head input {first.shape[1]}, expected the backbone's embed_dim {in_dim}")
    out_dim, bottleneck = state["last_layer.weight_v"].shape
    hidden = first.shape[0] if len(linears) > 1 else bottleneck
    head = DINOHead(first.shape[1], out_dim, hidden, last.shape[0], nlayers=len(linears))
    load_state_strict(head, state, str(path))
    if verbose:
        print(f"load_dino_head: {path}: {first.shape[1]} -> {hidden} x{len(linears)} -> {bottleneck} -> {out_dim} prototypes")
    return head


# ----------------------------------------------------------------------------------------------
# BART-lite (captioning)
# ----------------------------------------------------------------------------------------------

# BART as published by HuggingFace (BartForConditionalGeneration), written out by hand. Parameter names
# are HF's with the `model.` prefix dropped, so a published checkpoint loads by a plain rename. The
# encoder reads input embeddings only: in nanorad it never sees text, only the visual prefix.

# name -> (d_model, layers per stack, heads); the FFN is 4 * d_model as in every BART
BART_SIZES = {
    "tiny": (128, 2, 4),     # a CPU-sized default for tests and smoke runs
    "base": (768, 6, 12),    # facebook/bart-base (OmniRad's language model)
    "large": (1024, 12, 16),
}
BART_POSITION_OFFSET = 2  # fairseq reserved the first two rows of the position table; HF kept them


@dataclass
class BartConfig:
    vocab_size: int = 50265
    max_position_embeddings: int = 1024
    d_model: int = 768
    encoder_layers: int = 6
    decoder_layers: int = 6
    encoder_attention_heads: int = 12
    decoder_attention_heads: int = 12
    encoder_ffn_dim: int = 3072
    decoder_ffn_dim: int = 3072
    dropout: float = 0.1           # after embeddings, attention and FFN (HF's `dropout`)
    scale_embedding: bool = False  # bart-base/large: token embeddings are not multiplied by sqrt(d)
    pad_token_id: int = 1
    bos_token_id: int = 0
    eos_token_id: int = 2
    decoder_start_token_id: int = 2  # BART starts decoding from </s>, not <s>


def bart_config(size="base", **overrides):
    """BartConfig for a named size; `vocab_size=` etc. override."""
    if size not in BART_SIZES:
        raise ValueError(f"unknown BART size '{size}', expected one of {list(BART_SIZES)}")
    d, layers, heads = BART_SIZES[size]
    base = dict(d_model=d, encoder_layers=layers, decoder_layers=layers, encoder_attention_heads=heads,
                decoder_attention_heads=heads, encoder_ffn_dim=4 * d, decoder_ffn_dim=4 * d)
    base.update(overrides)
    return BartConfig(**base)


def bart_config_from_hf(hf_config):
    """BartConfig from a HuggingFace config.json dict (unknown HF keys are ignored)."""
    names = {f.name for f in fields(BartConfig)}
    return BartConfig(**{k: v for k, v in hf_config.items() if k in names})


class BartAttention(nn.Module):
    """Multi-head attention with separate q/k/v projections (HF names). Keys and values are made by
    `keys_values` so the decoder can cache them between generation steps."""

    def __init__(self, d_model, num_heads):
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"BART d_model {d_model} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def split_heads(self, x):  # (B, T, D) -> (B, H, T, D/H)
        B, T, D = x.shape
        return x.view(B, T, self.num_heads, D // self.num_heads).transpose(1, 2)

    def keys_values(self, x):
        return self.split_heads(self.k_proj(x)), self.split_heads(self.v_proj(x))

    def forward(self, x, k, v, mask=None):
        # scaled by 1/sqrt(head dim) like BART; mask is boolean, True = may attend
        out = F.scaled_dot_product_attention(self.split_heads(self.q_proj(x)), k, v, attn_mask=mask)
        B, H, T, Dh = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(B, T, H * Dh))


class BartEncoderLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        d = config.d_model
        self.self_attn = BartAttention(d, config.encoder_attention_heads)
        self.self_attn_layer_norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, config.encoder_ffn_dim)
        self.fc2 = nn.Linear(config.encoder_ffn_dim, d)
        self.final_layer_norm = nn.LayerNorm(d)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        # post-norm, as the original Transformer and BART: add the residual, then normalise
        x = self.self_attn_layer_norm(x + self.dropout(self.self_attn(x, *self.self_attn.keys_values(x))))
        return self.final_layer_norm(x + self.dropout(self.fc2(F.gelu(self.fc1(x)))))


class BartDecoderLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        d = config.d_model
        self.self_attn = BartAttention(d, config.decoder_attention_heads)
        self.self_attn_layer_norm = nn.LayerNorm(d)
        self.encoder_attn = BartAttention(d, config.decoder_attention_heads)
        self.encoder_attn_layer_norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, config.decoder_ffn_dim)
        self.fc2 = nn.Linear(config.decoder_ffn_dim, d)
        self.final_layer_norm = nn.LayerNorm(d)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, cross_kv, past_kv=None, mask=None):
        """x: the new positions; past_kv: self-attention keys/values of the earlier positions (or
        None). Returns the output and the keys/values of all positions so far."""
        k, v = self.self_attn.keys_values(x)
        if past_kv is not None:
            k, v = torch.cat([past_kv[0], k], dim=2), torch.cat([past_kv[1], v], dim=2)
        x = self.self_attn_layer_norm(x + self.dropout(self.self_attn(x, k, v, mask)))
        x = self.encoder_attn_layer_norm(x + self.dropout(self.encoder_attn(x, *cross_kv)))
        x = self.final_layer_norm(x + self.dropout(self.fc2(F.gelu(self.fc1(x)))))
        return x, (k, v)


class BartEncoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.max_positions = config.max_position_embeddings
        self.embed_positions = nn.Embedding(config.max_position_embeddings + BART_POSITION_OFFSET, config.d_model)
        self.layernorm_embedding = nn.LayerNorm(config.d_model)
        self.layers = nn.ModuleList([BartEncoderLayer(config) for _ in range(config.encoder_layers)])
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, inputs_embeds):
        T = inputs_embeds.shape[1]
        if T > self.max_positions:
            raise ValueError(f"BART encoder input has {T} positions, max_position_embeddings is {self.max_positions}")
        positions = torch.arange(T, device=inputs_embeds.device) + BART_POSITION_OFFSET
        x = self.dropout(self.layernorm_embedding(inputs_embeds + self.embed_positions(positions)))
        for layer in self.layers:
            x = layer(x)
        return x  # BART has no final encoder LayerNorm (mBART does)


class BartDecoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.max_positions = config.max_position_embeddings
        self.embed_positions = nn.Embedding(config.max_position_embeddings + BART_POSITION_OFFSET, config.d_model)
        self.layernorm_embedding = nn.LayerNorm(config.d_model)
        self.layers = nn.ModuleList([BartDecoderLayer(config) for _ in range(config.decoder_layers)])
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, token_embeds, cross_kv, past_kv=None, attention_mask=None):
        """token_embeds (B, T, D) for positions start..start+T-1, where start is the cached length.
        attention_mask (B, start+T): 0 marks padding keys. Returns hidden states and new caches."""
        B, T, _ = token_embeds.shape
        start = 0 if past_kv is None else past_kv[0][0].shape[2]
        if start + T > self.max_positions:
            raise ValueError(f"BART decoder at position {start + T}, max_position_embeddings is {self.max_positions}")
        device = token_embeds.device
        positions = torch.arange(start, start + T, device=device) + BART_POSITION_OFFSET
        x = self.dropout(self.layernorm_embedding(token_embeds + self.embed_positions(positions)))
        mask = None
        if T > 1 or attention_mask is not None:
            query_pos = torch.arange(start, start + T, device=device)[:, None]
            mask = (torch.arange(start + T, device=device)[None, :] <= query_pos)[None, None]  # causal
            if attention_mask is not None:
                mask = mask & attention_mask.bool()[:, None, None, :]
        new_kv = []
        for i, layer in enumerate(self.layers):
            x, kv = layer(x, cross_kv[i], None if past_kv is None else past_kv[i], mask)
            new_kv.append(kv)
        return x, new_kv


class DecoderCache:
    """What the decoder keeps between generation steps: cross-attention keys/values (made once from
    the encoder states) and self-attention keys/values (one more position per step)."""

    def __init__(self, cross_kv):
        self.cross_kv = cross_kv
        self.self_kv = None

    def reorder(self, index):
        """Beam search: row i continues the hypothesis that was in row index[i]. The cross keys need
        no reordering because every beam of an image attends to the same encoder states."""
        self.self_kv = [(k[index], v[index]) for k, v in self.self_kv]


class Bart(nn.Module):
    """BartForConditionalGeneration: encoder from input embeddings, decoder with a language-model head
    tied to the shared token embedding, plus HF's `final_logits_bias` (a buffer, zero unless loaded)."""

    def __init__(self, config: BartConfig):
        super().__init__()
        self.config = config
        self.shared = nn.Embedding(config.vocab_size, config.d_model, padding_idx=config.pad_token_id)
        self.encoder = BartEncoder(config)
        self.decoder = BartDecoder(config)
        self.register_buffer("final_logits_bias", torch.zeros(1, config.vocab_size))
        self.embed_scale = math.sqrt(config.d_model) if config.scale_embedding else 1.0
        self.init_weights()

    def init_weights(self):
        # as HF BART: normal(0, 0.02) for linears and embeddings, zero biases and padding row
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)
        with torch.no_grad():
            self.shared.weight[self.config.pad_token_id].zero_()

    def encode(self, inputs_embeds):
        return self.encoder(inputs_embeds)

    def new_cache(self, encoder_states):
        return DecoderCache([layer.encoder_attn.keys_values(encoder_states) for layer in self.decoder.layers])

    def lm_head(self, hidden):
        return F.linear(hidden, self.shared.weight) + self.final_logits_bias

    def decode(self, decoder_input_ids, encoder_states, decoder_attention_mask=None):
        """Teacher-forced logits (B, T, vocab) for all positions at once (training, scoring)."""
        embeds = self.shared(decoder_input_ids) * self.embed_scale
        hidden, _ = self.decoder(embeds, self.new_cache(encoder_states).cross_kv, attention_mask=decoder_attention_mask)
        return self.lm_head(hidden)

    def decode_step(self, new_ids, cache):
        """Logits (B, T, vocab) for new tokens (B, T) that follow the cached ones; updates the cache."""
        embeds = self.shared(new_ids) * self.embed_scale
        hidden, cache.self_kv = self.decoder(embeds, cache.cross_kv, cache.self_kv)
        return self.lm_head(hidden)

    def forward(self, inputs_embeds, decoder_input_ids, decoder_attention_mask=None):
        return self.decode(decoder_input_ids, self.encode(inputs_embeds), decoder_attention_mask)


def bart_from_hf_state(state, config, source="BART state dict"):
    """A Bart from a HuggingFace BART state dict (`model.shared.weight`, `model.encoder.layers.N...`,
    `lm_head.weight`, `final_logits_bias`; the `model.` prefix may be absent, as in BartModel files).
    The per-stack `embed_tokens` and `lm_head` copies must equal `shared` (BART ties them)."""
    prefix = "model." if any(k.startswith("model.") for k in state) else ""
    shared = state[prefix + "shared.weight"]
    own = {}
    for key, value in state.items():
        name = key[len(prefix):] if key.startswith(prefix) else key
        if name in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight"):
            if not torch.equal(value, shared):
                raise KeyError(f"BART checkpoint: '{key}' differs from '{prefix}shared.weight'; "
                               "nanorad's BART ties input and output embeddings")
            continue
        own[name] = value
    own.setdefault("final_logits_bias", torch.zeros(1, shared.shape[0]))
    model = Bart(config)
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(own)), sorted(set(own) - set(expected))
    shapes = [f"{k}: file {tuple(own[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in set(own) & set(expected) if own[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        raise KeyError(f"{source}: does not match {config}. missing={missing[:8]} "
                       f"unexpected={unexpected[:8]} shape mismatches={shapes[:8]}")
    model.load_state_dict(own)
    return model


def load_bart(path, **config_overrides):
    """A Bart from a HuggingFace BART safetensors file or model folder (config.json beside it gives
    the config; without one, sizes are read from the shapes with 64-dim heads)."""
    path = Path(path)
    state = read_hf_safetensors(path)
    hf_config = (path if path.is_dir() else path.parent) / "config.json"
    if hf_config.exists():
        config = bart_config_from_hf({**json.loads(hf_config.read_text()), **config_overrides})
    else:
        prefix = "model." if "model.shared.weight" in state else ""
        vocab, d = state[prefix + "shared.weight"].shape
        n_layers = lambda stack: len({k.split(".")[3 if prefix else 2] for k in state
                                      if k.startswith(f"{prefix}{stack}.layers.")})
        inferred = dict(vocab_size=vocab, d_model=d,
                        max_position_embeddings=state[prefix + "encoder.embed_positions.weight"].shape[0] - BART_POSITION_OFFSET,
                        encoder_layers=n_layers("encoder"), decoder_layers=n_layers("decoder"),
                        encoder_attention_heads=d // 64, decoder_attention_heads=d // 64,
                        encoder_ffn_dim=state[prefix + "encoder.layers.0.fc1.weight"].shape[0],
                        decoder_ffn_dim=state[prefix + "decoder.layers.0.fc1.weight"].shape[0])
        config = BartConfig(**{**inferred, **config_overrides})
    return bart_from_hf_state(state, config, source=str(path))


# ----------------------------------------------------------------------------------------------
# Llama (decoder-only LM for LLaVA-style report generation)
# ----------------------------------------------------------------------------------------------

# The language model of LLaVA-1.5 (Vicuna, a fine-tuned Llama 2) and so of RAD-DINO's report generation:
# image patch embeddings, projected to the LM's width, are fed as a prefix of input embeddings before
# the text tokens. Module names are HuggingFace's LlamaForCausalLM ones, so a published state dict loads
# with no renaming.

# name -> (hidden_size, layers, heads, intermediate_size); one key/value head per query head unless overridden
LLAMA_SIZES = {
    "tiny": (64, 2, 4, 176),        # a CPU-sized default for tests and smoke runs
    "7b": (4096, 32, 32, 11008),    # Llama 2 7B, Vicuna-7B v1.5 (LLaVA-1.5 7B's LM)
    "13b": (5120, 40, 40, 13824),
}


@dataclass
class LlamaConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # grouped-query attention; None: as many as query heads
    head_dim: int | None = None             # None: hidden_size // num_attention_heads
    max_position_embeddings: int = 4096     # RoPE has no position table: HF's field, kept for config.json
    rms_norm_eps: float = 1e-6              # HF's default; Llama 2 and Vicuna files say 1e-5
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    pad_token_id: int = 0
    bos_token_id: int = 1
    eos_token_id: int = 2

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"LlamaConfig: num_attention_heads {self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads {self.num_key_value_heads}")
        if self.head_dim % 2:
            raise ValueError(f"LlamaConfig: head_dim must be even for RoPE, found {self.head_dim}")


def llama_config(size="7b", **overrides):
    """LlamaConfig for a named size; `vocab_size=`, `num_key_value_heads=` etc. override."""
    if size not in LLAMA_SIZES:
        raise ValueError(f"unknown Llama size '{size}', expected one of {list(LLAMA_SIZES)}")
    hidden, layers, heads, intermediate = LLAMA_SIZES[size]
    base = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=intermediate)
    base.update(overrides)
    return LlamaConfig(**base)


def llama_config_from_hf(hf_config):
    """LlamaConfig from a HuggingFace config.json dict (unknown keys ignored). RoPE's base is `rope_theta` up to
    transformers 4.x, `rope_parameters.rope_theta` from 5.0. What this model does not implement is an error
    rather than a silently different model: scaled RoPE (Llama 3.1's "llama3", "linear", ...), biases, other
    activations."""
    rope = hf_config.get("rope_parameters") or hf_config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"Llama config.json: rope type '{rope_type}' is not implemented, only 'default'")
    for flag in ("attention_bias", "mlp_bias"):
        if hf_config.get(flag):
            raise ValueError(f"Llama config.json: {flag}=true is not implemented")
    if hf_config.get("hidden_act", "silu") != "silu":
        raise ValueError(f"Llama config.json: hidden_act '{hf_config['hidden_act']}' is not implemented, only 'silu'")
    names = {f.name for f in fields(LlamaConfig)}
    values = {k: v for k, v in hf_config.items() if k in names and v is not None}  # null: keep our default
    if "rope_theta" in rope:
        values["rope_theta"] = rope["rope_theta"]
    return LlamaConfig(**values)


class RMSNorm(nn.Module):
    """x / rms(x) * weight: LayerNorm without centring or bias. In fp32 whatever the input dtype, as HF
    does: the mean of squared bf16 activations loses too many digits."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_cos_sin(positions, head_dim, theta):
    """cos and sin (T, head_dim) of RoPE's angles position * theta^(-2i / head_dim), i < head_dim / 2, each
    frequency written twice: in HF's layout dimension i turns together with i + head_dim/2 (the original
    Llama code paired adjacent dimensions; HF permuted q_proj/k_proj's rows on conversion to match)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim)
    angles = positions.float()[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def rotate_half(x):
    """(x1, x2) -> (-x2, x1) on the two halves of the last dimension: with x * cos, a 2-D rotation of each pair."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x, cos, sin):
    """Rotate queries or keys (B, H, T, head_dim) by their positions' angles: q.k then depends on the offset only."""
    return x * cos + rotate_half(x) * sin


class LlamaAttention(nn.Module):
    """Causal self-attention with RoPE and grouped-query attention: num_attention_heads query heads share
    num_key_value_heads key/value heads, each serving a run of consecutive query heads (HF's repeat_kv).
    The cache holds keys and values before the repeat, which is what GQA saves. No biases."""

    def __init__(self, config):
        super().__init__()
        D, self.head_dim = config.hidden_size, config.head_dim
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.q_proj = nn.Linear(D, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(D, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(D, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, D, bias=False)

    def split_heads(self, x, heads):  # (B, T, heads * head_dim) -> (B, heads, T, head_dim)
        B, T, _ = x.shape
        return x.view(B, T, heads, self.head_dim).transpose(1, 2)

    def forward(self, x, cos, sin, past_kv=None, mask=None):
        """x: the new positions; past_kv: keys/values of the earlier ones (or None); mask: boolean, True = may
        attend. Returns the output and the keys/values of all positions so far."""
        q = apply_rope(self.split_heads(self.q_proj(x), self.num_heads), cos, sin)
        k = apply_rope(self.split_heads(self.k_proj(x), self.num_kv_heads), cos, sin)
        v = self.split_heads(self.v_proj(x), self.num_kv_heads)
        if past_kv is not None:
            k, v = torch.cat([past_kv[0], k], dim=2), torch.cat([past_kv[1], v], dim=2)
        group = self.num_heads // self.num_kv_heads
        out = F.scaled_dot_product_attention(q, k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1),
                                             attn_mask=mask)  # scaled by 1/sqrt(head_dim)
        B, H, T, Dh = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(B, T, H * Dh)), (k, v)


class LlamaMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), no biases."""

    def __init__(self, config):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.self_attn = LlamaAttention(config)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, past_kv=None, mask=None):
        # pre-norm, unlike BART: each branch sees a normalised copy, the residual stream itself is never normalised
        attn, kv = self.self_attn(self.input_layernorm(x), cos, sin, past_kv, mask)
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x)), kv


class LlamaModel(nn.Module):
    """HF's LlamaModel (the `model.` of LlamaForCausalLM): token embedding, decoder layers, final RMSNorm."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.layers = nn.ModuleList([LlamaDecoderLayer(config) for _ in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, past_kv=None):
        """x (B, T, D): input embeddings for positions start..start+T-1, where start is the cached length.
        Returns the final hidden states and every layer's keys/values of all positions so far."""
        T = x.shape[1]
        start = 0 if past_kv is None else past_kv[0][0].shape[2]
        positions = torch.arange(start, start + T, device=x.device)
        cos, sin = (t.to(x.dtype) for t in rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta))
        mask = None
        if T > 1:  # causal; one new position may see every cached one
            mask = torch.arange(start + T, device=x.device)[None, :] <= positions[:, None]
        new_kv = []
        for i, layer in enumerate(self.layers):
            x, kv = layer(x, cos, sin, None if past_kv is None else past_kv[i], mask)
            new_kv.append(kv)
        return self.norm(x), new_kv


class LlamaCache:
    """What the LM keeps between generation steps: every layer's keys and values (after RoPE, before the
    GQA repeat), one more position per step."""

    def __init__(self):
        self.kv = None

    def reorder(self, index):
        """Beam search: row i continues the hypothesis that was in row index[i]."""
        self.kv = [(k[index], v[index]) for k, v in self.kv]


class Llama(nn.Module):
    """LlamaForCausalLM: LlamaModel and an output layer, tied to the token embedding when
    config.tie_word_embeddings (Vicuna and Llama 2 7B are untied)."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.init_weights()
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def init_weights(self):
        # as HF Llama: normal(0, 0.02) for linears and the embedding, zero padding row; RMSNorm weights stay 1
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
        with torch.no_grad():
            self.model.embed_tokens.weight[self.config.pad_token_id].zero_()

    def input_embeddings(self, input_ids=None, inputs_embeds=None):
        """(B, P+T, D): `inputs_embeds` (B, P, D), e.g. a projected image, followed by the embeddings of
        `input_ids` (B, T); either may be None."""
        parts = [] if inputs_embeds is None else [inputs_embeds]
        if input_ids is not None:
            parts.append(self.model.embed_tokens(input_ids))
        if not parts:
            raise ValueError("Llama: give input_ids, inputs_embeds or both")
        return torch.cat(parts, dim=1)

    def forward(self, input_ids=None, inputs_embeds=None, cache=None):
        """Logits (B, P+T, vocab) at every position of `inputs_embeds` then `input_ids` (HF takes one or the
        other; here both is the image-prefix case). With a LlamaCache, the positions follow the cached ones
        and their keys and values are appended to it."""
        x = self.input_embeddings(input_ids, inputs_embeds)
        hidden, kv = self.model(x, None if cache is None else cache.kv)
        if cache is not None:
            cache.kv = kv
        return self.lm_head(hidden)


def llama_from_hf_state(state, config, source="Llama state dict"):
    """A Llama from a HuggingFace LlamaForCausalLM state dict (its key names are ours). With tied embeddings
    the dict may still hold `lm_head.weight`, which must then equal `model.embed_tokens.weight`."""
    # transformers < 4.31 saved RoPE's frequencies as a buffer; they follow from the config
    state = {k: v for k, v in state.items() if not k.endswith("self_attn.rotary_emb.inv_freq")}
    model = Llama(config)
    allow_missing = ()
    if config.tie_word_embeddings:
        allow_missing = ("lm_head.weight",)
        embed = state.get("model.embed_tokens.weight")
        if "lm_head.weight" in state and embed is not None and not torch.equal(state["lm_head.weight"], embed):
            raise KeyError(f"{source}: 'lm_head.weight' differs from 'model.embed_tokens.weight', but the config "
                           "ties them (tie_word_embeddings)")
    load_state_strict(model, state, source, allow_missing)
    return model


def infer_llama_config(state, **overrides):
    """LlamaConfig from the tensors' shapes: vocabulary, widths, layer count, tying (no `lm_head.weight`).
    num_attention_heads must be among `overrides`: q_proj has heads * head_dim rows and no shape splits that
    product (with it, head_dim and num_key_value_heads follow). rms_norm_eps and rope_theta are not in the
    tensors either: LlamaConfig's defaults unless given."""
    if "num_attention_heads" not in overrides:
        raise ValueError("Llama checkpoint without config.json: give num_attention_heads=, the shapes hold only "
                         "heads * head_dim")
    vocab, hidden = state["model.embed_tokens.weight"].shape
    head_dim = state["model.layers.0.self_attn.q_proj.weight"].shape[0] // overrides["num_attention_heads"]
    inferred = dict(
        vocab_size=vocab, hidden_size=hidden, head_dim=head_dim,
        intermediate_size=state["model.layers.0.mlp.gate_proj.weight"].shape[0],
        num_hidden_layers=len({k.split(".")[2] for k in state if k.startswith("model.layers.")}),
        num_key_value_heads=state["model.layers.0.self_attn.k_proj.weight"].shape[0] // head_dim,
        tie_word_embeddings="lm_head.weight" not in state,
    )
    return LlamaConfig(**{**inferred, **overrides})


def load_llama(path, **config_overrides):
    """A Llama from a HuggingFace folder (config.json with model.safetensors or its shards) or a safetensors
    file of HF key names (a config.json beside it is read; without one see infer_llama_config). Strict: a
    missing, unexpected or mis-shaped key is an error naming it."""
    path = Path(path)
    state = read_hf_safetensors(path)
    hf_config = (path if path.is_dir() else path.parent) / "config.json"
    if hf_config.exists():
        config = llama_config_from_hf({**json.loads(hf_config.read_text()), **config_overrides})
    else:
        config = infer_llama_config(state, **config_overrides)
    return llama_from_hf_state(state, config, source=str(path))


# ---------------------------------------------------------------------------- decoding

# The search loops below only see `next_logits(tokens, step)`: the logits (N, vocab) for the next position,
# given the tokens (N,) chosen at the last step (None at step 0) and the number of tokens chosen so far; it
# keeps its model's KV cache. BART and the Llama LM differ only in what they feed first (BART's start token,
# the LM's prefix embeddings) and in BART's forced </s> at the length limit.

def force_eos_at_limit(log_probs, cur_len, max_length, eos_token_id):
    """HF's ForcedEOSTokenLogitsProcessor: the last position a sequence may fill must be </s>, so a
    caption cut at the length limit still ends properly."""
    if cur_len == max_length - 1:
        log_probs = torch.full_like(log_probs, -math.inf)
        log_probs[:, eos_token_id] = 0.0
    return log_probs


def greedy_tokens(next_logits, batch_size, max_new_tokens, eos_token_id, pad_token_id, device):
    """Argmax decoding: the new tokens (B, L <= max_new_tokens); a sequence that chose eos is padded with
    pad_token_id, and decoding stops once every sequence has."""
    new = torch.empty(batch_size, 0, dtype=torch.long, device=device)
    running = torch.ones(batch_size, dtype=torch.bool, device=device)
    tokens = None
    for step in range(max_new_tokens):
        tokens = torch.where(running, next_logits(tokens, step).argmax(-1), pad_token_id)
        new = torch.cat([new, tokens[:, None]], dim=1)
        running &= tokens != eos_token_id
        if not running.any():
            break
    return new


def beam_tokens(next_logits, reorder, batch_size, num_beams, max_new_tokens, eos_token_id, pad_token_id,
                length_penalty, device):
    """Batched beam search with HuggingFace's semantics for early_stopping=True: per step, the 2*num_beams
    best continuations over all beams are ranked; one among the first num_beams closes a hypothesis if it is
    eos or fills the last position, scored sum(log p) / new_tokens ** length_penalty (eos counted); the
    others continue. A sequence is done once it holds num_beams closed hypotheses. next_logits sees
    batch_size * num_beams rows, beams of a sequence adjacent; reorder(rows) makes row i continue the
    hypothesis that was in row rows[i]. Returns the best hypothesis's new tokens per sequence, (B, L <=
    max_new_tokens), padded with pad_token_id."""
    B, K = batch_size, num_beams
    seqs = torch.empty(B, K, 0, dtype=torch.long, device=device)
    # all beams start identical: only the first may expand, or the top-k would hold K copies
    beam_scores = torch.zeros(B, K, device=device)
    beam_scores[:, 1:] = -1e9
    done_seqs = torch.full((B, K, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    done_scores = torch.full((B, K), -math.inf, device=device)
    done_lengths = torch.zeros(B, K, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    rank = torch.arange(2 * K, device=device)
    for step in range(max_new_tokens):
        n_new = step + 1  # tokens in each hypothesis after this step
        tokens = None if step == 0 else seqs[:, :, -1].reshape(B * K)
        log_probs = F.log_softmax(next_logits(tokens, step).float(), dim=-1)
        V = log_probs.shape[-1]
        scores = (log_probs.view(B, K, V) + beam_scores[:, :, None]).view(B, K * V)
        top_scores, top_index = scores.topk(2 * K, dim=1)
        parent, token = top_index // V, top_index % V
        top_seqs = torch.cat([seqs.gather(1, parent[:, :, None].expand(-1, -1, step)), token[:, :, None]], dim=2)
        is_eos = token == eos_token_id

        # close hypotheses: eos (or the length limit) ranked among the first K, for sequences not done yet
        ends = is_eos | (n_new == max_new_tokens)
        closes = ends & (rank < K)[None] & ~done[:, None]
        closed_scores = torch.where(closes, top_scores / n_new ** length_penalty, -math.inf)
        padded = F.pad(top_seqs, (0, max_new_tokens - n_new), value=pad_token_id)
        pool_scores = torch.cat([done_scores, closed_scores], dim=1)
        keep = pool_scores.topk(K, dim=1).indices
        done_scores = pool_scores.gather(1, keep)
        done_lengths = torch.cat([done_lengths, torch.full_like(token, n_new)], dim=1).gather(1, keep)
        done_seqs = torch.cat([done_seqs, padded], dim=1).gather(1, keep[:, :, None].expand(-1, -1, max_new_tokens))

        done |= torch.isfinite(done_scores).all(dim=1)
        if done.all() or n_new == max_new_tokens:
            break
        # continue with the K best that did not end (an ended one gets -1e9, as in HF)
        open_scores = top_scores + is_eos.float() * -1e9
        keep = open_scores.topk(K, dim=1).indices
        beam_scores = open_scores.gather(1, keep)
        seqs = top_seqs.gather(1, keep[:, :, None].expand(-1, -1, n_new))
        reorder((parent.gather(1, keep) + torch.arange(B, device=device)[:, None] * K).flatten())
    return done_seqs[:, 0, :int(done_lengths[:, 0].max())]


@torch.no_grad()
def greedy_search(bart, encoder_states, max_length=64):
    """BART's argmax decoding with the KV cache. Returns (B, L <= max_length) token ids starting with the
    decoder start token; sequences that ended early are padded with pad_token_id."""
    cfg = bart.config
    cache = bart.new_cache(encoder_states)
    start = torch.full((encoder_states.shape[0], 1), cfg.decoder_start_token_id, device=encoder_states.device)

    def next_logits(tokens, step):
        logits = bart.decode_step(start if tokens is None else tokens[:, None], cache)[:, -1].float()
        return force_eos_at_limit(logits, step + 1, max_length, cfg.eos_token_id)

    new = greedy_tokens(next_logits, len(start), max_length - 1, cfg.eos_token_id, cfg.pad_token_id, start.device)
    return torch.cat([start, new], dim=1)


@torch.no_grad()
def beam_search(bart, encoder_states, num_beams=5, max_length=64, length_penalty=1.0):
    """BART's beam search (beam_tokens, with </s> forced at the length limit as HF's BART does). Returns the
    best hypothesis per image, (B, L <= max_length), starting with the decoder start token, padded with
    pad_token_id."""
    cfg = bart.config
    B, device = encoder_states.shape[0], encoder_states.device
    cache = bart.new_cache(encoder_states.repeat_interleave(num_beams, dim=0))
    start = torch.full((B * num_beams, 1), cfg.decoder_start_token_id, device=device)

    def next_logits(tokens, step):
        logits = bart.decode_step(start if tokens is None else tokens[:, None], cache)[:, -1].float()
        return force_eos_at_limit(logits, step + 1, max_length, cfg.eos_token_id)

    new = beam_tokens(next_logits, cache.reorder, B, num_beams, max_length - 1, cfg.eos_token_id, cfg.pad_token_id,
                      length_penalty, device)
    return torch.cat([start[:B], new], dim=1)


def llama_next_logits(lm, prefix_embeds):
    """next_logits for the search loops: the prefix (an image's embeddings) at step 0, then one token a step."""
    cache = LlamaCache()

    def next_logits(tokens, step):
        if tokens is None:
            return lm(inputs_embeds=prefix_embeds, cache=cache)[:, -1].float()
        return lm(tokens[:, None], cache=cache)[:, -1].float()

    return next_logits, cache


@torch.no_grad()
def llama_greedy_search(lm, prefix_embeds, max_new_tokens=64):
    """Argmax continuation of input embeddings (B, P, D), as HF's generate(inputs_embeds=...): only the new
    tokens (B, L <= max_new_tokens), padded with pad_token_id after eos."""
    cfg = lm.config
    next_logits, _ = llama_next_logits(lm, prefix_embeds)
    return greedy_tokens(next_logits, len(prefix_embeds), max_new_tokens, cfg.eos_token_id, cfg.pad_token_id,
                         prefix_embeds.device)


@torch.no_grad()
def llama_beam_search(lm, prefix_embeds, num_beams=3, max_new_tokens=64, length_penalty=1.0):
    """Beam search (beam_tokens) continuing input embeddings (B, P, D): the best hypothesis's new tokens,
    (B, L <= max_new_tokens), padded with pad_token_id after eos (HF pads with eos when pad_token_id is 0)."""
    cfg = lm.config
    next_logits, cache = llama_next_logits(lm, prefix_embeds.repeat_interleave(num_beams, dim=0))
    return beam_tokens(next_logits, cache.reorder, len(prefix_embeds), num_beams, max_new_tokens, cfg.eos_token_id,
                       cfg.pad_token_id, length_penalty, prefix_embeds.device)


# ---------------------------------------------------------------------------- image captioning

class VisualPrefix(nn.Module):
    """OmniRad's bridge from ViT tokens T (B, N, Dv) to K decoder input embeddings: a linear
    projection and LayerNorm, Z = LN(W_p T), then a Patch Merger (Renggli et al.) with K learned
    queries Q, P = softmax(Q Z^T / sqrt(D)) Z. K is fixed, so the decoder sees the same short
    sequence whatever the image size."""

    def __init__(self, vit_dim, d_model, n_queries=64, query_std=1.0):
        super().__init__()
        self.proj = nn.Linear(vit_dim, d_model)
        self.norm = nn.LayerNorm(d_model)
        # Z is layer-normed, so the attention logits start with std = query_std. At 0.02 every query
        # would start as the same uniform average over patches and the K outputs would be identical;
        # at 1 (the public Patch Merger code) each output still averages most patches, so a lesion
        # that fills 1 of 64 patches moves it by ~1/20 of its change; larger values start each query on
        # a few patches (4.0: ~1/4, tests/test_caption.py)
        self.queries = nn.Parameter(torch.randn(n_queries, d_model) * query_std)

    def forward(self, tokens):
        z = self.norm(self.proj(tokens))
        weights = torch.softmax(self.queries @ z.transpose(1, 2) / math.sqrt(z.shape[-1]), dim=-1)
        return weights @ z  # (B, K, D)


class MLPProjector(nn.Module):
    """LLaVA-1.5's bridge, which RAD-DINO uses (§4.2): every ViT patch token through Linear -> GELU ->
    Linear into the decoder's embedding space. Nothing is merged: the decoder sees all N tokens."""

    def __init__(self, vit_dim, d_model):
        super().__init__()
        self.fc1 = nn.Linear(vit_dim, d_model)
        self.fc2 = nn.Linear(d_model, d_model)

    def forward(self, tokens):
        return self.fc2(F.gelu(self.fc1(tokens)))


BRIDGES = ("merger", "mlp")  # OmniRad's Linear + LN + Patch Merger, RAD-DINO's (LLaVA's) two-layer MLP


def make_bridge(kind, vit_dim, d_model, n_queries=64, query_std=1.0):
    """The module that turns ViT tokens (B, N, Dv) into decoder input embeddings (B, P, D)."""
    if kind == "merger":
        return VisualPrefix(vit_dim, d_model, n_queries, query_std)
    if kind == "mlp":
        return MLPProjector(vit_dim, d_model)
    raise ValueError(f"bridge '{kind}': expected one of {BRIDGES}")


class Captioner(nn.Module):
    """Frozen ViT -> bridge -> decoder, in one of two layouts:
    - BART (OmniRad): the bridge's output is the BART encoder's input; the decoder cross-attends to its states.
    - a causal LM (LLaVA-1.5, RAD-DINO): the LM reads the prefix [<s>, bridge output, instruction tokens]
      and continues it with the report.
    The ViT has requires_grad off and stays in eval mode; the bridge and the decoder train."""

    def __init__(self, vit, bridge, decoder, instruction_ids=()):
        super().__init__()
        self.vit = vit.requires_grad_(False).eval()
        self.prefix = bridge
        self.decoder = decoder
        self.causal_lm = isinstance(decoder, Llama)
        self.register_buffer("instruction_ids", torch.tensor(list(instruction_ids), dtype=torch.long),
                             persistent=False)

    def train(self, mode=True):
        super().train(mode)
        self.vit.eval()  # frozen means frozen: no dropout or drop-path noise in its features
        return self

    @torch.no_grad()
    def vit_tokens(self, images):
        """The frozen ViT's normalised patch tokens (B, N, Dv) for normalised images (B, 3, H, W)."""
        return self.vit.forward_features(images)["x_norm_patchtokens"]

    def encode_tokens(self, vit_tokens):
        """BART encoder states (B, K, D) from ViT tokens (a script may cache those: the ViT is frozen)."""
        return self.decoder.encode(self.prefix(vit_tokens))

    def lm_prefix(self, vit_tokens):
        """The causal LM's prefix embeddings (B, 1 + P + I, D): <s>, the image, the instruction."""
        B, embed = len(vit_tokens), self.decoder.model.embed_tokens
        bos = torch.full((B, 1), self.decoder.config.bos_token_id, device=vit_tokens.device)
        image = self.prefix(vit_tokens)
        return torch.cat([embed(bos).to(image.dtype), image,
                          embed(self.instruction_ids.expand(B, -1)).to(image.dtype)], dim=1)

    def forward(self, images, token_ids):
        """Logits for `token_ids` (B, T): BART's decoder inputs, or the report tokens that follow the LM's
        prefix (then the logits cover the prefix positions too: (B, prefix + T, vocab))."""
        tokens = self.vit_tokens(images)
        if self.causal_lm:
            return self.decoder(token_ids, inputs_embeds=self.lm_prefix(tokens))
        return self.decoder.decode(token_ids, self.encode_tokens(tokens))
