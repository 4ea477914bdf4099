"""bench/steps.py times each switch of the two-stage trainer and the stock peer on one plan of batches (its own
file so that pytest-xdist runs it beside the other benches' tests)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

STEPS = Path(__file__).resolve().parents[1] / "bench" / "steps.py"


def test_steps_bench_times_each_switch_and_the_stock_peer_on_the_same_batches(tmp_path):
    out = tmp_path / "steps"
    tiny = ["model.backbone=resnet18", "model.trainable_layers=1", "model.image_size=96", "model.max_size=128",
            "train.image_sizes=[96]", "model.roi_channels=8", "model.roi_size=3", "model.hidden=16",
            "proposals.max_proposals=100", "proposals.mode=fast"]
    proc = subprocess.run([sys.executable, str(STEPS), "--images", "4", "--steps", "1", "--warmup", "1",
                           "--set", *tiny, "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["device"] == "cpu" and results["dataset"] == "synthetic" and results["steps"] == 1
    rows = results["rows"]
    import torch

    from rcnn.engine.device import inference_dtype, use_channels_last
    cpu = torch.device("cpu")  # each switch flipped from the code's choice on this CPU
    switches = ("default", "2 loader workers", "channels-last " + ("off" if use_channels_last(cpu) else "on"),
                "float32 (no autocast)" if inference_dtype(cpu) == torch.bfloat16 else "bfloat16 autocast",
                "grouped batches",  # free on a CPU
                "torchvision's RoIAlign")  # gathered on a CPU
    expected = ["reading batches, 0 workers", "reading batches, 2 workers",
                *(f"{family}, {s}" for family in ("fast_rcnn", "faster_rcnn") for s in switches),
                "stock torchvision Faster R-CNN"]
    assert sorted(rows) == sorted(expected)
    assert all(row["ms_per_step"] > 0 for row in rows.values())
    table = [line for line in (out / "results.md").read_text().splitlines() if line.startswith("| ")]
    assert table[0] == "| configuration | ms per step | vs the family's default |"
    assert [line.split(" | ")[0][2:] for line in table[1:]] == expected  # the order measured
    assert table[3].endswith("| 1.00x |") and table[-1].endswith("x |")  # fast_rcnn's default; the peer's ratio


def test_steps_bench_on_a_folder_that_is_not_a_voc_set_is_a_one_line_error(tmp_path):
    proc = subprocess.run([sys.executable, str(STEPS), str(tmp_path), "--out", str(tmp_path / "steps")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ")
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "steps").exists()
