"""finetune_cls.py: class weights, the learning-rate schedule, LoRA and head-only invariants, and a
short phantom run that must beat chance (its metrics: tests/test_metrics.py)."""
import copy
import json

import numpy as np
import pytest
import torch

import model as vit_model
from conftest import run_stage
import schedules
from finetune_cls import Classifier, class_weights, make_optimizer, set_lr, set_train_mode, setup_mode, train_step
from lora import LoRALinear, merge_lora
from metrics import classification_metrics



# ---------------------------------------------------------------------------- optimisation


def test_class_weights_are_balanced_inverse_frequencies():
    w = class_weights(np.array([0, 0, 0, 1]), 3, multi_label=False)  # counts 3, 1, 0
    np.testing.assert_allclose(w.numpy(), [4 / (3 * 3), 4 / (3 * 1), 1.0], rtol=1e-6)
    pos_w = class_weights(np.array([[1, 0], [0, 0], [0, 1], [0, 1]]), 2, multi_label=True)
    np.testing.assert_allclose(pos_w.numpy(), [3.0, 1.0])


def lr_by_name(model, optimizer):
    lr_of = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    return {name: lr_of[id(p)] for name, p in model.named_parameters() if id(p) in lr_of}


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_layerwise_decay_gives_each_block_the_lr_of_the_formula(mode):
    model = tiny_classifier()  # depth 2: embeddings 0.5^3, block 0 0.5^2, block 1 0.5, final norm and head 1
    setup_mode(model, mode, lora_rank=2, lora_alpha=4)
    optimizer = make_optimizer(model, 1e-2, 0.01, layerwise_decay=0.5)
    set_lr(optimizer, 4e-3)
    lrs = lr_by_name(model, optimizer)
    assert set(lrs) == {name for name, p in model.named_parameters() if p.requires_grad}
    expected = {"head.weight": 1.0, "head.bias": 1.0}
    if mode == "full":
        expected.update({"backbone.cls_token": 0.5 ** 3, "backbone.pos_embed": 0.5 ** 3,
                         "backbone.patch_embed.proj.weight": 0.5 ** 3, "backbone.blocks.0.attn.qkv.weight": 0.5 ** 2,
                         "backbone.blocks.0.norm1.bias": 0.5 ** 2, "backbone.blocks.1.mlp.fc2.weight": 0.5,
                         "backbone.norm.weight": 1.0, "backbone.norm.bias": 1.0})
    else:  # the adapters inside block i decay as block i does
        expected.update({"backbone.blocks.0.attn.qkv.lora_a": 0.5 ** 2, "backbone.blocks.0.mlp.fc1.lora_b": 0.5 ** 2,
                         "backbone.blocks.1.attn.proj.lora_a": 0.5})
    for name, multiplier in expected.items():
        assert lrs[name] == pytest.approx(4e-3 * multiplier), name
    no_decay = {name for group in optimizer.param_groups if group["weight_decay"] == 0 for name in group["names"]}
    assert no_decay == {name for name, p in model.named_parameters() if p.requires_grad and p.ndim < 2}
    assert all(group["weight_decay"] == 0.01 for group in optimizer.param_groups if group["names"][0] not in no_decay)


def test_finetuning_groups_parameters_with_pretrainings_code(monkeypatch):
    monkeypatch.setattr(schedules, "backbone_layer_id", lambda name, depth: 0)  # every layer as the embeddings
    model = tiny_classifier()
    optimizer = make_optimizer(model, 1e-2, 0.0, layerwise_decay=0.5)
    set_lr(optimizer, 1.0)
    lrs = lr_by_name(model, optimizer)
    assert lrs["backbone.norm.weight"] == lrs["backbone.blocks.1.attn.qkv.weight"] == 0.5 ** 3 and lrs["head.bias"] == 1


# ---------------------------------------------------------------------------- LoRA and head-only


def tiny_classifier(seed=0, n_classes=3, **head_kwargs):
    torch.manual_seed(seed)
    cfg = vit_model.vit_config("tiny", img_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                               layerscale_init=None)
    return Classifier(vit_model.ViT(cfg), n_classes, **head_kwargs)


def batch(seed=0, n=6, n_classes=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 16, 16, generator=g), torch.randint(0, n_classes, (n,), generator=g)


def test_lora_model_output_equals_base_model_exactly_at_init():
    base = tiny_classifier().eval()
    lora = copy.deepcopy(base)
    setup_mode(lora, "lora", lora_rank=4, lora_alpha=8)
    x, _ = batch()
    assert sum(isinstance(m, LoRALinear) for m in lora.modules()) == 2 * 4  # qkv, proj, fc1, fc2 per block
    assert torch.equal(lora.eval()(x), base(x))


def test_lora_trains_only_adapters_and_head():
    model = tiny_classifier()
    setup_mode(model, "lora", lora_rank=4, lora_alpha=8)
    optimizer = make_optimizer(model, 1e-2, 0.01)
    x, y = batch()
    for _ in range(2):  # B starts at zero, so A gets its first gradient on the second step
        train_step(model, optimizer, x, y, multi_label=False)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {name for name, _ in model.named_parameters() if ".lora_" in name or name.startswith("head.")}
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


def test_merged_lora_backbone_gives_the_unmerged_outputs():
    model = tiny_classifier()
    setup_mode(model, "lora", lora_rank=4, lora_alpha=8)
    optimizer = make_optimizer(model, 1e-2, 0.0)
    x, y = batch()
    for _ in range(5):
        train_step(model, optimizer, x, y, multi_label=False)
    model.eval()
    before = model(x)
    assert before.sub(tiny_classifier().head(tiny_classifier().eval().features(x))).abs().max() > 1e-4  # LoRA moved it
    merge_lora(model.backbone)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-5)


def test_merged_lora_backbone_round_trips_through_save_and_load_backbone(tmp_path):
    model = tiny_classifier()
    setup_mode(model, "lora", lora_rank=2, lora_alpha=4)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_b.normal_(std=0.1)
    x, _ = batch()
    before = model.eval().backbone(x)
    vit_model.save_backbone(merge_lora(model.backbone), tmp_path / "b.safetensors")
    loaded = vit_model.load_backbone(tmp_path / "b.safetensors", verbose=False).eval()
    torch.testing.assert_close(loaded(x), before, atol=1e-5, rtol=1e-5)


def test_head_only_training_leaves_backbone_bit_identical():
    model = tiny_classifier(head="mlp", head_features="cls+mean")
    frozen = copy.deepcopy(model.backbone.state_dict())
    head_before = copy.deepcopy(model.head.state_dict())
    setup_mode(model, "head")
    optimizer = make_optimizer(model, 1e-2, 0.05)  # weight decay must not touch the frozen weights
    set_train_mode(model, "head")
    assert not model.backbone.training
    x, y = batch()
    for _ in range(3):
        train_step(model, optimizer, x, y, multi_label=False)
    for name, tensor in model.backbone.state_dict().items():
        assert torch.equal(tensor, frozen[name]), name
    assert any(not torch.equal(v, head_before[k]) for k, v in model.head.state_dict().items())


# ---------------------------------------------------------------------------- the script end to end


def run_finetune_cls(tmp_path, *args):
    return run_stage("finetune_cls.py", f"--out_dir={tmp_path}", *args)


def test_bad_mode_is_an_error_before_any_work(tmp_path):
    result = run_finetune_cls(tmp_path, "--mode=lorra")
    assert result.returncode != 0 and "--mode='lorra'" in result.stderr and "full" in result.stderr
    assert not (tmp_path / "results.json").exists()


def test_script_runs_end_to_end_and_writes_the_table_row(tmp_path):
    result = run_finetune_cls(tmp_path, "--depth=1", "--img_size=32", "--epochs=1", "--phantom_sizes=(64,32,32)",
                        "--seeds=0,1", "--mode=lora", "--log_interval=1")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "img/s" in result.stdout and "ETA" in result.stdout and "ACC" in result.stdout and " ± " in result.stdout
    results = json.loads((tmp_path / "results.json").read_text())
    assert [r["seed"] for r in results["runs"]] == [0, 1]
    assert results["summary"]["acc"]["mean"] == pytest.approx(np.mean([r["test"]["acc"] for r in results["runs"]]))
    backbone = vit_model.load_backbone(tmp_path / "seed0" / "backbone.safetensors", verbose=False)  # LoRA merged
    assert backbone.config.depth == 1


def test_short_phantom_training_beats_chance():
    import data

    def cached(n, split):  # 32 px phantoms, without augmentation, so that a few hundred steps suffice
        ds = data.PhantomDataset(n, img_size=64, split=split)
        items = [ds[i] for i in range(n)]
        return (torch.stack([data.normalize(data.resize(it["image"], 32)) for it in items]),
                torch.tensor([it["label"] for it in items]))

    x, y = cached(512, "train")
    x_test, y_test = cached(256, "test")
    torch.manual_seed(0)
    cfg = vit_model.vit_config("tiny", patch_size=8, img_size=32, depth=1, layerscale_init=None)
    model = Classifier(vit_model.ViT(cfg), 4, head_features="cls+mean")
    setup_mode(model, "full")
    optimizer = make_optimizer(model, 1e-3, 0.01)
    g = torch.Generator().manual_seed(0)
    for _ in range(250):
        idx = torch.randint(0, len(x), (64,), generator=g)
        train_step(model, optimizer, x[idx], y[idx], multi_label=False)
    with torch.no_grad():
        probs = model.eval()(x_test).softmax(-1)
    test = classification_metrics(y_test, probs, multi_label=False)
    # 4 balanced classes: chance is 25% accuracy and 50% AUC (256 test images: sd ~2.7% on accuracy). Over
    # init seeds 0-5, 250 steps gave 48-61% and AUC 0.73-0.85; 90 steps gave 24-42%, so a change of
    # numerics (another torch or CPU) could fail it.
    assert test["acc"] > 0.40 and test["auc"] > 0.68, test
