"""The features stage's output folder, written in one step whichever family runs: cached backbone features
(R-CNN with a frozen backbone) or only ``info.json`` saying why there is nothing to cache."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from rcnn.pipeline.params import Params
from rcnn.utils.fileio import atomic_dir, write_json


def write_feature_cache(out_dir: str | Path, arrays: dict[str, dict[str, np.ndarray]], info: dict[str, Any],
                        timing: dict[str, Any], metrics_path: str | Path | None) -> dict[str, Any]:
    """Swap in the new feature folder in one step (a crash never leaves a half-written cache), then write
    the timing apart from it, so the folder DVC hashes is identical for identical inputs."""
    with atomic_dir(Path(out_dir)) as tmp:
        for split, data in arrays.items():
            np.savez(tmp / f"{split}.npz", **data)
        write_json(tmp / "info.json", info)
    if metrics_path is not None:
        write_json(metrics_path, {"cached": info["cached"], **timing})
    return {**info, **timing}


def run_no_features_stage(params: Params, regions_dir: str | Path = "data/regions",
                          out_dir: str | Path = "data/features",
                          metrics_path: str | Path | None = None) -> dict[str, Any]:
    """The features stage of a family that computes its features from whole images while it trains."""
    m = params.model
    info = {"backbone": m.backbone, "weights": m.weights, "trainable_layers": m.trainable_layers,
            "seed": params.seed, "arch": m.arch, "cached": False,
            "reason": f"model.arch = {m.arch}: the detector computes its features from whole images while it "
                      "trains, so there is nothing to cache"}
    return write_feature_cache(out_dir, {}, info, {}, metrics_path)
