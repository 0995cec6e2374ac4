"""finetune_seg.py and seg_heads.py: the Dice loss, frozen-backbone training, head output shapes at odd input sizes,
data loaders, overlays, and a short run on the phantoms (its metrics: tests/test_metrics.py)."""
import json
import math

import numpy as np
import pytest
import torch

import finetune_seg as fs
import seg_heads as sh
from conftest import run_stage, tiny_vit
from metrics import segmentation_metrics


def small_vit(patch_size=14, seed=0):
    return tiny_vit(seed, img_size=4 * patch_size, patch_size=patch_size, embed_dim=32, depth=4, num_heads=2)


def tiny_segmenter(head, patch_size=14, n_classes=3, seed=0):
    vit = small_vit(patch_size, seed=seed)
    layers = sh.head_layers(head, vit.config.depth, linear_n_last=2 if head == "linear" else 1)
    seg_head = sh.build_head(head, vit.embed_dim, n_classes, omnirad_width=16,
                             linear_n_last=len(layers) if head == "linear" else 1, upernet_channels=16,
                             vitdet_channels=16)
    return fs.FrozenBackboneSegmenter(vit, seg_head, layers)


def vitdet_head_parameters_by_hand(D, C, n_classes):
    """ViTDetHead's size from its layer shapes: embed_dim D, pyramid width D, level/fusion width C."""
    transposed_conv = D * D * 2 * 2 + D                    # 2x2 stride-2, with bias
    pyramid = 3 * transposed_conv + 2 * D                  # 4x: two and a BatchNorm between them; 2x: one
    level = (D * C + 2 * C) + (C * C * 3 * 3 + 2 * C)      # 1x1 conv + BN, 3x3 conv + BN (convs without bias)
    fuse = 4 * C * C * 3 * 3 + 2 * C                       # 3x3 conv-BN-ReLU on the 4 concatenated levels
    return pyramid + 4 * level + fuse + C * n_classes + n_classes


# ---------------------------------------------------------------------------------------------- loss

def test_soft_dice_loss_equals_one_minus_hard_dice_for_confident_logits():
    target = torch.tensor([[[0, 1], [1, 2]]])
    pred = torch.tensor([[[0, 1], [2, 2]]])
    logits = 50.0 * torch.nn.functional.one_hot(pred, 3).permute(0, 3, 1, 2).float()
    # class 1: tp 1, fp 0, fn 1; class 2: tp 1, fp 1, fn 0; Dice (+1 smoothing) = 3/4 and 3/4
    assert fs.soft_dice_loss(logits, target).item() == pytest.approx(1 - 3 / 4, abs=1e-5)


# ---------------------------------------------------------------------------------------------- heads

def test_head_layers_reproduce_omnirad_blocks_and_fit_shallow_vits():
    assert sh.head_layers("omnirad", 12) == (3, 7, 11)
    assert sh.head_layers("omnirad", 6) == (1, 3, 5)
    assert sh.head_layers("linear", 12, linear_n_last=4) == (8, 9, 10, 11)
    assert sh.head_layers("omnirad", 12, layers=(11, 3, 7)) == (3, 7, 11)
    assert sh.head_layers("vitdet", 12) == (11,) and sh.head_layers("vitdet", 4) == (3,)
    with pytest.raises(ValueError, match="needs 4"):
        sh.head_layers("upernet", 12, layers=(3, 7, 11))


@pytest.mark.parametrize("head", sh.HEADS)
@pytest.mark.parametrize("size", [(448, 448), (518, 518), (224, 224), (224, 280)])
def test_head_gives_input_sized_logits_at_odd_sizes(head, size):
    model = tiny_segmenter(head, patch_size=14).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, *size))
    assert out.shape == (2, 3, *size)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("head", ["omnirad", "vitdet"])
def test_frozen_backbone_is_bit_identical_after_training_steps(head):
    model = tiny_segmenter(head, patch_size=8)
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    head_before = {k: v.clone() for k, v in model.head.state_dict().items()}
    # an optimizer over *all* parameters: freezing must not rely on leaving the backbone out of it
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    torch.manual_seed(1)
    for _ in range(3):
        fs.train_step(model, optimizer, torch.randn(4, 3, 32, 32), torch.randint(0, 3, (4, 32, 32)), dice_weight=0.5)
    assert not model.backbone.training and model.head.training
    for k, v in model.backbone.state_dict().items():
        assert torch.equal(v, before[k]), f"backbone tensor {k} changed"
    assert any(not torch.equal(v, head_before[k]) for k, v in model.head.state_dict().items())


@pytest.mark.parametrize("head", sh.HEADS)
def test_only_head_parameters_receive_gradients(head):
    model = tiny_segmenter(head, patch_size=8).train()
    loss = fs.seg_loss(model(torch.randn(2, 3, 32, 48)), torch.randint(0, 3, (2, 32, 48)), dice_weight=1.0)
    loss.backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert all(p.grad is not None for p in model.head.parameters())
    assert fs.count_parameters(model) == fs.count_parameters(model.head)


def test_vitdet_head_parameter_count_matches_a_hand_count():
    model = tiny_segmenter("vitdet", patch_size=8)  # embed_dim 32, vitdet_channels 16, 3 classes
    assert fs.count_parameters(model.head) == vitdet_head_parameters_by_hand(32, 16, 3)


def test_vitdet_pyramid_levels_are_4x_2x_1x_half_the_patch_grid():
    model = tiny_segmenter("vitdet", patch_size=8).eval()
    (patches, _), = model.features(torch.randn(1, 3, 32, 48))          # a 4 x 6 patch grid
    sizes = [tuple(to_level(patches).shape[-2:]) for to_level in model.head.pyramid]
    assert sizes == [(16, 24), (8, 12), (4, 6), (2, 3)]


def test_cached_features_give_the_same_logits_as_computing_them():
    model = tiny_segmenter("upernet", patch_size=8).eval()
    images = torch.randn(5, 3, 32, 32)
    cache = fs.cache_features(model, images, batch_size=2, device=torch.device("cpu"))
    index = torch.tensor([4, 1])
    with torch.no_grad():
        torch.testing.assert_close(model(images[index], fs.select_features(cache, index)), model(images[index]))


@pytest.mark.parametrize("head", sh.HEADS)
def test_bfloat16_autocast_path_trains_on_cached_features_and_predicts(head):
    """The CUDA recipe (bf16 autocast, features cached in bf16), run through CPU autocast."""
    model = tiny_segmenter(head, patch_size=8)
    images, masks = torch.randn(4, 3, 32, 32), torch.randint(0, 3, (4, 32, 32))
    cache = fs.cache_features(model, images, 2, torch.device("cpu"), autocast_dtype=torch.bfloat16)
    assert cache[0][0].dtype == torch.bfloat16
    optimizer = torch.optim.AdamW(model.head.parameters(), lr=1e-3)
    loss = fs.train_step(model, optimizer, images, masks, cache, dice_weight=0.5, autocast_dtype=torch.bfloat16)
    assert math.isfinite(loss)
    assert all(p.dtype == torch.float32 for p in model.head.parameters())
    pred = fs.predict(model, images, 3, torch.device("cpu"), cache, autocast_dtype=torch.bfloat16)
    assert pred.shape == (4, 32, 32) and pred.dtype == torch.uint8


@pytest.mark.parametrize("head, layers", [("omnirad", (1, 2, 3)), ("vitdet", (3,))])
def test_short_run_on_phantoms_beats_all_background_dice(head, layers):
    torch.manual_seed(0)
    datasets, names = fs.load_splits("", phantom_sizes=(64, 0, 16), phantom_px=48)
    train_x, train_y = fs.stack_split(datasets["train"], 48)
    test_x, test_y = fs.stack_split(datasets["test"], 48)
    seg_head = sh.build_head(head, 32, len(names), omnirad_width=32, vitdet_channels=32)
    model = fs.FrozenBackboneSegmenter(small_vit(8), seg_head, layers)
    cache = fs.cache_features(model, train_x, 32, torch.device("cpu"))
    optimizer = torch.optim.AdamW(model.head.parameters(), lr=3e-3, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(0)
    for _ in range(8):
        for idx in fs.epoch_batches(len(train_x), 16, generator):
            fs.train_step(model, optimizer, train_x[idx], train_y[idx], fs.select_features(cache, idx))
    trained = segmentation_metrics(fs.predict(model, test_x, 16, torch.device("cpu")), test_y, len(names))
    background = segmentation_metrics(torch.zeros_like(test_y), test_y, len(names))
    assert trained["mDice"] > background["mDice"] + 0.25
    assert trained["per_class"]["1"]["dice"] > 0.6  # the lungs, present in every phantom


# ---------------------------------------------------------------------------------------------- data and outputs

def test_npz_loader_reads_medsegbench_layout(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 3), ("val", 1), ("test", 2)):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, 20, 24), dtype=np.uint8)
        arrays[f"{split}_label"] = rng.integers(0, 3, (n, 20, 24)).astype(np.uint8)
    np.savez(tmp_path / "toy_256.npz", **arrays)
    datasets, names = fs.load_splits(str(tmp_path / "toy_256.npz"))
    assert [len(datasets[s]) for s in ("train", "val", "test")] == [3, 1, 2]
    assert names == ["background", "class 1", "class 2"]
    item = datasets["test"][1]
    assert item["image"].shape == (3, 20, 24) and item["mask"].dtype == torch.int64
    np.testing.assert_allclose(item["image"][1].numpy(), arrays["test_images"][1] / 255, rtol=1e-6)
    assert torch.equal(item["mask"], torch.from_numpy(arrays["test_label"][1].astype(np.int64)))


def test_npz_loader_names_the_missing_array(tmp_path):
    np.savez(tmp_path / "bad.npz", train_images=np.zeros((1, 4, 4), np.uint8))
    with pytest.raises(KeyError, match="train_label"):
        fs.npz_split(tmp_path / "bad.npz", "train")


def test_stack_split_keeps_mask_labels_and_whole_field_of_view():
    mask = torch.zeros(30, 60, dtype=torch.int64)
    mask[:, :10] = 2                                     # a band at the far left must survive (no crop)
    images, masks = fs.stack_split([{"image": torch.rand(3, 30, 60), "mask": mask}], 24)
    image, resized = images[0], masks[0]
    assert image.shape == (3, 24, 24) and resized.shape == (24, 24)
    assert set(resized.unique().tolist()) == {0, 2}
    assert (resized[:, 0] == 2).all() and (resized[:, -1] == 0).all()


def test_mean_std_row_is_percent_mean_and_population_std_over_seeds():
    runs = [{"mIoU": 0.80, "mDice": 0.90, "mF1": 0.91}, {"mIoU": 0.84, "mDice": 0.92, "mF1": 0.95}]
    assert fs.mean_std_row("omnirad", runs) == "| omnirad | 82.00 ± 2.00 | 91.00 ± 1.00 | 93.00 ± 2.00 |"
    assert fs.mean_std_row("linear", runs[:1]) == "| linear | 80.00 (1 seed) | 90.00 (1 seed) | 91.00 (1 seed) |"


def test_covid_lung_csv_loads_binary_masks_with_patient_splits(data_dir):
    csv_path = data_dir / "covid_cxr_lungseg" / "pairs.csv"
    if not csv_path.is_file():
        pytest.skip(f"{csv_path} not found")
    datasets, names = fs.load_splits(str(csv_path), mask_threshold=127)
    assert names == ["background", "foreground"]
    assert [len(datasets[s]) for s in ("train", "val", "test")] == [96, 8, 19]
    item = datasets["val"][0]
    assert item["mask"].shape == item["image"].shape[1:]
    assert set(item["mask"].unique().tolist()) == {0, 1}


@pytest.mark.parametrize("extra", [["--head=linear", "--seeds=0,1"],
                                   ["--head=omnirad", "--augment=True", "--hflip=True"]],
                         ids=["cached-features", "augmented"])
def test_script_runs_end_to_end_and_writes_json_table_and_overlays(tmp_path, extra):
    cmd = ["--epochs=2", "--batch_size=8", "--phantom_sizes=(16,8,4)",
           "--phantom_px=32", "--img_size=32", "--depth=3",
           "--omnirad_width=16", "--n_overlays=2", f"--out_dir={tmp_path}"] + extra
    result = run_stage("finetune_seg.py", *cmd, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((tmp_path / "results.json").read_text())
    assert [r["seed"] for r in summary["runs"]] == list(summary["seeds"])
    assert summary["layers"] == ([2] if "--head=linear" in extra else [0, 1, 2])
    assert "RANDOM INIT" in result.stdout
    table = (tmp_path / "table.md").read_text().splitlines()
    head = extra[0].split("=")[1]
    assert len(table) == 3 and table[2].startswith(f"| {head} on random-init ViT-tiny/8 | ")
    assert sorted(p.name for p in (tmp_path / "overlays").iterdir()) == ["test_00.png", "test_01.png"]


def test_script_prints_the_vitdet_head_parameter_count_of_a_hand_count(tmp_path):
    cmd = ["--head=vitdet", "--vitdet_channels=16", "--epochs=1", "--batch_size=8", "--phantom_sizes=(8,4,4)",
           "--phantom_px=32", "--img_size=32", "--depth=3", "--n_overlays=0", f"--out_dir={tmp_path}"]
    result = run_stage("finetune_seg.py", *cmd, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    n_head = vitdet_head_parameters_by_hand(192, 16, 3)  # ViT-tiny: embed_dim 192; phantoms: 3 classes
    assert f"head vitdet on blocks (2,): {n_head:,} trainable parameters" in result.stdout
    assert json.loads((tmp_path / "results.json").read_text())["trainable_parameters"] == n_head
