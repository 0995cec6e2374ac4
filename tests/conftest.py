import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
sys.path.insert(0, str(REPO))


def shared_dir(name, what):
    """../shared/<name> beside the repository, or a skip that says where it was looked for."""
    path = SHARED / name
    if not path.is_dir():
        pytest.skip(f"{what} not found at {path} (they live in ../shared/{name} beside the repo)")
    return path


@pytest.fixture(scope="session")
def oracles_dir():
    return shared_dir("oracles", "oracle tensors")


def read_oracle(path):
    """One reference-output file of ../shared/oracles: (all its tensors, the `weights.` state dict with that
    prefix removed, the metadata JSON: source, config, what each key holds)."""
    tensors = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["meta"])
    weights = {k[len("weights."):]: v for k, v in tensors.items() if k.startswith("weights.")}
    return tensors, weights, meta


@pytest.fixture(scope="session")
def loss_oracle(oracles_dir):
    """DINOv2's DINO / iBOT / KoLeo losses and teacher targets on fixed inputs (see the oracles README)."""
    return load_file(str(oracles_dir / "dinov2_losses.safetensors"))


@pytest.fixture(scope="session")
def data_dir():
    return shared_dir("data", "real data files")


@pytest.fixture(autouse=True)
def one_cpu_thread():
    """Small ops run 10-30x slower when OpenMP threads outnumber the free cores (CI machines are small)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_vit(seed=0, **config):
    """A small random ViT for unit tests, seeded; `config` overrides ViTConfig's fields."""
    from model import ViT, ViTConfig  # after the sys.path line above
    torch.manual_seed(seed)
    return ViT(ViTConfig(**{"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 3, "num_heads": 4, **config}))


class ListDataset(torch.utils.data.Dataset):
    """Images and class indices in memory, as the stages' datasets give them: {"image", "label"} items."""

    def __init__(self, images, labels):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i], "label": int(self.labels[i])}


def cpu_env(**extra):
    """The environment of a script run in a test: on the CPU, also on a GPU machine."""
    return {**os.environ, "CUDA_VISIBLE_DEVICES": "", **extra}


def run_stage(script, *args, timeout=300, **env):
    """`python <script> <args>` from the repository root on the CPU; the finished process, output captured."""
    return subprocess.run([sys.executable, str(REPO / script), *args], cwd=REPO, env=cpu_env(**env),
                          capture_output=True, text=True, timeout=timeout)


# pretrain.py at its smallest, for tests of the step, resume and data parallelism
TINY_RUN = ["--model_size=tiny", "--depth=2", "--patch_size=8", "--global_crops_size=32", "--local_crops_size=16",
            "--n_local_crops=2", "--batch_size=8", "--head_n_prototypes=128", "--head_hidden_dim=64",
            "--head_bottleneck_dim=32", "--phantom_sizes=(64,64,64)", "--phantom_px=32", "--eval_every=0",
            "--log_interval=1", "--warmup_iters=2", "--teacher_temp_warmup_iters=4", "--freeze_last_layer_iters=1",
            # DINOv2's multi-crop views and teacher, not the phantom demo's: every path of the step runs
            "--global_crops_only=False", "--global_crops_scale=(0.32,1.0)", "--color_jitter=(0.4,0.4,0.2,0.1)",
            "--solarize_p=0.2", "--blur_probs=(1.0,0.1,0.5)", "--base_lr=0.004", "--momentum_teacher=0.99",
            "--final_momentum_teacher=1.0", "--warmup_teacher_temp=0.04", "--teacher_temp=0.07",
            "--phantom_task=lesions"]


def run_tiny_pretrain(args, timeout=300):
    """A one-thread CPU run of the tiny config (fp32, so resume is bitwise), also on a GPU machine."""
    return run_stage("pretrain.py", *TINY_RUN, *args, timeout=timeout, OMP_NUM_THREADS="1", PYTHONHASHSEED="0")
