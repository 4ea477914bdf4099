"""Backbone features of every training region, computed once and cached.

The tutorial recomputed its frozen backbone over every region in every epoch; with the backbone
frozen its output never changes, so one pass here lets each training epoch take seconds.
When the backbone is fine-tuned (``model.trainable_layers > 0``) cached features would be stale
after the first step, so only ``info.json`` saying so is written.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from rcnn.proposals import labelling

from rcnn.engine.device import inference_autocast, inference_dtype, select_device, use_channels_last
from rcnn.families.rcnn import regions
from rcnn.families.rcnn.model import RegionClassifier, build_model, preprocess
from rcnn.pipeline.feature_cache import write_feature_cache
from rcnn.pipeline.params import Params
from rcnn.utils.errors import RcnnError
from rcnn.utils.fileio import load_npz, read_json

# Per-region arrays carried over from the region shards, in region order.
REGION_KEYS = ("labels", "boxes", "gt_boxes", "ious", "image_ids")


def crop_features(model: RegionClassifier, crops: np.ndarray, device: torch.device, batch_size: int) -> np.ndarray:
    """(N,S,S,3) uint8 RGB crops -> (N,D) float32 backbone features (eval mode, inference numerics)."""
    model.eval()
    out = []
    with torch.inference_mode(), inference_autocast(device):
        for start in range(0, len(crops), batch_size):
            out.append(model.features(preprocess(crops[start:start + batch_size], device)).float().cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, model.feature_dim), np.float32)


def split_features(model: RegionClassifier, regions_dir: str | Path, split: str, device: torch.device,
                   batch_size: int, min_iou: float | None = None) -> dict[str, np.ndarray]:
    """Features plus the per-region arrays of every region of ``split``, in region order; with ``min_iou``
    only of the foreground regions overlapping their object by at least that much (box regression's rows)."""
    index = labelling.read_index(regions_dir)
    total = index.get("splits", {}).get(split, {}).get("regions")
    parts: dict[str, list[np.ndarray]] = {key: [] for key in ("features", *REGION_KEYS)}
    with tqdm(total=total, desc=f"features {split}", unit="region", leave=min_iou is None) as bar:
        for shard in regions.iter_shards(regions_dir, split):
            rows = slice(None)
            if min_iou is not None:
                rows = np.flatnonzero((np.asarray(shard["labels"]) > 0) & (np.asarray(shard["ious"]) >= min_iou))
            parts["features"].append(crop_features(model, shard["crops"][rows], device, batch_size))
            for key in REGION_KEYS:
                parts[key].append(np.asarray(shard[key])[rows])
            bar.update(len(shard["labels"]))
    if not parts["features"]:
        return {"features": np.zeros((0, model.feature_dim), np.float32), "labels": np.zeros(0, np.int64),
                "boxes": np.zeros((0, 4), np.float32), "gt_boxes": np.zeros((0, 4), np.float32),
                "ious": np.zeros(0, np.float32), "image_ids": np.zeros(0, dtype=str)}
    return {key: np.concatenate(value) for key, value in parts.items()}


def feature_splits(params: Params) -> list[str]:
    """The splits the train stage needs features for (train, then val; once if they are the same)."""
    return list(dict.fromkeys([params.data.train_split, params.data.val_split]))


def run_features_stage(params: Params, regions_dir: str | Path = "data/regions",
                       out_dir: str | Path = "data/features",
                       metrics_path: str | Path | None = None) -> dict[str, Any]:
    """Write ``<out_dir>/<split>.npz`` for the train and val splits and ``info.json`` (what the cache
    holds: the same bytes for the same inputs) and the timing to ``metrics_path``; returns both."""
    out_dir = Path(out_dir)
    m = params.model
    info: dict[str, Any] = {"backbone": m.backbone, "weights": m.weights, "trainable_layers": m.trainable_layers,
                            "seed": params.seed}
    if m.trainable_layers > 0:
        info.update(cached=False, reason=f"model.trainable_layers = {m.trainable_layers}: the backbone is "
                    "fine-tuned, so its features change during training and the train stage reads crops instead")
        return write_feature_cache(out_dir, {}, info, {}, metrics_path)
    index = labelling.read_index(regions_dir)
    device = select_device(params.train.device)
    model = build_model(params).to(device).eval()
    arrays, counts = {}, {}
    start = time.perf_counter()
    for split in feature_splits(params):
        arrays[split] = split_features(model, regions_dir, split, device, params.train.feature_batch_size)
        counts[split] = len(arrays[split]["labels"])
    seconds = time.perf_counter() - start
    total = sum(counts.values())
    info.update(cached=True, dim=model.feature_dim, splits=counts, crop_size=index.get("crop_size"),
                context=index.get("context"), device=str(device), channels_last=use_channels_last(device),
                precision=str(inference_dtype(device)).removeprefix("torch."),
                batch_size=params.train.feature_batch_size)
    timing = {"seconds": round(seconds, 2), "threads": torch.get_num_threads(),
              "regions_per_second": round(total / seconds, 1) if seconds > 0 else None}
    return write_feature_cache(out_dir, arrays, info, timing, metrics_path)


def read_info(features_dir: str | Path) -> dict[str, Any]:
    """``info.json`` of a features folder."""
    return read_json(Path(features_dir) / "info.json", "features")


def load_features(features_dir: str | Path, split: str, num_classes: int | None = None) -> dict[str, np.ndarray]:
    """The cached arrays of ``split`` (``features`` float32 (N,D) and the per-region arrays); with
    ``num_classes``, labels outside ``0..num_classes-1`` make the file invalid."""
    path = Path(features_dir) / f"{split}.npz"
    if not path.is_file():
        raise RcnnError(f"{path} not found: run the features stage (with model.trainable_layers = 0)")
    data = load_npz(path, "features", "features")
    invalid = f"{path} is not a valid features file"
    missing = [key for key in ("features", *REGION_KEYS) if key not in data]
    if missing:
        raise RcnnError(f"{invalid} (no {missing[0]!r} array); rerun the features stage")
    arrays = {key: data[key] for key in ("features", *REGION_KEYS)}
    if arrays["features"].ndim != 2 or any(len(arrays[key]) != len(arrays["features"]) for key in REGION_KEYS):
        raise RcnnError(f"{invalid} (features and labels disagree); rerun the features stage")
    labels = arrays["labels"]
    if num_classes is not None and len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise RcnnError(f"{invalid} (labels outside 0..{num_classes - 1}: the regions were made for other "
                        f"classes); rerun the regions and features stages")
    if not np.isfinite(arrays["features"]).all():
        raise RcnnError(f"{invalid} (non-finite features); rerun the features stage")
    return arrays
