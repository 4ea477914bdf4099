"""Training the region classifier, reproducibly.

Frozen backbone (``model.trainable_layers = 0``): only the head is trained, on the features the
features stage cached, so an epoch over tens of thousands of regions takes seconds. Otherwise the
last ``trainable_layers`` backbone units are fine-tuned end to end on the region crops (random
horizontal flips), with the frozen units' BatchNorm kept in eval mode.

Class-weighted cross-entropy (background vs objects), Adam or SGD (:mod:`rcnn.optim`), early stopping on the validation
loss with the best state kept; seeded model init, shuffling, dropout and flips, so the same
params give the same metrics. Per-epoch curves go to dvclive, the best epoch's numbers to
``metrics/train.json`` and the best model to ``data/model/model.pt``.
"""

from __future__ import annotations

import copy
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
from dvclive import Live
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from rcnn import features as features_mod
from rcnn import regions
from rcnn.bbox_regression import fit_box_regressor
from rcnn.errors import RcnnError
from rcnn.fileio import write_json
from rcnn.optim import build_optimizer, build_scheduler
from rcnn.model import RegionClassifier, build_model, preprocess, save_checkpoint, select_device
from rcnn.params import Params, to_dict

Batch = tuple[torch.Tensor, torch.Tensor]
METRIC_NAMES = ("loss", "accuracy", "fg_accuracy")


def class_weights(params: Params) -> torch.Tensor:
    """Cross-entropy weights: ``train.background_weight`` for class 0, ``train.object_weight`` for objects."""
    return torch.tensor([params.train.background_weight] + [params.train.object_weight] * len(params.classes),
                        dtype=torch.float32)


class _Meter:
    """Epoch totals: weighted loss (as the whole-epoch weighted mean), accuracy, foreground accuracy."""

    def __init__(self) -> None:
        self.loss = self.weight = 0.0
        self.correct = self.count = self.fg_correct = self.fg_count = 0

    def add(self, logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> None:
        with torch.no_grad():
            self.loss += nn.functional.cross_entropy(logits.float(), labels, weight=weights, reduction="sum").item()
            self.weight += weights[labels].sum().item()
            hit = logits.argmax(dim=1) == labels
            fg = labels != 0
            self.correct += int(hit.sum())
            self.count += len(labels)
            self.fg_correct += int((hit & fg).sum())
            self.fg_count += int(fg.sum())

    def result(self) -> dict[str, float]:
        return {"loss": self.loss / max(self.weight, 1e-12), "accuracy": self.correct / max(self.count, 1),
                "fg_accuracy": self.fg_correct / max(self.fg_count, 1)}


@dataclass
class TrainData:
    """What :func:`fit` needs to know about the data: batches for one epoch and how to get logits."""

    train_batches: Callable[[int], Iterable[Batch]]  # epoch -> shuffled training batches
    val_batches: Callable[[], Iterable[Batch]]
    logits: Callable[[RegionClassifier, torch.Tensor], torch.Tensor]
    train_size: int
    val_size: int
    batch_size: int

    @property
    def steps_per_epoch(self) -> int:
        return -(-self.train_size // self.batch_size)


def fit(model: RegionClassifier, data: TrainData, params: Params, device: torch.device,
        live: Live | None = None) -> dict[str, Any]:
    """Train with early stopping; ``model`` ends holding the best epoch's state. Returns a summary."""
    t = params.train
    weights = class_weights(params).to(device)
    optimizer = build_optimizer(model.parameters(), t)
    scheduler = build_scheduler(optimizer, data.steps_per_epoch, t)
    best: dict[str, Any] = {"best_epoch": 0, "val_loss": float("inf")}
    best_state: dict[str, torch.Tensor] = {}
    learned = model.head if model.frozen else model  # the part whose best state must be kept
    start, epochs_run = time.perf_counter(), 0
    bar = tqdm(range(1, t.epochs + 1), desc="train", unit="epoch")
    for epoch in bar:
        model.train()
        train_meter = _Meter()
        for x, y in data.train_batches(epoch):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            logits = data.logits(model, x)
            loss = nn.functional.cross_entropy(logits.float(), y, weight=weights)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            train_meter.add(logits.detach(), y, weights)
        model.eval()
        val_meter = _Meter()
        with torch.inference_mode():
            for x, y in data.val_batches():
                x, y = x.to(device), y.to(device)
                val_meter.add(data.logits(model, x), y, weights)
        train_m, val_m = train_meter.result(), val_meter.result()
        epochs_run = epoch
        if live is not None:
            for name in METRIC_NAMES:
                live.log_metric(f"train/{name}", train_m[name])
                live.log_metric(f"val/{name}", val_m[name])
            live.next_step()
        if val_m["loss"] < best["val_loss"]:
            best = {"best_epoch": epoch, **{f"val_{k}": v for k, v in val_m.items()},
                    **{f"train_{k}": v for k, v in train_m.items()}}
            best_state = copy.deepcopy(learned.state_dict())
        bar.set_postfix(train_loss=f"{train_m['loss']:.4f}", val_loss=f"{val_m['loss']:.4f}",
                        best=best["best_epoch"])
        if epoch - best["best_epoch"] >= t.patience:
            break
    seconds = time.perf_counter() - start
    if best["best_epoch"] == 0:
        raise RcnnError(f"training diverged: the validation loss was never finite; lower train.lr = {t.lr}")
    learned.load_state_dict(best_state)
    model.eval()
    return {**best, "epochs_run": epochs_run, "seconds": round(seconds, 3),
            "seconds_per_epoch": round(seconds / max(epochs_run, 1), 4), "device": str(device),
            "train_regions": data.train_size, "val_regions": data.val_size}


def cached_feature_data(train: dict[str, np.ndarray], val: dict[str, np.ndarray], batch_size: int, seed: int,
                        device: torch.device) -> TrainData:
    """Batches of cached backbone features (kept on ``device``); the head alone makes the logits."""
    x_train = torch.from_numpy(np.ascontiguousarray(train["features"], dtype=np.float32)).to(device)
    y_train = torch.from_numpy(train["labels"].astype(np.int64)).to(device)
    x_val = torch.from_numpy(np.ascontiguousarray(val["features"], dtype=np.float32)).to(device)
    y_val = torch.from_numpy(val["labels"].astype(np.int64)).to(device)
    generator = torch.Generator().manual_seed(seed)

    def train_batches(epoch: int) -> Iterator[Batch]:
        order = torch.randperm(len(y_train), generator=generator).to(device)
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            yield x_train[idx], y_train[idx]

    def val_batches() -> Iterator[Batch]:
        for s in range(0, len(y_val), 4096):
            yield x_val[s:s + 4096], y_val[s:s + 4096]

    return TrainData(train_batches, val_batches, lambda model, x: model.classify_features(x),
                     len(y_train), len(y_val), batch_size)


class CropDataset(Dataset):
    """Region crops of one split from a ``.npy`` file opened memory-mapped in each worker."""

    def __init__(self, crops_path: Path, labels: np.ndarray) -> None:
        self.crops_path, self.labels = crops_path, labels
        self._crops: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if self._crops is None:
            self._crops = np.load(self.crops_path, mmap_mode="r")
        return torch.from_numpy(np.array(self._crops[i])), int(self.labels[i])


def stage_crops(regions_dir: str | Path, split: str, scratch: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """Decode every crop of ``split`` once into ``scratch/<split>.npy`` (read memory-mapped, so the
    split need not fit in RAM); returns that path and the per-region arrays."""
    index = regions.read_index(regions_dir)
    n, size = int(index["splits"][split]["regions"]), int(index["crop_size"])
    path = scratch / f"{split}.npy"
    crops = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(n, size, size, 3))
    parts: dict[str, list[np.ndarray]] = {key: [] for key in features_mod.REGION_KEYS}
    pos = 0
    for shard in tqdm(regions.iter_shards(regions_dir, split), desc=f"crops {split}", unit="shard"):
        k = len(shard["crops"])
        crops[pos:pos + k] = shard["crops"]
        for key in features_mod.REGION_KEYS:
            parts[key].append(np.asarray(shard[key]))
        pos += k
    crops.flush()
    if pos != n:
        raise RcnnError(f"{Path(regions_dir) / 'index.json'} lists {n} regions for {split} but its shards hold "
                        f"{pos}; rerun the regions stage")
    return path, {key: np.concatenate(v) if v else np.zeros(0) for key, v in parts.items()}


def crop_data(train_path: Path, train_labels: np.ndarray, val_path: Path, val_labels: np.ndarray,
              params: Params, device: torch.device) -> TrainData:
    """Shuffled crop batches from a DataLoader (``train.num_workers`` workers), flipped at random.

    Flips are drawn in the main process from a seeded generator, so results do not depend on
    the number of workers; the loader's own generator fixes the shuffling order.
    """
    t = params.train
    loader_gen = torch.Generator().manual_seed(params.seed)
    flip_gen = torch.Generator().manual_seed(params.seed + 1)
    common = {"num_workers": t.num_workers, "persistent_workers": t.num_workers > 0,
              "pin_memory": device.type == "cuda"}
    train_loader = DataLoader(CropDataset(train_path, train_labels), batch_size=t.batch_size, shuffle=True,
                              generator=loader_gen, **common)
    val_loader = DataLoader(CropDataset(val_path, val_labels), batch_size=t.feature_batch_size, shuffle=False,
                            **common)

    def train_batches(epoch: int) -> Iterator[Batch]:
        for crops, labels in train_loader:
            flip = torch.rand(len(crops), generator=flip_gen) < 0.5
            crops[flip] = crops[flip].flip(2)  # NHWC: dim 2 is the width
            yield crops, labels

    def logits(model: RegionClassifier, crops: torch.Tensor) -> torch.Tensor:
        return model(preprocess(crops, device))

    return TrainData(train_batches, lambda: iter(val_loader), logits, len(train_labels), len(val_labels),
                     t.batch_size)


def _check_features_info(info: dict[str, Any], params: Params, features_dir: Path) -> None:
    """Cached features must come from the backbone the train stage is about to save."""
    m = params.model
    wanted = {"backbone": m.backbone, "weights": m.weights, "cached": True}
    if m.weights == "none":
        wanted["seed"] = params.seed
    for key, value in wanted.items():
        if info.get(key) != value:
            raise RcnnError(f"{features_dir / 'info.json'} has {key} = {info.get(key)!r} but params say "
                            f"{value!r}: rerun the features stage")


def run_train_stage(params: Params, features_dir: str | Path = "data/features",
                    regions_dir: str | Path = "data/regions", model_path: str | Path = "data/model/model.pt",
                    metrics_path: str | Path = "metrics/train.json", live_dir: str | Path = "dvclive",
                    voc_dir: str | Path | None = None) -> dict:
    """Train, write the best checkpoint and ``metrics/train.json``; returns the metrics.

    ``voc_dir`` is accepted for the common train-stage signature and not read: the region crops
    already hold every pixel R-CNN trains on.
    """
    features_dir = Path(features_dir)
    index = regions.read_index(regions_dir)
    device = select_device(params.train.device)
    torch.manual_seed(params.seed)  # dropout
    model = build_model(params).to(device)
    train_split, val_split = params.data.train_split, params.data.val_split
    with Live(dir=str(live_dir), save_dvc_exp=False, dvcyaml=None, report=None) as live, \
            tempfile.TemporaryDirectory(prefix="rcnn-crops-") as scratch:
        if model.frozen:
            _check_features_info(features_mod.read_info(features_dir), params, features_dir)
            train = features_mod.load_features(features_dir, train_split)
            val = features_mod.load_features(features_dir, val_split)
            if train["features"].shape[1] != model.feature_dim:
                raise RcnnError(f"{features_dir / (train_split + '.npz')} has {train['features'].shape[1]}-d "
                                f"features, {params.model.backbone} gives {model.feature_dim}: rerun the "
                                f"features stage")
            data = cached_feature_data(train, val, params.train.batch_size, params.seed, device)
        else:
            train_path, train = stage_crops(regions_dir, train_split, Path(scratch))
            val_path, val = stage_crops(regions_dir, val_split, Path(scratch))
            data = crop_data(train_path, train["labels"], val_path, val["labels"], params, device)
        if data.train_size == 0 or data.val_size == 0:
            raise RcnnError(f"no regions to train on ({data.train_size} in {train_split}, {data.val_size} in "
                            f"{val_split}): check the regions stage output in {regions_dir}")
        summary = fit(model, data, params, device, live)
        regressor = None
        if params.model.bbox_regression:
            feats = (train["features"] if model.frozen else
                     features_mod.crop_features(model, np.load(train_path, mmap_mode="c"), device,
                                                params.train.feature_batch_size))
            regressor = fit_box_regressor(feats, train["labels"], train["boxes"], train["gt_boxes"],
                                          train["ious"], params.num_classes, min_iou=params.train.bbox_iou,
                                          ridge_lambda=params.train.bbox_lambda)
    meta = {"classes": list(params.classes), "crop_size": index["crop_size"], "context": index["context"],
            "params": to_dict(params), "weights": params.model.weights, "bbox_regressor": regressor,
            "best_epoch": summary["best_epoch"]}
    save_checkpoint(model_path, model.cpu(), meta)
    metrics = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in summary.items()}
    write_json(metrics_path, metrics)
    return metrics
