"""Faster R-CNN's proposals stage: no selective search (the model proposes its own regions), only the
split check and an output that says so."""

from __future__ import annotations

from pathlib import Path

from rcnn.data import voc
from rcnn.data.splits import check_evaluation_split
from rcnn.pipeline.params import Params
from rcnn.utils.fileio import atomic_dir, write_json


def run_no_proposals_stage(params: Params, voc_dir: str | Path = "data/voc", out_dir: str | Path = "data/proposals",
                           metrics_path: str | Path = "metrics/proposals.json") -> dict:
    """The proposals stage of a detector that proposes its own regions (Faster R-CNN): no selective search,
    ``out_dir`` and ``metrics_path`` saying so (an empty folder is not a reliable DVC output); the splits are
    still checked."""
    check_evaluation_split(voc.find_voc_root(voc_dir), params)
    metrics = {"selective_search": False, "arch": params.model.arch, "seconds": 0.0}
    with atomic_dir(out_dir) as tmp:
        write_json(tmp / "none.json", metrics)
    write_json(metrics_path, metrics)
    return metrics
