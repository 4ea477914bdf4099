"""Named configurations: every preset is valid params and prints as shell-safe -S options."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from rcnn import presets
from rcnn.params import from_dict


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
    assert "assumes ImageNet-pretrained weights" in listed[-1]  # what model.weights=none means for them
    printed = subprocess.run([*cli, "fast-rcnn"], capture_output=True, text=True, check=True).stdout
    assert printed.split() == presets.options(["fast-rcnn"])
    bad = subprocess.run([*cli, "fastest"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error: unknown preset 'fastest'")
