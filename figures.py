"""Result pictures as PNG, drawn with pillow: line plots (training curves, ROC curves), confusion
matrices, attention and similarity maps, feature scatter plots, segmentation overlays and caption
sample sheets."""
import math
import textwrap
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from data import denormalize
from metrics import as_label_array, confusion_matrix, roc_curve

# ----------------------------------------------------------------------------------------------
# Line plots and confusion matrices (pretrain.py, finetune_cls.py)
# ----------------------------------------------------------------------------------------------

def line_plot(series, title, x_label, y_range=None, size_px=(420, 300), diagonal=False):
    """A pillow picture of named lines {name: (xs, ys)} on shared axes, with a legend; y_range
    (lo, hi) fixes the y axis (else the data's range); diagonal draws y = x (ROC chance)."""
    width, height = size_px
    left, right, top, bottom = 48, 12, 22, 34
    canvas = Image.new("RGB", size_px, "white")
    draw = ImageDraw.Draw(canvas)
    lines = {k: (np.asarray(x, np.float64), np.asarray(y, np.float64)) for k, (x, y) in series.items() if len(x)}
    xs = np.concatenate([x for x, _ in lines.values()]) if lines else np.zeros(1)
    ys = np.concatenate([y for _, y in lines.values()]) if lines else np.zeros(1)
    x_lo, x_hi = xs.min(), max(xs.max(), xs.min() + 1e-12)
    y_lo, y_hi = y_range or (ys.min(), ys.max())
    y_hi = max(y_hi, y_lo + 1e-12)

    def to_px(x, y):
        return (left + (x - x_lo) / (x_hi - x_lo) * (width - left - right),
                height - bottom - (y - y_lo) / (y_hi - y_lo) * (height - top - bottom))

    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    for fraction in (0.0, 0.5, 1.0):
        y = y_lo + fraction * (y_hi - y_lo)
        draw.text((2, to_px(x_lo, y)[1] - 6), f"{y:.3g}", fill="black")
        x = x_lo + fraction * (x_hi - x_lo)
        draw.text((to_px(x, y_lo)[0] - 10, height - bottom + 4), f"{x:.3g}", fill="black")
    if diagonal:
        draw.line([to_px(x_lo, y_lo), to_px(x_hi, y_hi)], fill=(180, 180, 180))
    for i, (name, (x, y)) in enumerate(lines.items()):
        color = PALETTE[i % len(PALETTE)]
        points = [to_px(a, b) for a, b in zip(x, y)]
        if len(points) > 1:
            draw.line(points, fill=color, width=2)
        else:
            draw.ellipse([points[0][0] - 3, points[0][1] - 3, points[0][0] + 3, points[0][1] + 3], fill=color)
        draw.text((left + 6, top + 4 + 12 * i), str(name)[:40], fill=color)
    draw.text((left, 4), title, fill="black")
    draw.text((width // 2 - 3 * len(x_label), height - 14), x_label, fill="black")
    return canvas


def save_pictures(pictures, path):
    """Pillow pictures side by side in one PNG."""
    canvas = Image.new("RGB", (sum(p.width for p in pictures), max(p.height for p in pictures)), "white")
    x = 0
    for picture in pictures:
        canvas.paste(picture, (x, 0))
        x += picture.width
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


def save_training_curves(log_rows, knn_history, path):
    """pretrain.py's log.jsonl rows and k-NN history as three plots: the losses, the teacher's k-NN
    accuracy, and the collapse monitors."""
    steps = [row["step"] for row in log_rows]
    loss_names = [k for k in ("total", "dino_global", "dino_local", "ibot", "koleo") if log_rows and k in log_rows[0]]
    monitors = ("teacher_entropy", "head_info", "view_corr")
    save_pictures([
        line_plot({k: (steps, [row[k] for row in log_rows]) for k in loss_names}, "losses", "step"),
        line_plot({"teacher k-NN accuracy": ([h["step"] for h in knn_history], [h["knn_acc"] for h in knn_history])},
                  "k-NN on held-out images", "step", y_range=(0, 1)),
        line_plot({k: (steps, [row[k] for row in log_rows]) for k in monitors}, "collapse monitors", "step"),
    ], path)


def confusion_picture(counts, class_names, title, cell_px=56):
    """counts[i, j] (true class i, predicted j) as a grid of cells shaded by the row's fraction."""
    counts = np.asarray(counts)
    n, left, top = len(counts), 110, 48
    canvas = Image.new("RGB", (left + n * cell_px + 8, top + n * cell_px + 8), "white")
    draw = ImageDraw.Draw(canvas)
    fractions = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    for i in range(n):
        draw.text((4, top + i * cell_px + cell_px // 2 - 6), str(class_names[i])[:16], fill="black")
        draw.text((left + i * cell_px + 2, top - 14), str(class_names[i])[:8], fill="black")
        for j in range(n):
            shade = tuple(int(255 - fractions[i, j] * (255 - c)) for c in PALETTE[0])
            box = [left + j * cell_px, top + i * cell_px, left + (j + 1) * cell_px, top + (i + 1) * cell_px]
            draw.rectangle(box, fill=shade, outline="gray")
            draw.text((box[0] + 6, box[1] + cell_px // 2 - 6), str(int(counts[i, j])),
                      fill="white" if fractions[i, j] > 0.5 else "black")
    draw.text((4, 4), title, fill="black")
    draw.text((left, top - 28), "predicted ->", fill="black")
    draw.text((4, top - 14), "true", fill="black")
    return canvas


def save_classification_figure(labels, probs, class_names, multi_label, path, title=""):
    """ROC curves (binary: class 1; else one per class or label, one-vs-rest) and, for single-label
    tasks, the confusion matrix of the argmax, side by side."""
    labels, probs = np.asarray(labels), np.asarray(probs, np.float64)
    columns = [1] if probs.shape[1] == 2 and not multi_label else range(probs.shape[1])
    curves = {}
    for c in columns:
        truth = labels[:, c] if multi_label else (labels == c)
        if 0 < truth.sum() < len(truth):  # a curve needs positives and negatives
            fpr, tpr = roc_curve(truth, probs[:, c])
            curves[f"{class_names[c]} (AUC {np.trapezoid(tpr, fpr):.3f})"] = (fpr, tpr)
    pictures = [line_plot(curves, f"{title} ROC".strip(), "false positive rate", y_range=(0, 1), diagonal=True)]
    if not multi_label:
        counts = confusion_matrix(labels, probs.argmax(1), probs.shape[1])
        pictures.append(confusion_picture(counts, class_names, f"{title} confusion matrix".strip()))
    save_pictures(pictures, path)


# ----------------------------------------------------------------------------------------------
# Maps and scatter plots (probe.py, pretrain.py)
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


def save_attention_rows(images, maps, path, panel_px=120):
    """One row per image: the image, then its CLS attention per head. maps: (B, heads, h, w)."""
    rows = [[image_panel(image, panel_px)] + [heat_panel(m, panel_px) for m in image_maps]
            for image, image_maps in zip(images, np.asarray(maps))]
    canvas = Image.new("RGB", (panel_px * len(rows[0]), (panel_px + 2) * len(rows) + 16), "white")
    ImageDraw.Draw(canvas).text((4, 2), "teacher CLS attention, last block: image, then one panel per head", fill="black")
    for r, row in enumerate(rows):
        for c, panel in enumerate(row):
            canvas.paste(panel, (c * panel_px, 16 + r * (panel_px + 2)))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


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
    panel = Image.fromarray(panel.repeat(scale, axis=0).repeat(scale, axis=1))
    canvas = Image.new("RGB", (max(panel.width, 300), panel.height + 18), "white")  # a legend strip below
    canvas.paste(panel, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, (name, color) in enumerate(OVERLAY_COLORS.items()):
        draw.rectangle([4 + 100 * i, panel.height + 5, 14 + 100 * i, panel.height + 15], fill=color)
        draw.text((18 + 100 * i, panel.height + 4), name, fill="black")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


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
