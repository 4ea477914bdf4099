"""torchvision's stock ``FasterRCNN``, configured as a careful user would, as the benches' outside peer.

Against this pipeline's Faster R-CNN it differs only where torchvision's own defaults do: the box
head (``TwoMLPHead``, 1024 wide, on the full-width map, 512 RoIs per image) and the RoI pooler
(``MultiScaleRoIAlign``, ``aligned=False``). Everything else follows the params it is given (the
``fast-rcnn`` preset in ``bench/families.py``): the backbone and how much of it trains, with every
BatchNorm a ``FrozenBatchNorm2d`` (ImageNet statistics, as torchvision's detectors ship); autocast
around the backbone only, so the RPN and the box head run and decode boxes in float32; the RPN's
settings (``model.rpn_*``); image sizes, multi-scale training, optimiser, warm-up, schedule, epochs
and steps per epoch (``train.*``); the best epoch by validation AP, then the NMS IoU chosen on the
validation split; scored once on the evaluated split by the project's evaluator.
"""

from __future__ import annotations

import copy
import hashlib
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.misc import FrozenBatchNorm2d
from tqdm import tqdm

from rcnn.data import voc
from rcnn.engine.device import inference_dtype, select_device
from rcnn.engine.optim import build_optimizer, build_scheduler, first_validated_epoch, step_floor
from rcnn.engine.resume import ResumePoint, restore_training, resume_key, save_epoch
from rcnn.engine.two_stage_batches import draw_flips
from rcnn.engine.two_stage_trainer import steps_per_epoch
from rcnn.evaluation.bootstrap import map_intervals
from rcnn.evaluation.class_accuracy import objects_per_class, rarest_class_objects
from rcnn.evaluation.voc_eval import Detections, evaluate_detections
from rcnn.modeling.backbones import backbone_units, build_backbone
from rcnn.modeling.image_input import flipped, image_tensor
from rcnn.pipeline.params import Params
from rcnn.utils.boxes import INCLUSIVE_SHIFT, clip_boxes

NMS_CHOICES = (0.3, 0.4, 0.5, 0.6, 0.7)  # the peer's NMS IoU is picked among these on the validation split


def frozen_batchnorm(module: nn.Module) -> nn.Module:
    """``module`` with every BatchNorm2d replaced by a FrozenBatchNorm2d holding the same statistics."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            for key in ("weight", "bias", "running_mean", "running_var"):
                getattr(frozen, key).copy_(getattr(child, key).detach())
            setattr(module, name, frozen)
        else:
            frozen_batchnorm(child)
    return module


class AutocastBody(nn.Module):
    """The backbone under autocast to ``dtype`` (None: none), its map handed on in float32."""

    def __init__(self, body: nn.Module, out_channels: int, dtype: torch.dtype | None) -> None:
        super().__init__()
        self.body, self.out_channels, self.dtype = body, out_channels, dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dtype is None:
            return self.body(x)
        with torch.autocast(x.device.type, dtype=self.dtype):
            return self.body(x).float()


def build_stock_peer(params: Params, autocast_dtype: torch.dtype | None = None) -> FasterRCNN:
    """The peer for ``params`` (seeded by ``params.seed``); ``autocast_dtype`` for the backbone alone."""
    m, t, e = params.model, params.train, params.evaluate
    torch.manual_seed(params.seed)
    trunk, dim = build_backbone(m.backbone, m.weights)
    units = backbone_units(trunk)
    trunk.requires_grad_(False)
    for unit in units[len(units) - m.trainable_layers:]:
        for module in unit:
            module.requires_grad_(True)
    body = trunk.features if hasattr(trunk, "features") else nn.Sequential(
        *[getattr(trunk, n) for n in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")])
    body = AutocastBody(frozen_batchnorm(body), dim, autocast_dtype)
    anchors = AnchorGenerator((tuple(m.rpn_anchor_sizes),), (tuple(m.rpn_aspect_ratios),))
    return FasterRCNN(
        body, num_classes=len(params.classes) + 1, rpn_anchor_generator=anchors,
        box_roi_pool=MultiScaleRoIAlign(["0"], 7, 2), min_size=tuple(t.image_sizes) or (m.image_size,),
        max_size=m.max_size, rpn_pre_nms_top_n_train=m.rpn_pre_nms_top_n_train,
        rpn_pre_nms_top_n_test=m.rpn_pre_nms_top_n_test, rpn_post_nms_top_n_train=m.rpn_post_nms_top_n_train,
        rpn_post_nms_top_n_test=m.rpn_post_nms_top_n_test, rpn_nms_thresh=m.rpn_nms_iou,
        rpn_fg_iou_thresh=m.rpn_fg_iou, rpn_bg_iou_thresh=m.rpn_bg_iou, rpn_batch_size_per_image=m.rpn_batch_size,
        rpn_positive_fraction=m.rpn_fg_fraction, box_score_thresh=e.score_threshold, box_nms_thresh=e.nms_iou,
        box_detections_per_img=e.max_detections)


def _sizes(model: FasterRCNN, params: Params, training: bool) -> None:
    """Multi-scale sizes in training, ``model.image_size`` in evaluation (torchvision would use the last)."""
    model.transform.min_size = tuple(params.train.image_sizes) or (params.model.image_size,) if training \
        else (params.model.image_size,)


def _batch(root: Path, annotations: Sequence[voc.Annotation], order: np.ndarray, flips: Sequence[Sequence[str]],
           device: torch.device) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    images, targets = [], []
    for k, mirrorings in zip(order, flips):
        ann = annotations[k]
        image = image_tensor(voc.read_image(voc.image_path(root, ann.image_id)))
        keep = ~ann.difficult
        boxes = torch.from_numpy(ann.boxes[keep] + INCLUSIVE_SHIFT).reshape(-1, 4)
        image, (boxes,) = flipped(image, (boxes,), mirrorings)
        images.append(image.to(device))
        targets.append({"boxes": boxes.to(device), "labels": torch.from_numpy(ann.labels[keep]).to(device)})
    return images, targets


def detect(model: FasterRCNN, params: Params, root: Path, annotations: Sequence[voc.Annotation],
           device: torch.device, desc: str) -> tuple[dict[str, Detections], float]:
    """The peer's detections on ``annotations``' images and the seconds per image."""
    model.eval()
    _sizes(model, params, False)
    found = {}
    start = time.perf_counter()
    with torch.inference_mode():
        for ann in tqdm(annotations, desc=desc, unit="img", leave=False):
            image = voc.read_image(voc.image_path(root, ann.image_id))
            out = model([image_tensor(image).to(device)])[0]
            boxes = clip_boxes(out["boxes"].float().cpu().numpy() - INCLUSIVE_SHIFT, image.shape[1], image.shape[0])
            found[ann.image_id] = Detections(boxes, out["scores"].float().cpu().numpy(),
                                             out["labels"].cpu().numpy().astype(np.int64))
    return found, (time.perf_counter() - start) / max(len(annotations), 1)


def _ap(model: FasterRCNN, params: Params, root: Path, annotations: Sequence[voc.Annotation],
        device: torch.device, desc: str) -> float:
    found, _ = detect(model, params, root, annotations, device, desc)
    result = evaluate_detections(found, list(annotations), params.classes)
    return result.map if result.map == result.map else 0.0


def fit(model: FasterRCNN, params: Params, root: Path, train: Sequence[voc.Annotation],
        val: Sequence[voc.Annotation], device: torch.device, resume: ResumePoint | None = None) -> dict[str, Any]:
    """Train with the params' schedule, keep the epoch with the best validation AP (scored from the epoch
    ``train.val_start`` sets on, as the pipeline's trainer), then pick the NMS IoU on validation; returns what
    was chosen and the training seconds. With ``resume``, every finished epoch is saved there and a saved
    one continued from: the peer's 24 epochs take hours on a CPU."""
    t = params.train
    model.to(device)
    optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad], t)
    # the pipeline's step floor, derived from the same objects (difficult ones excluded, as the batches do)
    objects = objects_per_class([ann.labels[~ann.difficult] for ann in train], params.num_classes)
    steps = steps_per_epoch(len(train), t, step_floor(t, rarest_class_objects(objects)))
    scheduler = build_scheduler(optimizer, steps, t)
    rng = np.random.default_rng(params.seed)
    best_ap, best_epoch, best_state, done, earlier = -1.0, 0, None, 0, 0.0
    loop = restore_training(resume, model, optimizer, scheduler, numpy_rng=rng)
    if loop is not None:
        best_ap, best_epoch, best_state = loop["best_ap"], loop["best_epoch"], loop["best_state"]
        done, earlier = int(loop["epoch"]), float(loop["seconds"])
    start = time.perf_counter()
    for epoch in tqdm(range(done + 1, t.epochs + 1), desc="stock faster r-cnn", unit="epoch", initial=done,
                      total=t.epochs):
        model.train()
        _sizes(model, params, True)
        needed = steps * t.images_per_batch
        order = np.concatenate([rng.permutation(len(train)) for _ in range(-(-needed // len(train)))])[:needed]
        flips = draw_flips(len(order), t.flips, rng)
        for i in range(0, len(order), t.images_per_batch):
            images, targets = _batch(root, train, order[i:i + t.images_per_batch], flips[i:i + t.images_per_batch],
                                     device)
            loss = sum(model(images, targets).values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        if epoch >= first_validated_epoch(t):
            ap = _ap(model, params, root, val, device, f"val epoch {epoch}")
            if ap > best_ap:
                best_ap, best_epoch, best_state = ap, epoch, copy.deepcopy(model.state_dict())
        save_epoch(resume, None, model, optimizer, scheduler, numpy_rng=rng, epoch=epoch, best_ap=best_ap,
                   best_epoch=best_epoch, best_state=best_state, seconds=earlier + time.perf_counter() - start)
    seconds = earlier + time.perf_counter() - start
    model.load_state_dict(best_state)
    by_nms = {}
    for nms in NMS_CHOICES:
        model.roi_heads.nms_thresh = nms
        by_nms[nms] = _ap(model, params, root, val, device, f"val nms {nms}")
    model.roi_heads.nms_thresh = max(by_nms, key=lambda k: (by_nms[k], -abs(k - params.evaluate.nms_iou)))
    return {"train_seconds": round(seconds, 1), "best_epoch": best_epoch, "val_map": round(best_ap, 6),
            "nms_iou": model.roi_heads.nms_thresh, "val_map_by_nms": {str(k): round(v, 6) for k, v in by_nms.items()}}


def resume_point(resume_dir: Path | None, params: Params, voc_dir: Path) -> ResumePoint | None:
    """The peer's resume point for ``params`` under ``resume_dir`` (one folder per seed), keyed as the train
    stage's (params, data, package code, torch) and this file's code."""
    if resume_dir is None:
        return None
    key = hashlib.sha256((resume_key(params, [], voc_dir) + Path(__file__).read_text()).encode()).hexdigest()[:24]
    return ResumePoint(resume_dir / f"stock-peer-seed-{params.seed}", key)


def peer(params: Params, work: Path, epochs: int | None = None, resume_dir: Path | None = None) -> dict[str, Any]:
    """Train the stock peer on ``params``' train split (validation on its val split), score the evaluated split;
    ``epochs`` replaces ``train.epochs``; ``resume_dir`` keeps a resume point (see :func:`fit`)."""
    params = replace(params, train=replace(params.train, epochs=epochs or params.train.epochs))
    root = voc.find_voc_root(work / "data" / "voc")
    device = select_device(params.train.device)
    dtype = inference_dtype(device)
    train, val = (voc.load_split(root, split, params.classes, params.data.on_bad_annotation)
                  for split in (params.data.train_split, params.data.val_split))
    test = voc.load_split(root, params.evaluate.split, params.classes, "skip")
    model = build_stock_peer(params, None if dtype == torch.float32 else dtype)
    point = resume_point(resume_dir, params, work / "data" / "voc")
    chosen = fit(model, params, root, train, val, device, point)
    if point is not None:
        point.clear()
    found, per_image = detect(model, params, root, test, device, "stock faster r-cnn detect")
    result = evaluate_detections(found, test, params.classes)
    return {"map07": result.map07, "map": result.map, **map_intervals(result), "seed": params.seed,
            **chosen, "detect_s_per_image": round(per_image, 4), "search_s_per_image": 0.0,
            "detect_with_search_s_per_image": round(per_image, 4), "pipeline_seconds": None,
            "epochs": params.train.epochs}
