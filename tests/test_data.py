"""data.py: MedMNIST files, CSV-indexed images, phantoms, augmentations, iBOT masking."""
import csv
import http.server
import re
import socket
import threading
import time
from collections import deque

import numpy as np
import pytest
import torch
from PIL import Image

import data

# ----------------------------------------------------------------------------------------------
# MedMNIST
# ----------------------------------------------------------------------------------------------

OFFICIAL_COUNTS = {"breastmnist": (546, 78, 156), "pneumoniamnist": (4708, 524, 624)}


@pytest.mark.parametrize("name", ["breastmnist", "pneumoniamnist"])
def test_real_medmnist_loads_with_official_split_counts_and_md5(data_dir, name):
    path = data_dir / f"{name}.npz"
    assert data.file_md5(path) == data.MEDMNIST[name].md5[28]
    for split, count in zip(data.SPLITS, OFFICIAL_COUNTS[name]):
        images, labels = data.load_medmnist(name, split, root=data_dir)
        assert images.shape == (count, 28, 28) and images.dtype == np.uint8
        assert labels.shape == (count,) and labels.dtype == np.int64
        assert set(np.unique(labels)) == {0, 1}
        # a path gives the same arrays as the name
        images_by_path, labels_by_path = data.load_medmnist(str(path), split)
        assert np.array_equal(images, images_by_path) and np.array_equal(labels, labels_by_path)


def test_array_dataset_gives_three_channel_unit_range_images(data_dir):
    images, labels = data.load_medmnist("breastmnist", "val", root=data_dir)
    item = data.ArrayImageDataset(images, labels)[3]
    assert item["image"].shape == (3, 28, 28) and item["image"].dtype == torch.float32
    assert torch.equal(item["image"][0], torch.from_numpy(images[3]).float() / 255)
    assert torch.equal(item["image"][0], item["image"][2]) and item["label"] == labels[3]


def write_npz(path, n=10, size=28, label_max=1, **overrides):
    rng = np.random.default_rng(0)
    arrays = {}
    for split in data.SPLITS:
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, size, size), dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, label_max + 1, (n, 1), dtype=np.uint8)
    arrays.update(overrides)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    np.savez(path, **arrays)
    return path


def test_npz_without_the_split_keys_names_the_file_and_the_key(tmp_path):
    path = write_npz(tmp_path / "mine.npz", train_labels=None)
    with pytest.raises(ValueError, match=r"mine\.npz.*train_labels"):
        data.load_medmnist(path, "train")
    data.load_medmnist(path, "val")  # the other splits are intact


def test_corrupt_npz_names_the_file(tmp_path):
    path = tmp_path / "broken.npz"
    path.write_bytes(b"PK\x03\x04 this is not a zip archive")
    with pytest.raises(ValueError, match=r"broken\.npz.*not a readable \.npz"):
        data.load_medmnist(path, "train")


def test_official_name_with_other_content_fails_the_md5_check(tmp_path):
    path = write_npz(tmp_path / "breastmnist.npz")
    with pytest.raises(ValueError, match=r"breastmnist\.npz: md5 [0-9a-f]{32}, expected the official "
                                         r"750601b1f35ba3300ea97c75c52ff8f6"):
        data.load_medmnist(path, "train")
    images, _ = data.load_medmnist(path, "train", check_md5=False)
    assert images.shape == (10, 28, 28)


def test_labels_out_of_range_for_the_dataset_are_an_error(tmp_path):
    path = write_npz(tmp_path / "breastmnist.npz", label_max=2)  # BreastMNIST has 2 classes
    with pytest.raises(ValueError, match=r"breastmnist\.npz \[train\]: labels in \[0, 2\], expected \[0, 1\]"):
        data.load_medmnist(path, "train", check_md5=False)
    negative = write_npz(tmp_path / "custom.npz", train_labels=-np.ones((10, 1), np.int64))
    with pytest.raises(ValueError, match=r"custom\.npz \[train\]: labels in \[-1, -1\], expected >= 0"):
        data.load_medmnist(negative, "train")


def test_wrong_dtype_shape_or_size_are_errors_naming_what_was_expected(tmp_path):
    floats = write_npz(tmp_path / "a.npz", train_images=np.zeros((10, 28, 28), np.float32))
    with pytest.raises(ValueError, match=r"a\.npz \[train\]: train_images dtype float32, expected uint8"):
        data.load_medmnist(floats, "train")
    flat = write_npz(tmp_path / "b.npz", train_images=np.zeros((10, 784), np.uint8))
    with pytest.raises(ValueError, match=r"b\.npz \[train\]: train_images shape \(10, 784\), expected"):
        data.load_medmnist(flat, "train")
    rgb_for_gray = write_npz(tmp_path / "breastmnist_64.npz",
                             train_images=np.zeros((10, 64, 64, 3), np.uint8))
    with pytest.raises(ValueError, match=r"3-channel images, expected 1"):
        data.load_medmnist(rgb_for_gray, "train", check_md5=False)
    wrong_size = write_npz(tmp_path / "pneumoniamnist_128.npz", size=64)
    with pytest.raises(ValueError, match=r"64 px images, expected 128 px"):
        data.load_medmnist(wrong_size, "train", check_md5=False)
    too_few = write_npz(tmp_path / "c.npz", train_labels=np.zeros((9, 1), np.uint8))
    with pytest.raises(ValueError, match=r"9 labels for 10 images"):
        data.load_medmnist(too_few, "train")


def test_chestmnist_labels_are_multi_label_with_14_columns(tmp_path):
    labels = np.random.default_rng(0).integers(0, 2, (10, 14), dtype=np.uint8)
    path = write_npz(tmp_path / "chestmnist.npz", train_labels=labels)
    _, loaded = data.load_medmnist(path, "train", check_md5=False)
    assert loaded.shape == (10, 14) and loaded.dtype == np.int64 and np.array_equal(loaded, labels)
    bad = write_npz(tmp_path / "chestmnist_64.npz", size=64, train_labels=labels[:, :13])
    with pytest.raises(ValueError, match=r"shape \(10, 13\), expected \(N, 14\)"):
        data.load_medmnist(bad, "train", check_md5=False)


def test_missing_file_says_where_to_put_it_and_where_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        data.load_medmnist("dermamnist", "train", root=tmp_path, size=64)
    message = str(e.value)
    assert str(tmp_path / "dermamnist_64.npz") in message
    assert "https://zenodo.org/records/10519652/files/dermamnist_64.npz?download=1" in message


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_download_fails_at_once_with_the_url_and_the_destination_when_refused(tmp_path, monkeypatch):
    url = f"http://127.0.0.1:{free_port()}/{{filename}}"  # nothing listens there
    monkeypatch.setattr(data, "MEDMNIST_URL", url)
    start = time.monotonic()
    with pytest.raises(ConnectionError) as e:
        data.load_medmnist("breastmnist", "train", root=tmp_path, download=True, timeout_s=2)
    assert time.monotonic() - start < 5
    message = str(e.value)
    assert url.format(filename="breastmnist.npz") in message
    assert str(tmp_path / "breastmnist.npz") in message
    assert not list(tmp_path.iterdir())  # no partial file left behind


def test_download_gives_up_after_timeout_when_the_server_never_answers(tmp_path, monkeypatch):
    with socket.socket() as server:  # accepts connections (backlog) but never replies
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        monkeypatch.setattr(data, "MEDMNIST_URL", f"http://127.0.0.1:{server.getsockname()[1]}/{{filename}}")
        start = time.monotonic()
        with pytest.raises(ConnectionError, match=r"could not download MedMNIST 'breastmnist'.*put it at"):
            data.download_medmnist("breastmnist", 28, tmp_path, timeout_s=0.5)
        assert time.monotonic() - start < 5


@pytest.fixture
def http_serving(tmp_path):
    """A local HTTP server over a folder: yields (folder, URL pattern for data.MEDMNIST_URL)."""
    folder = tmp_path / "served"
    folder.mkdir()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(folder), **kwargs)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield folder, f"http://127.0.0.1:{server.server_address[1]}/{{filename}}"
    server.shutdown()
    server.server_close()


def test_download_writes_the_official_file_and_rejects_a_changed_one(data_dir, tmp_path, http_serving, monkeypatch):
    folder, url = http_serving
    monkeypatch.setattr(data, "MEDMNIST_URL", url)
    (folder / "breastmnist.npz").write_bytes((data_dir / "breastmnist.npz").read_bytes())
    images, labels = data.load_medmnist("breastmnist", "test", root=tmp_path / "root", download=True)
    assert images.shape == (156, 28, 28) and (tmp_path / "root" / "breastmnist.npz").is_file()

    write_npz(folder / "pneumoniamnist.npz")
    with pytest.raises(ValueError, match=r"md5 [0-9a-f]{32}, expected 28209eda62fecd6e6a2d98b1501bb15f"):
        data.download_medmnist("pneumoniamnist", 28, tmp_path / "root")
    assert sorted(p.name for p in (tmp_path / "root").iterdir()) == ["breastmnist.npz"]


def test_medmnist_table_matches_the_official_2d_collection():
    assert len(data.MEDMNIST) == 12
    assert data.MEDMNIST["chestmnist"].multi_label and data.MEDMNIST["chestmnist"].n_classes == 14
    assert {n: i.n_classes for n, i in data.MEDMNIST.items() if n.startswith("organ")} == \
        {"organamnist": 11, "organcmnist": 11, "organsmnist": 11}
    assert all(set(i.md5) == set(data.MEDMNIST_SIZES) for i in data.MEDMNIST.values())
    assert data.medmnist_url("pathmnist", 224) == \
        "https://zenodo.org/records/10519652/files/pathmnist_224.npz?download=1"


# ----------------------------------------------------------------------------------------------
# Image files and CSV indexes
# ----------------------------------------------------------------------------------------------

def test_read_image_scales_16_bit_gray_by_65535(tmp_path):
    array = (np.arange(40 * 30).reshape(30, 40) * 54).astype(np.uint16)
    Image.fromarray(array).save(tmp_path / "x16.png")
    image = data.read_image(tmp_path / "x16.png")
    assert image.shape == (3, 30, 40) and image.dtype == torch.float32
    assert torch.allclose(image[1], torch.from_numpy(array.astype(np.float32) / 65535))
    assert torch.equal(image[0], image[2])


def twelve_bit_xray_in_16_bit_png(path):
    """Values 0..4095 as a 12-bit detector stores them, mostly mid-gray, with a few hot and dead pixels."""
    rng = np.random.default_rng(0)
    array = rng.normal(2000, 300, (40, 50)).clip(0, 4095).astype(np.uint16)
    array.flat[:5], array.flat[-5:] = 0, 4095
    Image.fromarray(array).save(path)
    return array.astype(np.float64)


@pytest.mark.parametrize("intensity", data.INTENSITIES)
def test_intensity_options_on_12_bit_content_in_a_16_bit_png(tmp_path, intensity):
    values = twelve_bit_xray_in_16_bit_png(tmp_path / "x.png")
    low, high = {"full_range": (0, 65535), "minmax": (0, 4095),
                 "percentile": np.percentile(values, (0.5, 99.5))}[intensity]
    image = data.read_image(tmp_path / "x.png", intensity=intensity)
    np.testing.assert_allclose(image[0].numpy(), np.clip((values - low) / (high - low), 0, 1), atol=1e-6, rtol=0)
    if intensity == "full_range":  # today's scaling, bit for bit: the 12-bit image stays below 4095 / 65535
        assert torch.equal(image[0], torch.from_numpy(values.astype(np.float32) / 65535)) and image.max() < 0.07
    if intensity == "percentile":  # the hot and dead pixels clip; most of the image spans [0, 1]
        assert 0 < low and high < 4095 and (image[0] == 0).sum() >= 5 and (image[0] == 1).sum() >= 5


@pytest.mark.parametrize("intensity", data.INTENSITIES)
@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_8_bit_images_are_value_over_255_whatever_the_intensity(tmp_path, intensity, suffix):
    gray = np.random.default_rng(1).integers(0, 256, (12, 9), dtype=np.uint8)
    Image.fromarray(gray).save(tmp_path / f"x{suffix}")
    stored = np.asarray(Image.open(tmp_path / f"x{suffix}"))  # JPEG is lossy: what the file holds
    image = data.read_image(tmp_path / f"x{suffix}", intensity=intensity)
    assert torch.equal(image[0], torch.from_numpy(stored.copy()).float().div_(255))


def test_an_unknown_intensity_is_an_error_naming_the_choices(tmp_path):
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "x.png")
    with pytest.raises(ValueError, match="intensity: expected one of full_range, minmax, percentile, found 'gamma'"):
        data.read_image(tmp_path / "x.png", intensity="gamma")
    with pytest.raises(ValueError, match="intensity: expected one of"):
        data.open_images(str(tmp_path), "train", intensity="gamma")


def test_a_folder_of_16_bit_pngs_follows_the_intensity_option(tmp_path):
    values = twelve_bit_xray_in_16_bit_png(tmp_path / "x.png")
    image = data.open_images(str(tmp_path), "train", intensity="minmax")[0]["image"]
    np.testing.assert_allclose(image[0].numpy(), values / 4095, atol=1e-6, rtol=0)


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P", "1"])
def test_read_image_gives_rgb_unit_range_for_every_8_bit_mode(tmp_path, mode):
    rgb = np.random.default_rng(0).integers(0, 256, (12, 9, 3), dtype=np.uint8)
    source = Image.fromarray(rgb)
    expected = np.asarray(source.convert(mode).convert("RGB")).astype(np.float32) / 255
    source.convert(mode).save(tmp_path / "x.png")
    image = data.read_image(tmp_path / "x.png")
    assert image.shape == (3, 12, 9)
    assert torch.allclose(image.permute(1, 2, 0), torch.from_numpy(expected))


def test_read_image_names_a_missing_or_unreadable_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.png"):
        data.read_image(tmp_path / "nothere.png")
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(ValueError, match=r"text\.png: not a readable image"):
        data.read_image(tmp_path / "text.png")


def test_read_mask_thresholds_or_keeps_class_indices(tmp_path):
    values = np.array([[0, 100, 127, 128, 255]], dtype=np.uint8)
    Image.fromarray(values).save(tmp_path / "m.png")
    assert data.read_mask(tmp_path / "m.png").tolist() == [[0, 0, 0, 1, 1]]
    assert data.read_mask(tmp_path / "m.png", threshold=None).tolist() == [[0, 100, 127, 128, 255]]
    Image.fromarray(np.stack([values] * 3, -1)).save(tmp_path / "rgb.png")
    with pytest.raises(ValueError, match=r"rgb\.png: mask mode RGB"):
        data.read_mask(tmp_path / "rgb.png", threshold=None)


@pytest.mark.parametrize("folder, csv_name, counts", [
    ("covid_cxr_xray256", "images.csv", (326, 29, 68)),
    ("covid_cxr_lungseg", "pairs.csv", (96, 8, 19)),
    ("covid_cxr_captions", "captions.csv", (117, 4, 13)),
])
def test_real_csv_indexes_have_their_patient_split_counts(data_dir, folder, csv_name, counts):
    path = data_dir / folder / csv_name
    for split, count in zip(("train", "val", "test"), counts):
        rows = data.read_csv_rows(path, split)
        assert len(rows) == count
        assert all(row["image"].startswith(str(data_dir / folder)) for row in rows)


def test_real_datasets_give_images_masks_and_captions(data_dir):
    xray = data.ImageFolderDataset(data_dir / "covid_cxr_xray256" / "images.csv", "val")
    item = xray[0]
    assert set(item) == {"image"} and item["image"].shape[0] == 3 and min(item["image"].shape[1:]) == 256

    pairs = data.SegmentationPairsDataset(data_dir / "covid_cxr_lungseg" / "pairs.csv", "val")
    item = pairs[0]
    assert item["image"].shape[1:] == item["mask"].shape and set(item["mask"].unique().tolist()) == {0, 1}
    transformed = data.SegmentationPairsDataset(data_dir / "covid_cxr_lungseg" / "pairs.csv", "val",
                                                transform=data.SegmentationTransform(112, train=True))[0]
    assert transformed["image"].shape == (3, 112, 112) and transformed["mask"].shape == (112, 112)

    captions = data.CaptionDataset(data_dir / "covid_cxr_captions" / "captions.csv", "val",
                                   transform=data.ClassificationTransform(64, train=False))
    assert len(captions) == 4 and all(len(captions[i]["caption"]) >= 20 for i in range(4))
    assert captions[0]["image"].shape == (3, 64, 64)


def test_label_column_maps_the_same_classes_in_every_split(data_dir):
    csv_path = data_dir / "covid_cxr_xray256" / "images.csv"
    for split in ("train", "val", "test"):
        ds = data.ImageFolderDataset(csv_path, split, label_column="sex")
        assert ds.classes == ["F", "M"]
        assert all(ds.classes[label] == row["sex"] for label, row in zip(ds.labels, ds.rows))
        assert all(row["sex"] for row in ds.rows)  # blank sex dropped


def test_covid_vs_other_drops_the_unlabelled_todo_rows(data_dir):
    csv_path = data_dir / "covid_cxr_xray256" / "images.csv"
    rows = data.read_csv_rows(csv_path, "test")
    ds = data.ImageFolderDataset(csv_path, "test", label_fn=data.covid_vs_other)
    assert len(ds) == sum(row["finding"] != "todo" for row in rows)
    assert sum(ds.labels) == sum("COVID-19" in row["finding"] for row in rows)
    assert 0 < sum(ds.labels) < len(ds)


def write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def test_csv_errors_name_the_csv_the_line_and_the_column(tmp_path):
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "a.png")
    no_column = write_csv(tmp_path / "x.csv", ["path", "split"], [["a.png", "train"]])
    with pytest.raises(ValueError, match=r"x\.csv: expected a column 'image', found columns \['path', 'split'\]"):
        data.read_csv_rows(no_column)
    missing = write_csv(tmp_path / "y.csv", ["image", "split"], [["a.png", "train"], ["b.png", "train"]])
    with pytest.raises(FileNotFoundError, match=r"y\.csv line 3: column 'image' names 'b\.png'"):
        data.read_csv_rows(missing)
    with pytest.raises(ValueError, match=r"y\.csv: no rows with split 'val'; splits found \['train'\]"):
        data.read_csv_rows(missing, "val")
    labelled = write_csv(tmp_path / "z.csv", ["image", "finding"], [["a.png", "cat"]])
    with pytest.raises(ValueError, match=r"z\.csv: .*finding 'cat' is not one of the classes \['dog'\]"):
        data.ImageFolderDataset(labelled, label_column="finding", classes=["dog"])


def test_image_folder_is_read_recursively_in_sorted_order(tmp_path):
    (tmp_path / "sub").mkdir()
    for name, value in [("b.png", 10), ("a.jpg", 200), ("sub/c.png", 90)]:
        Image.fromarray(np.full((8, 6), value, np.uint8)).save(tmp_path / name)
    (tmp_path / "notes.txt").write_text("ignored")
    ds = data.ImageFolderDataset(tmp_path, transform=lambda x: x.mean())
    assert len(ds) == 3 and [p.split("/")[-1] for p in ds.paths] == ["a.jpg", "b.png", "c.png"]
    assert abs(ds[1]["image"].item() - 10 / 255) < 1e-6 and "label" not in ds[1]


# ----------------------------------------------------------------------------------------------
# Procedural phantoms
# ----------------------------------------------------------------------------------------------

def test_phantom_items_depend_only_on_seed_split_and_index():
    a, b = data.PhantomDataset(50, 48, seed=1), data.PhantomDataset(50, 48, seed=1)
    for i in (7, 3, 7):
        x, y = a[i], b[i]
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["mask"], y["mask"])
        assert x["label"] == y["label"] and x["caption"] == y["caption"]
    assert not torch.equal(a[7]["image"], data.PhantomDataset(50, 48, seed=1, split="val")[7]["image"])
    assert not torch.equal(a[7]["image"], data.PhantomDataset(50, 48, seed=2)[7]["image"])


def components(binary):
    """Number of 4-connected components of a bool array."""
    binary, seen, count = binary.copy(), np.zeros_like(binary), 0
    for start in zip(*np.nonzero(binary)):
        if seen[start]:
            continue
        count += 1
        queue = deque([start])
        seen[start] = True
        while queue:
            r, c = queue.popleft()
            for rr, cc in ((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)):
                if 0 <= rr < binary.shape[0] and 0 <= cc < binary.shape[1] and binary[rr, cc] and not seen[rr, cc]:
                    seen[rr, cc] = True
                    queue.append((rr, cc))
    return count


def test_phantom_masks_labels_and_captions_agree():
    ds = data.PhantomDataset(160, 64, seed=0)
    numbers = {"a": 1, "two": 2, "three": 3}
    seen_labels = set()
    for i in range(len(ds)):
        item = ds[i]
        image, mask, label, caption = item["image"], item["mask"].numpy(), item["label"], item["caption"]
        seen_labels.add(label)
        assert image.shape == (3, 64, 64) and 0 <= image.min() and image.max() <= 1
        assert set(np.unique(mask)) <= {0, 1, 2}
        assert (mask[:, :32] == 1).any() and (mask[:, 32:] == 1).any()  # two lungs
        lesion = mask == 2
        name = data.PHANTOM_CLASSES[label]
        if name == "normal":
            assert not lesion.any() and "no lesion" in caption
            continue
        assert lesion.any()
        # radiological convention: the patient's right is the image's left
        sides = {"right"} if not lesion[:, 32:].any() else {"left"} if not lesion[:, :32].any() else {"right", "left"}
        if name == "consolidation":
            assert re.fullmatch(r"consolidation in the (right|left) (upper|middle|lower) lung", caption)
            assert sides == {caption.split()[3]}
        else:
            match = re.fullmatch(r"(a|two|three) nodules? in (the (right|left)|both) (upper |middle |lower )?lungs?", caption)
            assert match, caption
            assert components(lesion) == numbers[match.group(1)]
            assert (name == "nodule") == (match.group(1) == "a")
            if match.group(3):
                assert sides == {match.group(3)}
    assert seen_labels == set(range(len(data.PHANTOM_CLASSES)))


def test_phantom_lesions_are_brighter_than_the_lung_around_them():
    ds = data.PhantomDataset(40, 64, seed=3)
    for i in range(len(ds)):
        item = ds[i]
        lesion, lung = item["mask"] == 2, item["mask"] == 1
        if lesion.any():
            assert item["image"][0][lesion].mean() > item["image"][0][lung].mean() + 0.1


def test_anatomy_phantoms_show_their_finding():
    """pretrain.py's default task: each finding changes what a crop of the whole chest shows. Per class,
    the mean of: visible lung area (a large heart hides lung), how much brighter the lung base is than the
    rest of the lung (fluid), and the fine texture inside the lungs (a net of lines)."""
    ds = data.PhantomDataset(200, 64, seed=0, task="anatomy")
    assert ds.classes == list(data.PHANTOM_ANATOMY_CLASSES)
    rows = {name: [] for name in ds.classes}
    for i in range(len(ds)):
        item = ds[i]
        image, lung = item["image"][0], item["mask"] == 1
        assert set(item["mask"].unique().tolist()) == {0, 1}  # no lesion class in this task
        lung_rows = lung.any(1).nonzero().flatten()
        base = lung.clone()
        base[: lung_rows.min() + (lung_rows.max() - lung_rows.min()) * 2 // 3] = False
        texture = (image - torch.nn.functional.avg_pool2d(image[None, None], 3, 1, 1)[0, 0]).abs()[lung].mean()
        rows[ds.classes[item["label"]]].append(
            [lung.sum().item(), (image[base].mean() - image[lung & ~base].mean()).item(), texture.item()])
    assert all(len(r) >= 30 for r in rows.values())  # labels uniform over the four classes
    means = {name: np.mean(r, axis=0) for name, r in rows.items()}
    assert means["cardiomegaly"][0] < 0.8 * min(m[0] for name, m in means.items() if name != "cardiomegaly")
    assert means["pleural effusion"][1] > 3 * max(m[1] for name, m in means.items() if name != "pleural effusion")
    assert means["interstitial pattern"][2] > 1.4 * max(m[2] for name, m in means.items()
                                                        if name != "interstitial pattern")
    with pytest.raises(ValueError, match="phantom task"):
        data.PhantomDataset(4, 64, task="fractures")


def flip_both(x, m):
    return data.random_horizontal_flip_pair(x, m, p=1.0)


def test_phantom_pair_transform_keeps_image_and_mask_aligned():
    ds = data.PhantomDataset(8, 64, pair_transform=flip_both)
    plain = data.PhantomDataset(8, 64)
    for i in range(8):
        assert torch.equal(ds[i]["image"], plain[i]["image"].flip(-1))
        assert torch.equal(ds[i]["mask"], plain[i]["mask"].flip(-1))


# ----------------------------------------------------------------------------------------------
# Augmentations
# ----------------------------------------------------------------------------------------------

def test_random_resized_crop_has_size_range_and_is_reproducible():
    img = torch.rand(3, 50, 70)
    crops = [data.random_resized_crop(img, 32, (0.2, 1.0), generator=torch.Generator().manual_seed(5))
             for _ in range(2)]
    assert crops[0].shape == (3, 32, 32) and torch.equal(crops[0], crops[1])
    assert crops[0].min() >= 0 and crops[0].max() <= 1
    other = data.random_resized_crop(img, 32, (0.2, 1.0), generator=torch.Generator().manual_seed(6))
    assert not torch.equal(crops[0], other)


def test_random_resized_crop_box_respects_scale_and_ratio():
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        top, left, h, w = data.random_resized_crop_box(100, 120, (0.3, 0.6), (0.5, 2.0), generator=g)
        assert 0 <= top and top + h <= 100 and 0 <= left and left + w <= 120
        assert 0.3 * 0.9 <= h * w / 12000 <= 0.6 * 1.1  # rounding of h and w
        assert 0.5 * 0.9 <= w / h <= 2.0 * 1.1


def test_resize_matches_pillow_bicubic_when_shrinking():
    array = np.random.default_rng(0).integers(0, 256, (60, 50, 3), dtype=np.uint8)
    array = np.asarray(Image.fromarray(array).resize((50, 60)))  # smooth it a little first
    pil = np.asarray(Image.fromarray(array).resize((31, 23), Image.BICUBIC)).astype(np.float32) / 255
    ours = data.resize(torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255, (23, 31))
    difference = (ours.permute(1, 2, 0).numpy() - pil)
    assert np.abs(difference).max() < 0.02 and np.abs(difference).mean() < 0.003


def test_hue_shift_of_one_third_turns_red_into_green():
    red = torch.zeros(1, 3, 4, 4)
    red[:, 0] = 1
    green = data._adjust_hue(red, 1 / 3)
    assert torch.allclose(green[0, :, 0, 0], torch.tensor([0.0, 1.0, 0.0]), atol=1e-6)
    colours = torch.rand(2, 3, 8, 8)
    assert torch.allclose(data._hsv_to_rgb(*data._rgb_to_hsv(colours)), colours, atol=1e-6)


def test_color_jitter_keeps_gray_images_gray_and_in_range():
    gray = torch.rand(1, 16, 16).expand(3, -1, -1)
    g = torch.Generator().manual_seed(0)
    for _ in range(10):
        out = data.color_jitter(gray, 0.4, 0.4, 0.2, 0.1, generator=g)
        assert torch.allclose(out[0], out[1], atol=1e-6) and torch.allclose(out[1], out[2], atol=1e-6)
        assert out.min() >= 0 and out.max() <= 1


def test_color_jitter_hue_and_saturation_act_on_colour_images():
    colour = torch.rand(3, 16, 16)
    g = torch.Generator().manual_seed(0)
    hue_only = data.color_jitter(colour, 0, 0, 0, 0.5, generator=g)
    assert (hue_only - colour).abs().max() > 0.1
    # a hue shift keeps each pixel's max (HSV value) and its max - min spread (saturation * value)
    assert torch.allclose(hue_only.max(0).values, colour.max(0).values, atol=1e-5)
    assert torch.allclose(hue_only.max(0).values - hue_only.min(0).values,
                          colour.max(0).values - colour.min(0).values, atol=1e-5)
    saturation_only = data.color_jitter(colour, 0, 0, 0.9, 0, generator=g)
    assert (saturation_only - colour).abs().max() > 0.01


def test_gaussian_blur_keeps_constants_and_smooths_noise():
    constant = torch.full((3, 20, 20), 0.3)
    assert torch.allclose(data.gaussian_blur(constant, p=1.0), constant, atol=1e-6)
    noise = torch.rand(3, 40, 40)
    blurred = data.gaussian_blur(noise, sigma=(1.5, 2.0), p=1.0)
    assert blurred.std() < 0.5 * noise.std() and abs(blurred.mean() - noise.mean()) < 0.01
    assert torch.equal(data.gaussian_blur(noise, p=0.0), noise)


def test_solarize_inverts_only_bright_pixels():
    img = torch.tensor([0.1, 0.49, 0.5, 0.9]).view(1, 1, 4).expand(3, 1, 4)
    assert torch.allclose(data.solarize(img, p=1.0)[0, 0], torch.tensor([0.1, 0.49, 0.5, 0.1]))


def test_normalize_uses_imagenet_statistics_and_inverts():
    img = torch.rand(2, 3, 5, 5)
    out = data.normalize(img)
    assert torch.allclose(out[:, 1], (img[:, 1] - 0.456) / 0.224)
    assert torch.allclose(data.denormalize(out), img, atol=1e-6)


def test_pair_crop_uses_one_box_for_image_and_mask():
    img, mask = torch.rand(3, 40, 60), torch.randint(0, 3, (40, 60))
    out_img, out_mask = data.random_resized_crop_pair(img, mask, 24, generator=torch.Generator().manual_seed(3))
    top, left, h, w = data.random_resized_crop_box(40, 60, generator=torch.Generator().manual_seed(3))
    assert torch.equal(out_img, data.resize(img[:, top:top + h, left:left + w], 24))
    assert torch.equal(out_mask, data.resize_mask(mask[top:top + h, left:left + w], 24))
    assert out_mask.dtype == torch.int64 and set(out_mask.unique().tolist()) <= {0, 1, 2}


def test_segmentation_transform_without_flip_never_mirrors():
    # a mask that is 1 on the image's left half only: without flips it stays on the left
    img, mask = torch.rand(3, 64, 64), torch.zeros(64, 64, dtype=torch.int64)
    mask[:, :32] = 1
    transform = data.SegmentationTransform(32, train=True, scale=(0.9, 1.0), hflip_p=0.0, rotation_deg=0.0,
                                           generator=torch.Generator().manual_seed(0))
    for _ in range(20):
        _, out = transform(img, mask)
        assert out[:, :8].float().mean() > 0.9 and out[:, -8:].float().mean() < 0.1


@pytest.mark.parametrize("n_local", [4, 0])
def test_dino_augmentation_gives_two_globals_and_n_locals(n_local):
    aug = data.DinoAugmentation(64, 32, n_local, generator=torch.Generator().manual_seed(0))
    out = aug(torch.rand(3, 80, 90))
    assert [c.shape for c in out["global_crops"]] == [(3, 64, 64)] * 2
    assert [c.shape for c in out["local_crops"]] == [(3, 32, 32)] * n_local
    # normalised with ImageNet statistics: [0,1] maps into [-mean/std, (1-mean)/std]
    low = min(-m / s for m, s in zip(data.IMAGENET_MEAN, data.IMAGENET_STD))
    assert all(c.min() >= low - 1e-5 for c in out["global_crops"] + out["local_crops"])


def test_dino_augmentation_is_reproducible_with_a_seeded_generator():
    img = torch.rand(3, 60, 60)
    a = data.DinoAugmentation(48, 24, 2, generator=torch.Generator().manual_seed(1))(img)
    b = data.DinoAugmentation(48, 24, 2, generator=torch.Generator().manual_seed(1))(img)
    assert all(torch.equal(x, y) for x, y in zip(a["global_crops"] + a["local_crops"], b["global_crops"] + b["local_crops"]))
    assert not torch.equal(a["global_crops"][0], a["global_crops"][1])


# ----------------------------------------------------------------------------------------------
# iBOT masking and the DINO collate
# ----------------------------------------------------------------------------------------------

def test_mask_block_is_one_rectangle_of_at_least_min_area_up_to_rounding():
    g = torch.Generator().manual_seed(0)
    generator = data.MaskingGenerator(16, 16, min_num_patches=4)
    for _ in range(300):
        mask = torch.zeros(16, 16, dtype=torch.bool)
        new = generator.add_block(mask, 60, generator=g)
        rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
        h, w = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
        assert new == int(mask.sum()) == h * w  # a filled rectangle
        # area >= 4 drawn, then h and w rounded: a 1x3 block is the smallest possible
        assert 3 <= new <= 60
        assert 0.3 / 2 <= h / w <= 3.34 * 2


def test_masking_never_exceeds_the_requested_number_and_nearly_reaches_it():
    g = torch.Generator().manual_seed(0)
    generator = data.MaskingGenerator(16, 16)
    for target in (0, 10, 60, 128):
        counts = [int(generator(target, g).sum()) for _ in range(30)]
        assert max(counts) <= target and np.mean(counts) >= 0.9 * target


def test_collate_spreads_mask_ratios_and_weights_each_masked_crop_to_one():
    aug = data.DinoAugmentation(28, 14, 2, generator=torch.Generator().manual_seed(0))
    samples = [{**aug(torch.rand(3, 40, 40)), "batch_seed": 0} for _ in range(8)]
    grid = 14
    n_tokens = grid * grid
    batch = data.MaskedCollate(grid, 0.5, (0.1, 0.5))(samples)
    assert batch["global_crops"].shape == (16, 3, 28, 28) and batch["local_crops"].shape == (16, 3, 14, 14)
    assert torch.equal(batch["global_crops"][1], samples[1]["global_crops"][0])
    assert torch.equal(batch["global_crops"][8 + 1], samples[1]["global_crops"][1])
    masks = batch["masks"]
    assert masks.shape == (16, n_tokens) and masks.dtype == torch.bool
    counts = masks.sum(1)
    assert int((counts > 0).sum()) == 8  # int(16 * 0.5) crops masked
    probs = torch.linspace(0.1, 0.5, 9)
    # masked crop i drew its ratio in [probs[i], probs[i+1]]: sorted counts follow the spread
    for i, count in enumerate(counts[counts > 0].sort().values.tolist()):
        assert count <= int(n_tokens * probs[i + 1]) and count >= 0.8 * n_tokens * probs[i]
    assert batch["upperbound"] == sum(int(n_tokens * p) for p in probs[1:].tolist())
    assert torch.equal(batch["mask_indices"], masks.flatten().nonzero().flatten())
    assert batch["n_masked_patches"].tolist() == [int(counts.sum())]
    per_crop = torch.zeros(16).index_add_(0, batch["mask_indices"] // n_tokens, batch["masks_weight"])
    assert torch.allclose(per_crop[counts > 0], torch.ones(8)) and (per_crop[counts == 0] == 0).all()


def test_collate_in_global_only_mode_has_no_local_crops():
    aug = data.DinoAugmentation(28, 14, 0, generator=torch.Generator().manual_seed(0))
    samples = [{**aug(torch.rand(3, 30, 30)), "batch_seed": 0} for _ in range(3)]
    batch = data.MaskedCollate(2, 0.0, (0.1, 0.5))(samples)
    assert batch["local_crops"] is None and batch["global_crops"].shape == (6, 3, 28, 28)
    assert not batch["masks"].any() and batch["n_masked_patches"].item() == 0


def test_dino_augmentation_follows_dinov2_asymmetric_recipe(monkeypatch):
    calls = []
    for name in ("gaussian_blur", "solarize", "color_jitter", "random_grayscale"):
        def recording(img, *args, _name=name, _original=getattr(data, name), **kwargs):
            calls.append((_name, kwargs["p"]))
            return _original(img, *args, **kwargs)

        monkeypatch.setattr(data, name, recording)
    data.DinoAugmentation(32, 16, 2)(torch.rand(3, 40, 40))
    assert [p for name, p in calls if name == "gaussian_blur"] == [1.0, 0.1, 0.5, 0.5]  # globals, locals
    assert [p for name, p in calls if name == "solarize"] == [0.2]  # second global crop only
    assert [p for name, p in calls if name == "color_jitter"] == [0.8] * 4
    assert [p for name, p in calls if name == "random_grayscale"] == [0.2] * 4


def test_dino_augmentation_uses_the_given_jitter_strengths_blur_and_solarize_p(monkeypatch):
    calls = []
    for name in ("color_jitter", "solarize", "gaussian_blur"):
        def recording(img, *args, _name=name, _original=getattr(data, name), **kwargs):
            calls.append((_name, args, kwargs["p"]))
            return _original(img, *args, **kwargs)

        monkeypatch.setattr(data, name, recording)
    data.DinoAugmentation(32, 16, 1, jitter=(0.2, 0.1, 0.0, 0.0), blur_probs=(0.0, 0.3, 0.6),
                          solarize_p=0.0)(torch.rand(3, 40, 40))
    assert [args for name, args, _ in calls if name == "color_jitter"] == [(0.2, 0.1, 0.0, 0.0)] * 3
    assert [p for name, _, p in calls if name == "gaussian_blur"] == [0.0, 0.3, 0.6]  # global 1, global 2, local
    assert [p for name, _, p in calls if name == "solarize"] == []  # p=0 skips the call


def test_batched_augmentation_uses_the_given_jitter_strengths_blur_and_solarize_p(monkeypatch):
    draws = []
    def recording(*args, _original=data.sample_view_params, **kwargs):
        draws.append(_original(*args, **kwargs))
        return draws[-1]

    monkeypatch.setattr(data, "sample_view_params", recording)
    augment = data.BatchedDinoAugmentation(32, 16, 1, jitter=(0.2, 0.1, 0.0, 0.0), blur_probs=(0.0, 0.0, 1.0),
                                           solarize_p=0.0)
    augment(torch.rand(500, 3, 40, 40), generator=torch.Generator().manual_seed(0))
    assert not draws[0]["blur"].any() and draws[1]["blur"].all()  # the global crops never blur, the local always
    strengths = torch.tensor([0.2, 0.1, 0.0])
    spread = (draws[0]["jitter_factors"] - 1).abs().amax(0)  # factors ~ U(1 - x, 1 + x)
    assert (spread <= strengths + 1e-6).all() and (spread >= 0.95 * strengths).all()
    assert not draws[0]["solarize"].any() and (draws[0]["hue_shift"] == 0).all()


# ----------------------------------------------------------------------------------------------
# BatchedDinoAugmentation: the same views, a whole batch at once, every draw per image
# ----------------------------------------------------------------------------------------------

def unchanged_view_params(n, height, width):
    """Parameters of n views that only resize the whole image: every random choice switched off."""
    return {"box": torch.tensor([[0, 0, height, width]] * n), "flip": torch.zeros(n, dtype=torch.bool),
            "jitter": torch.zeros(n, dtype=torch.bool), "jitter_order": torch.arange(4).repeat(n, 1),
            "jitter_factors": torch.ones(n, 3), "hue_shift": torch.zeros(n),
            "grayscale": torch.zeros(n, dtype=torch.bool), "blur": torch.zeros(n, dtype=torch.bool),
            "blur_sigma": torch.ones(n), "solarize": torch.zeros(n, dtype=torch.bool)}


# the batched resize is the same linear map as F.interpolate(antialias=True) computed as two matmuls:
# only float rounding differs (measured <= 7e-6 over sizes 3..127 -> 8..96)
RESIZE_ATOL = 2e-5


@pytest.mark.parametrize("source, size", [(50, 24), (20, 32), (85, 48), (97, 8)])
def test_batched_view_of_the_whole_image_is_resize(source, size):
    images = torch.rand(3, 3, source, source)
    views = data.apply_view_params(images, unchanged_view_params(3, source, source), size)
    torch.testing.assert_close(views, data.normalize(data.resize(images, size)), atol=RESIZE_ATOL, rtol=0)


def test_batched_view_of_the_source_size_is_the_image_itself():
    images = torch.rand(2, 3, 32, 32)
    views = data.apply_view_params(images, unchanged_view_params(2, 32, 32), 32)
    assert torch.equal(views, data.normalize(images))


def test_batched_flip_mirrors_only_the_flagged_images():
    images = torch.rand(2, 3, 40, 40)
    params = unchanged_view_params(2, 40, 40)
    params["flip"][1] = True
    views = data.apply_view_params(images, params, 24)
    expected = data.normalize(data.resize(images, 24))
    torch.testing.assert_close(views[0], expected[0], atol=RESIZE_ATOL, rtol=0)
    torch.testing.assert_close(views[1], torch.flip(expected[1], (-1,)), atol=RESIZE_ATOL, rtol=0)


def test_batched_crop_boxes_equal_the_per_image_crop_and_resize():
    images = torch.rand(2, 3, 60, 60)
    params = unchanged_view_params(4, 60, 60)  # two views of each image, view-major
    params["box"] = torch.tensor([[0, 0, 60, 60], [5, 17, 30, 41], [59, 0, 1, 60], [12, 3, 45, 20]])
    views = data.apply_view_params(images, params, 28)
    for row, (top, left, h, w) in enumerate(params["box"].tolist()):
        expected = data.resize(images[row % 2, :, top:top + h, left:left + w], 28)
        torch.testing.assert_close(views[row], data.normalize(expected), atol=RESIZE_ATOL, rtol=0)


def reference_jitter_draw(seed):
    """The order, factors and hue shift data.color_jitter(p=1) draws from a generator seeded `seed`."""
    g = torch.Generator().manual_seed(seed)
    data._rand(g)  # the p draw
    order = torch.randperm(4, generator=g)
    factors = torch.tensor([data._uniform(1 - x, 1 + x, g) for x in data.DINO_JITTER[:3]])
    return order, factors, data._uniform(-data.DINO_JITTER[3], data.DINO_JITTER[3], g)


@pytest.mark.parametrize("gray", [False, True])
def test_batched_color_jitter_gives_color_jitters_numbers_for_the_same_draw(gray):
    n = 6
    images = torch.rand(n, 1 if gray else 3, 20, 20).expand(-1, 3, -1, -1).contiguous()
    params = unchanged_view_params(n, 20, 20)
    expected = []
    for i in range(n):  # each image its own order and factors
        order, factors, shift = reference_jitter_draw(i)
        params["jitter_order"][i], params["jitter_factors"][i], params["hue_shift"][i] = order, factors, shift
        expected.append(data.color_jitter(images[i], *data.DINO_JITTER, p=1.0, generator=torch.Generator().manual_seed(i)))
    params["jitter"][:] = True
    params["jitter"][n - 1] = False
    expected[n - 1] = images[n - 1]
    views = data.apply_view_params(images, params, 20)
    torch.testing.assert_close(views, data.normalize(torch.stack(expected)), atol=1e-5, rtol=0)
    assert (torch.stack(expected) - images).abs().amax(dim=(1, 2, 3))[:n - 1].min() > 0.01  # the jitter acted


def test_batched_grayscale_blur_and_solarize_match_the_per_image_functions():
    images = torch.rand(4, 3, 24, 24, generator=torch.Generator().manual_seed(0))
    params = unchanged_view_params(4, 24, 24)
    params["grayscale"][0] = True
    params["blur"][1], params["blur_sigma"][1] = True, 1.3
    params["blur"][2], params["blur_sigma"][2] = True, 0.4
    params["solarize"][3] = True
    views = data.apply_view_params(images, params, 24)
    expected = [data.random_grayscale(images[0], p=1.0),
                data.gaussian_blur(images[1], sigma=(1.3, 1.3), p=1.0),
                data.gaussian_blur(images[2], sigma=(0.4, 0.4), p=1.0),
                data.solarize(images[3], p=1.0)]
    # the two blurs sum in different orders: a few float32 ulps, times 1/std (4.4) after normalising
    torch.testing.assert_close(views, data.normalize(torch.stack(expected)), atol=2e-6, rtol=0)


def test_batched_views_differ_between_identical_images_and_repeat_with_the_seed():
    images = torch.rand(1, 3, 64, 64).expand(6, -1, -1, -1)
    aug = data.BatchedDinoAugmentation(32, 16, 2)
    a = aug(images, torch.Generator().manual_seed(0))
    b = aug(images, torch.Generator().manual_seed(0))
    c = aug(images, torch.Generator().manual_seed(1))
    for key in ("global_crops", "local_crops"):
        assert torch.equal(a[key], b[key]) and not torch.equal(a[key], c[key])
        crops = a[key]
        assert all(not torch.equal(crops[i], crops[j]) for i in range(len(crops)) for j in range(i))


@pytest.mark.parametrize("n_local", [3, 0])
def test_batched_augmentation_lays_crops_out_crop_major_as_collate_does(n_local):
    # image 1 is black: every view of it (and only those) is normalize(0), whatever was drawn
    images = torch.rand(3, 3, 40, 40) * 0.8 + 0.1
    images[1] = 0
    out = data.BatchedDinoAugmentation(24, 12, n_local)(images, torch.Generator().manual_seed(0))
    assert out["global_crops"].shape == (6, 3, 24, 24)
    if n_local == 0:
        assert out["local_crops"] is None
        crops = [out["global_crops"]]
    else:
        assert out["local_crops"].shape == (3 * n_local, 3, 12, 12)
        crops = [out["global_crops"], out["local_crops"]]
    for c in crops:
        black = data.normalize(torch.zeros_like(c[0]))
        is_black = [torch.allclose(view, black, atol=1e-6) for view in c]
        assert is_black == [i % 3 == 1 for i in range(len(c))]


def test_batched_crop_boxes_respect_scale_and_ratio_and_fit():
    boxes = data.random_resized_crop_boxes(2000, 100, 120, (0.3, 0.6), (0.5, 2.0), torch.Generator().manual_seed(0))
    top, left, h, w = boxes.T.double()
    assert (top >= 0).all() and (top + h <= 100).all() and (left >= 0).all() and (left + w <= 120).all()
    # h and w are rounded: the area fraction and aspect of (h +- 0.5) x (w +- 0.5) bound the drawn ones
    assert ((h + 0.5) * (w + 0.5) / 12000 >= 0.3).all() and ((h - 0.5) * (w - 0.5) / 12000 <= 0.6).all()
    assert ((w + 0.5) / (h - 0.5) >= 0.5).all() and ((w - 0.5) / (h + 0.5) <= 2.0).all()
    # boxes are placed anywhere they fit, not always at one corner
    assert top.min() == 0 and (top + h).max() == 100 and left.min() == 0 and (left + w).max() == 120


@pytest.mark.parametrize("height, width", [(40, 40), (10, 40), (40, 10)])
def test_batched_crop_boxes_fall_back_to_the_reference_centre_crop(height, width):
    boxes = data.random_resized_crop_boxes(5, height, width, (2.0, 3.0), generator=torch.Generator().manual_seed(0))
    expected = data.random_resized_crop_box(height, width, (2.0, 3.0), generator=torch.Generator().manual_seed(0))
    assert boxes.tolist() == [list(expected)] * 5


def test_batched_crop_boxes_follow_the_reference_distribution():
    # a geometry where most tries do not fit: ~1 box in 7 is the fallback (the full image), and 40 %
    # are full-image boxes (fallbacks and tries that round to it), so the fallback rate shows
    n, size, scale, ratio = 3000, 10, (0.9, 1.0), (0.5, 2.0)
    g = torch.Generator().manual_seed(0)
    reference = torch.tensor([data.random_resized_crop_box(size, size, scale, ratio, generator=g)
                              for _ in range(n)]).double()
    ours = data.random_resized_crop_boxes(n, size, size, scale, ratio, torch.Generator().manual_seed(1)).double()
    full_image = lambda b: (b[:, 2:] == size).all(1).double().mean()
    assert 0.3 < full_image(reference) < 0.5
    assert abs(full_image(ours) - full_image(reference)) < 0.03
    for column in range(4):  # top, left, h, w: means within ~4 standard errors
        ref_col, our_col = reference[:, column], ours[:, column]
        assert abs(our_col.mean() - ref_col.mean()) < 4 * ref_col.std() * (2 / n) ** 0.5


def test_batched_view_draws_follow_dinov2s_probabilities_per_view():
    n = 4000
    params = data.sample_view_params(n, 64, 64, (0.32, 1.0), (1.0, 0.1), (0.0, 0.2), generator=torch.Generator().manual_seed(0))
    first, second = slice(0, n), slice(n, 2 * n)
    assert params["blur"][first].all() and abs(params["blur"][second].double().mean() - 0.1) < 0.02
    assert not params["solarize"][first].any() and abs(params["solarize"][second].double().mean() - 0.2) < 0.03
    for key, p in (("flip", 0.5), ("jitter", 0.8), ("grayscale", 0.2)):
        assert abs(params[key].double().mean() - p) < 0.02, key
    order = params["jitter_order"]
    assert (order.sort(1).values == torch.arange(4)).all()  # a permutation per view
    first_op = torch.bincount(order[:, 0], minlength=4).double() / len(order)
    assert (first_op - 0.25).abs().max() < 0.02
    low, high = torch.tensor([0.6, 0.6, 0.8]), torch.tensor([1.4, 1.4, 1.2])
    factors = params["jitter_factors"]
    assert (factors >= low).all() and (factors <= high).all() and ((factors - 1).abs().amax(0) > 0.95 * (high - 1)).all()
    assert params["hue_shift"].abs().max() <= 0.1 and params["blur_sigma"].min() >= 0.1 and params["blur_sigma"].max() <= 2.0
