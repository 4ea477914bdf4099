"""params.yaml validation as a user meets it: one line naming key and value, exit code 2, no traceback."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rcnn.utils.errors import run_cli
from conftest import shipped_params_text
from rcnn.pipeline.params import Params, from_dict, load_params, to_dict

REPO = Path(__file__).resolve().parents[1]


def _keys(tree: dict, prefix: str = "") -> set[str]:
    out = set()
    for key, value in tree.items():
        out.add(prefix + key)
        if isinstance(value, dict):
            out |= _keys(value, f"{prefix}{key}.")
    return out


def test_repo_params_yaml_lists_every_key_with_its_default():
    raw = yaml.safe_load(shipped_params_text())
    assert _keys(raw) == _keys(to_dict(Params()))
    assert from_dict(raw) == Params()


def test_missing_keys_take_defaults_and_a_dump_loads_back(tmp_path):
    (tmp_path / "empty.yaml").write_text("")
    assert load_params(tmp_path / "empty.yaml") == Params()
    partial = tmp_path / "partial.yaml"
    partial.write_text("train:\n  lr: 1\ndata:\n  max_images: 5\n")
    params = load_params(partial)
    assert params.train.lr == 1.0 and isinstance(params.train.lr, float) and params.data.max_images == 5
    assert params.train.epochs == Params().train.epochs
    full = tmp_path / "full.yaml"
    full.write_text(yaml.safe_dump(to_dict(params)))
    assert load_params(full) == params


def _with(override: dict) -> str:
    """The repo's params.yaml with ``override`` merged in, as YAML text."""
    merged = copy.deepcopy(yaml.safe_load(shipped_params_text()))
    for section, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(section), dict):
            merged[section].update(value)
        else:
            merged[section] = value
    return yaml.safe_dump(merged)


INVALID = {
    "unknown key": (_with({"data": {"sourse": "x"}}), "data.sourse is not a known parameter"),
    "unknown section": (_with({"trian": {"lr": 0.1}}), "trian is not a known parameter"),
    "string for float": (_with({"train": {"lr": "abc"}}), "train.lr = 'abc' is invalid: expected a number"),
    "bool for int": (_with({"train": {"batch_size": True}}), "train.batch_size = True is invalid: expected an integer"),
    "float for int": (_with({"train": {"epochs": 1.5}}), "train.epochs = 1.5 is invalid: expected an integer"),
    "null for float": (_with({"train": {"lr": None}}), "train.lr = None is invalid"),
    "zero lr": (_with({"train": {"lr": 0}}), "train.lr = 0.0 is out of range: allowed (0, 1]"),
    "negative lr": (_with({"train": {"lr": -0.001}}), "train.lr = -0.001 is out of range"),
    "iou above 1": (_with({"regions": {"fg_iou": 1.5}}), "regions.fg_iou = 1.5 is out of range: allowed (0, 1]"),
    "iou zero": (_with({"evaluate": {"nms_iou": 0.0}}), "evaluate.nms_iou = 0.0 is out of range"),
    "bg above fg": (_with({"regions": {"fg_iou": 0.5, "bg_iou": 0.6}}),
                    "regions.bg_iou = 0.6 is invalid: must be <= regions.fg_iou (0.5)"),
    "bad split name": (_with({"data": {"splits": ["train", "bogus"]}}), "data.splits = ['train', 'bogus'] is invalid"),
    "no splits": (_with({"data": {"splits": []}}), "data.splits = [] is invalid"),
    "bad eval split": (_with({"evaluate": {"split": "tst"}}), "evaluate.split = 'tst' is invalid"),
    "bad backbone": (_with({"model": {"backbone": "vgg16"}}), "model.backbone = 'vgg16' is invalid: expected one of"),
    "empty classes": (_with({"classes": []}), "classes = [] is invalid"),
    "background class": (_with({"classes": ["dog", "background"]}), "classes = ['dog', 'background'] is invalid"),
    "max_images zero": (_with({"data": {"max_images": 0}}), "data.max_images = 0 is out of range"),
    "no mirrors": (_with({"data": {"mirrors": []}}), "data.mirrors = [] is invalid"),
    "section not a mapping": (_with({"data": 5}), "data = 5 is invalid: expected a mapping"),
    "bad yaml": ("data: [unclosed\n", "params.yaml is not valid YAML"),
    "bad arch": (_with({"model": {"arch": "yolo"}}), "model.arch = 'yolo' is invalid: expected one of 'rcnn', 'fast_rcnn'"),
    "bad optimizer": (_with({"train": {"optimizer": "lbfgs"}}), "train.optimizer = 'lbfgs' is invalid"),
    "bad schedule": (_with({"train": {"schedule": "linear"}}), "train.schedule = 'linear' is invalid"),
    "max_size below image_size": (_with({"model": {"image_size": 600, "max_size": 500}}),
                                  "model.max_size = 500 is invalid: must be >= model.image_size (600)"),
    "training size above max": (_with({"train": {"image_sizes": [480, 900]}}),
                                "train.image_sizes = [480, 900] is invalid: each size must be in [32, model.max_size"),
    "unknown flip": (_with({"train": {"flips": ["horizontal", "upside"]}}),
                     "train.flips = ['horizontal', 'upside'] is invalid: each must be one of horizontal, vertical, "
                     "diagonal"),
    "flip named twice": (_with({"train": {"flips": ["vertical", "vertical"]}}),
                         "train.flips = ['vertical', 'vertical'] is invalid"),
    "warm-up as long as training": (_with({"train": {"epochs": 3, "warmup_epochs": 3}}),
                                    "train.warmup_epochs = 3 is invalid: must be < train.epochs (3)"),
    "fg_fraction zero": (_with({"train": {"fg_fraction": 0}}), "train.fg_fraction = 0.0 is out of range"),
    "rois zero": (_with({"train": {"rois_per_image": 0}}), "train.rois_per_image = 0 is out of range"),
    "bad feature stride": (_with({"model": {"feature_stride": 8}}),
                           "model.feature_stride = 8 is invalid: expected one of 16, 32"),
    "context region too large": (_with({"model": {"roi_context": 12}}), "model.roi_context = 12.0 is out of range"),
    "float feature stride": (_with({"model": {"feature_stride": 16.0}}), "model.feature_stride = 16.0 is invalid"),
    "stride 16 without reduction": (_with({"model": {"feature_stride": 16, "roi_channels": 0}}),
                                    "model.feature_stride = 16 needs model.roi_channels > 0"),
}


def _run_load(path: Path, capsys: pytest.CaptureFixture) -> str:
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: load_params(path))
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    return captured.err


@pytest.mark.parametrize("text, message", INVALID.values(), ids=INVALID.keys())
def test_invalid_value_gives_one_line_naming_key_and_value(tmp_path, capsys, text, message):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    err = _run_load(path, capsys)
    assert err.startswith("error: ") and err.endswith("\n") and err.count("\n") == 1, err
    assert message in err


def test_missing_params_file(tmp_path, capsys):
    err = _run_load(tmp_path / "params.yaml", capsys)
    assert err == f"error: {tmp_path / 'params.yaml'} not found: run from the project root or pass the params file\n"


@pytest.mark.parametrize("text, message", [INVALID["string for float"], INVALID["bad yaml"]])
def test_stage_script_reports_bad_params_without_traceback(tmp_path, text, message):
    (tmp_path / "params.yaml").write_text(text)
    done = subprocess.run([sys.executable, str(REPO / "stages" / "download.py")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and message in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "data").exists()
