"""Bad input, run as a user runs a script: one line on stderr, `error: ...` naming the key or file,
exit code 2, no traceback, and nothing in out_dir touched."""
import hashlib

import numpy as np
import pytest
import torch

from conftest import run_stage
from model import save_safetensors_atomic

SMALL_RUN = ["--max_iters=2", "--batch_size=4", "--eval_every=0", "--phantom_sizes=(16,8,8)"]


@pytest.fixture
def bad_files(tmp_path):
    """One broken input of each kind, in tmp_path/inputs."""
    root = tmp_path / "inputs"
    (root / "corrupt").mkdir(parents=True)
    (root / "corrupt" / "a.png").write_bytes(b"not a png")
    (root / "empty").mkdir()
    (root / "notes.txt").write_text("not data")
    (root / "no_image_column.csv").write_text("path,split\nx.png,train\n")
    (root / "missing_file.csv").write_text("image,split\nnothere.png,train\n")
    np.savez(root / "full.npz", train_images=np.zeros((4, 28, 28), np.uint8), train_labels=np.zeros((4, 1)))
    data = (root / "full.npz").read_bytes()
    (root / "trunc.npz").write_bytes(data[:len(data) // 2])
    save_safetensors_atomic({"w": torch.zeros(1000)}, root / "weights.safetensors")
    (root / "trunc.safetensors").write_bytes((root / "weights.safetensors").read_bytes()[:200])
    (root / "weights.safetensors").unlink()
    return root


def resume_from_truncated_checkpoint(root, out):
    save_safetensors_atomic({"w": torch.zeros(1000)}, out / "best.safetensors")
    save_safetensors_atomic({"w": torch.zeros(1000)}, out / "ckpt.safetensors")
    (out / "ckpt.safetensors").write_bytes((out / "ckpt.safetensors").read_bytes()[:200])
    return ["pretrain.py", *SMALL_RUN, "--resume=True"]


def rerun_into_a_used_out_dir(root, out):
    save_safetensors_atomic({"w": torch.zeros(3)}, out / "ckpt.safetensors")
    (out / "log.jsonl").write_text('{"step": 1}\n')
    return ["pretrain.py", *SMALL_RUN]


# (case, command or a function making the command and its files, text the message must contain)
CASES = [
    ("unknown key", ["pretrain.py", "--vit_size=small"], "did you mean model_size"),
    ("wrong type", ["pretrain.py", "--max_iters=abc"], "max_iters"),
    ("missing path", ["pretrain.py", *SMALL_RUN, "--train_data=('{root}/nope',)"], "nope"),
    ("data_path of no known kind", ["probe.py", "--data_path={root}/notes.txt"], "data_path"),
    ("data_path contradicting dataset", ["finetune_cls.py", "--dataset=phantom", "--data_path={root}/full.npz"],
     "data_path"),
    ("corrupt image", ["pretrain.py", *SMALL_RUN, "--train_data=('{root}/corrupt',)"], "a.png"),
    ("empty folder", ["pretrain.py", *SMALL_RUN, "--train_data=('{root}/empty',)"], "empty"),
    ("CSV missing a column", ["pretrain.py", *SMALL_RUN, "--train_data=('{root}/no_image_column.csv',)"],
     "no_image_column.csv"),
    ("CSV row naming a missing file", ["pretrain.py", *SMALL_RUN, "--train_data=('{root}/missing_file.csv',)"],
     "nothere.png"),
    ("truncated .npz", ["pretrain.py", *SMALL_RUN, "--train_data=('{root}/trunc.npz',)"], "trunc.npz"),
    ("truncated checkpoint, init_from", ["pretrain.py", *SMALL_RUN, "--init_from={root}/trunc.safetensors"],
     "trunc.safetensors"),
    ("truncated checkpoint, resume", resume_from_truncated_checkpoint, "best.safetensors"),
    ("size not a multiple of the patch, probe", ["probe.py", "--img_size=30"], "img_size"),
    ("size not a multiple of the patch, caption", ["caption.py", "--img_size=30"], "img_size"),
    ("rerun into a used out_dir", rerun_into_a_used_out_dir, "--resume=True"),
]


def digests(folder):
    return {p.relative_to(folder): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("case, command, expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_code_2_and_out_dir_untouched(case, command, expected, bad_files, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "earlier.txt").write_text("an earlier result")
    if callable(command):
        command = command(bad_files, out)
    script, *args = [part.format(root=bad_files) for part in command]
    before = digests(out)
    result = run_stage(script, *args, f"--out_dir={out}", timeout=240)
    message = result.stderr.strip()
    assert result.returncode == 2, f"{case}: exit code {result.returncode}\n{result.stderr[-2000:]}"
    assert message.startswith("error: ") and "\n" not in message and "Traceback" not in message, message
    assert expected in message, message
    assert digests(out) == before, f"{case}: out_dir changed"


def test_debug_shows_the_traceback():
    result = run_stage("pretrain.py", "--vit_size=small", NANORAD_DEBUG="1")
    assert result.returncode == 1 and "Traceback" in result.stderr and "did you mean model_size" in result.stderr


def test_a_given_data_path_chooses_its_loader(data_dir, tmp_path):
    result = run_stage("probe.py", f"--data_path={data_dir / 'breastmnist.npz'}", "--seeds=(0,)", "--bootstrap=0",
                       "--img_size=32", f"--out_dir={tmp_path}", timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "data: medmnist" in result.stdout
