"""The configurator: config files and --key=value overrides, with errors for typos and wrong types."""
import ast
import re

import pytest

from config import configure
from conftest import REPO


def defaults():
    return {"batch_size": 64, "lr": 1e-4, "compile": False, "out_dir": "out/x", "init_from": None,
            "crops_scale": (0.32, 1.0)}


def test_overrides_parse_python_literals_and_bare_words():
    ns = defaults()
    config = configure(ns, ["--batch_size=8", "--lr=3e-4", "--compile=True", "--out_dir=out/y",
                            "--init_from=ckpt.pth", "--crops_scale=(0.5,1.0)"])
    assert ns["batch_size"] == 8 and ns["lr"] == 3e-4 and ns["compile"] is True
    assert ns["out_dir"] == "out/y" and ns["init_from"] == "ckpt.pth" and ns["crops_scale"] == (0.5, 1.0)
    assert config["batch_size"] == 8


def test_int_is_accepted_where_a_float_is_expected():
    ns = defaults()
    configure(ns, ["--lr=1"])
    assert ns["lr"] == 1.0 and isinstance(ns["lr"], float)


def test_unknown_key_is_an_error():
    with pytest.raises(KeyError, match="batchsize"):
        configure(defaults(), ["--batchsize=8"])


def test_wrong_type_is_an_error_naming_the_key():
    with pytest.raises(TypeError, match="batch_size"):
        configure(defaults(), ["--batch_size=big"])


def test_config_file_then_override(tmp_path):
    path = tmp_path / "cfg.py"
    path.write_text("import math\nbatch_size = 32\nlr = 2 * math.pi\n")
    ns = defaults()
    configure(ns, [str(path), "--batch_size=4"])
    assert ns["batch_size"] == 4 and ns["lr"] == pytest.approx(6.283185307)


def test_config_file_with_unknown_key_names_the_file(tmp_path):
    path = tmp_path / "cfg.py"
    path.write_text("batch_sise = 32\n")
    with pytest.raises(KeyError, match="cfg.py.*batch_sise"):
        configure(defaults(), [str(path)])


def test_missing_config_file_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match="nope.py"):
        configure(defaults(), ["config/nope.py"])


def test_upper_case_constants_are_not_settings():
    ns = dict(defaults(), MODES=("full", "head"))
    with pytest.raises(KeyError, match="MODES"):
        configure(ns, ["--MODES=('x',)"])


def test_an_old_key_name_points_at_todays_name():
    ns = dict(defaults(), model_size="tiny", dtype="float32")
    with pytest.raises(KeyError, match="unknown config key vit_size; did you mean model_size"):
        configure(ns, ["--vit_size=small"])
    with pytest.raises(KeyError, match="unknown config key amp_dtype; did you mean dtype"):
        configure(ns, ["--amp_dtype=float16"])


def test_a_mistyped_key_points_at_the_closest_known_key(tmp_path):
    with pytest.raises(KeyError, match="did you mean batch_size"):
        configure(defaults(), ["--batchsize=8"])
    path = tmp_path / "cfg.py"
    path.write_text("out_dri = 'out/z'\n")
    with pytest.raises(KeyError, match="cfg.py: unknown config key out_dri; did you mean out_dir"):
        configure(defaults(), [str(path)])


SCRIPT_OF_CONFIG = {"caption_": "caption.py", "cls_": "finetune_cls.py", "seg_": "finetune_seg.py", "probe_": "probe.py"}


@pytest.mark.parametrize("path", sorted(p.name for p in (REPO / "config").glob("*.py") if p.name != "__init__.py"))
def test_every_ready_config_sets_only_keys_its_script_declares(path):
    script = next((s for prefix, s in SCRIPT_OF_CONFIG.items() if path.startswith(prefix)), "pretrain.py")
    declared = set(re.findall(r"^([a-z_][a-z0-9_]*) = ", (REPO / script).read_text(), re.M))
    assigned = [t.id for node in ast.parse((REPO / "config" / path).read_text()).body if isinstance(node, ast.Assign)
                for t in node.targets if isinstance(t, ast.Name) and not t.id.startswith("_")]
    assert assigned and set(assigned) <= declared, f"{path}: keys {set(assigned) - declared} are not in {script}"
