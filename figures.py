"""Result pictures as PNG, drawn with pillow: attention and similarity maps, feature scatter plots,
segmentation overlays and caption sample sheets."""
import math
import textwrap
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from data import denormalize
from metrics import as_label_array

# ----------------------------------------------------------------------------------------------
# Maps and scatter plots (probe.py)
# ----------------------------------------------------------------------------------------------

VIRIDIS = np.array([(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)], np.float64)
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def colormap(values):
    """Values in [0, 1] (any shape) -> uint8 RGB (..., 3), piecewise-linear through viridis anchors."""
    v = np.clip(np.asarray(values, np.float64), 0, 1) * (len(VIRIDIS) - 1)
    i = np.minimum(v.astype(np.int64), len(VIRIDIS) - 2)
    t = (v - i)[..., None]
    return ((1 - t) * VIRIDIS[i] + t * VIRIDIS[i + 1]).round().astype(np.uint8)


def min_max(x):
    x = np.asarray(x, np.float64)
    return (x - x.min()) / max(x.max() - x.min(), 1e-12)


def image_panel(image, panel_px):
    """A normalised (3, H, W) model input as a pillow RGB picture of panel_px x panel_px."""
    pixels = (denormalize(image.float().cpu()).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(pixels).resize((panel_px, panel_px), Image.BILINEAR)


def heat_panel(values, panel_px):
    """A (h, w) map, min-max scaled, in viridis; nearest upsampling keeps the patch grid visible."""
    return Image.fromarray(colormap(min_max(values))).resize((panel_px, panel_px), Image.NEAREST)


def save_scatter(points, labels, class_names, path, title, size_px=520):
    """2-D points as dots coloured by class, with a legend."""
    points, labels = np.asarray(points, np.float64), np.asarray(labels).reshape(-1)
    margin, legend_px = 24, 150
    canvas = Image.new("RGB", (size_px + legend_px, size_px), "white")
    draw = ImageDraw.Draw(canvas)
    lo, hi = points.min(axis=0), points.max(axis=0)
    xy = margin + (points - lo) / np.maximum(hi - lo, 1e-12) * (size_px - 2 * margin)
    for (x, y), label in zip(xy, labels):
        draw.ellipse([x - 3, size_px - y - 3, x + 3, size_px - y + 3], fill=PALETTE[int(label) % len(PALETTE)])
    draw.text((margin, 4), title, fill="black")
    for c, name in enumerate(class_names):
        y = margin + 18 * c
        draw.ellipse([size_px + 4, y, size_px + 12, y + 8], fill=PALETTE[c % len(PALETTE)])
        draw.text((size_px + 18, y - 2), str(name)[:20], fill="black")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


def save_panel_row(panels, titles, panel_px, path):
    """Square pillow panels side by side, each under a one-line title."""
    canvas = Image.new("RGB", (panel_px * len(panels), panel_px + 16), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (panel, title) in enumerate(zip(panels, titles)):
        canvas.paste(panel, (i * panel_px, 16))
        draw.text((i * panel_px + 4, 2), title, fill="black")
    canvas.save(path)


def save_attention_figure(image, maps, path, panel_px=160):
    """The image, then one panel per head of its CLS attention (h, w)."""
    panels = [image_panel(image, panel_px)] + [heat_panel(m, panel_px) for m in maps]
    save_panel_row(panels, ["image"] + [f"head {h}" for h in range(len(maps))], panel_px, path)


def save_similarity_figure(image_a, image_b, sims, query_patches, patch_size, path, panel_px=160):
    """RAD-DINO Fig. 3: the query image with its landmark patches circled, then for each landmark the
    target image overlaid with that landmark's similarity map (bright = similar)."""
    scale = panel_px / image_a.shape[-1]
    radius = max(4, patch_size * scale / 2)

    def circle(draw, rc, colour):
        cy, cx = ((rc[0] + 0.5) * patch_size * scale, (rc[1] + 0.5) * patch_size * scale)
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], outline=colour, width=2)

    query = image_panel(image_a, panel_px)
    draw = ImageDraw.Draw(query)
    for q, rc in enumerate(query_patches):
        circle(draw, rc, PALETTE[q % len(PALETTE)])
    panels = [query]
    target = image_panel(image_b, panel_px)
    for q, sim in enumerate(sims):
        panel = Image.blend(target, heat_panel(sim, panel_px), 0.6)
        best = np.unravel_index(int(np.argmax(sim)), sim.shape)  # the best match, ringed in the query's colour
        circle(ImageDraw.Draw(panel), best, PALETTE[q % len(PALETTE)])
        panels.append(panel)
    save_panel_row(panels, ["query"] + [f"target, landmark {i}" for i in range(1, len(panels))], panel_px, path)


# ----------------------------------------------------------------------------------------------
# Segmentation overlays (finetune_seg.py), in OmniRad Fig. 3's colours
# ----------------------------------------------------------------------------------------------

OVERLAY_COLORS = {"correct": (0, 200, 0), "over": (40, 90, 255), "missed": (235, 30, 30)}  # green, blue, red


def overlay_image(image, pred, target, alpha=0.5):
    """OmniRad Fig. 3 colours on the gray image: green where the predicted foreground class is
    right, blue where foreground is predicted wrongly (over-prediction, or the wrong class), red
    where target foreground was predicted as background (missed). Returns uint8 (H,W,3)."""
    gray = np.asarray(image, dtype=np.float32)
    gray = np.clip(gray.mean(0) if gray.ndim == 3 else gray, 0, 1)
    rgb = np.repeat((gray * 255)[..., None], 3, axis=-1)
    pred, target = as_label_array(pred), as_label_array(target)
    regions = {"correct": (pred == target) & (target > 0),
               "over": (pred > 0) & (pred != target),
               "missed": (target > 0) & (pred == 0)}
    for name, where in regions.items():
        rgb[where] = (1 - alpha) * rgb[where] + alpha * np.array(OVERLAY_COLORS[name], dtype=np.float32)
    return rgb.round().astype(np.uint8)


def save_overlay(image, pred, target, path, min_side_px=256):
    """[image | overlay] side by side as a PNG, enlarged (nearest) to at least min_side_px."""
    gray = np.clip(np.asarray(image, dtype=np.float32).mean(0), 0, 1)
    left = np.repeat((gray * 255).round().astype(np.uint8)[..., None], 3, axis=-1)
    scale = max(1, math.ceil(min_side_px / min(gray.shape)))
    gap = np.full((left.shape[0], max(1, 4 // scale), 3), 255, np.uint8)
    panel = np.concatenate([left, gap, overlay_image(image, pred, target)], 1)
    panel = panel.repeat(scale, axis=0).repeat(scale, axis=1)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(panel).save(path)


# ----------------------------------------------------------------------------------------------
# Caption sample sheets (caption.py)
# ----------------------------------------------------------------------------------------------

def sample_sheet(images, generated, references, path, tile_px=192, text_lines=8):
    """A PNG grid: each image above its generated (gen) and reference (ref) caption."""
    cols = min(4, len(images))
    rows = math.ceil(len(images) / cols)
    line_px = 11
    text_px = text_lines * line_px
    sheet = Image.new("RGB", (cols * tile_px, rows * (tile_px + text_px)), "white")
    draw = ImageDraw.Draw(sheet)
    for k, (img, gen, ref) in enumerate(zip(images, generated, references)):
        x, y = (k % cols) * tile_px, (k // cols) * (tile_px + text_px)
        pixels = (img.clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()
        sheet.paste(Image.fromarray(pixels).resize((tile_px - 8, tile_px - 8)), (x + 4, y + 4))
        # the default bitmap font is about 6 px per character; each caption gets half the lines
        width, half = tile_px // 6 - 1, text_lines // 2
        lines = ([(line, (0, 0, 160)) for line in textwrap.wrap(f"gen: {gen}", width, max_lines=half, placeholder=" ...")]
                 + [(line, "black") for line in textwrap.wrap(f"ref: {ref}", width, max_lines=half, placeholder=" ...")])
        for n, (line, colour) in enumerate(lines):
            draw.text((x + 4, y + tile_px + n * line_px), line, fill=colour)
    sheet.save(path)
