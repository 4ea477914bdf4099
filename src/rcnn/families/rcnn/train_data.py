"""What R-CNN's :func:`rcnn.families.rcnn.training.fit` trains on: batches of cached features (a frozen backbone) or
of crops warped from proposals drawn afresh each epoch (fine-tuning), with the validation each uses."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from rcnn.data import voc
from rcnn.engine.device import inference_autocast
from rcnn.evaluation.validation import labelled_split_ap, warn_if_unscorable
from rcnn.families.rcnn import features as features_mod
from rcnn.families.rcnn import regions
from rcnn.families.rcnn.bbox_regression import fit_box_regressor
from rcnn.families.rcnn.detector import RCNNDetector
from rcnn.families.rcnn.finetune import ProposalSampler
from rcnn.families.rcnn.model import RegionClassifier, preprocess
from rcnn.modeling.postprocess import postprocess_settings
from rcnn.pipeline.params import Params
from rcnn.proposals import labelling
from rcnn.proposals.region_boxes import ImageBoxes, load_boxes
from rcnn.utils.errors import RcnnError

Batch = tuple[torch.Tensor, torch.Tensor]
ValidationAP = Callable[..., dict[str, float]]  # (model, svm=None, regressor=None) -> {"map", "map07"} on validation
VAL_AP_IMAGES = 250  # fine-tuning's validation AP scores at most the first 250 validation images (full VOC val: 2,510)


@dataclass
class TrainData:
    """What :func:`fit` needs to know about the data: batches for one epoch and how to get logits."""

    train_batches: Callable[[int], Iterable[Batch]]  # epoch -> shuffled training batches
    val_batches: Callable[[], Iterable[Batch]]
    logits: Callable[[RegionClassifier, torch.Tensor], torch.Tensor]
    train_size: int
    val_size: int
    batch_size: int
    head_only: bool  # only the head learns (the logits come from cached features)
    val_ap: ValidationAP | None = None  # selects the best epoch when set
    generator: torch.Generator | None = None  # the shuffling state carried from epoch to epoch, if any

    @property
    def steps_per_epoch(self) -> int:
        return -(-self.train_size // self.batch_size)


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
                     len(y_train), len(y_val), batch_size, head_only=True, generator=generator)


def validation_ap(regions_dir: str | Path, root: Path, params: Params, device: torch.device) -> ValidationAP:
    """Detection AP on the validation split, the evaluate stage's way: its post-processing, its
    ``evaluate.max_proposals`` and, with ``model.bbox_regression``, a box regressor fitted to the model's
    backbone as the final one will be; only the images are capped, to the first :data:`VAL_AP_IMAGES`.
    The returned function scores a model with its softmax head, or with ``svm`` where given, and with
    ``regressor`` where the caller has already fitted it to this backbone."""
    settings = regions.region_settings(regions_dir)
    val_split, batch = params.data.val_split, params.train.feature_batch_size
    val_items = labelled_boxes(regions_dir, val_split)[:VAL_AP_IMAGES]
    warn_if_unscorable(val_items, val_split)
    val_paths = [voc.image_path(root, item.image_id) for item in val_items]
    meta = {"classes": list(params.classes), "crop_size": settings.crop_size, "context": settings.context}

    def val_ap(model: RegionClassifier, svm: dict[str, torch.Tensor] | None = None,
               regressor: dict[str, torch.Tensor] | None = None) -> dict[str, float]:
        if regressor is None and params.model.bbox_regression:
            regressor = box_regressor(model, regions_dir, params, device)
        detector = RCNNDetector(model, {**meta, "bbox_regressor": regressor, "svm": svm}, device, batch_size=batch,
                                **postprocess_settings(params))
        return labelled_split_ap(detector, val_paths, val_items, params.evaluate.max_proposals)

    return val_ap


def finetune_data(sampler: ProposalSampler, regions_dir: str | Path, root: Path, params: Params,
                  device: torch.device) -> TrainData:
    """Fine-tuning batches: fresh proposal samples each epoch (several draws an epoch where one would not
    reach ``train.min_steps``). Validation: the loss on the regions stage's fixed sample of the validation
    split, and detection AP (:func:`validation_ap`), which picks the best epoch (the loss alone favours early,
    under-trained epochs)."""
    index = labelling.read_index(regions_dir)
    val_split, batch = params.data.val_split, params.train.feature_batch_size

    def val_batches() -> Iterator[Batch]:
        for shard in regions.iter_shards(regions_dir, val_split):
            labels = torch.from_numpy(np.asarray(shard["labels"], np.int64))
            for s in range(0, len(labels), batch):
                yield torch.from_numpy(shard["crops"][s:s + batch]), labels[s:s + batch]

    def logits(model: RegionClassifier, crops: torch.Tensor) -> torch.Tensor:
        with inference_autocast(device):  # bf16 where native: about 1.5x the fp32 step on this CPU
            return model(preprocess(crops, device))

    # A small training set repeats the sampler's draw within an epoch until train.min_steps is in reach.
    t = params.train
    draw_steps = max(-(-sampler.regions_per_epoch // t.batch_size), 1)
    wanted_steps = -(-t.min_steps // t.epochs)
    draws = max(1, -(-wanted_steps // draw_steps))

    def train_batches(epoch: int) -> Iterator[Batch]:
        for draw in range(draws):
            yield from sampler.epoch((epoch - 1) * draws + draw + 1)

    return TrainData(train_batches, val_batches, logits, sampler.regions_per_epoch * draws,
                     int(index["splits"][val_split]["regions"]), t.batch_size, head_only=False,
                     val_ap=validation_ap(regions_dir, root, params, device))


def box_regressor(model: RegionClassifier, regions_dir: str | Path, params: Params,
                  device: torch.device) -> dict[str, torch.Tensor]:
    """Box regression fitted on ``model``'s features of the training regions it learns from (foreground
    at IoU >= ``train.bbox_iou``): computing only those rows gives the regressor that all rows would."""
    t = params.train
    rows = features_mod.split_features(model, regions_dir, params.data.train_split, device, t.feature_batch_size,
                                       min_iou=t.bbox_iou)
    return fit_box_regressor(rows["features"], rows["labels"], rows["boxes"], rows["gt_boxes"], rows["ious"],
                             params.num_classes, min_iou=t.bbox_iou, ridge_lambda=t.bbox_lambda)


def labelled_boxes(regions_dir: str | Path, split: str) -> list[ImageBoxes]:
    """Every labelled proposal of ``split``'s images, as the regions stage stored them."""
    index = labelling.read_index(regions_dir)
    rel = index.get("labelled_boxes", {}).get(split)
    if rel is None:
        raise RcnnError(f"{Path(regions_dir) / 'index.json'} lists no labelled boxes for {split}: rerun the "
                        f"regions stage (dvc repro)")
    return load_boxes(Path(regions_dir) / rel, len(index.get("classes", [])) or None)
