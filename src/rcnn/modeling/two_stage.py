"""Two-stage detection over one feature map, shared by Fast and Faster R-CNN.

The image goes through the backbone once; every region of interest is pooled from the last
feature map with RoIAlign (:class:`RoIAlignPool`, over ``torchvision.ops.roi_align``) and a small
head gives class scores and class-specific box offsets. Where the RoIs come from is the only
thing the two families change (:meth:`RoIDetector.propose`): Fast R-CNN takes the pipeline's
selective-search proposals, Faster R-CNN a region proposal network on the same map.
torchvision's building blocks do the standard parts: ``GeneralizedRCNNTransform`` resizes
(shorter side ``model.image_size``, longer side at most ``model.max_size``) and normalises;
``RoIHeads`` adds the ground truth to the proposals, matches, samples ``train.rois_per_image``
RoIs with a ``train.fg_fraction`` foreground share, encodes box targets and computes the
multi-task loss (cross-entropy + smooth L1).

Two choices differ from torchvision's Faster R-CNN defaults, both measured on a 2-core CPU:
a 1x1 convolution reduces the map to ``model.roi_channels`` channels *before* pooling, and the
head is ``model.hidden`` wide (512, not 1024): pooling 2,000 RoIs from the 1280-channel
MobileNetV2 map into a 1024-wide head took 2.3 s per image, 0.16 s with 128 channels and 512.
Detection uses the project's post-processing (:func:`rcnn.modeling.postprocess.postprocess_detections`,
VOC ``+1`` NMS, deterministic ties) rather than ``RoIHeads.postprocess_detections``, so every
detector family is scored by exactly the same rules. Boxes are decoded in float32 whatever the
autocast dtype.

Boxes: the pipeline's inclusive corners become torchvision's continuous corners by adding one
to the far corner (:data:`rcnn.utils.boxes.INCLUSIVE_SHIFT`) on the way in, and back on the way out.
"""

from __future__ import annotations

import abc
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn
from torchvision.models.detection.roi_heads import RoIHeads, fastrcnn_loss
from torchvision.models.detection.image_list import ImageList

from rcnn.engine.checkpoints import is_int_in, state_payload, write_checkpoint
from rcnn.engine.device import in_float32_if_not_finite, inference_autocast, seeded_rng, use_channels_last
from rcnn.evaluation.voc_eval import Detections
from rcnn.modeling.backbones import IMAGENET_MEAN, IMAGENET_STD, backbone_units, build_backbone
from rcnn.modeling.detector_interface import Detector
from rcnn.modeling.image_input import CanvasTransform, image_tensor, pad_to_resizable, to_continuous
from rcnn.modeling.postprocess import postprocess_detections
from rcnn.modeling.roi_heads import FEATURE_STRIDE, RoIAlignPool, box_predictor
from rcnn.pipeline.param_checks import allowed
from rcnn.pipeline.params import ModelParams, Params, RegionParams, TrainParams, to_dict
from rcnn.utils.boxes import INCLUSIVE_SHIFT, clip_boxes
from rcnn.utils.errors import RcnnError

CLASSIFIERS = ("softmax", "cosine")
# Constructor arguments of RoIDetector that a checkpoint records (its "config"); a family may add its own.
CONFIG_KEYS = ("backbone", "num_classes", "trainable_layers", "roi_channels", "roi_size", "hidden", "dropout",
               "image_size", "max_size", "train_sizes", "fg_iou", "bg_iou", "rois_per_image", "fg_fraction",
               "feature_stride", "classifier", "cosine_scale", "roi_context")
# Config keys added after checkpoints were first written, with the value those checkpoints were trained with.
CONFIG_DEFAULTS = {"feature_stride": FEATURE_STRIDE, "classifier": "softmax", "cosine_scale": 20.0,
                   "roi_context": 0.0}


def check_config(config: dict[str, Any], classes: Any) -> None:
    """Raise ValueError naming the first field of a two-stage checkpoint's config that cannot be right (the
    ranges ``params.yaml`` allows: :func:`rcnn.pipeline.param_checks.allowed`), before anything is built from it."""
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) and c for c in classes):
        raise ValueError("classes must be a non-empty list of names")
    model = {key: allowed(ModelParams, key, config[key]) for key in (
        "backbone", "trainable_layers", "roi_channels", "roi_size", "hidden", "dropout", "image_size", "max_size",
        "feature_stride", "cosine_scale", "roi_context")}
    max_size = config["max_size"]
    max_size_ok = model["max_size"] and (not model["image_size"] or max_size >= config["image_size"])
    checks = {
        **model,
        "num_classes": config["num_classes"] == len(classes) and is_int_in(config["num_classes"], 1),
        "max_size": max_size_ok,
        "train_sizes": isinstance(config["train_sizes"], (list, tuple))
        and all(is_int_in(s, 32, max_size if max_size_ok else None) for s in config["train_sizes"]),
        "fg_iou": allowed(RegionParams, "fg_iou", config["fg_iou"]),
        "bg_iou": allowed(RegionParams, "bg_iou", config["bg_iou"]),
        "rois_per_image": allowed(TrainParams, "rois_per_image", config["rois_per_image"]),
        "fg_fraction": allowed(TrainParams, "fg_fraction", config["fg_fraction"]),
        "feature_stride": model["feature_stride"] and (config["feature_stride"] == 32
                                                       or is_int_in(config["roi_channels"], 1)),
        "classifier": config["classifier"] in CLASSIFIERS,
    }
    bad = next((name for name, ok in checks.items() if not ok), None)
    if bad is not None:
        raise ValueError(f"config {bad} = {config[bad]!r} is invalid")


def _feature_body(trunk: nn.Module) -> nn.Sequential:
    """The convolutional part of a torchvision classifier trunk (stride 32, no pooling)."""
    if hasattr(trunk, "layer4"):
        return nn.Sequential(trunk.conv1, trunk.bn1, trunk.relu, trunk.maxpool, trunk.layer1, trunk.layer2,
                             trunk.layer3, trunk.layer4)
    return trunk.features


def _stride16_end(body: nn.Sequential) -> tuple[int, int]:
    """Index of the last module of ``body`` whose output is at stride 16, and that output's channels
    (found by running a blank 64x64 image through it: ResNet layer3, MobileNetV2 block 13)."""
    found, x, training = (-1, 0), torch.zeros(1, 3, 64, 64), body.training
    body.eval()  # BatchNorm in train mode would fold the blank image into its ImageNet statistics
    with torch.no_grad():
        for index, module in enumerate(body):
            x = module(x)
            if x.shape[-1] == 64 // 16:
                found = (index, x.shape[1])
    body.train(training)
    return found


class RoIDetector(nn.Module, abc.ABC):
    """Backbone + RoIAlign + two-layer head with class scores and class-specific box deltas; the RoIs come
    from :meth:`propose`, which each family defines.

    The first units of the backbone are frozen and the last ``trainable_layers`` train; every
    BatchNorm keeps its ImageNet statistics (batches of two images would only add noise), so
    the backbone always runs in eval mode while its trainable weights still learn.
    """

    arch: ClassVar[str]  # the family's name, written into its checkpoints
    config_keys: ClassVar[tuple[str, ...]] = CONFIG_KEYS
    takes_proposals: ClassVar[bool] = True  # detection needs the pipeline's proposals

    def __init__(self, backbone: str, num_classes: int, weights: str = "none", trainable_layers: int = 0,
                 roi_channels: int = 128, roi_size: int = 7, hidden: int = 512, dropout: float = 0.0,
                 image_size: int = 480, max_size: int = 800, train_sizes: tuple[int, ...] = (),
                 fg_iou: float = 0.5, bg_iou: float = 0.5, rois_per_image: int = 128,
                 fg_fraction: float = 0.25, feature_stride: int = FEATURE_STRIDE, classifier: str = "softmax",
                 cosine_scale: float = 20.0, roi_context: float = 0.0) -> None:
        super().__init__()
        self.config = {"backbone": backbone, "num_classes": num_classes, "trainable_layers": trainable_layers,
                       "roi_channels": roi_channels, "roi_size": roi_size, "hidden": hidden, "dropout": dropout,
                       "image_size": image_size, "max_size": max_size, "train_sizes": list(train_sizes),
                       "fg_iou": fg_iou, "bg_iou": bg_iou, "rois_per_image": rois_per_image,
                       "fg_fraction": fg_fraction, "feature_stride": feature_stride, "classifier": classifier,
                       "cosine_scale": cosine_scale, "roi_context": roi_context}
        if classifier not in CLASSIFIERS:
            raise RcnnError(f"classifier = {classifier!r} is invalid: expected one of {', '.join(CLASSIFIERS)}")
        if feature_stride not in (16, 32) or (feature_stride == 16 and not roi_channels):
            raise RcnnError(f"feature_stride = {feature_stride} is invalid: expected 32, or 16 with roi_channels > 0")
        trunk, dim = build_backbone(backbone, weights)
        units = backbone_units(trunk)
        if not 0 <= trainable_layers <= len(units):
            raise RcnnError(f"model.trainable_layers = {trainable_layers} is out of range for {backbone}: "
                            f"it has {len(units)} units")
        trunk.requires_grad_(False)
        for unit in units[len(units) - trainable_layers:]:
            for module in unit:
                module.requires_grad_(True)
        self.body = _feature_body(trunk)
        self.reduce = nn.Sequential(nn.Conv2d(dim, roi_channels, 1), nn.ReLU(inplace=True)) if roi_channels \
            else nn.Identity()
        self.stride16_end = -1
        if feature_stride == 16:  # FPN's top-down step, once: the stride-32 map upsampled onto the stride-16 one
            self.stride16_end, low_channels = _stride16_end(self.body)
            self.lateral = nn.Conv2d(low_channels, roi_channels, 1)
            self.smooth = nn.Sequential(nn.Conv2d(roi_channels, roi_channels, 3, padding=1), nn.ReLU(inplace=True))
        self.feature_channels = roi_channels or dim
        roi_pool = RoIAlignPool(roi_size, 1 / feature_stride, context=roi_context)
        pooled = roi_pool.channels(self.feature_channels) * roi_size * roi_size
        head = nn.Sequential(nn.Flatten(), nn.Linear(pooled, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
                             nn.Linear(hidden, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout))
        self.roi_heads = RoIHeads(
            box_roi_pool=roi_pool, box_head=head,
            box_predictor=box_predictor(classifier, hidden, num_classes + 1, cosine_scale), fg_iou_thresh=fg_iou, bg_iou_thresh=bg_iou,
            batch_size_per_image=rois_per_image, positive_fraction=fg_fraction, bbox_reg_weights=None,
            score_thresh=0.0, nms_thresh=1.0, detections_per_img=1)  # post-processing is ours, see module doc
        self.eval_sizes = (image_size,)
        self.train_sizes = tuple(train_sizes) or self.eval_sizes
        self.transform = CanvasTransform(self.train_sizes, max_size, list(IMAGENET_MEAN), list(IMAGENET_STD))
        self.train(False)

    @classmethod
    def check_config(cls, config: dict[str, Any], classes: Any) -> None:
        """ValueError for the first config field a checkpoint of this family cannot have."""
        check_config(config, classes)

    def train(self, mode: bool = True) -> "RoIDetector":
        """Like nn.Module.train, but the backbone stays in eval mode (frozen BatchNorm statistics)."""
        super().train(mode)
        self.body.eval()
        # GeneralizedRCNNTransform picks a random training size in train mode, the last in eval.
        self.transform.min_size = self.train_sizes if mode else self.eval_sizes
        return self

    @abc.abstractmethod
    def propose(self, batch: ImageList, features: dict[str, torch.Tensor], proposals: list[torch.Tensor],
                targets: list[dict[str, torch.Tensor]] | None) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
        """The RoIs of each image (resized pixels, continuous corners) and the losses of whatever made them;
        ``proposals`` are the pipeline's, already resized; ``targets`` are given when losses are wanted."""

    def _features(self, images: list[torch.Tensor], proposals: list[torch.Tensor],
                  targets: list[dict[str, torch.Tensor]] | None = None, size: int = 0, canvas: int = 0):
        """Resize and normalise, run the backbone once; proposals (and targets) scaled to match. ``size`` and
        ``canvas``: :meth:`CanvasTransform.shaped`'s."""
        images = [pad_to_resizable(img, self.config["max_size"]) for img in images]
        sizes = [tuple(img.shape[-2:]) for img in images]
        with self.transform.shaped(size, canvas):
            batch, targets = self.transform(images, targets)
        scaled = [_resized(boxes, old, new) for boxes, old, new in zip(proposals, sizes, batch.image_sizes)]
        x = batch.tensors
        if use_channels_last(x.device):
            x = x.contiguous(memory_format=torch.channels_last)
        features = {"0": self._feature_map(x)}
        return batch, features, scaled, targets, sizes

    def _feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """The map RoIs are pooled from: the last one reduced, or with ``feature_stride`` 16 that map
        upsampled and added to the reduced stride-16 one (FPN's top-down pathway for one level)."""
        low = None
        for index, module in enumerate(self.body):
            x = module(x)
            if index == self.stride16_end:
                low = x
        top = self.reduce(x)
        if low is None:
            return top
        lateral = self.lateral(low)
        return self.smooth(lateral + nn.functional.interpolate(top, size=lateral.shape[-2:], mode="nearest"))

    def _head(self, features: dict[str, torch.Tensor], rois: list[torch.Tensor],
              image_sizes: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = self.roi_heads.box_roi_pool(features, rois, image_sizes)
        return self.roi_heads.box_predictor(self.roi_heads.box_head(pooled))

    def losses(self, images: list[torch.Tensor], proposals: list[torch.Tensor], targets: list[dict[str, torch.Tensor]],
               size: int = 0, canvas: int = 0) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """The multi-task loss (the proposer's too) on a fresh RoI sample; also the sampled logits and labels.
        ``size``: the batch's training size (0: one drawn per image); ``canvas``: see :class:`CanvasTransform`."""
        batch, features, scaled, targets, _ = self._features(images, proposals, targets, size, canvas)
        return self._losses(batch, features, scaled, targets)

    def score(self, image: torch.Tensor, proposals: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Softmax scores ``(N, C+1)``, per-class boxes ``(N, C+1, 4)`` and the ``N`` RoIs they came from
        ``(N, 4)``, all in original pixels, continuous corners."""
        batch, features, scaled, _, sizes = self._features([image], [proposals])
        return self._scores(batch, features, scaled, sizes[0])

    def score_with_losses(self, image: torch.Tensor, proposals: torch.Tensor, target: dict[str, torch.Tensor],
                          scored_proposals: torch.Tensor) -> tuple[tuple, tuple]:
        """``losses([image], [proposals], [target])`` and ``score(image, scored_proposals)`` from one backbone
        pass (validation: its loss on a RoI sample of the labelled proposals, its AP on the ranked ones)."""
        batch, features, scaled, targets, sizes = self._features([image], [proposals], [target])
        scored = [_resized(scored_proposals, sizes[0], batch.image_sizes[0])]
        return self._losses(batch, features, scaled, targets), self._scores(batch, features, scored, sizes[0])

    def _losses(self, batch: ImageList, features: dict[str, torch.Tensor], proposals: list[torch.Tensor],
                targets: list[dict[str, torch.Tensor]]) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        rois, proposer_losses = self.propose(batch, features, proposals, targets)
        rois, _, labels, box_targets = self.roi_heads.select_training_samples(rois, targets)
        logits, deltas = self._head(features, rois, batch.image_sizes)
        loss_cls, loss_box = fastrcnn_loss(logits.float(), deltas.float(), labels, box_targets)
        return ({**proposer_losses, "loss_classifier": loss_cls, "loss_box_reg": loss_box}, logits.detach(),
                torch.cat(labels))

    def _scores(self, batch: ImageList, features: dict[str, torch.Tensor], proposals: list[torch.Tensor],
                size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rois, _ = self.propose(batch, features, proposals, None)
        logits, deltas = self._head(features, rois, batch.image_sizes)
        boxes = self.roi_heads.box_coder.decode(deltas.float(), [r.float() for r in rois])  # (N, C+1, 4), resized
        (nh, nw), (h, w) = batch.image_sizes[0], size
        scale = torch.tensor([w / nw, h / nh, w / nw, h / nh], dtype=boxes.dtype, device=boxes.device)
        return torch.softmax(logits.float(), dim=1), boxes * scale, rois[0].float() * scale


def _resized(boxes: torch.Tensor, size: tuple[int, int], new_size: tuple[int, int]) -> torch.Tensor:
    """Boxes of an image of ``size`` (h, w) in the pixels of its resized ``new_size``."""
    (h, w), (nh, nw) = size, new_size
    return boxes * torch.tensor([nw / w, nh / h, nw / w, nh / h], dtype=boxes.dtype, device=boxes.device)


def detector_kwargs(params: Params, fg_iou: float, bg_iou: float) -> dict[str, Any]:
    """The shared constructor arguments of the model ``params.model``/``params.train`` describe; ``fg_iou``/
    ``bg_iou`` are the thresholds the regions stage labelled with (from its index)."""
    m, t = params.model, params.train
    return {"backbone": m.backbone, "num_classes": len(params.classes), "weights": m.weights,
            "trainable_layers": m.trainable_layers, "roi_channels": m.roi_channels, "roi_size": m.roi_size,
            "hidden": m.hidden, "dropout": m.dropout, "image_size": m.image_size, "max_size": m.max_size,
            "train_sizes": tuple(t.image_sizes), "fg_iou": fg_iou, "bg_iou": bg_iou,
            "rois_per_image": t.rois_per_image, "fg_fraction": t.fg_fraction, "feature_stride": m.feature_stride,
            "classifier": m.classifier, "cosine_scale": m.cosine_scale, "roi_context": m.roi_context}


def seeded(params: Params, build: Any, **kwargs: Any) -> RoIDetector:
    """``build(**kwargs)`` with the weights the new layers get drawn from ``params.seed``."""
    with seeded_rng(params.seed):
        return build(**kwargs)


def save_roi_detector(path: str | Path, model: RoIDetector, params: Params, extra: dict[str, Any]) -> None:
    """A self-describing checkpoint: ``arch``, the constructor config, classes, params and the state dict."""
    meta = {"arch": model.arch, "classes": list(params.classes), "config": dict(model.config),
            "weights": params.model.weights, "params": to_dict(params), "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD), **extra}
    write_checkpoint(path, state_payload(model, meta))


def load_roi_detector(model_cls: type[RoIDetector], payload: dict[str, Any], path: str | Path,
                      device: torch.device) -> RoIDetector:
    """Rebuild a ``model_cls`` from a checkpoint payload (eval mode, on ``device``)."""
    meta = payload["meta"]
    try:
        config = {key: meta["config"][key] if key in meta["config"] or key not in CONFIG_DEFAULTS
                  else CONFIG_DEFAULTS[key] for key in model_cls.config_keys}
        model_cls.check_config(config, meta["classes"])
        config = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}
        model = model_cls(**config)
        model.load_state_dict(payload["state_dict"], strict=True)
    except (KeyError, TypeError, ValueError, RuntimeError, RcnnError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise RcnnError(f"checkpoint {path} does not match its own description ({reason}); "
                        f"rerun the train stage") from None
    return model.to(device).eval()


@dataclass
class RoIDetection(Detector):
    """Detection with a two-stage checkpoint: one backbone pass per image, every RoI scored at once. The
    family's module sets ``model_cls``."""

    model_cls: ClassVar[type[RoIDetector]]

    @classmethod
    def from_payload(cls, payload: dict[str, Any], path: str | Path, device: torch.device,
                     **settings: float) -> "RoIDetection":
        return cls(load_roi_detector(cls.model_cls, payload, path, device), payload["meta"], device, **settings)

    @property
    def takes_proposals(self) -> bool:
        return self.model.takes_proposals

    def detect(self, image_bgr: np.ndarray, proposals: np.ndarray | None = None) -> Detections:
        """Detections of one BGR image given its ranked proposals (inclusive corners; ignored, and may be
        None, where the model proposes its own)."""
        proposals = np.asarray(proposals if proposals is not None else np.zeros((0, 4)), np.float32).reshape(-1, 4)
        if self.takes_proposals and len(proposals) == 0:
            self.last_rois = proposals
            return Detections.empty()
        start = time.perf_counter()
        image = image_tensor(image_bgr).to(self.device)
        rois = to_continuous(proposals).to(self.device)
        self.timings.crops += time.perf_counter() - start
        start = time.perf_counter()
        with torch.inference_mode(), inference_autocast(self.device):
            scored = in_float32_if_not_finite(lambda: self.model.score(image, rois), lambda out: out[:2], self.device)
        self.timings.cnn += time.perf_counter() - start
        return self.finish(scored, image_bgr.shape[:2])

    def finish(self, scored: tuple[torch.Tensor, torch.Tensor, torch.Tensor], size: tuple[int, int]) -> Detections:
        """The detections of :meth:`RoIDetector.score`'s output for an image of ``size`` (h, w): boxes clipped,
        class-wise NMS; the scored RoIs kept in ``last_rois``."""
        start = time.perf_counter()
        probs, boxes, rois = (x.cpu().numpy() for x in scored)
        boxes = boxes - INCLUSIVE_SHIFT
        self.last_rois = rois - INCLUSIVE_SHIFT
        height, width = size
        boxes = clip_boxes(boxes.reshape(-1, 4), width, height).reshape(boxes.shape)
        out = postprocess_detections(boxes, probs, self.score_threshold, self.nms_iou, self.max_detections)
        self.timings.postprocess += time.perf_counter() - start
        return out
