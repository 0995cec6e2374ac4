"""export_hf against transformers itself: the exported folders load in Dinov2Model and
Dinov2WithRegistersModel and give our tokens, and load_backbone reads them back with HF's resampling.

transformers runs in one subprocess started outside the repo: the repo's top-level kernels/ shadows
the PyPI package `kernels` that transformers >= 5 imports inside from_pretrained."""
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

pytest.importorskip("transformers")

from model import ViT, export_hf, load_backbone, vit_config  # noqa: E402
from test_model import TOL, last_hidden_state, max_err  # noqa: E402

STORED = 280  # the size the models' positions are stored for: 224 and 168x252 are resampled (shrunk)
INPUTS = {"x280": (280, 280), "x224": (224, 224), "x168x252": (168, 252)}
MODELS = {
    "plain": vit_config("tiny", depth=2, img_size=STORED),
    "reg4": vit_config("tiny", depth=2, img_size=STORED, n_registers=4),
    "swiglu": vit_config("tiny", depth=2, img_size=STORED, ffn="swiglu"),
}

# argv: jobs.json ({name: [folder, [input keys]]}), inputs.safetensors, outputs.safetensors
HF_SCRIPT = """
import json, sys
import torch, transformers
from safetensors.torch import load_file, save_file
jobs, inputs, outputs = json.load(open(sys.argv[1])), load_file(sys.argv[2]), {}
for name, (folder, keys) in jobs.items():
    with_registers = json.load(open(folder + "/config.json"))["model_type"] == "dinov2_with_registers"
    cls = transformers.Dinov2WithRegistersModel if with_registers else transformers.Dinov2Model
    model, info = cls.from_pretrained(folder, output_loading_info=True)
    assert not any(info.values()), (name, info)
    with torch.no_grad():
        for key in keys:
            outputs[name + "." + key] = model.eval()(pixel_values=inputs[key]).last_hidden_state
save_file(outputs, sys.argv[3])
"""


def randomized(config, seed):
    """A ViT with seeded random weights: LayerScale at its 1e-5 init or zero biases would hide a
    mismatch, and large positions make any resampling difference show."""
    model = ViT(config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name == "pos_embed":
                p.copy_(noise)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * noise)
            elif name.endswith("gamma"):
                p.copy_(0.5 + 0.1 * noise)
            else:
                p.copy_(0.1 * noise)
    return model


def run_transformers(jobs, inputs, work_dir):
    """last_hidden_state of every job's input keys, from `python -I` (no repo or cwd on sys.path) in work_dir."""
    (work_dir / "jobs.json").write_text(json.dumps(jobs))
    save_file(inputs, str(work_dir / "inputs.safetensors"))
    argv = [sys.executable, "-I", "-c", HF_SCRIPT, "jobs.json", "inputs.safetensors", "outputs.safetensors"]
    proc = subprocess.run(argv, cwd=work_dir, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return load_file(str(work_dir / "outputs.safetensors"))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Each model exported twice (stored size; img_size=224), and transformers' outputs for both."""
    work_dir = tmp_path_factory.mktemp("hf_export")
    g = torch.Generator().manual_seed(0)
    inputs = {key: torch.randn(2, 3, h, w, generator=g) for key, (h, w) in INPUTS.items()}
    models, jobs = {}, {}
    for seed, (name, config) in enumerate(MODELS.items()):
        models[name] = randomized(config, seed)
        export_hf(models[name], work_dir / name)
        export_hf(models[name], work_dir / f"{name}_at224", img_size=224)
        jobs[name] = [str(work_dir / name), list(INPUTS)]
        jobs[f"{name}_at224"] = [str(work_dir / f"{name}_at224"), ["x224"]]
    return models, inputs, run_transformers(jobs, inputs, work_dir), work_dir


@torch.no_grad()
@pytest.mark.parametrize("name", MODELS)
def test_transformers_loads_the_export_and_equals_ours_at_the_stored_size(exported, name):
    models, inputs, hf, _ = exported
    assert max_err(last_hidden_state(models[name], inputs["x280"]), hf[f"{name}.x280"]) < TOL


@torch.no_grad()
@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("key", INPUTS)
def test_our_reload_of_the_export_resamples_as_transformers(exported, name, key):
    _, inputs, hf, work_dir = exported
    reloaded = load_backbone(work_dir / name, verbose=False).eval()
    assert max_err(last_hidden_state(reloaded, inputs[key]), hf[f"{name}.{key}"]) < TOL


@torch.no_grad()
@pytest.mark.parametrize("name", MODELS)
def test_export_at_img_size_equals_the_official_convention_model_there(exported, name):
    models, inputs, hf, _ = exported
    model, x = models[name], inputs["x224"]
    assert model.config.interpolate_offset == 0.1  # DINOv2's official resampling, which HF cannot express
    assert max_err(last_hidden_state(model, x), hf[f"{name}_at224.x224"]) < TOL
    # what img_size= is for: exported at the stored size, HF resamples otherwise at 224
    assert max_err(last_hidden_state(model, x), hf[f"{name}.x224"]) > 1e-3
