"""nanorad data: MedMNIST, image files (PNG, JPEG, DICOM) in folders or indexed by CSV, procedural radiograph
phantoms, and the augmentations of DINOv2 / OmniRad / RAD-DINO, all in plain torch + numpy + pillow (+ pydicom,
optional, for DICOM files).

Every image leaves this module as a float32 tensor (3, H, W) in [0, 1] (gray replicated to three
channels) until a transform normalises it with the ImageNet statistics the ViT was trained with.
Every dataset item is a dict, so a script can swap the phantoms for real files by changing one line.

Public API
----------
Constants
    IMAGENET_MEAN, IMAGENET_STD                      3-tuples of floats
    MEDMNIST: dict name -> MedMNISTInfo              the 12 official 2D datasets (task, label names,
                                                     n_channels, split sizes, md5 per size 28/64/128/224)
    PHANTOM_TASKS: {"lesions": PHANTOM_CLASSES, "anatomy": PHANTOM_ANATOMY_CLASSES}, PHANTOM_SEG_CLASSES
                                                     class names of the procedural dataset
MedMNIST (.npz, official file names)
    medmnist_filename(name, size=28) -> str          "breastmnist.npz", "breastmnist_64.npz", ...
    medmnist_url(name, size=28) -> str               official Zenodo URL
    download_medmnist(name, size=28, root="~/.medmnist", timeout_s=10) -> Path
        atomic, md5-checked; any network failure raises ConnectionError at once, naming the URL
        and the path to put the file at by hand
    load_medmnist(path_or_name, split="train", root="~/.medmnist", size=28, download=False,
                  check_md5=True) -> (images uint8 (N,H,W) or (N,H,W,3),
                                      labels int64 (N,), or (N,14) in {0,1} for chestmnist)
    file_md5(path) -> str
    ArrayImageDataset(images, labels=None, transform=None)           item {"image", "label"}
Image files (`intensity`: how 16-bit gray without a display window becomes [0,1], one of INTENSITIES: "full_range"
(default: value / the format's largest value, 65535 for a PNG), "minmax", "percentile" (for 12-bit data in 16 bits))
    read_image(path, intensity="full_range") -> float (3,H,W) in [0,1]
                                                     PNG/JPEG, 1/8/16-bit gray, palette, RGB(A); DICOM (.dcm)
    read_dicom(path, intensity="full_range")         pydicom (optional): modality LUT -> VOI LUT / window,
                                                     MONOCHROME1 inverted, RGB/YBR/palette as RGB, 1 frame;
                                                     no pydicom: MissingDependencyError (a ValueError)
        dicom_pixels(ds, path), dicom_gray_to_unit(ds, pixels, intensity), dicom_stored_range(ds),
        dicom_window_to_unit(values, ds); intensity_bounds(values, intensity, full_range), to_unit_range
    read_mask(path, threshold=127) -> int64 (H,W)    {0,1} by threshold, or raw class indices (None)
    read_csv_rows(csv_path, split=None, path_columns=("image",), required_columns=()) -> list[dict]
    ImageFolderDataset(root_or_csv, split=None, label_column=None, classes=None, label_fn=None,
                       transform=None, image_column="image", intensity="full_range")
                                                     item {"image"} or {"image", "label"}
    covid_vs_other(row) -> 1 / 0 / None              label_fn for covid_cxr_xray256 ("todo" dropped)
    SegmentationPairsDataset(csv_path, split=None, transform=None, threshold=127, intensity="full_range")
                                                     item {"image", "mask"}
    CaptionDataset(csv_path, split=None, transform=None, intensity="full_range")   item {"image", "caption"}
    read_jsonl_pairs(path, split, image_column, caption_column) -> [{"image": path, "caption"}] (JSONL index)
Procedural default data (no files needed)
    make_phantom(rng, img_size, label, task="lesions") -> {"image", "label", "mask", "caption"}
    PhantomDataset(n, img_size=64, seed=0, split="train", transform=None, pair_transform=None, task="lesions")
Augmentations (tensors (3,H,W) or (B,3,H,W) in [0,1]; `generator=None` uses torch's global RNG;
a batch gets one random draw per call)
    resize, center_crop, center_square, resize_mask, random_resized_crop_box (fallback_crop_size),
    random_resized_crop, random_horizontal_flip, random_rotation, color_jitter, random_grayscale, gaussian_blur,
    solarize, normalize, denormalize;
    pairs (image, mask): random_resized_crop_pair, random_horizontal_flip_pair, random_rotation_pair
    ClassificationTransform(size, train, ...)(img) -> normalised (3,size,size)
    SegmentationTransform(size, train, ..., hflip_p)(img, mask) -> (normalised img, int64 mask)
    DinoAugmentation(...)(img) -> {"global_crops": [2 tensors], "local_crops": [n tensors]}
The same views for a batch at once, on any device (every random choice still drawn per image)
    BatchedDinoAugmentation(...)(images (B,3,H,W), generator=None)
        -> {"global_crops" (2B,3,G,G), "local_crops" (nB,3,L,L) or None}, MaskedCollate's layout
    sample_view_params(n_images, height, width, scale, blur_probs, solarize_probs, jitter=DINO_JITTER,
                       generator=None, device="cpu") -> dict of per-view tensors (box, flip, jitter, ..., solarize)
    apply_view_params(images, params, size) -> normalised views (pure)
    random_resized_crop_boxes(n, height, width, scale, ratio, generator=None, device="cpu") -> long (n, 4)
    resize_weights, resized_crops, color_jitter_per_image, gaussian_blur_per_image
iBOT masking
    MaskingGenerator(grid_h, grid_w, min_num_patches=4, max_num_patches=None, min_aspect=0.3)
        (num_masking_patches, generator=None) -> bool (grid_h, grid_w); .add_block(mask, max_patches)
Pretraining batches, a pure function of (seed, step) so that a resumed run sees the same ones
    open_images(source, split, phantom_sizes, phantom_px, label_column=None, phantom_task="lesions",
                intensity="full_range")      "phantom", .npz, .csv, folder of PNG/JPEG/DICOM files
    StepBatchSampler(n_images, batch_size, seed, start_step, max_iters, rank, world_size)
        -> per step, this rank's keys (image index, crop seed, batch seed)
    MultiCropDataset(images, **DinoAugmentation kwargs)[key] -> that image's crops
    SourceImageDataset(images, source_px)[key] -> that image as a square (BatchedDinoAugmentation)
    MaskedCollate(grid_size, mask_probability, mask_ratio_min_max)(items)
        -> {"global_crops" (2B,3,G,G), "local_crops" (nB,3,L,L) or None, "masks" bool (2B,N),
            "mask_indices" (M,), "masks_weight" (M,), "n_masked_patches" (1,), "upperbound" int}

Typical use
    images = open_images("../shared/data/covid_cxr_xray256/images.csv", "train")
    loader = DataLoader(MultiCropDataset(images, global_crops_size=224, local_crops_size=96),
                        batch_sampler=StepBatchSampler(len(images), 32, seed=0, start_step=0, max_iters=1000),
                        collate_fn=MaskedCollate(224 // 14, 0.5, (0.1, 0.5)))
    images, labels = load_medmnist("breastmnist", "train", root="../shared/data")
    ArrayImageDataset(images, labels, ClassificationTransform(224, train=True))
"""
import csv
import hashlib
import http.client
import json
import math
import os
import re
import socket
import threading
import urllib.parse
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# ----------------------------------------------------------------------------------------------
# MedMNIST v2/v3 (2D): the official table, from MedMNIST/MedMNIST medmnist/info.py (v3.0.2)
# ----------------------------------------------------------------------------------------------

MEDMNIST_URL = "https://zenodo.org/records/10519652/files/{filename}?download=1"
MEDMNIST_SIZES = (28, 64, 128, 224)
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class MedMNISTInfo:
    task: str                  # "multi-class", "binary-class", "multi-label, binary-class", "ordinal-regression"
    labels: tuple              # class names; index = label value
    n_channels: int            # 1 = gray (N,H,W), 3 = RGB (N,H,W,3)
    n_samples: dict            # official split sizes
    md5: dict                  # image size -> md5 of the official .npz

    @property
    def n_classes(self):
        return len(self.labels)

    @property
    def multi_label(self):
        return self.task.startswith("multi-label")


_ORGANS = ("bladder", "femur-left", "femur-right", "heart", "kidney-left", "kidney-right", "liver",
           "lung-left", "lung-right", "pancreas", "spleen")

MEDMNIST = {
    "pathmnist": MedMNISTInfo(
        "multi-class", ("adipose", "background", "debris", "lymphocytes", "mucus", "smooth muscle",
                        "normal colon mucosa", "cancer-associated stroma",
                        "colorectal adenocarcinoma epithelium"), 3,
        {"train": 89996, "val": 10004, "test": 7180},
        {28: "a8b06965200029087d5bd730944a56c1", 64: "55aa9c1e0525abe5a6b9d8343a507616",
         128: "ac42d08fb904d92c244187169d1fd1d9", 224: "2c51a510bcdc9cf8ddb2af93af1eadec"}),
    "chestmnist": MedMNISTInfo(
        "multi-label, binary-class", ("atelectasis", "cardiomegaly", "effusion", "infiltration",
                                      "mass", "nodule", "pneumonia", "pneumothorax", "consolidation",
                                      "edema", "emphysema", "fibrosis", "pleural", "hernia"), 1,
        {"train": 78468, "val": 11219, "test": 22433},
        {28: "02c8a6516a18b556561a56cbdd36c4a8", 64: "9de6cd0b934ebb5b7426cfba5efbae16",
         128: "db107e5590b27930b62dbaf558aebee3", 224: "45bd33e6f06c3e8cdb481c74a89152aa"}),
    "dermamnist": MedMNISTInfo(
        "multi-class", ("actinic keratoses and intraepithelial carcinoma", "basal cell carcinoma",
                        "benign keratosis-like lesions", "dermatofibroma", "melanoma",
                        "melanocytic nevi", "vascular lesions"), 3,
        {"train": 7007, "val": 1003, "test": 2005},
        {28: "0744692d530f8e62ec473284d019b0c7", 64: "b70a2f5635c6199aeaa28c31d7202e1f",
         128: "2defd784463fa5243564e855ed717de1", 224: "8974907d8e169bef5f5b96bc506ae45d"}),
    "octmnist": MedMNISTInfo(
        "multi-class", ("choroidal neovascularization", "diabetic macular edema", "drusen", "normal"), 1,
        {"train": 97477, "val": 10832, "test": 1000},
        {28: "c68d92d5b585d8d81f7112f81e2d0842", 64: "e229e9440236b774d9f0dfef9d07bdaf",
         128: "0a97e76651ace45c5d943ee3f65b63ae", 224: "abc493b6d529d5de7569faaef2773ba3"}),
    "pneumoniamnist": MedMNISTInfo(
        "binary-class", ("normal", "pneumonia"), 1,
        {"train": 4708, "val": 524, "test": 624},
        {28: "28209eda62fecd6e6a2d98b1501bb15f", 64: "8f4eceb4ccffa70c672198ea285246c6",
         128: "05b46931834c231683c68f40c47b2971", 224: "d6a3c71de1b945ea11211b03746c1fe1"}),
    "retinamnist": MedMNISTInfo(
        "ordinal-regression", ("0", "1", "2", "3", "4"), 3,
        {"train": 1080, "val": 120, "test": 400},
        {28: "bd4c0672f1bba3e3a89f0e4e876791e4", 64: "afda852cc34dcda56f86ad2b2457dbcc",
         128: "e48e916a24454daf90583d4e6efb1a18", 224: "eae7e3b6f3fcbda4ae613ebdcbe35348"}),
    "breastmnist": MedMNISTInfo(
        "binary-class", ("malignant", "normal, benign"), 1,
        {"train": 546, "val": 78, "test": 156},
        {28: "750601b1f35ba3300ea97c75c52ff8f6", 64: "742edef2a1fd1524b2efff4bd7ba9364",
         128: "363e4b3f8d712e9b5de15470a2aaadf1", 224: "b56378a6eefa9fed602bb16d192d4c8b"}),
    "bloodmnist": MedMNISTInfo(
        "multi-class", ("basophil", "eosinophil", "erythroblast", "immature granulocytes",
                        "lymphocyte", "monocyte", "neutrophil", "platelet"), 3,
        {"train": 11959, "val": 1712, "test": 3421},
        {28: "7053d0359d879ad8a5505303e11de1dc", 64: "2b94928a2ae4916078ca51e05b6b800b",
         128: "adace1e0ed228fccda1f39692059dd4c", 224: "b718ff6835fcbdb22ba9eacccd7b2601"}),
    "tissuemnist": MedMNISTInfo(
        "multi-class", ("Collecting Duct, Connecting Tubule", "Distal Convoluted Tubule",
                        "Glomerular endothelial cells", "Interstitial endothelial cells", "Leukocytes",
                        "Podocytes", "Proximal Tubule Segments", "Thick Ascending Limb"), 1,
        {"train": 165466, "val": 23640, "test": 47280},
        {28: "ebe78ee8b05294063de985d821c1c34b", 64: "123ece2eba09d0aa5d698fda57103344",
         128: "61b955355d7425a89687b06cca3ce0c2", 224: "b077128c4a949f0a4eb01517f9037b9c"}),
    # the Organ{A,C,S} files on Zenodo record 10519652 (MedMNIST v3) differ from the v2.1 ones:
    # other md5s and slightly smaller splits
    "organamnist": MedMNISTInfo(
        "multi-class", _ORGANS, 1, {"train": 34561, "val": 6491, "test": 17778},
        {28: "68e3f8846a6bd62f0c9bf841c0d9eacc", 64: "2dcccc29b88e6da5a01161ef20cda288",
         128: "eeae80d0a227a8d099027e1b3cfd3b60", 224: "50747347e05c87dd3aaf92c49f9f3170"}),
    "organcmnist": MedMNISTInfo(
        "multi-class", _ORGANS, 1, {"train": 12975, "val": 2392, "test": 8216},
        {28: "b9ceb9546e10131b32923c5bbeaea2b1", 64: "3ce34a8724ea6f548e6db4744d03b6a9",
         128: "773c1f009daa3fe5d9a2a201b2a7ed94", 224: "050f5e875dc056f6768abf94ec9995d1"}),
    "organsmnist": MedMNISTInfo(
        "multi-class", _ORGANS, 1, {"train": 13932, "val": 2452, "test": 8827},
        {28: "9ab87b696fb54e2a387ebe992d6ed5f1", 64: "53a6d115339d874c25e309a994ff46d3",
         128: "ded0c5fa01a95dc4978b956f613e9b8e", 224: "b354719e553fbbb2513d5533f52a4cb1"}),
}


def _check_medmnist_name(name, size):
    if name not in MEDMNIST:
        raise ValueError(f"unknown MedMNIST dataset '{name}'; expected one of {', '.join(MEDMNIST)} "
                         f"(or a path to a .npz file)")
    if size not in MEDMNIST_SIZES:
        raise ValueError(f"MedMNIST size {size!r}: expected one of {MEDMNIST_SIZES}")


def medmnist_filename(name, size=28):
    """The official file name: 28 px files carry no suffix, larger ones `_{size}`."""
    _check_medmnist_name(name, size)
    return f"{name}.npz" if size == 28 else f"{name}_{size}.npz"


def medmnist_url(name, size=28):
    return MEDMNIST_URL.format(filename=medmnist_filename(name, size))


def file_md5(path, chunk_bytes=1 << 20):
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def _resolve_host(host, port, timeout_s):
    """Socket timeouts do not cover the DNS lookup, and a machine whose resolver is unreachable can
    stall there for a minute; so look the host up in a thread and give up after timeout_s."""
    result = {}

    def lookup():
        try:
            result["addr"] = socket.getaddrinfo(host, port)
        except OSError as e:
            result["error"] = e

    thread = threading.Thread(target=lookup, daemon=True)
    thread.start()
    thread.join(timeout_s)
    if "addr" not in result:
        raise result.get("error", TimeoutError(f"DNS lookup of {host} took more than {timeout_s} s"))


def download_medmnist(name, size=28, root="~/.medmnist", timeout_s=10.0):
    """Fetch the official file into `root` (atomically, md5-checked) and return its path.
    Any network failure raises at once with the URL and where to put the file by hand."""
    filename = medmnist_filename(name, size)
    url = MEDMNIST_URL.format(filename=filename)
    root = Path(root).expanduser()
    dest = root / filename
    expected_md5 = MEDMNIST[name].md5[size]
    tmp = root / (filename + ".part")
    print(f"downloading {url} -> {dest}")
    try:
        parts = urllib.parse.urlsplit(url)
        _resolve_host(parts.hostname, parts.port or (443 if parts.scheme == "https" else 80), timeout_s)
        root.mkdir(parents=True, exist_ok=True)
        digest = hashlib.md5()
        with urllib.request.urlopen(url, timeout=timeout_s) as response, open(tmp, "wb") as f:
            while chunk := response.read(1 << 20):
                f.write(chunk)
                digest.update(chunk)
    except (OSError, ValueError, http.client.HTTPException) as e:  # URLError, timeouts, DNS: OSError
        tmp.unlink(missing_ok=True)
        raise ConnectionError(
            f"could not download MedMNIST '{name}' ({size} px) from {url}: {e}. "
            f"Without internet, fetch {filename} (md5 {expected_md5}) on another machine and put it "
            f"at {dest}") from e
    if digest.hexdigest() != expected_md5:
        tmp.unlink(missing_ok=True)
        raise ValueError(f"download of {url}: md5 {digest.hexdigest()}, expected {expected_md5} "
                         f"(truncated or changed upstream); nothing was written to {dest}")
    os.replace(tmp, dest)
    return dest


_MD5_VERIFIED = set()  # (path, bytes, mtime) already checked in this process: big files hash slowly


def _check_md5(path, expected):
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key in _MD5_VERIFIED:
        return
    found = file_md5(path)
    if found != expected:
        raise ValueError(f"{path}: md5 {found}, expected the official {expected}; the file is "
                         f"corrupt, truncated or not the official MedMNIST copy (pass check_md5=False "
                         f"to load it anyway)")
    _MD5_VERIFIED.add(key)


def _medmnist_name_and_size(path):
    """'breastmnist_64.npz' -> ('breastmnist', 64); (None, None) for a file of another name."""
    match = re.fullmatch(r"([a-z]+mnist)(?:_(\d+))?", path.stem)
    if match is None or match.group(1) not in MEDMNIST:
        return None, None
    size = int(match.group(2) or 28)
    return (match.group(1), size) if size in MEDMNIST_SIZES else (None, None)


def load_medmnist(path_or_name, split="train", root="~/.medmnist", size=28, download=False,
                  check_md5=True, timeout_s=10.0):
    """One split of a MedMNIST .npz, validated.

    `path_or_name` is a path to a .npz or an official name ("breastmnist"), which is looked up as
    `root/medmnist_filename(name, size)` (downloaded first if absent and `download=True`).
    Returns images uint8 (N,H,W) (gray) or (N,H,W,3) (RGB), and labels int64 (N,) or, for the
    multi-label chestmnist, (N,14) in {0,1}. The md5 is checked when the file has an official name.
    """
    if split not in SPLITS:
        raise ValueError(f"MedMNIST split {split!r}: expected one of {SPLITS}")
    text = str(path_or_name)
    if text.endswith(".npz") or os.sep in text or Path(text).expanduser().is_file():
        path = Path(text).expanduser()
        name, size = _medmnist_name_and_size(path)
    else:
        name = text
        path = Path(root).expanduser() / medmnist_filename(name, size)
        if not path.is_file():
            if download:
                path = download_medmnist(name, size, root, timeout_s)
            else:
                raise FileNotFoundError(
                    f"MedMNIST file {path} not found: put the official {path.name} there "
                    f"(from {medmnist_url(name, size)}), or pass download=True")
    if not path.is_file():
        raise FileNotFoundError(f"MedMNIST file {path} not found (expected an official .npz such as "
                                f"breastmnist.npz, with keys train_images, train_labels, val_images, ...)")
    info = MEDMNIST.get(name)
    if info is not None and check_md5:
        _check_md5(path, info.md5[size])
    try:
        # allow_pickle=False: an .npz from the internet must not be able to run code
        npz = np.load(path, allow_pickle=False)
    except Exception as e:
        raise ValueError(f"{path}: not a readable .npz archive ({type(e).__name__}: {e}); "
                         f"expected a MedMNIST file written by numpy.savez") from e
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise ValueError(f"{path}: a single array, expected an .npz archive with keys "
                         f"train_images, train_labels, val_images, ...")
    with npz:
        wanted = (f"{split}_images", f"{split}_labels")
        missing = [k for k in wanted if k not in npz.files]
        if missing:
            raise ValueError(f"{path}: missing key(s) {', '.join(missing)}; expected {wanted[0]} and "
                             f"{wanted[1]}, found keys {sorted(npz.files)}")
        try:
            images, labels = npz[wanted[0]], npz[wanted[1]]
        except Exception as e:  # a damaged member: zlib / zipfile / format errors
            raise ValueError(f"{path}: could not read {wanted[0]}/{wanted[1]} ({type(e).__name__}: "
                             f"{e}); the archive is damaged") from e
    return _validate_medmnist(path, split, images, labels, info, size)


def _validate_medmnist(path, split, images, labels, info, size):
    where = f"{path} [{split}]"
    if images.dtype != np.uint8:
        raise ValueError(f"{where}: {split}_images dtype {images.dtype}, expected uint8")
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] != 3):
        raise ValueError(f"{where}: {split}_images shape {images.shape}, expected (N,H,W) or (N,H,W,3)")
    if images.shape[1] != images.shape[2]:
        raise ValueError(f"{where}: {split}_images are {images.shape[1]}x{images.shape[2]}, expected square")
    if info is not None:
        channels = 1 if images.ndim == 3 else 3
        if channels != info.n_channels:
            raise ValueError(f"{where}: {channels}-channel images, expected {info.n_channels} "
                             f"(shape {images.shape})")
        if images.shape[1] != size:
            raise ValueError(f"{where}: {images.shape[1]} px images, expected {size} px for this file name")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{where}: {split}_labels dtype {labels.dtype}, expected an integer type")
    if len(labels) != len(images):
        raise ValueError(f"{where}: {len(labels)} labels for {len(images)} images")
    multi_label = info.multi_label if info is not None else (labels.ndim == 2 and labels.shape[1] > 1)
    if multi_label:
        if labels.ndim != 2 or (info is not None and labels.shape[1] != info.n_classes):
            expected = f"(N, {info.n_classes})" if info is not None else "(N, L)"
            raise ValueError(f"{where}: {split}_labels shape {labels.shape}, expected {expected}")
        if labels.size and (labels.min() < 0 or labels.max() > 1):
            raise ValueError(f"{where}: multi-label values in [{labels.min()}, {labels.max()}], "
                             f"expected 0 or 1")
    else:
        if labels.ndim == 2 and labels.shape[1] == 1:
            labels = labels[:, 0]
        if labels.ndim != 1:
            raise ValueError(f"{where}: {split}_labels shape {labels.shape}, expected (N,) or (N,1)")
        n_classes = info.n_classes if info is not None else None
        low, high = (int(labels.min()), int(labels.max())) if labels.size else (0, 0)
        if low < 0 or (n_classes is not None and high >= n_classes):
            expected = f"[0, {n_classes - 1}]" if n_classes is not None else ">= 0"
            raise ValueError(f"{where}: labels in [{low}, {high}], expected {expected}")
    return images, labels.astype(np.int64)


class ArrayImageDataset(torch.utils.data.Dataset):
    """Images held in memory as uint8 (N,H,W) / (N,H,W,3) arrays (e.g. from load_medmnist).
    Item: {"image": transform(float (3,H,W) in [0,1]), "label": int, or int64 (L,) multi-label}."""

    def __init__(self, images, labels=None, transform=None):
        if images.ndim not in (3, 4):
            raise ValueError(f"images shape {images.shape}: expected (N,H,W) or (N,H,W,C)")
        if labels is not None and len(labels) != len(images):
            raise ValueError(f"{len(labels)} labels for {len(images)} images")
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        image = torch.from_numpy(np.ascontiguousarray(self.images[i]))
        image = image.float() / 255 if image.dtype == torch.uint8 else image.float()
        image = image[None] if image.ndim == 2 else image.permute(2, 0, 1)
        image = image.expand(3, -1, -1).contiguous() if image.shape[0] == 1 else image
        item = {"image": self.transform(image) if self.transform else image}
        if self.labels is not None:
            label = self.labels[i]
            item["label"] = int(label) if np.ndim(label) == 0 else torch.from_numpy(np.asarray(label, np.int64))
        return item


# ----------------------------------------------------------------------------------------------
# Image files and CSV indexes
# ----------------------------------------------------------------------------------------------

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm")
# How a gray image with more than 8 bits and no display window of its own (16-bit PNG, DICOM without a VOI LUT
# or Window Center / Width) becomes [0, 1]; read_image's docstring says what each does and which to choose
INTENSITIES = ("full_range", "minmax", "percentile")
INTENSITY_PERCENTILES = (0.5, 99.5)  # "percentile": a few hot or dead pixels (labels, collimator edges) ignored


def check_intensity(intensity):
    if intensity not in INTENSITIES:
        raise ValueError(f"intensity: expected one of {', '.join(INTENSITIES)}, found {intensity!r}")


def intensity_bounds(values, intensity, full_range):
    """The gray values (low, high) that become 0 and 1: `full_range` (the range the file format can hold),
    the image's own minimum and maximum, or its 0.5 and 99.5 percentiles."""
    check_intensity(intensity)
    if intensity == "full_range":
        return full_range
    if intensity == "minmax":
        return values.min(), values.max()
    return tuple(np.percentile(values, INTENSITY_PERCENTILES))


def to_unit_range(values, low, high):
    """float32 (values - low) / (high - low), clipped to [0, 1]; when high <= low (a constant image, a
    one-value window), the limit of that ramp: 1 above low, else 0."""
    values = np.asarray(values, dtype=np.float32)
    if high <= low:
        return (values > low).astype(np.float32)
    return np.clip((values - np.float32(low)) / np.float32(high - low), 0.0, 1.0)


def _open_image(path):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file {path} not found")
    try:
        with open(path, "rb") as f:  # closed at once: a DataLoader opens thousands of files
            image = Image.open(f)
            image.load()
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{path}: not a readable image ({e}); expected PNG, JPEG or DICOM (.dcm)") from e
    return image


def read_image(path, intensity="full_range"):
    """Any PNG/JPEG/DICOM (.dcm, read_dicom) as float32 (3,H,W) in [0,1]; gray is replicated to 3
    channels, an alpha channel is dropped. 8-bit and colour images: value / 255.

    `intensity` maps 16-bit gray PNGs (and DICOMs without a window of their own) to [0, 1]:
      "full_range" (the default): value / 65535 (a DICOM: the range its Bits Stored can hold), the same
          division for every image, so intensities stay comparable across a dataset, and 16-bit PNGs read
          exactly as in earlier versions (and the results made with them). A 12-bit X-ray stored in 16 bits
          then spans only [0, 0.0625]: choose "percentile" for such data.
      "minmax": the image's own minimum -> 0, maximum -> 1 (stretched per image).
      "percentile": the image's 0.5 and 99.5 percentiles -> 0 and 1, clipped: stretched per image and robust
          to a few extreme pixels; the recommended choice for 12-bit radiographs stored in 16 bits.
    """
    check_intensity(intensity)
    if Path(path).suffix.lower() == ".dcm":
        return read_dicom(path, intensity)
    image = _open_image(path)
    mode = image.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # Pillow opens 16-bit PNGs as "I;16" (or "I" in older versions): a 0..65535 range
        values = np.asarray(image)
        tensor = torch.from_numpy(to_unit_range(values, *intensity_bounds(values, intensity, (0, 65535))))[None]
    elif mode in ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV"):
        if mode in ("1", "LA"):
            image = image.convert("L")
        elif mode != "L":
            image = image.convert("RGB")  # palette, alpha and other colour spaces
        array = np.asarray(image, dtype=np.uint8)
        tensor = torch.from_numpy(array.copy()).float().div_(255)
        tensor = tensor[None] if tensor.ndim == 2 else tensor.permute(2, 0, 1)
    else:
        raise ValueError(f"{path}: image mode {mode}, expected 8/16-bit gray (L, I;16), palette or RGB(A)")
    return tensor.expand(3, -1, -1).contiguous() if tensor.shape[0] == 1 else tensor.contiguous()


# ---- DICOM, through pydicom (optional: imported only when a .dcm file is read) ----

class MissingDependencyError(ModuleNotFoundError, ValueError):
    """An optional package is not installed: an ImportError to code that catches those, and a ValueError so
    that a stage script ends with the one-line `error: ...` of a user error (config.USER_ERRORS)."""


def _import_pydicom(path):
    try:
        import pydicom
        import pydicom.pixels
    except ImportError as e:
        raise MissingDependencyError(f"{path}: reading DICOM files needs pydicom, which is not installed: "
                                     f"pip install pydicom") from e
    return pydicom


def _one_line(error):
    return " ".join(str(error).split())


def read_dicom(path, intensity="full_range"):
    """A single-frame DICOM file as float32 (3,H,W) in [0,1], as a viewer would show it. Gray:
    stored values -> modality LUT (Rescale Slope / Intercept or Modality LUT Sequence) -> the VOI LUT
    Sequence, else the first Window Center / Width, else `intensity` (read_image; "full_range" is the range
    the stored bits can hold) -> [0,1]; MONOCHROME1 inverted so that bone is bright in every image. Colour:
    RGB, YBR (converted to RGB by pydicom) and palette (pydicom's apply_color_lut), / the largest value of their bits.
    Multi-frame files are an error (save the frames you want as single files): nanorad reads 2D images."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"image file {path} not found")
    pydicom = _import_pydicom(path)
    try:
        ds = pydicom.dcmread(path)
    except (pydicom.errors.InvalidDicomError, EOFError, ValueError) as e:
        raise ValueError(f"{path}: not a readable DICOM file ({_one_line(e)})") from e
    n_frames = int(ds.get("NumberOfFrames") or 1)
    if n_frames > 1:
        raise ValueError(f"{path}: a multi-frame DICOM ({n_frames} frames); nanorad reads single 2D images, "
                         f"save the frames you want as single-frame files")
    pixels = dicom_pixels(ds, path)
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    if photometric in ("MONOCHROME1", "MONOCHROME2"):
        unit = dicom_gray_to_unit(ds, pixels, intensity)
        tensor = torch.from_numpy(1.0 - unit if photometric == "MONOCHROME1" else unit)[None]
        return tensor.expand(3, -1, -1).contiguous()
    if photometric == "PALETTE COLOR":
        rgb = pydicom.pixels.apply_color_lut(pixels, ds)
        max_value = 2 ** ds.RedPaletteColorLookupTableDescriptor[2] - 1
    elif photometric == "RGB" or photometric.startswith("YBR"):  # pydicom has converted YBR to RGB
        rgb, max_value = pixels, 2 ** ds.BitsStored - 1
    else:
        raise ValueError(f"{path}: Photometric Interpretation {photometric!r}, expected MONOCHROME1/2, RGB, YBR_* "
                         f"or PALETTE COLOR")
    return torch.from_numpy(to_unit_range(rgb, 0, max_value)).permute(2, 0, 1).contiguous()


def dicom_pixels(ds, path):
    """The decoded pixel array of a dataset (YBR converted to RGB, pydicom's default), or a one-line ValueError
    that names the file, its transfer syntax and, for a compressed one, what would decode it."""
    try:
        return ds.pixel_array
    # pydicom raises AttributeError for a missing element (no pixel data, no transfer syntax), ValueError for
    # truncated pixel data, RuntimeError and NotImplementedError when no installed decoder can read it
    except (AttributeError, ValueError, RuntimeError, NotImplementedError) as e:
        syntax = ds.file_meta.get("TransferSyntaxUID")
        raise ValueError(f"{path}: cannot decode its pixel data" + (f" ({syntax.name})" if syntax else "")
                         + f": {_one_line(e)}" + _other_decoders(syntax)) from e


def _other_decoders(syntax):
    """pydicom names the packages it lacks only when none of its plugins for a compressed syntax is installed;
    when an installed one tried and failed (Pillow on 12-bit JPEG), the other plugins' needs say what to install."""
    from pydicom.pixels import get_decoder
    if syntax is None or not syntax.is_compressed:
        return ""
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:  # pydicom has no decoder at all for this syntax
        return ""
    if not decoder.is_available or not decoder.missing_dependencies:
        return ""
    return f"; other decoders of it need {'; '.join(decoder.missing_dependencies)}"


def dicom_gray_to_unit(ds, pixels, intensity):
    """Gray stored values -> modality LUT -> VOI LUT, else the first window, else `intensity` -> float32
    (H,W) in [0,1], darkest = 0 as stored (MONOCHROME1 is inverted by the caller)."""
    from pydicom.pixels import apply_modality_lut, apply_voi
    values = apply_modality_lut(pixels, ds)
    if ds.get("VOILUTSequence"):
        # a table made for this image's display, indexed by integer modality values, outputs of its nominal depth
        lut_bits = ds.VOILUTSequence[0].LUTDescriptor[2]
        return to_unit_range(apply_voi(np.rint(values).astype(np.int64), ds), 0, 2 ** lut_bits - 1)
    if "WindowCenter" in ds and "WindowWidth" in ds:
        return dicom_window_to_unit(values, ds)
    return to_unit_range(values, *intensity_bounds(values, intensity, dicom_stored_range(ds)))


def dicom_stored_range(ds):
    """The modality values the stored bits can hold (pydicom's apply_windowing maps a window onto the
    same range): Bits Stored, signed or not, through Rescale Slope / Intercept; a Modality LUT's outputs
    are unsigned of the table's nominal depth (PS3.3 C.11.1.1.1)."""
    from pydicom.pixels import apply_modality_lut
    if ds.get("ModalityLUTSequence"):
        return 0.0, 2.0 ** ds.ModalityLUTSequence[0].LUTDescriptor[2] - 1
    bits = ds.BitsStored
    stored = (0, 2 ** bits - 1) if ds.PixelRepresentation == 0 else (-2 ** (bits - 1), 2 ** (bits - 1) - 1)
    ends = apply_modality_lut(np.array(stored, dtype=np.float64), ds)
    return float(ends.min()), float(ends.max())  # a negative slope swaps the ends


def _first_value(element):
    """A DICOM element's value, or its first one when it holds several (alternative windows)."""
    return float(element.value[0] if element.VM > 1 else element.value)


def dicom_window_to_unit(values, ds):
    """The first Window Center / Width as a ramp from 0 to 1 (PS3.3 C.11.2.1.2): LINEAR (the default, whose
    window is [c - 0.5 - (w - 1) / 2, c - 0.5 + (w - 1) / 2]), LINEAR_EXACT ([c - w / 2, c + w / 2]) or SIGMOID."""
    center, width = _first_value(ds["WindowCenter"]), _first_value(ds["WindowWidth"])
    function = str(ds.get("VOILUTFunction") or "LINEAR").strip().upper()
    width_ok = width >= 1 if function == "LINEAR" else width > 0
    if function not in ("LINEAR", "LINEAR_EXACT", "SIGMOID") or not width_ok:
        raise ValueError(f"{ds.filename}: VOI LUT Function {function} with Window Width {width}: expected LINEAR "
                         f"(width >= 1), LINEAR_EXACT or SIGMOID (width > 0)")
    if function == "SIGMOID":
        return (1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))).astype(np.float32)
    if function == "LINEAR":
        center, width = center - 0.5, width - 1
    return to_unit_range(values, center - width / 2, center + width / 2)


def read_mask(path, threshold=127):
    """A segmentation mask as int64 (H,W). With a threshold: 1 where the gray value > threshold, else 0
    (binary masks saved with anti-aliased edges). With threshold=None: the stored values are class
    indices (single-channel L, P or 16-bit masks)."""
    image = _open_image(path)
    if threshold is None:
        if image.mode not in ("L", "P", "I;16", "I;16L", "I;16B", "I"):
            raise ValueError(f"{path}: mask mode {image.mode}; a class-index mask must be single-channel "
                             f"(L, P or I;16)")
        return torch.from_numpy(np.asarray(image).astype(np.int64))
    if image.mode not in ("L", "I;16", "I;16L", "I;16B", "I"):
        image = image.convert("L")
    return torch.from_numpy((np.asarray(image) > threshold).astype(np.int64))


def read_csv_rows(csv_path, split=None, path_columns=("image",), required_columns=()):
    """Rows of a CSV index as dicts of strings. Columns in `path_columns` are resolved relative to
    the CSV's folder and must name existing files; `split` keeps the rows whose `split` column
    equals it."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise FileNotFoundError(f"CSV index {csv_path} not found")
    with open(csv_path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        needed = list(path_columns) + list(required_columns) + (["split"] if split is not None else [])
        for column in needed:
            if column not in header:
                raise ValueError(f"{csv_path}: expected a column '{column}', found columns {header}")
        rows, splits_seen = [], set()
        for row in reader:
            line = reader.line_num
            if split is not None:
                splits_seen.add(row["split"])
                if row["split"] != split:
                    continue
            for column in path_columns:
                value = (row[column] or "").strip()
                if not value:
                    raise ValueError(f"{csv_path} line {line}: column '{column}' is empty, expected a file path")
                resolved = csv_path.parent / value
                if not resolved.is_file():
                    raise FileNotFoundError(f"{csv_path} line {line}: column '{column}' names '{value}', "
                                            f"but {resolved} does not exist")
                row[column] = str(resolved)
            rows.append(row)
    if split is not None and not rows:
        raise ValueError(f"{csv_path}: no rows with split '{split}'; splits found {sorted(splits_seen)}")
    return rows


def covid_vs_other(row):
    """label_fn for covid_cxr_xray256 (and the other covid_cxr CSVs): 1 for any COVID-19 finding
    ("COVID-19", "COVID-19, ARDS"), 0 for other findings, None (row dropped) for the source's
    unlabelled "todo"."""
    if "finding" not in row:
        raise ValueError(f"covid_vs_other needs a 'finding' column, found columns {list(row)}")
    finding = row["finding"].strip()
    if finding in ("", "todo"):
        return None
    return 1 if "COVID-19" in finding else 0


class ImageFolderDataset(torch.utils.data.Dataset):
    """Images from a folder (searched recursively, unlabelled) or from a CSV index.

    Labels (CSV only): `label_column` maps its strings to ints by `classes` (a list: index = label;
    or a dict name -> int); without `classes`, by the sorted distinct values of that column over the
    whole CSV, so every split gets the same mapping. Or `label_fn(row) -> label`. Rows whose label is
    blank (or label_fn returns None) are dropped; `self.rows` holds the kept rows, in item order,
    for metadata (sex, age, ...). Item: {"image": transform(float (3,H,W)), "label": int} (no
    "label" when unlabelled). `intensity`: how 16-bit images become [0, 1] (read_image).
    """

    def __init__(self, root_or_csv, split=None, label_column=None, classes=None, label_fn=None,
                 transform=None, image_column="image", intensity="full_range"):
        check_intensity(intensity)
        root = Path(root_or_csv)
        self.transform, self.intensity = transform, intensity
        if label_column is not None and label_fn is not None:
            raise ValueError("give label_column or label_fn, not both")
        if root.is_dir():
            if split is not None or label_column is not None or label_fn is not None:
                raise ValueError(f"{root} is a folder: splits and labels need a CSV index")
            paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
            if not paths:
                raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {root}")
            self.rows = [{image_column: str(p)} for p in paths]
            self.labels, self.classes = None, None
            self.paths = [str(p) for p in paths]
            read_image(self.paths[0], intensity)  # a file that cannot be decoded stops a script here, before any work
            return
        if not root.is_file():
            raise FileNotFoundError(f"{root} not found: expected an image folder or a CSV index")
        required = (label_column,) if label_column is not None else ()
        rows = read_csv_rows(root, split, path_columns=(image_column,), required_columns=required)
        self.classes, labels = None, None
        if label_column is not None:
            if classes is None:
                all_rows = read_csv_rows(root, None, path_columns=(), required_columns=required)
                classes = sorted({r[label_column].strip() for r in all_rows} - {""})
            mapping = dict(classes) if isinstance(classes, dict) else {c: i for i, c in enumerate(classes)}
            self.classes = sorted(mapping, key=mapping.get)
            labels = []
            for row in rows:
                value = row[label_column].strip()
                if value and value not in mapping:
                    raise ValueError(f"{root}: row of {row[image_column]}: {label_column} '{value}' "
                                     f"is not one of the classes {list(mapping)}")
                labels.append(mapping[value] if value else None)
        elif label_fn is not None:
            labels = [label_fn(row) for row in rows]
        if labels is not None:
            kept = [(row, label) for row, label in zip(rows, labels) if label is not None]
            if not kept:
                raise ValueError(f"{root}: no labelled rows in split {split!r}")
            rows, labels = [row for row, _ in kept], [label for _, label in kept]
        self.rows, self.labels = rows, labels
        self.paths = [row[image_column] for row in rows]
        if self.paths:
            read_image(self.paths[0], intensity)  # a file that cannot be decoded stops a script here, before any work

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        image = read_image(self.paths[i], self.intensity)
        item = {"image": self.transform(image) if self.transform else image}
        if self.labels is not None:
            item["label"] = self.labels[i]
        return item


class SegmentationPairsDataset(torch.utils.data.Dataset):
    """Image/mask pairs from a CSV index (columns `image`, `mask`; masks binarised at `threshold`,
    or class indices with threshold=None). Item: {"image", "mask"} after transform(image, mask);
    untransformed: float (3,H,W) and int64 (H,W). `intensity`: how 16-bit images become [0, 1] (read_image)."""

    def __init__(self, csv_path, split=None, transform=None, threshold=127, image_column="image",
                 mask_column="mask", intensity="full_range"):
        check_intensity(intensity)
        self.rows = read_csv_rows(csv_path, split, path_columns=(image_column, mask_column))
        self.csv_path, self.transform, self.threshold = Path(csv_path), transform, threshold
        self.intensity = intensity
        self.image_column, self.mask_column = image_column, mask_column

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        row = self.rows[i]
        image = read_image(row[self.image_column], self.intensity)
        mask = read_mask(row[self.mask_column], self.threshold)
        if image.shape[1:] != mask.shape:
            raise ValueError(f"{self.csv_path}: mask {row[self.mask_column]} is {tuple(mask.shape)}, "
                             f"expected the size of its image {row[self.image_column]} {tuple(image.shape[1:])}")
        if self.transform:
            image, mask = self.transform(image, mask)
        return {"image": image, "mask": mask}


class CaptionDataset(torch.utils.data.Dataset):
    """Image/caption pairs from a CSV index (columns `image`, `caption`). Item: {"image", "caption"}.
    `intensity`: how 16-bit images become [0, 1] (read_image)."""

    def __init__(self, csv_path, split=None, transform=None, image_column="image", caption_column="caption",
                 intensity="full_range"):
        check_intensity(intensity)
        self.rows = read_csv_rows(csv_path, split, path_columns=(image_column,),
                                  required_columns=(caption_column,))
        for row in self.rows:
            if not row[caption_column].strip():
                raise ValueError(f"{csv_path}: {image_column} {row[image_column]} has an empty "
                                 f"'{caption_column}', expected text")
        self.transform, self.image_column, self.caption_column = transform, image_column, caption_column
        self.intensity = intensity

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        row = self.rows[i]
        image = read_image(row[self.image_column], self.intensity)
        return {"image": self.transform(image) if self.transform else image,
                "caption": row[self.caption_column].strip()}


def read_jsonl_pairs(path, split, image_column, caption_column):
    """Rows {image, caption[, split]} of a JSONL index, image paths resolved beside the file."""
    path, rows = Path(path), []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        for column in (image_column, caption_column):
            if not str(row.get(column, "")).strip():
                raise ValueError(f"{path} line {line_no}: expected a non-empty '{column}', found {row.get(column)!r}")
        if split is not None and row.get("split") != split:
            continue
        image = path.parent / row[image_column]
        if not image.is_file():
            raise FileNotFoundError(f"{path} line {line_no}: '{image_column}' names {row[image_column]}, "
                                    f"but {image} does not exist")
        rows.append({"image": str(image), "caption": row[caption_column].strip()})
    if not rows:
        raise ValueError(f"{path}: no rows with split '{split}'")
    return rows

# ----------------------------------------------------------------------------------------------
# Procedural chest-radiograph phantoms: the default dataset, so every script runs with no files
# ----------------------------------------------------------------------------------------------

# Two tasks. "lesions" (classification, segmentation, captions): small findings inside the lungs.
# "anatomy" (pretraining's default): findings that change the whole picture's structure and survive
# cropping, so a self-supervised run can discover them without labels. Labels never depend on the
# side, so horizontal flips keep them valid.
PHANTOM_CLASSES = ("normal", "nodule", "multiple nodules", "consolidation")
PHANTOM_ANATOMY_CLASSES = ("normal", "cardiomegaly", "pleural effusion", "interstitial pattern")
PHANTOM_TASKS = {"lesions": PHANTOM_CLASSES, "anatomy": PHANTOM_ANATOMY_CLASSES}
PHANTOM_SEG_CLASSES = ("background", "lung", "lesion")


def _soft_inside(d, radius, img_size):
    """~1 for d < 1 (inside an ellipse of normalised distance d), 0 outside, with a ~1.5 px ramp."""
    distance_px = (1.0 - d) * radius * img_size / 2
    return np.clip(distance_px / 1.5 + 0.5, 0.0, 1.0)


def make_phantom(rng, img_size, label, task="lesions"):
    """One frontal-chest-radiograph-like phantom drawn with `rng` (numpy Generator).

    Dark background, soft-tissue body, two dark lungs, a bright heart, spine and ribs, noise; the
    finding `label` of PHANTOM_TASKS[task]. Radiological convention: the patient's right lung is on
    the image's left. Returns {"image": float32 (3,H,W) in [0,1], "label": int, "mask": int64 (H,W)
    with PHANTOM_SEG_CLASSES indices, "caption": str}.
    """
    finding = PHANTOM_TASKS[task][label]
    s = img_size
    coords = ((np.arange(s, dtype=np.float32) + 0.5) / s * 2 - 1)
    v, u = np.meshgrid(coords, coords, indexing="ij")  # v: down, u: right, both in [-1, 1]

    def ellipse(cu, cv, ru, rv):
        return np.sqrt(((u - cu) / ru) ** 2 + ((v - cv) / rv) ** 2)

    def jitter(scale):
        return float(rng.uniform(-scale, scale))

    body_ru, body_rv = 0.86 + jitter(0.06), 0.98 + jitter(0.04)
    body = _soft_inside(ellipse(jitter(0.03), 0.08, body_ru, body_rv), min(body_ru, body_rv), s)
    lungs = []  # (cu, cv, ru, rv) of the patient's right lung (image left), then the left lung
    for side in (-1, 1):
        ru, rv = 0.26 + jitter(0.03), 0.52 + jitter(0.05)
        lungs.append((side * (0.37 + jitter(0.03)), -0.06 + jitter(0.05), ru, rv))
    lung_d = [ellipse(*lung) for lung in lungs]
    lung_softs = [_soft_inside(d, min(l[2], l[3]), s) for d, l in zip(lung_d, lungs)]  # each lung, soft-edged
    lung_soft = np.maximum(*lung_softs)
    heart = (0.13 + jitter(0.04), 0.32 + jitter(0.04), 0.25 + jitter(0.03), 0.2 + jitter(0.03))
    if finding == "cardiomegaly":  # a cardiothoracic ratio well above 0.5
        heart = (heart[0] + 0.02, heart[1] - 0.08, heart[2] * 1.8, heart[3] * 1.7)
    heart_d = ellipse(*heart)
    heart_soft = _soft_inside(heart_d, heart[3], s)
    spine = np.clip((0.065 - np.abs(u - jitter(0.02))) * s / 3 + 0.5, 0, 1)
    # posterior ribs: arcs that fall away laterally, six per side
    side = np.where(u < 0, -1.0, 1.0)
    v0 = (-0.66 + 0.21 * np.arange(6, dtype=np.float32) + rng.uniform(-0.03, 0.03, 6)).astype(np.float32)
    rib_v = v0[:, None, None] + 0.32 * (u - side * 0.1)[None] ** 2
    lateral = (np.abs(u) > 0.08) & (np.abs(u) < 0.85)
    ribs = (np.clip((0.024 - np.abs(v - rib_v)) * s / 3 + 0.5, 0, 1).max(0)) * lateral

    image = 0.04 + 0.03 * v + 0.36 * body
    image = image - 0.24 * lung_soft + 0.2 * heart_soft + (0.13 * spine + 0.1 * ribs) * body
    lung_inside = [(d < 1) & (heart_d >= 1) for d in lung_d]  # the heart shadow hides the lung

    if task == "lesions":
        lesion_field, lesion_hard, caption = _draw_lesions(rng, label, u, v, lungs, lung_inside, heart, s)
    else:
        lesion_field, caption = _draw_anatomy(rng, finding, u, v, lungs, lung_softs, lung_soft, s)
        lesion_hard = np.zeros(u.shape, dtype=bool)
    image = image + lesion_field
    image = image + rng.normal(0.0, rng.uniform(0.01, 0.03), (s, s))
    image = np.clip(image * rng.uniform(0.9, 1.15) + jitter(0.04), 0.0, 1.0).astype(np.float32)

    mask = (lung_inside[0] | lung_inside[1]).astype(np.int64)
    mask[lesion_hard] = 2
    image = torch.from_numpy(image)[None].expand(3, -1, -1).contiguous()
    return {"image": image, "label": int(label), "mask": torch.from_numpy(mask), "caption": caption}


def _draw_lesions(rng, label, u, v, lungs, lung_inside, heart, s):
    """Lesion intensity (H,W), lesion pixels (H,W) bool and the caption for class `label`. A lesion
    is clipped to its own lung, so the mask, the picture and the caption's side always agree."""
    field = np.zeros_like(u)
    hard = np.zeros(u.shape, dtype=bool)
    side_names = ("right", "left")  # lungs[0] is the patient's right lung

    def place(lung_index, margin, avoid=()):
        """A point well inside the lung, off the heart and away from `avoid` [(cu, cv, min_dist)],
        or None when 100 tries found none."""
        cu0, cv0, ru, rv = lungs[lung_index]
        for _ in range(100):
            angle, rho = rng.uniform(0, 2 * np.pi), np.sqrt(rng.uniform()) * margin
            cu, cv = cu0 + rho * np.cos(angle) * ru, cv0 + rho * np.sin(angle) * rv
            off_heart = ((cu - heart[0]) / heart[2]) ** 2 + ((cv - heart[1]) / heart[3]) ** 2 > 1.4 ** 2
            if off_heart and all(math.hypot(cu - au, cv - av) > dist for au, av, dist in avoid):
                return cu, cv
        return None

    def zone(lung_index, cv):
        t = (cv - lungs[lung_index][1]) / lungs[lung_index][3]
        return "upper" if t < -0.25 else ("lower" if t > 0.25 else "middle")

    name = PHANTOM_CLASSES[label]
    if name == "normal":
        return field, hard, "no lesion, clear lungs"
    if name in ("nodule", "multiple nodules"):
        count = 1 if name == "nodule" else int(rng.integers(2, 4))
        placed, sides = [], []
        for _ in range(count):
            lung_index, r = int(rng.integers(2)), float(rng.uniform(0.07, 0.11))
            avoid = [(pu, pv, pr + r + 0.12) for pu, pv, pr in placed]  # separate blobs, countable
            point = place(lung_index, 0.7, avoid)
            if point is None:  # this lung is crowded: the other one has room for a third nodule
                lung_index = 1 - lung_index
                point = place(lung_index, 0.7, avoid)
            cu, cv = point
            d = np.sqrt((u - cu) ** 2 + (v - cv) ** 2) / r
            field += float(rng.uniform(0.28, 0.38)) * _soft_inside(d, r, s) * lung_inside[lung_index]
            hard |= (d < 1) & lung_inside[lung_index]
            placed.append((cu, cv, r))
            sides.append(lung_index)
        if count == 1:
            return field, hard, f"a nodule in the {side_names[sides[0]]} {zone(sides[0], placed[0][1])} lung"
        where = f"the {side_names[sides[0]]} lung" if len(set(sides)) == 1 else "both lungs"
        return field, hard, f"{('two', 'three')[count - 2]} nodules in {where}"
    # consolidation: a cluster of overlapping Gaussian blobs with a mottled texture
    lung_index = int(rng.integers(2))
    cu, cv = place(lung_index, 0.55)  # only the heart to avoid: 100 tries never all miss
    blobs = np.zeros_like(u)
    for _ in range(int(rng.integers(3, 5))):
        bu, bv = cu + rng.normal(0, 0.07), cv + rng.normal(0, 0.09)
        sigma = rng.uniform(0.07, 0.11)
        blobs += np.exp(-((u - bu) ** 2 + (v - bv) ** 2) / (2 * sigma ** 2))
    hard = (blobs > 0.5) & lung_inside[lung_index]
    texture = 0.75 + 0.5 * rng.random(u.shape)
    field = float(rng.uniform(0.2, 0.28)) * np.clip((blobs - 0.35) / 0.3, 0, 1) * texture
    field = field * lung_inside[lung_index]
    return field, hard, f"consolidation in the {side_names[lung_index]} {zone(lung_index, cv)} lung"


def _draw_anatomy(rng, finding, u, v, lungs, lung_softs, lung_soft, s):
    """Intensity (H,W) and caption of an "anatomy" finding (cardiomegaly is drawn with the heart); lung_softs:
    each lung's soft-edged inside, lung_soft: both lungs'."""
    field = np.zeros_like(u)
    if finding == "normal":
        return field, "normal heart size, clear lungs"
    if finding == "cardiomegaly":
        return field, "enlarged cardiac silhouette"
    if finding == "pleural effusion":  # fluid fills the lung base, its meniscus rising laterally
        sides = (0, 1) if rng.uniform() < 0.3 else (int(rng.integers(2)),)
        for i in sides:
            cu, cv, ru, rv = lungs[i]
            lateral = np.clip((u - cu) * (1 if i else -1) / ru, 0, 1)
            level = cv + rv * rng.uniform(-0.05, 0.35) - 0.2 * rv * lateral
            fluid = np.clip((v - level) * s / 3 + 0.5, 0, 1)
            field += float(rng.uniform(0.22, 0.28)) * fluid * lung_softs[i]
        where = "both" if len(sides) == 2 else ("right", "left")[sides[0]]
        return field, f"pleural effusion, {where} side"
    # interstitial pattern: a fine net of lines over both lungs
    period = rng.uniform(0.16, 0.2)
    net = np.zeros_like(u)
    for angle in rng.uniform(0, np.pi, 3):
        phase = (u * np.cos(angle) + v * np.sin(angle)) / period + rng.uniform()
        net = np.maximum(net, np.cos(2 * np.pi * phase) ** 8)
    return float(rng.uniform(0.1, 0.14)) * net * lung_soft, "reticular interstitial pattern in both lungs"


class PhantomDataset(torch.utils.data.Dataset):
    """`n` phantoms (see make_phantom), item i seeded by (seed, split, i): the same item every time,
    in any worker, in any order; different splits never share an image. Labels are uniform over
    PHANTOM_TASKS[task]. `transform` applies to the image only (classification, DINO); for
    segmentation give `pair_transform(image, mask) -> (image, mask)` instead."""

    def __init__(self, n, img_size=64, seed=0, split="train", transform=None, pair_transform=None, task="lesions"):
        if transform is not None and pair_transform is not None:
            raise ValueError("give transform (image only) or pair_transform (image and mask), not both")
        if img_size < 16:
            raise ValueError(f"phantom img_size {img_size}: expected >= 16 px (lesions vanish below)")
        self.n, self.img_size, self.seed, self.split = n, img_size, seed, split
        if task not in PHANTOM_TASKS:
            raise ValueError(f"phantom task: expected one of {tuple(PHANTOM_TASKS)}, found {task!r}")
        self.transform, self.pair_transform, self.task = transform, pair_transform, task
        self.classes = list(PHANTOM_TASKS[task])

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if not 0 <= i < self.n:
            raise IndexError(f"phantom index {i} out of range [0, {self.n})")
        rng = np.random.default_rng([self.seed, zlib.crc32(self.split.encode()), i])
        item = make_phantom(rng, self.img_size, int(rng.integers(len(self.classes))), self.task)
        if self.transform:
            item["image"] = self.transform(item["image"])
        if self.pair_transform:
            item["image"], item["mask"] = self.pair_transform(item["image"], item["mask"])
        return item


# ----------------------------------------------------------------------------------------------
# Augmentations in plain torch. Inputs are (3,H,W) or (B,3,H,W) floats in [0,1] (before normalize);
# a batch gets one random draw per call. generator=None draws from torch's global RNG, which
# DataLoader workers seed per worker, so seeded runs are reproducible either way.
# ----------------------------------------------------------------------------------------------

def _rand(generator):
    return torch.rand((), generator=generator).item()


def _uniform(low, high, generator):
    return low + (high - low) * _rand(generator)


def _size2(size):
    return (size, size) if isinstance(size, int) else tuple(size)


def _batched(fn, img):
    """Run `fn` on a (B,C,H,W) view of img and give back img's own rank."""
    out = fn(img[None] if img.ndim == 3 else img)
    return out[0] if img.ndim == 3 else out


def resize(img, size):
    """Bicubic resize to `size` (int: square; or (h, w)), antialiased when shrinking (as PIL is),
    clamped to [0,1] because bicubic overshoots at edges."""
    size = _size2(size)
    if tuple(img.shape[-2:]) == size:
        return img
    return _batched(lambda x: F.interpolate(x, size=size, mode="bicubic", align_corners=False,
                                            antialias=True).clamp_(0, 1), img)


def resize_mask(mask, size):
    """Nearest-neighbour resize of an integer mask (H,W) or (B,H,W): class indices must stay indices."""
    size = _size2(size)
    if tuple(mask.shape[-2:]) == size:
        return mask
    x = mask[None, None] if mask.ndim == 2 else mask[:, None]
    out = F.interpolate(x.float(), size=size, mode="nearest-exact").to(mask.dtype)
    return out[0, 0] if mask.ndim == 2 else out[:, 0]


def center_crop(img, size):
    """Central (h, w) crop of an image or mask (the last two dims)."""
    h, w = _size2(size)
    H, W = img.shape[-2:]
    if h > H or w > W:
        raise ValueError(f"center_crop to {h}x{w} of a {H}x{W} image: the crop must fit")
    top, left = (H - h) // 2, (W - w) // 2
    return img[..., top:top + h, left:left + w]


def center_square(img, size):
    """The largest central square of an image, resized to size x size: how every eval and
    pretraining source image is made square without stretching it."""
    return resize(center_crop(img, min(img.shape[-2:])), size)


def random_resized_crop_box(height, width, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), generator=None):
    """(top, left, h, w) as torchvision's RandomResizedCrop draws it: area fraction ~ U(scale),
    log aspect ~ U(log ratio), ten tries, then a central crop of the clamped aspect."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * _uniform(scale[0], scale[1], generator)
        aspect = math.exp(_uniform(log_ratio[0], log_ratio[1], generator))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (), generator=generator))
            left = int(torch.randint(0, width - w + 1, (), generator=generator))
            return top, left, h, w
    h, w = fallback_crop_size(height, width, ratio)
    return (height - h) // 2, (width - w) // 2, h, w


def fallback_crop_size(height, width, ratio):
    """(h, w) of RandomResizedCrop's central crop when ten tries found no box: the whole image with
    its aspect clamped to `ratio`."""
    in_ratio = width / height
    if in_ratio < min(ratio):
        return int(round(width / min(ratio))), width
    if in_ratio > max(ratio):
        return height, int(round(height * max(ratio)))
    return height, width


def random_resized_crop(img, size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), generator=None):
    """Crop a random box (random_resized_crop_box) and resize it bicubic to `size`."""
    top, left, h, w = random_resized_crop_box(img.shape[-2], img.shape[-1], scale, ratio, generator)
    return resize(img[..., top:top + h, left:left + w], size)


def random_resized_crop_pair(img, mask, size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), generator=None):
    """The same random box for an image (bicubic) and its mask (nearest)."""
    top, left, h, w = random_resized_crop_box(img.shape[-2], img.shape[-1], scale, ratio, generator)
    return (resize(img[..., top:top + h, left:left + w], size),
            resize_mask(mask[..., top:top + h, left:left + w], size))


def random_horizontal_flip(img, p=0.5, generator=None):
    return img.flip(-1) if _rand(generator) < p else img


def random_horizontal_flip_pair(img, mask, p=0.5, generator=None):
    """Flip image and mask together. Use p=0 when classes are sided (left/right lung)."""
    return (img.flip(-1), mask.flip(-1)) if _rand(generator) < p else (img, mask)


def _rotate(x, angle_deg, mode):
    theta = math.radians(angle_deg)
    matrix = torch.tensor([[math.cos(theta), -math.sin(theta), 0.0],
                           [math.sin(theta), math.cos(theta), 0.0]], dtype=torch.float32)
    grid = F.affine_grid(matrix[None].expand(x.shape[0], 2, 3), list(x.shape), align_corners=False)
    # zeros outside: black, like the background of a radiograph
    return F.grid_sample(x.float(), grid, mode=mode, padding_mode="zeros", align_corners=False)


def random_rotation(img, degrees=10.0, generator=None):
    """Rotate by an angle ~ U(-degrees, degrees) about the centre (bilinear, black corners)."""
    angle = _uniform(-degrees, degrees, generator)
    return _batched(lambda x: _rotate(x, angle, "bilinear").clamp_(0, 1), img)


def random_rotation_pair(img, mask, degrees=10.0, generator=None):
    angle = _uniform(-degrees, degrees, generator)
    m = mask[None, None] if mask.ndim == 2 else mask[:, None]
    rotated_mask = _rotate(m, angle, "nearest").to(mask.dtype)
    rotated_mask = rotated_mask[0, 0] if mask.ndim == 2 else rotated_mask[:, 0]
    return _batched(lambda x: _rotate(x, angle, "bilinear").clamp_(0, 1), img), rotated_mask


def _grayscale(x):
    """ITU-R 601 luma, (B,1,H,W), as PIL and torchvision compute it."""
    return (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2])[:, None]


def _rgb_to_hsv(x):
    r, g, b = x.unbind(1)
    maxc, minc = x.max(1).values, x.min(1).values
    delta = maxc - minc
    s = torch.where(maxc > 0, delta / maxc.clamp_min(1e-12), torch.zeros_like(maxc))
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(delta > 0, (h / 6.0) % 1.0, torch.zeros_like(h))
    return h, s, maxc


def _hsv_to_rgb(h, s, v):
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.long() % 6
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    choices = torch.stack([torch.stack(c, 1) for c in
                           ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))], 0)
    index = i[None, :, None].expand(1, -1, 3, -1, -1)
    return choices.gather(0, index)[0]


def _adjust_hue(x, shift):
    h, s, v = _rgb_to_hsv(x)
    return _hsv_to_rgb((h + shift) % 1.0, s, v)


def color_jitter(img, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1, p=1.0, generator=None):
    """torchvision's ColorJitter (factors ~ U(1-x, 1+x), hue shift ~ U(-hue, hue), the four in a
    random order), applied with probability p. On gray images only brightness and contrast act."""
    if _rand(generator) >= p:
        return img
    order = torch.randperm(4, generator=generator).tolist()
    factors = [_uniform(max(0.0, 1 - x), 1 + x, generator) for x in (brightness, contrast, saturation)]
    shift = _uniform(-hue, hue, generator)

    def apply(x):
        # saturation and hue leave gray pixels as they are: skip them on radiographs (the HSV round
        # trip is half the cost of a DINO view); brightness and contrast keep gray images gray
        gray = torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 1], x[:, 2])
        for op in order:
            if op == 0:
                x = (x * factors[0]).clamp(0, 1)
            elif op == 1:
                mean = _grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
                x = (factors[1] * x + (1 - factors[1]) * mean).clamp(0, 1)
            elif op == 2 and not gray:
                x = (factors[2] * x + (1 - factors[2]) * _grayscale(x)).clamp(0, 1)
            elif op == 3 and not gray and shift != 0:
                x = _adjust_hue(x, shift)
        return x

    return _batched(apply, img)


def random_grayscale(img, p=0.2, generator=None):
    if _rand(generator) >= p:
        return img
    return _batched(lambda x: _grayscale(x).expand(-1, 3, -1, -1).contiguous(), img)


def gaussian_blur(img, sigma=(0.1, 2.0), p=0.5, kernel_size=9, generator=None):
    """With probability p, a Gaussian blur of sigma ~ U(sigma) px, kernel_size taps (9 as DINOv2),
    reflect padding."""
    if _rand(generator) >= p:
        return img
    s = _uniform(sigma[0], sigma[1], generator)
    x = torch.arange(kernel_size, dtype=torch.float32) - (kernel_size - 1) / 2
    kernel = torch.exp(-x ** 2 / (2 * s ** 2))
    kernel = (kernel / kernel.sum()).to(img.dtype)
    pad = kernel_size // 2

    def blur(b):
        c = b.shape[1]
        mode = "reflect" if min(b.shape[-2:]) > pad else "replicate"
        b = F.pad(b, (pad, pad, pad, pad), mode=mode)
        b = F.conv2d(b, kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
        return F.conv2d(b, kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)

    return _batched(blur, img)


def solarize(img, threshold=0.5, p=0.2, generator=None):
    """With probability p, invert the pixels >= threshold (torchvision's RandomSolarize(128) on uint8)."""
    if _rand(generator) >= p:
        return img
    return torch.where(img >= threshold, 1.0 - img, img)


def normalize(img, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    mean = torch.tensor(mean, dtype=img.dtype, device=img.device).view(-1, 1, 1)
    std = torch.tensor(std, dtype=img.dtype, device=img.device).view(-1, 1, 1)
    return (img - mean) / std


def denormalize(img, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """normalize's inverse, for saving pictures."""
    mean = torch.tensor(mean, dtype=img.dtype, device=img.device).view(-1, 1, 1)
    std = torch.tensor(std, dtype=img.dtype, device=img.device).view(-1, 1, 1)
    return img * std + mean


class ClassificationTransform:
    """Fine-tuning / probing input pipeline -> normalised (3,size,size).
    train: random resized crop (scale), horizontal flip (hflip_p), rotation (+-rotation_deg), as
    OmniRad's classification recipe ("random flips, rotations, and resized crops");
    eval: centre square crop, resize."""

    def __init__(self, size=224, train=True, scale=(0.5, 1.0), hflip_p=0.5, rotation_deg=10.0,
                 generator=None):
        self.size, self.train, self.scale = size, train, scale
        self.hflip_p, self.rotation_deg, self.generator = hflip_p, rotation_deg, generator

    def __call__(self, img):
        g = self.generator
        if self.train:
            img = random_resized_crop(img, self.size, self.scale, generator=g)
            img = random_horizontal_flip(img, self.hflip_p, generator=g)
            if self.rotation_deg:
                img = random_rotation(img, self.rotation_deg, generator=g)
        else:
            # centre square, then resize: no distortion (RAD-DINO's "centre-cropping and resizing")
            img = center_square(img, self.size)
        return normalize(img)


class SegmentationTransform:
    """(image, mask) -> (normalised (3,size,size), int64 (size,size)).
    train: the same random resized crop / flip / rotation for both (mask nearest); hflip_p=0 for
    sided classes (left vs right lung). eval: centre square crop, resize."""

    def __init__(self, size=224, train=True, scale=(0.5, 1.0), hflip_p=0.5, rotation_deg=10.0,
                 generator=None):
        self.size, self.train, self.scale = size, train, scale
        self.hflip_p, self.rotation_deg, self.generator = hflip_p, rotation_deg, generator

    def __call__(self, img, mask):
        g = self.generator
        if self.train:
            img, mask = random_resized_crop_pair(img, mask, self.size, self.scale, generator=g)
            img, mask = random_horizontal_flip_pair(img, mask, self.hflip_p, generator=g)
            if self.rotation_deg:
                img, mask = random_rotation_pair(img, mask, self.rotation_deg, generator=g)
        else:
            side = min(img.shape[-2:])
            img, mask = resize(center_crop(img, side), self.size), resize_mask(center_crop(mask, side), self.size)
        return normalize(img), mask


# DINOv2's photometric recipe (dinov2/data/augmentations.py), shared by both DINO augmentations
DINO_JITTER = (0.4, 0.4, 0.2, 0.1)  # colour jitter strengths: brightness, contrast, saturation, hue
DINO_JITTER_P, DINO_GRAYSCALE_P, DINO_BLUR_SIGMA = 0.8, 0.2, (0.1, 2.0)


def check_view_strengths(jitter, blur_probs, solarize_p):
    """One-line errors for DINOv2 photometric settings out of range, named as pretrain.py's keys."""
    if len(jitter) != 4 or min(jitter) < 0 or jitter[3] > 0.5:
        raise ValueError(f"color_jitter: expected (brightness, contrast, saturation, hue) >= 0 with hue <= 0.5, "
                         f"found {jitter}")
    if len(blur_probs) != 3 or not all(0 <= p <= 1 for p in blur_probs):
        raise ValueError(f"blur_probs: expected 3 probabilities (global 1, global 2, local) in [0, 1], found {blur_probs}")
    if not 0 <= solarize_p <= 1:
        raise ValueError(f"solarize_p: expected a probability in [0, 1], found {solarize_p}")


class DinoAugmentation:
    """DINOv2's multi-crop views of one image (3,H,W) in [0,1] -> {"global_crops": [2 normalised
    (3,G,G)], "local_crops": [n_local_crops normalised (3,L,L)]}.
    `jitter` (brightness, contrast, saturation, hue), `blur_probs` (global 1, global 2, local) and
    `solarize_p` set the photometric strengths and probabilities.

    Each crop: random resized crop (bicubic) + horizontal flip, colour jitter (0.4, 0.4, 0.2, 0.1)
    with p=0.8, grayscale p=0.2; then global 1: blur p=1.0; global 2: blur p=0.1 + solarize p=0.2;
    locals: blur p=0.5 (the BYOL asymmetry DINOv2 describes). Note: DINOv2's code passes 1-p to
    torchvision's RandomApply, so its released checkpoints saw blur p = (0.0, 0.9, 0.5);
    blur_probs=(0.0, 0.9, 0.5) reproduces that.

    Defaults are DINOv2's (224/96 px, scales (0.32, 1) / (0.05, 0.32), 8 locals). n_local_crops=0 is
    OmniRad's global-only mode. RAD-DINO (App. C.1) samples crop sides ~ U(259, 518) for 518 px
    global crops and U(104, 259) for 196 px locals: area scales ~(0.25, 1.0) and ~(0.04, 0.25).
    """

    def __init__(self, global_crops_size=224, local_crops_size=96, n_local_crops=8,
                 global_crops_scale=(0.32, 1.0), local_crops_scale=(0.05, 0.32),
                 blur_probs=(1.0, 0.1, 0.5), solarize_p=0.2, jitter=DINO_JITTER, generator=None):
        check_view_strengths(jitter, blur_probs, solarize_p)
        self.global_crops_size, self.local_crops_size = global_crops_size, local_crops_size
        self.n_local_crops = n_local_crops
        self.global_crops_scale, self.local_crops_scale = global_crops_scale, local_crops_scale
        self.blur_probs, self.solarize_p, self.jitter, self.generator = blur_probs, solarize_p, tuple(jitter), generator

    def _view(self, img, size, scale, blur_p, solarize_p):
        g = self.generator
        x = random_resized_crop(img, size, scale, generator=g)
        x = random_horizontal_flip(x, p=0.5, generator=g)
        x = color_jitter(x, *self.jitter, p=DINO_JITTER_P, generator=g)
        x = random_grayscale(x, p=DINO_GRAYSCALE_P, generator=g)
        x = gaussian_blur(x, DINO_BLUR_SIGMA, p=blur_p, generator=g)
        if solarize_p:
            x = solarize(x, 0.5, p=solarize_p, generator=g)
        return normalize(x)

    def __call__(self, img):
        blur_global1, blur_global2, blur_local = self.blur_probs
        g_size, g_scale = self.global_crops_size, self.global_crops_scale
        return {
            "global_crops": [self._view(img, g_size, g_scale, blur_global1, 0.0),
                             self._view(img, g_size, g_scale, blur_global2, self.solarize_p)],
            "local_crops": [self._view(img, self.local_crops_size, self.local_crops_scale, blur_local, 0.0)
                            for _ in range(self.n_local_crops)],
        }


# ----------------------------------------------------------------------------------------------
# DinoAugmentation for a whole batch at once, on the training device. Every random choice is still
# drawn per image (sample_view_params), so the views follow DinoAugmentation's distribution; only
# the loop over images is gone. apply_view_params makes the views from given choices (pure).
# ----------------------------------------------------------------------------------------------

def random_resized_crop_boxes(n, height, width, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), generator=None,
                              device="cpu"):
    """n boxes long (n, 4) = (top, left, h, w), each drawn as random_resized_crop_box draws one: the
    ten tries are drawn at once and the first that fits is kept; when none fits, the central crop
    of the clamped aspect. Float64, so h and w round as Python's round() does in the reference."""
    rand = lambda *shape: torch.rand(shape, generator=generator, device=device, dtype=torch.float64)
    area = height * width * (scale[0] + (scale[1] - scale[0]) * rand(n, 10))
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    aspect = torch.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * rand(n, 10))
    w = torch.round(torch.sqrt(area * aspect)).long()
    h = torch.round(torch.sqrt(area / aspect)).long()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.long().argmax(1, keepdim=True)  # argmax gives the first of equal maxima
    found = fits.any(1)
    h, w = h.gather(1, first)[:, 0], w.gather(1, first)[:, 0]
    fallback_h, fallback_w = fallback_crop_size(height, width, ratio)
    h = torch.where(found, h, fallback_h)
    w = torch.where(found, w, fallback_w)
    # randint(0, height - h + 1) of the reference, as the floor of a uniform draw
    top = torch.where(found, (rand(n) * (height - h + 1)).floor().long(), (height - h) // 2)
    left = torch.where(found, (rand(n) * (width - w + 1)).floor().long(), (width - w) // 2)
    return torch.stack([top, left, h, w], 1)


def sample_view_params(n_images, height, width, scale, blur_probs, solarize_probs, jitter=DINO_JITTER, generator=None,
                       device="cpu"):
    """Every random choice of len(blur_probs) DinoAugmentation views of n_images images of height x
    width, drawn per view: row v * n_images + i is view v of image i (view-major, as the crops are
    collated). View v blurs with probability blur_probs[v] and solarizes with solarize_probs[v]."""
    n = len(blur_probs) * n_images
    rand = lambda *shape: torch.rand(shape, generator=generator, device=device)
    per_view = lambda probs: torch.tensor(probs, device=device).repeat_interleave(n_images)
    strengths = torch.tensor(jitter[:3], device=device, dtype=torch.float32)
    hue = jitter[3]
    return {
        "box": random_resized_crop_boxes(n, height, width, scale, generator=generator, device=device),
        "flip": rand(n) < 0.5,
        "jitter": rand(n) < DINO_JITTER_P,
        "jitter_order": rand(n, 4).argsort(1),  # a uniform random order of the four, as torch.randperm(4)
        "jitter_factors": 1 - strengths + 2 * strengths * rand(n, 3),  # ~ U(1 - x, 1 + x)
        "hue_shift": -hue + 2 * hue * rand(n),
        "grayscale": rand(n) < DINO_GRAYSCALE_P,
        "blur": rand(n) < per_view(blur_probs),
        "blur_sigma": DINO_BLUR_SIGMA[0] + (DINO_BLUR_SIGMA[1] - DINO_BLUR_SIGMA[0]) * rand(n),
        "solarize": rand(n) < per_view(solarize_probs),
    }


def _bicubic_antialias_kernel(d):
    """The cubic convolution kernel (a = -0.5, PIL's) that torch's antialiased bicubic resize uses."""
    a, d = -0.5, d.abs()
    near = ((a + 2) * d - (a + 3)) * d * d + 1
    far = ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
    return torch.where(d < 1, near, torch.where(d < 2, far, torch.zeros_like(d)))


def resize_weights(start, length, in_size, out_size):
    """(n, out_size, in_size) matrices: row i of matrix k takes pixels [start[k], start[k] + length[k])
    of a line of in_size pixels to output pixel i as resize() does (torch's bicubic with
    antialias=True: the kernel stretched by the shrink factor, weights normalised over the pixels
    inside the crop). The weights are computed on the few taps each output pixel reads, then
    scattered into the dense matrices."""
    length = length.to(torch.float32)
    scale = length / out_size
    stretch = scale.clamp(min=1)[:, None, None]
    support = 2 * stretch  # the kernel is zero beyond 2 (stretched) pixels
    n_taps = math.floor(4 * max(in_size / out_size, 1)) + 2  # enough for the longest crop, the whole line
    center = scale[:, None, None] * (torch.arange(out_size, device=start.device)[:, None] + 0.5)  # crop coordinates
    first = torch.floor(center - 0.5 - support) + 1
    j = first + torch.arange(n_taps, device=start.device)  # (n, out_size, n_taps) crop coordinates
    w = _bicubic_antialias_kernel((j + 0.5 - center) / stretch) * ((j >= 0) & (j < length[:, None, None]))
    w = w / w.sum(-1, keepdim=True)
    column = (start[:, None, None] + j.long()).clamp(0, in_size - 1)  # taps outside the crop carry weight 0
    return torch.zeros(len(start), out_size, in_size, device=start.device).scatter_add_(2, column, w)


def resized_crops(images, boxes, flips, size):
    """Crops (n, 3, size, size) in [0,1] of images (B,3,H,W): row v * B + i is boxes[row] of image i,
    resized as resize() does and mirrored where flips[row]. A resize is linear and separable, so a
    crop is Wy @ image @ Wx^T with its own weight matrices (a flip reverses Wx's rows): two batched
    matmuls for every crop of the batch, equal to the per-image crop + resize up to float rounding
    (on CUDA with TF32 matmuls allowed, as pretrain.py allows them, ~1e-3: below 8-bit quantisation)."""
    B, _, H, W = images.shape
    n_views = len(boxes) // B
    top, left, h, w = boxes.unbind(1)
    wy = resize_weights(top, h, H, size).view(n_views, B, size, H)
    wx = resize_weights(left, w, W, size)
    wx = torch.where(flips[:, None, None], wx.flip(1), wx).view(n_views, B, size, W)
    x = torch.einsum("vbyh,bchw->vbcyw", wy, images)
    x = torch.einsum("vbcyw,vbxw->vbcyx", x, wx)
    return x.flatten(0, 1).clamp_(0, 1)  # bicubic overshoots at edges


def _per_row(t):
    return t.view(-1, 1, 1, 1)


def color_jitter_per_image(x, apply, order, factors, hue_shift, gray):
    """color_jitter with each image's own draw: apply (n,) bool; order (n, 4), a permutation of
    0 brightness, 1 contrast, 2 saturation, 3 hue; factors (n, 3) of the first three; hue_shift (n,);
    gray (n,) bool: saturation and hue are skipped on gray images, as color_jitter skips them.
    Brightness, contrast and saturation are one blend x' = f x + (1 - f) ref, with ref = 0, the
    mean gray level, the gray image: one pass per position of the order, f = 1 where nothing acts."""
    any_colour = bool((apply & ~gray).any())  # radiograph batches skip the HSV round trip (one sync)
    for position in range(4):
        op = order[:, position]
        factor = factors.gather(1, op.clamp(max=2)[:, None])[:, 0]
        acts = apply & (op < 3) & ~((op == 2) & gray)
        factor = _per_row(torch.where(acts, factor, torch.ones_like(factor)))
        luma = _grayscale(x)
        reference = torch.where(_per_row(op == 0), 0.0,
                                torch.where(_per_row(op == 1), luma.mean(dim=(1, 2, 3), keepdim=True), luma))
        x = torch.lerp(reference, x, factor).clamp_(0, 1)  # exactly x where factor = 1
        if any_colour:
            x = torch.where(_per_row(apply & (op == 3) & ~gray), _adjust_hue(x, hue_shift.view(-1, 1, 1)), x)
    return x


def gaussian_blur_per_image(x, sigma, kernel_size=9):
    """gaussian_blur of every image (n,C,H,W) with its own sigma (n,): one grouped separable
    convolution with per-image kernels, reflect padding as gaussian_blur."""
    n, c, H, W = x.shape
    taps = torch.arange(kernel_size, dtype=x.dtype, device=x.device) - (kernel_size - 1) / 2
    kernel = torch.exp(-taps ** 2 / (2 * sigma[:, None].to(x.dtype) ** 2))
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (n * c, kernel_size)
    pad = kernel_size // 2
    mode = "reflect" if min(H, W) > pad else "replicate"
    y = F.pad(x.reshape(1, n * c, H, W), (pad, pad, pad, pad), mode=mode)
    y = F.conv2d(y, kernel.view(n * c, 1, 1, kernel_size), groups=n * c)
    y = F.conv2d(y, kernel.view(n * c, 1, kernel_size, 1), groups=n * c)
    return y.view(n, c, H, W)


def is_gray(images):
    """(B,) bool: the three channels are equal (gray replicated, as every radiograph here is)."""
    return ((images[:, 0] == images[:, 1]) & (images[:, 1] == images[:, 2])).flatten(1).all(1)


def apply_view_params(images, params, size):
    """The views `params` (sample_view_params) describe, of images (B,3,H,W) in [0,1]: normalised
    (n_views * B, 3, size, size), view-major, each made as DinoAugmentation._view makes it: crop +
    resize + flip, colour jitter, grayscale, blur, solarize, normalize. Pure: no random draws."""
    x = resized_crops(images, params["box"], params["flip"], size)
    gray = is_gray(images).repeat(len(x) // len(images))
    x = color_jitter_per_image(x, params["jitter"], params["jitter_order"], params["jitter_factors"],
                               params["hue_shift"], gray)
    x = torch.where(_per_row(params["grayscale"]), _grayscale(x).expand_as(x), x)
    x = torch.where(_per_row(params["blur"]), gaussian_blur_per_image(x, params["blur_sigma"]), x)
    x = torch.where(_per_row(params["solarize"]) & (x >= 0.5), 1.0 - x, x)
    return normalize(x)


class BatchedDinoAugmentation:
    """DinoAugmentation's views of a batch images (B,3,H,W) in [0,1], on the images' device, every
    random choice drawn per image from `generator` (a torch.Generator on that device; None: torch's
    default one there) -> {"global_crops": (2B,3,G,G), "local_crops": (nB,3,L,L) or None}, crop-major
    as MaskedCollate lays them out. Images must share one size (pretrain.py resizes them to a
    square source first); crops are resized from that source, not from the original file."""

    def __init__(self, global_crops_size=224, local_crops_size=96, n_local_crops=8,
                 global_crops_scale=(0.32, 1.0), local_crops_scale=(0.05, 0.32),
                 blur_probs=(1.0, 0.1, 0.5), solarize_p=0.2, jitter=DINO_JITTER):
        check_view_strengths(jitter, blur_probs, solarize_p)
        self.global_crops_size, self.local_crops_size = global_crops_size, local_crops_size
        self.n_local_crops = n_local_crops
        self.global_crops_scale, self.local_crops_scale = global_crops_scale, local_crops_scale
        self.blur_probs, self.solarize_p, self.jitter = blur_probs, solarize_p, tuple(jitter)

    def __call__(self, images, generator=None):
        B, _, H, W = images.shape
        blur_global1, blur_global2, blur_local = self.blur_probs
        draw = dict(generator=generator, device=images.device)
        global_params = sample_view_params(B, H, W, self.global_crops_scale, (blur_global1, blur_global2),
                                           (0.0, self.solarize_p), self.jitter, **draw)
        out = {"global_crops": apply_view_params(images, global_params, self.global_crops_size), "local_crops": None}
        if self.n_local_crops:
            local_params = sample_view_params(B, H, W, self.local_crops_scale, (blur_local,) * self.n_local_crops,
                                              (0.0,) * self.n_local_crops, self.jitter, **draw)
            out["local_crops"] = apply_view_params(images, local_params, self.local_crops_size)
        return out


# ----------------------------------------------------------------------------------------------
# iBOT block masking (BEiT / DINOv2 dinov2/data/masking.py semantics) and the batch collate
# ----------------------------------------------------------------------------------------------

class MaskingGenerator:
    """Masks of rectangular blocks on a grid_h x grid_w patch grid. Each block has an area drawn
    from U(min_num_patches, remaining budget capped at max_num_patches) and a log-uniform aspect in
    [min_aspect, max_aspect (default 1/min_aspect)]; a block is kept only if it adds at least one new
    patch without overshooting the budget; ten tries per block, and masking stops when a block
    cannot be placed. max_num_patches defaults to half the grid, as DINOv2's train.py sets it."""

    def __init__(self, grid_h, grid_w, min_num_patches=4, max_num_patches=None, min_aspect=0.3,
                 max_aspect=None):
        self.grid_h, self.grid_w = grid_h, grid_w
        self.num_patches = grid_h * grid_w
        self.min_num_patches = min_num_patches
        self.max_num_patches = 0.5 * self.num_patches if max_num_patches is None else max_num_patches
        max_aspect = max_aspect or 1 / min_aspect
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))

    def add_block(self, mask, max_patches, generator=None):
        """Mask one more block in `mask` (bool (grid_h, grid_w), in place); return how many patches
        it newly masked (0 if ten tries failed)."""
        for _ in range(10):
            target_area = _uniform(self.min_num_patches, max_patches, generator)
            aspect = math.exp(_uniform(*self.log_aspect_ratio, generator))
            h = int(round(math.sqrt(target_area * aspect)))
            w = int(round(math.sqrt(target_area / aspect)))
            if w < self.grid_w and h < self.grid_h:
                top = int(torch.randint(0, self.grid_h - h + 1, (), generator=generator))
                left = int(torch.randint(0, self.grid_w - w + 1, (), generator=generator))
                block = mask[top:top + h, left:left + w]
                new = h * w - int(block.sum())
                if 0 < new <= max_patches:
                    block.fill_(True)
                    return new
        return 0

    def __call__(self, num_masking_patches=0, generator=None):
        mask = torch.zeros(self.grid_h, self.grid_w, dtype=torch.bool)
        count = 0
        while count < num_masking_patches:
            budget = min(num_masking_patches - count, self.max_num_patches)
            new = self.add_block(mask, budget, generator)
            if new == 0:
                break
            count += new
        return mask


# ----------------------------------------------------------------------------------------------
# Pretraining batches: a pure function of (seed, step), so a resumed run sees exactly the batches
# it would have seen
# ----------------------------------------------------------------------------------------------

DATA_KINDS = ("phantom", "medmnist", "csv")


def data_kind(dataset, data_path):
    """Which loader a stage uses for (dataset, data_path): `dataset` when set, else what data_path is
    ("" -> phantom, .npz -> medmnist, .csv -> csv). A given path is never ignored: a contradiction
    or a missing file is an error here, before any work."""
    suffix = Path(data_path).suffix if data_path else ""
    looks_like = "phantom" if not data_path else {".npz": "medmnist", ".csv": "csv"}.get(suffix)
    if dataset and dataset not in DATA_KINDS:
        raise ValueError(f"dataset: expected one of {', '.join(DATA_KINDS)} (or '' to go by data_path), found {dataset!r}")
    if not dataset and looks_like is None:
        raise ValueError(f"data_path: expected a MedMNIST .npz or a CSV index (or set dataset), found {data_path!r}")
    kind = dataset or looks_like
    if kind == "phantom" and data_path:
        raise ValueError(f"data_path: dataset='phantom' uses no files, found data_path={data_path!r}; drop one of them")
    if kind != "phantom" and not data_path:
        raise ValueError(f"data_path: dataset={kind!r} expected a file, found ''")
    if looks_like not in (None, kind):
        raise ValueError(f"dataset: {kind!r} contradicts data_path {data_path} (a {suffix} file is {looks_like})")
    if suffix and not Path(data_path).is_file():
        raise FileNotFoundError(f"data_path: {data_path} not found")
    return kind


def open_images(source, split, phantom_sizes=(2000, 500, 500), phantom_px=64, label_column=None,
                phantom_task="lesions", intensity="full_range"):
    """Images in [0, 1] from one source: "phantom", a MedMNIST .npz, a CSV index or a folder (PNG, JPEG, DICOM).
    Items {"image"} (and {"label"} when label_column is given for a CSV, always for npz/phantoms).
    phantom_sizes: phantom images per split (train, val, test); intensity: how 16-bit image files become
    [0, 1] (read_image)."""
    check_intensity(intensity)
    if source == "phantom":
        return PhantomDataset(phantom_sizes[SPLITS.index(split)], img_size=phantom_px, seed=0, split=split,
                              task=phantom_task)
    path = Path(source)
    if path.suffix == ".npz":
        return ArrayImageDataset(*load_medmnist(str(path), split))
    if path.suffix == ".csv":
        return ImageFolderDataset(path, split=split, label_column=label_column, intensity=intensity)
    if path.is_dir():
        return ImageFolderDataset(path, intensity=intensity)
    raise FileNotFoundError(f"data source '{source}': expected 'phantom', a MedMNIST .npz, a CSV index with a "
                            f"split column, or a folder of images")


def item_seed(seed, *position):
    return int(np.random.SeedSequence([seed, *position]).generate_state(1)[0])


class MultiCropDataset(torch.utils.data.Dataset):
    """Key (image index, crop seed, batch seed) -> DINOv2 crops of that image drawn with that seed."""

    def __init__(self, images, **augmentation):
        DinoAugmentation(**augmentation)  # its settings are checked now, not in a loader worker
        self.images, self.augmentation = images, augmentation

    def __len__(self):
        return len(self.images)

    def __getitem__(self, key):
        index, crop_seed, batch_seed = key
        generator = torch.Generator().manual_seed(crop_seed)
        crops = DinoAugmentation(**self.augmentation, generator=generator)(self.images[index]["image"])
        return {**crops, "batch_seed": batch_seed}


class StepBatchSampler(torch.utils.data.Sampler):
    """For each step from start_step: this rank's slice of the global batch. The sample stream is
    one random permutation of the dataset per epoch (seeded), read in order, batch_size * world
    samples per step, rank r taking the r-th slice; so batches depend on (seed, step) only."""

    def __init__(self, n_images, batch_size, seed, start_step, max_iters, rank=0, world_size=1):
        self.n, self.batch_size, self.seed = n_images, batch_size, seed
        self.start_step, self.max_iters, self.rank, self.world = start_step, max_iters, rank, world_size
        self._epoch, self._perm = None, None

    def __len__(self):
        return max(self.max_iters - self.start_step, 0)

    def index(self, position):
        epoch = position // self.n
        if epoch != self._epoch:
            self._epoch = epoch
            self._perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(item_seed(self.seed, epoch)))
        return int(self._perm[position % self.n])

    def __iter__(self):
        for step in range(self.start_step, self.max_iters):
            first = (step * self.world + self.rank) * self.batch_size
            batch_seed = item_seed(self.seed, step, self.rank, 1)
            yield [(self.index(p), item_seed(self.seed, p, 0), batch_seed) for p in range(first, first + self.batch_size)]


def masked_patch_indices(masks):
    """Flat indices into masks.flatten() of the masked patches (masks: bool (n_crops, N)): the rows of the
    flattened patch tokens that pretrain.ssl_losses gathers for iBOT."""
    return masks.flatten().nonzero().flatten()


class MaskedCollate:
    """Batch MultiCropDataset items and draw the iBOT masks of their 2B global crops from the batch's
    own seed, as DINOv2's collate_data_and_cast. Of the 2B crops, int(2B * mask_probability) are
    masked; their ratios spread over linspace(min, max, n_masked + 1): masked crop i gets a ratio
    ~ U(probs[i], probs[i+1]); the masks are then shuffled over the batch. Returns
      global_crops (2B,3,G,G) crop-major (all first crops, then all second crops);
      local_crops (nB,3,L,L), or None with no local crops;
      masks bool (2B, N); mask_indices (M,) flat indices into masks.flatten();
      masks_weight (M,) 1/(#masked patches of its crop), so each masked crop sums to 1;
      n_masked_patches long (1,) = M; upperbound int, the most patches the ratios allowed.
    Items without crops (SourceImageDataset's) are stacked as "images" instead, with the same masks
    for their 2B global crops-to-be."""

    def __init__(self, grid_size, mask_probability, mask_ratio_min_max):
        self.grid_size, self.mask_probability, self.mask_ratio_min_max = grid_size, mask_probability, mask_ratio_min_max

    def __call__(self, samples):
        if "global_crops" in samples[0]:
            n_global, n_local = len(samples[0]["global_crops"]), len(samples[0]["local_crops"])
            batch = {"global_crops": torch.stack([s["global_crops"][i] for i in range(n_global) for s in samples]),
                     "local_crops": (torch.stack([s["local_crops"][i] for i in range(n_local) for s in samples])
                                     if n_local else None)}
        else:
            batch = {"images": torch.stack([s["image"] for s in samples])}
        generator = torch.Generator().manual_seed(samples[0]["batch_seed"])
        mask_generator = MaskingGenerator(self.grid_size, self.grid_size)  # at most half the patches, as DINOv2
        n_crops, n_tokens = 2 * len(samples), self.grid_size ** 2
        n_masked = int(n_crops * self.mask_probability)
        probs = torch.linspace(self.mask_ratio_min_max[0], self.mask_ratio_min_max[1], n_masked + 1).tolist()
        masks, upperbound = [], 0
        for i in range(n_masked):
            ratio = _uniform(probs[i], probs[i + 1], generator)
            masks.append(mask_generator(int(n_tokens * ratio), generator))
            upperbound += int(n_tokens * probs[i + 1])
        masks += [mask_generator(0, generator) for _ in range(n_masked, n_crops)]
        order = torch.randperm(n_crops, generator=generator).tolist()
        masks = torch.stack([masks[j] for j in order]).flatten(1)
        mask_indices = masked_patch_indices(masks)
        return {**batch, "masks": masks, "mask_indices": mask_indices,
                "masks_weight": (1 / masks.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(masks)[masks],
                "n_masked_patches": torch.full((1,), len(mask_indices), dtype=torch.long), "upperbound": upperbound}


class SourceImageDataset(torch.utils.data.Dataset):
    """Key (image index, crop seed, batch seed) -> that image as a centre square resized to source_px (so a
    batch stacks), for BatchedDinoAugmentation on the training device; the crop seed is unused there."""

    def __init__(self, images, source_px):
        self.images, self.source_px = images, source_px

    def __len__(self):
        return len(self.images)

    def __getitem__(self, key):
        index, _, batch_seed = key
        img = self.images[index]["image"]
        return {"image": center_square(img, self.source_px), "batch_seed": batch_seed}


def eval_tensors(dataset, img_size, max_images, seed=0):
    """Up to max_images (a fixed random subset) as normalised (N,3,S,S) images and (N,) labels."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:max_images].tolist()
    images, labels = [], []
    for i in sorted(order):
        item = dataset[i]
        img = item["image"]
        img = center_square(img, img_size)
        images.append(normalize(img))
        labels.append(int(item["label"]))
    return torch.stack(images), torch.tensor(labels)


def auto_source_px(global_crops_size, global_crops_scale):
    """The smallest square from which a global crop of the smallest area fraction is still global_crops_size px."""
    return math.ceil(global_crops_size / math.sqrt(global_crops_scale[0]))
