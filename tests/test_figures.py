"""figures.py: the pictures show what they say (colours, positions)."""
import numpy as np
from PIL import Image

from figures import OVERLAY_COLORS, PALETTE, overlay_image, save_scatter


def test_scatter_draws_each_class_in_its_palette_colour(tmp_path):
    points = np.array([[0.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    save_scatter(points, [0, 1, 2], ["a", "b", "c"], tmp_path / "s.png", "test", size_px=200)
    pixels = np.asarray(Image.open(tmp_path / "s.png").convert("RGB"))
    # lower-left point (class 0) sits at (margin, size - margin) in image coordinates
    assert tuple(pixels[200 - 24, 24]) == PALETTE[0]
    assert tuple(pixels[24, 200 - 24]) == PALETTE[1]
    assert tuple(pixels[24, 24]) == PALETTE[2]


def test_overlay_colours_follow_omnirad_figure_3():
    image = np.full((3, 1, 4), 0.5, dtype=np.float32)
    target = np.array([[1, 1, 0, 0]])
    pred = np.array([[1, 0, 1, 0]])
    rgb = overlay_image(image, pred, target, alpha=1.0)
    assert tuple(rgb[0, 0]) == OVERLAY_COLORS["correct"]   # green
    assert tuple(rgb[0, 1]) == OVERLAY_COLORS["missed"]    # red
    assert tuple(rgb[0, 2]) == OVERLAY_COLORS["over"]      # blue
    assert tuple(rgb[0, 3]) == (128, 128, 128)                # background left as the image
