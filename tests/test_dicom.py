"""DICOM files through data.read_image: the real files shipped in pydicom's wheel, pydicom's own LUT functions as
the oracle, the clear errors for files nanorad cannot read, and a pretraining run on a folder of DICOMs."""
import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import data
from conftest import REPO, cpu_env, run_stage, run_tiny_pretrain

pydicom = pytest.importorskip("pydicom")
from pydicom.data import get_testdata_file  # noqa: E402 (after the skip when pydicom is absent)
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, convert_color_space  # noqa: E402


def stored_range_after_rescale(ds):
    """PS3.3 C.11.1: the values Bits Stored can hold (signed or not), through Rescale Slope / Intercept."""
    bits = ds.BitsStored
    low, high = (0, 2 ** bits - 1) if ds.PixelRepresentation == 0 else (-2 ** (bits - 1), 2 ** (bits - 1) - 1)
    slope, intercept = float(ds.get("RescaleSlope", 1)), float(ds.get("RescaleIntercept", 0))
    return low * slope + intercept, high * slope + intercept


def read_gray(path, **kwargs):
    image = data.read_image(path, **kwargs)
    assert image.shape[0] == 3 and image.dtype == torch.float32
    assert torch.equal(image[0], image[1]) and torch.equal(image[0], image[2])
    return image[0].numpy()


def one_line_error(error_info, path):
    message = str(error_info.value)
    assert message.startswith(f"{path}: ") and "\n" not in message, message
    return message


# ----------------------------------------------------------------------------------------------
# Gray images: modality LUT -> VOI LUT / window -> [0, 1]
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm", "MR_small_bigendian.dcm"])
def test_gray_pixels_equal_pydicoms_modality_then_voi_lut_scaled_to_unit_range(name):
    """CT_small: Rescale Intercept -1024, no window (its stored range, the default intensity); MR_small: Window
    Center 600 / Width 1600. pydicom's windowing maps onto the stored range; nanorad maps that range to [0, 1]."""
    path = get_testdata_file(name)
    ds = pydicom.dcmread(path)
    values = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds)
    low, high = stored_range_after_rescale(ds)
    expected = (values - low) / (high - low)
    np.testing.assert_allclose(read_gray(path), expected, atol=1e-6, rtol=0)


def test_window_is_the_dicom_linear_ramp_of_center_and_width():
    """PS3.3 C.11.2.1.2.1 by hand: 0 below c - 0.5 - (w - 1) / 2, 1 above c - 0.5 + (w - 1) / 2, linear between."""
    path = get_testdata_file("MR_small.dcm")
    ds = pydicom.dcmread(path)
    center, width = float(ds.WindowCenter), float(ds.WindowWidth)
    expected = np.clip((ds.pixel_array - (center - 0.5)) / (width - 1) + 0.5, 0, 1)
    image = read_gray(path)
    np.testing.assert_allclose(image, expected, atol=1e-6, rtol=0)
    assert image.max() == 1.0 and 0 < image.min() < 0.5  # the window clips the bright end only


@pytest.mark.parametrize("intensity", ["full_range", "minmax", "percentile"])
def test_a_dicom_without_a_window_follows_the_intensity_option(intensity):
    path = get_testdata_file("CT_small.dcm")
    ds = pydicom.dcmread(path)
    hounsfield = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    low, high = {"full_range": stored_range_after_rescale(ds),
                 "minmax": (hounsfield.min(), hounsfield.max()),
                 "percentile": np.percentile(hounsfield, (0.5, 99.5))}[intensity]
    expected = np.clip((hounsfield - low) / (high - low), 0, 1)
    np.testing.assert_allclose(read_gray(path, intensity=intensity), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("intensity", ["full_range", "minmax"])
def test_monochrome1_reads_as_the_inverse_of_its_monochrome2_twin(tmp_path, intensity):
    """MONOCHROME1 shows its lowest value white: inverted, so that bone is bright in every image."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.save_as(tmp_path / "monochrome2.dcm")
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.save_as(tmp_path / "monochrome1.dcm")
    bright_bone = read_gray(tmp_path / "monochrome2.dcm", intensity=intensity)
    inverted = read_gray(tmp_path / "monochrome1.dcm", intensity=intensity)
    np.testing.assert_allclose(inverted, 1 - bright_bone, atol=1e-6, rtol=0)
    assert not np.allclose(inverted, bright_bone, atol=1e-3)


# ----------------------------------------------------------------------------------------------
# Colour: RGB, YBR (converted as pydicom does), palette (pydicom's apply_color_lut)
# ----------------------------------------------------------------------------------------------

def rgb_oracle(path):
    """float (H,W,3) in [0,1], made with pydicom's own colour functions."""
    ds = pydicom.dcmread(path)
    if ds.PhotometricInterpretation == "PALETTE COLOR":
        return apply_color_lut(ds.pixel_array, ds) / (2 ** ds.RedPaletteColorLookupTableDescriptor[2] - 1)
    stored = pydicom.pixels.pixel_array(path, as_rgb=False)  # YBR stays YBR here, also from a JPEG decoder
    if ds.PhotometricInterpretation.startswith("YBR_FULL"):
        stored = convert_color_space(stored, "YBR_FULL", "RGB")
    return stored / (2 ** ds.BitsStored - 1)


@pytest.mark.parametrize("name", ["examples_palette.dcm", "examples_rgb_color.dcm", "SC_ybr_full_422_uncompressed.dcm",
                                  "SC_rgb_jpeg_dcmtk.dcm", "SC_rgb_rle_16bit.dcm"])
def test_colour_files_read_as_rgb_as_pydicom_converts_them(name):
    """Palette (16-bit LUT), RGB, YBR_FULL_422 uncompressed, YBR_FULL in JPEG baseline (decoded by Pillow), 16-bit
    RGB in RLE."""
    path = get_testdata_file(name)
    image = data.read_image(path)
    assert image.shape[0] == 3 and image.dtype == torch.float32
    assert not torch.equal(image[0], image[1]) and not torch.equal(image[1], image[2])
    np.testing.assert_allclose(image.permute(1, 2, 0).numpy(), rgb_oracle(path), atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------------------------
# Files nanorad cannot read: one-line errors naming the file (ValueError / OSError: `error: ...` in a script)
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, frames", [("SC_rgb_rle_2frame.dcm", 2), ("examples_ybr_color.dcm", 30)])
def test_a_multi_frame_file_is_an_error_naming_the_file_and_its_frames(name, frames):
    path = get_testdata_file(name)
    with pytest.raises(ValueError) as error:
        data.read_image(path)
    assert f"a multi-frame DICOM ({frames} frames)" in one_line_error(error, path)


def test_truncated_pixel_data_is_an_error_naming_the_file():
    path = get_testdata_file("MR_truncated.dcm")
    with pytest.raises(ValueError) as error:
        data.read_image(path)
    assert "cannot decode its pixel data" in one_line_error(error, path)


def test_a_dcm_that_is_not_dicom_is_an_error_naming_the_file(tmp_path):
    path = tmp_path / "notes.dcm"
    path.write_text("not a DICOM file")
    with pytest.raises(ValueError) as error:
        data.read_image(path)
    assert "not a readable DICOM file" in one_line_error(error, path)
    with pytest.raises(FileNotFoundError, match="missing.dcm not found"):
        data.read_image(tmp_path / "missing.dcm")


@pytest.mark.parametrize("name, syntax", [
    ("JPEG-lossy.dcm", "JPEG Extended (Process 2 and 4)"),  # 12-bit JPEG: Pillow is installed but cannot decode it
    ("MR_small_jpeg_ls_lossless.dcm", "JPEG-LS Lossless Image Compression"),  # no JPEG-LS decoder installed
])
def test_an_undecodable_compressed_syntax_names_the_file_the_syntax_and_a_decoder_package(name, syntax):
    path = get_testdata_file(name)
    try:
        pydicom.dcmread(path).pixel_array
        pytest.skip(f"a decoder for {syntax} is installed here")
    except RuntimeError:
        pass
    with pytest.raises(ValueError) as error:
        data.read_image(path)
    message = one_line_error(error, path)
    assert f"({syntax})" in message and "pylibjpeg" in message and "gdcm" in message


def test_without_pydicom_a_dicom_is_an_error_naming_the_file_and_the_install_command(monkeypatch):
    path = get_testdata_file("CT_small.dcm")
    monkeypatch.setitem(sys.modules, "pydicom", None)  # `import pydicom` now raises ImportError
    with pytest.raises(data.MissingDependencyError) as error:
        data.read_image(path)
    assert "pip install pydicom" in one_line_error(error, path)
    assert isinstance(error.value, ValueError) and isinstance(error.value, ImportError)


def test_pydicom_is_imported_only_when_a_dicom_is_read(tmp_path):
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "x.png")
    code = (f"import sys, data; data.read_image({str(tmp_path / 'x.png')!r}); print('pydicom' in sys.modules); "
            f"data.read_image({get_testdata_file('CT_small.dcm')!r}); print('pydicom' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=cpu_env(), capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["False", "True"]


# ----------------------------------------------------------------------------------------------
# DICOMs as a data source: CSV index, folder, a pretraining run
# ----------------------------------------------------------------------------------------------

def dicom_folder(root, copies=4):
    """root/ct/ct{i}.dcm and root/mr/mr{i}.dcm: copies of CT_small and MR_small, in subfolders."""
    for name, short in (("CT_small.dcm", "ct"), ("MR_small.dcm", "mr")):
        (root / short).mkdir(parents=True)
        for i in range(copies):
            shutil.copy(get_testdata_file(name), root / short / f"{short}{i}.dcm")
    return root


def test_a_csv_index_and_a_folder_of_dicoms_give_images(tmp_path):
    folder = dicom_folder(tmp_path / "dicoms", copies=2)
    rows = [f"dicoms/{kind}/{kind}{i}.dcm,{split},{kind}" for kind in ("ct", "mr")
            for i, split in enumerate(("train", "val"))]
    (tmp_path / "index.csv").write_text("\n".join(["image,split,finding", *rows]) + "\n")
    labelled = data.ImageFolderDataset(tmp_path / "index.csv", "train", label_column="finding", intensity="minmax")
    assert [item["label"] for item in labelled] == [0, 1] and labelled.classes == ["ct", "mr"]
    assert labelled[0]["image"].shape == (3, 128, 128) and labelled[0]["image"].min() == 0
    unlabelled = data.open_images(str(folder), "train", intensity="percentile")
    assert len(unlabelled) == 4 and unlabelled[3]["image"].shape == (3, 64, 64)
    assert unlabelled[0]["image"].min() == 0 and unlabelled[0]["image"].max() == 1  # CT_small, stretched


def test_pretraining_on_a_folder_of_dicoms_lowers_the_loss(tmp_path):
    folder = dicom_folder(tmp_path / "dicoms")
    out = tmp_path / "run"
    result = run_tiny_pretrain([f"--train_data=('{folder}',)", "--intensity=percentile", "--max_iters=30",
                                f"--out_dir={out}"], timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"data: 8 training images from {folder};" in result.stdout
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    first, last = [sum(r["total"] for r in rows) / len(rows) for rows in (log[:5], log[-5:])]
    assert len(log) == 30 and last < first - 0.5, (first, last)


def test_a_bad_dicom_stops_a_stage_with_a_one_line_error(tmp_path):
    (tmp_path / "dicoms").mkdir()
    shutil.copy(get_testdata_file("SC_rgb_rle_2frame.dcm"), tmp_path / "dicoms" / "cine.dcm")
    result = run_stage("pretrain.py", f"--train_data=('{tmp_path / 'dicoms'}',)", "--max_iters=1",
                       f"--out_dir={tmp_path / 'run'}", timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    message = result.stderr.strip().splitlines()[-1]
    assert re.fullmatch(r"error: .*cine\.dcm: a multi-frame DICOM \(2 frames\).*", message), message
