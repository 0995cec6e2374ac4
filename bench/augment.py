"""Images per second of DINOv2's multi-crop augmentation made two ways, measured in the same run:
(a) per image by DinoAugmentation in DataLoader workers (pretrain.py's default path: MultiCropDataset
+ MaskedCollate), and (b) for the whole batch at once by BatchedDinoAugmentation on the training
device (augment_on_device=True), for nanorad's medmnist_tiny geometry (64/32 px) and DINOv2's
(224/96 px), each with 8 local crops and global crops only.

    python bench/augment.py                                        # CPU: small batches, ~1 min
    python bench/augment.py --num_workers=14 --batch_size=256 --n_batches=20     # on a GPU machine

Both paths start from the same gray square images at the source size pretrain.py uses for (b)
(global_crops_size / sqrt(0.32)), held in memory: this times the augmentation, not the decoding of
files. (b) is timed on images already on the device; column "(b) loader" is what the CPU still does
for it (stacking the images, drawing the iBOT masks) with the same workers, so a reader can see
whether that becomes the next limit. On CPU, (b) runs with cpu_threads threads (default 1) while (a)
has num_workers processes: with the defaults, (b) uses half the cores (a) does.
"""
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere: `python bench/augment.py`
from data import (BatchedDinoAugmentation, MaskedCollate, MultiCropDataset, SourceImageDataset,  # noqa: E402
                  StepBatchSampler, auto_source_px)

# config ----------------------------------------------------------------------------------------
num_workers = 2            # DataLoader processes for (a) and for (b)'s loader
batch_size = 32            # images per batch
n_batches = 4              # timed batches per measurement (one more runs first, untimed)
n_images = 256             # distinct source images (the dataset cycles through them)
geometries = ("medmnist_tiny", "dinov2")
patch_size = 8             # for the iBOT mask grid only
cpu_threads = 1            # torch threads for (b) on a CPU; on a shared CPU, more threads than free cores make
                           # OpenMP's spin-waits dominate (bench/README.md)
out_json = "out/bench_augment.json"
from config import configure  # noqa: E402
config = configure(globals())
# -----------------------------------------------------------------------------------------------

GEOMETRIES = {"medmnist_tiny": (64, 32), "dinov2": (224, 96)}  # global, local crop px
GLOBAL_SCALE, LOCAL_SCALE = (0.32, 1.0), (0.05, 0.32)


class GrayImages(torch.utils.data.Dataset):
    """n gray (3, size, size) images in [0, 1]: smooth random blobs, like radiographs after resizing."""

    def __init__(self, n, size):
        low = torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(0))
        smooth = torch.nn.functional.interpolate(low, size=(size, size), mode="bicubic", align_corners=False)
        self.images = smooth.clamp(0, 1).expand(-1, 3, -1, -1).contiguous()

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return {"image": self.images[index]}


def loader(dataset, grid_size):
    sampler = StepBatchSampler(len(dataset), batch_size, seed=0, start_step=0, max_iters=n_batches + 1)
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                                       collate_fn=MaskedCollate(grid_size, 0.5, (0.1, 0.5)),
                                       prefetch_factor=4 if num_workers else None)


def loader_images_per_s(dataset, grid_size):
    """Batches per second the loader delivers once running (the first batch, with worker start-up, untimed)."""
    batches = iter(loader(dataset, grid_size))
    next(batches)
    t = time.perf_counter()
    for _ in range(n_batches):
        next(batches)
    return batch_size * n_batches / (time.perf_counter() - t)


def device_images_per_s(augmentation, images, device):
    generator = torch.Generator(device).manual_seed(0)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    augmentation(images, generator)
    sync()
    t = time.perf_counter()
    for _ in range(n_batches):
        augmentation(images, generator)
    sync()
    return batch_size * n_batches / (time.perf_counter() - t)


def bench_one(geometry, n_local, device):
    global_px, local_px = GEOMETRIES[geometry]
    source_px = auto_source_px(global_px, GLOBAL_SCALE)
    images = GrayImages(n_images, source_px)
    crop_args = dict(global_crops_size=global_px, local_crops_size=local_px, n_local_crops=n_local,
                     global_crops_scale=GLOBAL_SCALE, local_crops_scale=LOCAL_SCALE)
    grid_size = global_px // patch_size
    per_image = loader_images_per_s(MultiCropDataset(images, **crop_args), grid_size)
    source_loader = loader_images_per_s(SourceImageDataset(images, source_px), grid_size)
    batch = images.images[:batch_size].to(device)
    batched = device_images_per_s(BatchedDinoAugmentation(**crop_args), batch, device)
    return {"geometry": f"{global_px}/{local_px}", "source_px": source_px, "crops": f"2+{n_local}" if n_local else "2",
            "per_image_img_per_s": per_image, "batched_img_per_s": batched, "ratio": batched / per_image,
            "batched_loader_img_per_s": source_loader}


if __name__ == "__main__":
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(cpu_threads)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"DINO augmentation, batch {batch_size}: (a) DinoAugmentation in {num_workers} DataLoader workers, "
          f"(b) BatchedDinoAugmentation on {name}")
    print(f"{'geometry':9} {'source':>6} {'crops':5} {'(a) img/s':>10} {'(b) img/s':>10} {'(b)/(a)':>8} "
          f"{'(b) loader':>11}")
    rows = []
    for geometry in geometries:
        for n_local in (8, 0):
            row = bench_one(geometry, n_local, device)
            rows.append(row)
            print(f"{row['geometry']:9} {row['source_px']:6d} {row['crops']:5} {row['per_image_img_per_s']:10.0f} "
                  f"{row['batched_img_per_s']:10.0f} {row['ratio']:7.1f}x {row['batched_loader_img_per_s']:11.0f}",
                  flush=True)
    Path(out_json).parent.mkdir(parents=True, exist_ok=True)
    Path(out_json).write_text(json.dumps({"device": name, "config": config, "rows": rows}, indent=1))
    print(f"wrote {out_json}")
