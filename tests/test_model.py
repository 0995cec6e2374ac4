"""The ViT against tensors produced by the reference implementations (../shared/oracles)."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from model import ViT, export_hf, load_backbone, save_backbone, vit_config

TOL = 1e-4


def max_err(a, b):
    return (a - b).abs().max().item()


def oracle(oracles_dir, name):
    tensors = load_file(str(oracles_dir / f"{name}.safetensors"))
    weights = {k[len("weights."):]: v for k, v in tensors.items() if k.startswith("weights.")}
    return tensors, weights


@pytest.fixture(scope="module", params=["dinov2_vit_official", "dinov2_vit_reg4_official"])
def official(request, oracles_dir, tmp_path_factory):
    """The official checkpoint as a user has it: a torch.hub .pth state dict, through load_backbone."""
    tensors, weights = oracle(oracles_dir, request.param)
    path = tmp_path_factory.mktemp("ckpt") / f"{request.param}.pth"
    torch.save(weights, path)
    return tensors, load_backbone(path).eval()


@torch.no_grad()
@pytest.mark.parametrize("res", ["224", "518"])
def test_vit_matches_dinov2_official(official, res):
    tensors, model = official
    out = model.forward_features(tensors[f"input.x{res}"])
    assert max_err(out["x_norm_clstoken"], tensors[f"out{res}.cls"]) < TOL
    assert max_err(out["x_norm_patchtokens"], tensors[f"out{res}.patch"]) < TOL
    if res == "224":
        assert max_err(out["x_prenorm"], tensors["out224.prenorm"]) < TOL


@torch.no_grad()
def test_vit_matches_dinov2_official_with_masked_patches(official):
    tensors, model = official
    out = model.forward_features(tensors["input.x224"], masks=tensors["input.masks224"])
    assert max_err(out["x_norm_clstoken"], tensors["out224_masked.cls"]) < TOL
    assert max_err(out["x_norm_patchtokens"], tensors["out224_masked.patch"]) < TOL


@torch.no_grad()
def test_vit_matches_dinov2_official_intermediate_layers(official):
    tensors, model = official
    x = tensors["input.x224"]
    normed = model.get_intermediate_layers(x, [0, 2, 3], reshape=True, return_class_token=True, norm=True)
    for i, (patch_map, cls) in zip([0, 2, 3], normed):
        assert max_err(patch_map, tensors[f"inter224.layer{i}.patch_map_norm"]) < TOL
        assert max_err(cls, tensors[f"inter224.layer{i}.cls_norm"]) < TOL
    raw = model.get_intermediate_layers(x, [1, 3], norm=False)
    for i, patches in zip([1, 3], raw):
        assert max_err(patches, tensors[f"inter224.layer{i}.patch_raw"]) < TOL


@torch.no_grad()
def test_vit_matches_dinov2_register_tokens(oracles_dir, tmp_path):
    tensors, weights = oracle(oracles_dir, "dinov2_vit_reg4_official")
    torch.save(weights, tmp_path / "reg4.pth")
    model = load_backbone(tmp_path / "reg4.pth").eval()
    assert model.n_registers == 4
    out = model.forward_features(tensors["input.x224"])
    assert max_err(out["x_norm_regtokens"], tensors["out224.reg"]) < TOL


@pytest.fixture(scope="module")
def hf(oracles_dir, tmp_path_factory):
    tensors, weights = oracle(oracles_dir, "dinov2_vit_hf")
    path = tmp_path_factory.mktemp("hf") / "model.safetensors"
    save_file(weights, str(path))
    return tensors, weights, load_backbone(path).eval()


def last_hidden_state(model, x):
    """HF's last_hidden_state: CLS, then the register tokens (if any), then the patches, all normed."""
    out = model.forward_features(x)
    return torch.cat([out["x_norm_clstoken"][:, None], out["x_norm_regtokens"], out["x_norm_patchtokens"]], dim=1)


@torch.no_grad()
@pytest.mark.parametrize("res", ["224", "518"])
def test_vit_matches_hf_dinov2(hf, res):
    tensors, _, model = hf
    assert max_err(last_hidden_state(model, tensors[f"input.x{res}"]), tensors[f"out{res}.last_hidden_state"]) < TOL


@torch.no_grad()
def test_export_hf_has_hf_key_set_and_reloads_identically(hf, tmp_path):
    tensors, hf_weights, model = hf
    export_hf(model, tmp_path / "export")
    exported = load_file(str(tmp_path / "export" / "model.safetensors"))
    assert set(exported) == set(hf_weights)
    for key, value in hf_weights.items():
        assert exported[key].shape == value.shape, key
    reloaded = load_backbone(tmp_path / "export").eval()
    x = tensors["input.x224"]
    assert torch.equal(last_hidden_state(reloaded, x), last_hidden_state(model, x))


def test_export_hf_config_has_the_types_transformers_declares(tmp_path):
    # Dinov2Config is a strict dataclass: mlp_ratio 4.0 where it declares an int fails from_pretrained
    export_hf(ViT(vit_config("tiny", depth=1, img_size=56, n_registers=2)), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    ints = ["hidden_size", "num_hidden_layers", "num_attention_heads", "mlp_ratio", "image_size", "patch_size",
            "num_channels", "num_register_tokens"]
    floats = ["layer_norm_eps", "layerscale_value", "drop_path_rate"]
    for key in ints:
        assert type(config[key]) is int, (key, config[key])
    for key in floats:
        assert type(config[key]) is float, (key, config[key])


def test_export_hf_refuses_a_non_integer_mlp_ratio(tmp_path):
    with pytest.raises(ValueError, match="mlp_ratio 2.5 is not an integer"):
        export_hf(ViT(vit_config("tiny", depth=1, img_size=28, mlp_ratio=2.5)), tmp_path)


def test_export_hf_warns_when_hf_resamples_positions_otherwise(tmp_path, capsys):
    export_hf(ViT(vit_config("tiny", depth=1, img_size=56)), tmp_path / "official")  # offset 0.1: no HF setting
    assert "export_hf: warning: Dinov2Model resamples" in capsys.readouterr().out
    export_hf(load_backbone(tmp_path / "official", verbose=False), tmp_path / "hf")  # HF's own convention
    assert capsys.readouterr().out == ""
    # without antialias the register class's convention is missed too
    no_antialias = vit_config("tiny", depth=1, img_size=56, n_registers=2, interpolate_offset=0.0)
    export_hf(ViT(no_antialias), tmp_path / "registers")
    assert "export_hf: warning: Dinov2WithRegistersModel resamples" in capsys.readouterr().out


@pytest.fixture(scope="module")
def timm_model(oracles_dir, tmp_path_factory):
    tensors, weights = oracle(oracles_dir, "timm_vit")
    # a published timm checkpoint usually carries its classifier: it must be skipped, not loaded
    weights = dict(weights, **{"head.weight": torch.zeros(10, 192), "head.bias": torch.zeros(10)})
    path = tmp_path_factory.mktemp("timm") / "timm_vit.safetensors"
    save_file(weights, str(path))
    return tensors, load_backbone(path).eval()


@torch.no_grad()
@pytest.mark.parametrize("res", ["224", "448", "320x240"])
def test_vit_matches_timm(timm_model, res):
    tensors, model = timm_model
    assert model.patch_size == 16
    assert max_err(last_hidden_state(model, tensors[f"input.x{res}"]), tensors[f"out{res}.tokens"]) < TOL


@torch.no_grad()
def test_vit_matches_timm_intermediate_layers(timm_model):
    tensors, model = timm_model
    maps = model.get_intermediate_layers(tensors["input.x224"], [0, 2, 3], reshape=True, norm=False)
    for i, patch_map in zip([0, 2, 3], maps):
        assert max_err(patch_map, tensors[f"inter224.layer{i}.patch_map_raw"]) < TOL


@pytest.mark.parametrize("size,expected", [("small", 22_056_576), ("base", 86_580_480)])
def test_parameter_count_equals_official_dinov2_at_518(size, expected):
    model = ViT(vit_config(size, img_size=518, patch_size=14))
    assert sum(p.numel() for p in model.parameters()) == expected


@torch.no_grad()
def test_nanorad_format_round_trip(tmp_path):
    model = ViT(vit_config("tiny", depth=2, img_size=56, patch_size=14, n_registers=2)).eval()
    save_backbone(model, tmp_path / "vit.safetensors")
    assert (tmp_path / "vit.safetensors.json").exists()
    reloaded = load_backbone(tmp_path / "vit.safetensors").eval()
    assert reloaded.config == model.config
    x = torch.randn(2, 3, 56, 70)
    assert torch.equal(reloaded(x), model(x))


def test_missing_key_is_an_error_that_names_it(oracles_dir, tmp_path):
    _, weights = oracle(oracles_dir, "dinov2_vit_official")
    del weights["blocks.2.ls1.gamma"]
    torch.save(weights, tmp_path / "broken.pth")
    with pytest.raises(KeyError, match="blocks.2.ls1.gamma"):
        load_backbone(tmp_path / "broken.pth")


def test_unexpected_key_is_an_error_that_names_it(oracles_dir, tmp_path):
    _, weights = oracle(oracles_dir, "dinov2_vit_official")
    weights["blocks.0.attn.extra_bias"] = torch.zeros(3)
    torch.save(weights, tmp_path / "broken.pth")
    with pytest.raises(KeyError, match="blocks.0.attn.extra_bias"):
        load_backbone(tmp_path / "broken.pth")


def test_masks_change_only_through_the_mask_token():
    model = ViT(vit_config("tiny", depth=2, img_size=56)).eval()
    x = torch.randn(1, 3, 56, 56)
    none_masked = model.forward_features(x, masks=torch.zeros(1, 16, dtype=torch.bool))
    assert torch.equal(none_masked["x_norm_clstoken"], model(x))
    masks = torch.zeros(1, 16, dtype=torch.bool)
    masks[0, 3] = True
    with torch.no_grad():
        model.mask_token.normal_()
    assert not torch.allclose(model.forward_features(x, masks=masks)["x_norm_clstoken"], model(x))


def test_swiglu_giant_block_shapes():
    model = ViT(vit_config("giant", depth=1, img_size=28))
    assert model.blocks[0].mlp.w12.weight.shape == (2 * 4096, 1536)  # DINOv2 ViT-g: 4096 hidden


@torch.no_grad()
def test_dino_head_matches_dinov2(oracles_dir, tmp_path):
    from model import load_dino_head
    tensors, weights = oracle(oracles_dir, "dinov2_head")
    save_file(weights, str(tmp_path / "dino_head.safetensors"))
    head = load_dino_head(tmp_path / "dino_head.safetensors").eval()
    # weight_g is loaded as stored (the oracle set it away from 1), not reset
    assert torch.equal(head.last_layer.weight_g, weights["last_layer.weight_g"])
    assert max_err(head(tensors["input.x"]), tensors["out.logits"]) < TOL


@torch.no_grad()
def test_backbone_loads_from_a_dinov2_training_checkpoint_with_heads(oracles_dir, tmp_path):
    tensors, weights = oracle(oracles_dir, "dinov2_vit_official")
    # DINOv2's training checkpoints: {"teacher": {"backbone.*", "dino_head.*", "ibot_head.*"}, ...}
    checkpoint = {f"backbone.{k}": v for k, v in weights.items()}
    checkpoint["dino_head.mlp.0.weight"] = torch.zeros(8, 192)
    torch.save({"teacher": checkpoint}, tmp_path / "training_checkpoint.pth")
    model = load_backbone(tmp_path / "training_checkpoint.pth").eval()
    out = model.forward_features(tensors["input.x224"])
    assert max_err(out["x_norm_clstoken"], tensors["out224.cls"]) < TOL
