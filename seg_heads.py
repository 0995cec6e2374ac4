"""Decoder heads over a frozen ViT's patch maps for semantic segmentation (finetune_seg.py): OmniRad's dense
adapter (omnirad), DINOv2's linear head (linear), mmseg's UPerHead (upernet) and ViTDet's simple feature pyramid
(vitdet). Each maps (images (B,3,H,W), feats) to logits (B,n_classes,H,W); feats holds one (patch map (B,D,h,w),
CLS (B,D)) pair per block the head reads (head_layers), as FrozenBackboneSegmenter.features gives them."""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def conv_bn_relu(in_channels, out_channels, kernel_size=3, stride=1):
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


def resize_to(x, like):
    """Bilinear to `like`'s size: "2x bilinear" as an exact size keeps odd sizes (518 px: 65, 33, 17) aligned."""
    return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=False)


def vit_pyramid(D):
    """Four levels at 4x, 2x, 1x, 1/2x a plain ViT's 1/patch grid (ViTDet's simple pyramid as mmseg's BEiT/MAE
    recipes build it: D channels at every level, where detectron2 has D/2 at 2x and D/4 at 4x; BatchNorm + GELU
    between the two 2x transposed convs, where ViTDet has LayerNorm over channels)."""
    return nn.ModuleList([
        nn.Sequential(nn.ConvTranspose2d(D, D, 2, 2), nn.BatchNorm2d(D), nn.GELU(), nn.ConvTranspose2d(D, D, 2, 2)),
        nn.ConvTranspose2d(D, D, 2, 2), nn.Identity(), nn.MaxPool2d(2)])


def concat_at_finest(levels):
    """UPerHead's fusion input: every level resized to the first (finest) one, concatenated along channels."""
    return torch.cat([levels[0]] + [resize_to(x, levels[0]) for x in levels[1:]], dim=1)


class OmniRadHead(nn.Module):
    """OmniRad's adapter: a conv branch's 1/8, 1/16, 1/32 maps, each fused with one block's tokens; two upsampling
    blocks; a 1x1 classifier at 1/8. The paper gives only totals (14.27 M ViT-S, 69.76 M ViT-B); our widths (D for
    the fused maps and decoder; D/4, D/4, D/2, D, D in the conv branch) give 17.51 M / 70.03 M for 2 classes."""

    def __init__(self, embed_dim, n_classes, width=None):
        super().__init__()
        w = width or embed_dim
        # the parallel convolutional branch (spatial prior): 3x3 stride-2 convs down to 1/32
        self.stem = nn.Sequential(conv_bn_relu(3, w // 4, 3, 2), conv_bn_relu(w // 4, w // 4, 3, 2))
        self.down8 = conv_bn_relu(w // 4, w // 2, 3, 2)
        self.down16 = conv_bn_relu(w // 2, w, 3, 2)
        self.down32 = conv_bn_relu(w, w, 3, 2)
        self.fuse = nn.ModuleList([conv_bn_relu(embed_dim + c, w) for c in (w // 2, w, w)])
        # decoder: U16 = psi(Up(F32) (+) F16), U8 = psi(Up(U16) (+) F8), psi = two 3x3 conv-BN-ReLU
        self.up16 = nn.Sequential(conv_bn_relu(2 * w, w), conv_bn_relu(w, w))
        self.up8 = nn.Sequential(conv_bn_relu(2 * w, w), conv_bn_relu(w, w))
        self.classifier = nn.Conv2d(w, n_classes, 1)

    def forward(self, images, feats):
        c8 = self.down8(self.stem(images))
        c16 = self.down16(c8)
        c32 = self.down32(c16)
        # earlier blocks feed the finer scales (OmniRad: more local spatial sensitivity)
        f8, f16, f32 = [fuse(torch.cat([resize_to(tokens, conv), conv], dim=1))
                        for fuse, (tokens, _), conv in zip(self.fuse, feats, (c8, c16, c32))]
        u16 = self.up16(torch.cat([resize_to(f32, f16), f16], dim=1))
        u8 = self.up8(torch.cat([resize_to(u16, f8), f8], dim=1))
        return resize_to(self.classifier(u8), images)


class LinearHead(nn.Module):
    """DINOv2's BNHead: BatchNorm + 1x1 conv on concatenated patch maps (+ the CLS token broadcast over them)."""

    def __init__(self, embed_dim, n_classes, n_layers=1, cls_token=True):
        super().__init__()
        self.cls_token = cls_token
        self.bn = nn.BatchNorm2d(embed_dim * n_layers * (2 if cls_token else 1))
        self.classifier = nn.Conv2d(self.bn.num_features, n_classes, 1)

    def forward(self, images, feats):
        maps = [patches for patches, _ in feats]
        if self.cls_token:
            maps += [cls[:, :, None, None].expand_as(patches) for patches, cls in feats]
        return resize_to(self.classifier(self.bn(torch.cat(maps, dim=1))), images)


class UPerNetHead(nn.Module):
    """UPerNet on a plain ViT: 4 blocks' maps (all at 1/patch) become a pyramid at 4x, 2x, 1x, 1/2x (mmseg's
    BEiT/MAE recipes); then mmseg's UPerHead: PPM on the coarsest level, 1x1 laterals, top-down sum, 3x3 FPN
    convs, all levels resized to the finest and concatenated, 3x3 bottleneck, dropout, 1x1 classifier."""

    def __init__(self, embed_dim, n_classes, channels=512, pool_scales=(1, 2, 3, 6), dropout=0.1):
        super().__init__()
        D, C = embed_dim, channels
        self.pyramid = vit_pyramid(D)
        self.ppm = nn.ModuleList([nn.Sequential(nn.AdaptiveAvgPool2d(s), conv_bn_relu(D, C, 1)) for s in pool_scales])
        self.ppm_bottleneck = conv_bn_relu(D + len(pool_scales) * C, C)
        self.laterals = nn.ModuleList([conv_bn_relu(D, C, 1) for _ in range(3)])
        self.fpn_convs = nn.ModuleList([conv_bn_relu(C, C) for _ in range(3)])
        self.fpn_bottleneck = conv_bn_relu(4 * C, C)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(C, n_classes, 1)

    def forward(self, images, feats):
        levels = [to_level(patches) for to_level, (patches, _) in zip(self.pyramid, feats)]
        top = levels[3]
        top = self.ppm_bottleneck(torch.cat([top] + [resize_to(pool(top), top) for pool in self.ppm], dim=1))
        laterals = [lateral(x) for lateral, x in zip(self.laterals, levels[:3])] + [top]
        for i in range(3, 0, -1):  # top-down: each level adds the coarser one
            laterals[i - 1] = laterals[i - 1] + resize_to(laterals[i], laterals[i - 1])
        outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals[:3])] + [laterals[3]]
        fused = self.fpn_bottleneck(concat_at_finest(outs))
        return resize_to(self.classifier(self.dropout(fused)), images)


class ViTDetHead(nn.Module):
    """ViTDet's simple feature pyramid (Li et al. 2022; RAD-DINO Table 6) on ONE block's map (the last by default):
    vit_pyramid's 4x, 2x, 1x, 1/2x levels (built as UPerNet's), each through a 1x1 and a 3x3 conv, both followed by
    a norm and no activation (as detectron2's SimpleFeaturePyramid). The norm is BatchNorm, not ViTDet's LayerNorm
    over channels: it matches the pyramid's own norm and every other head here (the script already asks for
    batches >= 2). ViTDet stops at the levels (a detector reads them); for per-pixel logits we add UPerHead's last
    step: all levels resized to the finest (4x) and concatenated, one 3x3 conv-BN-ReLU, a 1x1 classifier, bilinear
    to the input. Concatenation rather than an FPN top-down sum: it reuses UPerNet's code, lets one conv weigh the
    coarse and fine levels per pixel, and adds no second set of per-level convs (the 3x3s already give context)."""

    def __init__(self, embed_dim, n_classes, channels=256):
        super().__init__()
        D, C = embed_dim, channels
        self.pyramid = vit_pyramid(D)
        self.level_convs = nn.ModuleList([nn.Sequential(
            nn.Conv2d(D, C, 1, bias=False), nn.BatchNorm2d(C), nn.Conv2d(C, C, 3, padding=1, bias=False),
            nn.BatchNorm2d(C)) for _ in range(4)])
        self.fuse = conv_bn_relu(4 * C, C)
        self.classifier = nn.Conv2d(C, n_classes, 1)

    def forward(self, images, feats):
        (patches, _), = feats  # one block: all four levels come from the same map
        levels = [convs(to_level(patches)) for convs, to_level in zip(self.level_convs, self.pyramid)]
        return resize_to(self.classifier(self.fuse(concat_at_finest(levels))), images)


HEADS = ("omnirad", "linear", "upernet", "vitdet")


def build_head(head, embed_dim, n_classes, omnirad_width=0, linear_n_last=1, linear_cls_token=True,
               upernet_channels=512, vitdet_channels=256):
    if head == "omnirad":
        return OmniRadHead(embed_dim, n_classes, omnirad_width or embed_dim)
    if head == "linear":
        return LinearHead(embed_dim, n_classes, linear_n_last, linear_cls_token)
    if head == "upernet":
        return UPerNetHead(embed_dim, n_classes, upernet_channels or embed_dim)
    if head == "vitdet":
        return ViTDetHead(embed_dim, n_classes, vitdet_channels or embed_dim)
    raise ValueError(f"--head={head!r}: expected one of {HEADS}")


def head_layers(head, depth, layers=(), linear_n_last=1):
    """The blocks a head reads: `layers` if given, else the linear head's last n, or n blocks evenly spaced up to
    the last (OmniRad's 3, 7, 11 of 12 for n=3; 2, 5, 8, 11 for UPerNet's n=4; 1, 3, 5 of 6; ViTDet's n=1: the last)."""
    n = {"omnirad": 3, "upernet": 4, "linear": linear_n_last, "vitdet": 1}[head]
    if layers:
        layers = tuple(sorted(set(int(i) for i in layers)))
    elif head == "linear":
        layers = tuple(range(depth - n, depth))
    else:
        layers = tuple(math.ceil((k + 1) * depth / n) - 1 for k in range(n))
    if len(set(layers)) != n or not all(0 <= i < depth for i in layers):
        raise ValueError(f"the {head} head needs {n} distinct blocks in [0, {depth}), got {layers} "
                         f"(--vit_layers, --linear_n_last, --depth)")
    return layers
