"""Named configurations: every preset is valid params and prints as shell-safe -S options."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from rcnn import presets
from rcnn.pipeline.params import from_dict

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", sorted(presets.PRESETS))
def test_every_preset_passes_params_validation(name: str):
    params = from_dict(presets.apply({}, [name]))
    for key, value in presets.merged([name]).items():
        node = params
        for part in key.split("."):
            node = getattr(node, part)
        assert node == value, key
    assert not any(k.startswith(("data.", "classes")) for k in presets.merged([name]))


def test_options_are_single_shell_words_that_dvc_reads_back():
    words = presets.options(["fast-cpu", "paper"])
    assert words[::2] == ["-S"] * (len(words) // 2)
    for option in words[1::2]:
        assert " " not in option and "'" not in option and '"' not in option
        key, _, text = option.partition("=")
        assert yaml.safe_load(text) == presets.merged(["fast-cpu", "paper"])[key]
    assert presets.format_value([480, 600]) == "[480,600]" and presets.format_value(True) == "true"


def test_later_presets_win():
    assert presets.merged(["rcnn-best", "fast-cpu"])["proposals.max_side"] == 300
    assert presets.merged(["paper", "rcnn-best"])["regions.bg_iou"] == presets.RCNN_BEST["regions.bg_iou"]
    assert presets.merged(["rcnn-best", "paper"])["regions.bg_iou"] == presets.PAPER["regions.bg_iou"]


def test_cli_lists_prints_and_rejects_unknown_names():
    cli = [sys.executable, "-m", "rcnn.presets"]
    listed = subprocess.run([*cli, "--list"], capture_output=True, text=True, check=True).stdout.splitlines()
    assert [line.split()[0] for line in listed[:len(presets.PRESETS)]] == list(presets.PRESETS)
    # what model.weights=none means for them
    assert "assumes ImageNet-pretrained weights" in listed[-1] and "model.require_weights" in listed[-1]
    printed = subprocess.run([*cli, "fast-rcnn"], capture_output=True, text=True, check=True).stdout
    assert printed.split() == presets.options(["fast-rcnn"])
    bad = subprocess.run([*cli, "fastest"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error: unknown preset 'fastest'")


@pytest.mark.parametrize("name", sorted(presets.PRESETS))
def test_a_preset_with_random_weights_stops_at_the_first_stage_naming_the_weights(name: str, tmp_path):
    raw = presets.apply({"data": {"source": str(tmp_path / "my_set")}, "model": {"weights": "none"}}, [name])
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, str(REPO / "stages" / "download.py")], cwd=tmp_path, capture_output=True,
                          text=True)
    assert time.perf_counter() - started < 30
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith("error: model.weights = none, but this recipe") and "model.weights=imagenet" in \
        proc.stderr and "model.require_weights=false" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]  # no work done, nothing written
    raw["model"]["require_weights"] = False  # the opt-out: random features, at the user's word
    assert from_dict(raw).model.weights == "none"
