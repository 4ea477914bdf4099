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
Detection uses the project's post-processing (:func:`rcnn.detector.postprocess_detections`,
VOC ``+1`` NMS, deterministic ties) rather than ``RoIHeads.postprocess_detections``, so every
detector family is scored by exactly the same rules. Boxes are decoded in float32 whatever the
autocast dtype.

Boxes: the pipeline's inclusive corners become torchvision's continuous corners by adding one
to the far corner (:data:`rcnn.boxes.INCLUSIVE_SHIFT`) on the way in, and back on the way out.
"""

from __future__ import annotations

import abc
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import cv2
import numpy as np
import torch
from torch import nn
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.roi_heads import RoIHeads, fastrcnn_loss
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import roi_align

from rcnn.boxes import INCLUSIVE_SHIFT, clip_boxes
from rcnn.detector import Detector, postprocess_detections
from rcnn.errors import RcnnError
from rcnn.evaluation import Detections
from rcnn.backbones import IMAGENET_MEAN, IMAGENET_STD, backbone_units, build_backbone
from rcnn.checkpoints import is_int_in, state_payload, write_checkpoint
from rcnn.device import inference_autocast, seeded_rng, use_channels_last
from rcnn.params import Params, to_dict

FEATURE_STRIDE = 32  # of the last feature map of every supported backbone (ResNet layer4, MobileNet features)
# Constructor arguments of RoIDetector that a checkpoint records (its "config"); a family may add its own.
CLASSIFIERS = ("softmax", "cosine")
CONFIG_KEYS = ("backbone", "num_classes", "trainable_layers", "roi_channels", "roi_size", "hidden", "dropout",
               "image_size", "max_size", "train_sizes", "fg_iou", "bg_iou", "rois_per_image", "fg_fraction",
               "feature_stride", "classifier", "cosine_scale")
# Config keys added after checkpoints were first written, with the value those checkpoints were trained with.
CONFIG_DEFAULTS = {"feature_stride": FEATURE_STRIDE, "classifier": "softmax", "cosine_scale": 20.0}


def _fraction(value: Any, lo_open: bool = False) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and (0 < value if lo_open else 0 <= value) \
        and value <= 1


def check_config(config: dict[str, Any], classes: Any) -> None:
    """Raise ValueError naming the first field of a two-stage checkpoint's config that cannot be right
    (the ranges ``params.yaml`` allows), before anything is built from it."""
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) and c for c in classes):
        raise ValueError("classes must be a non-empty list of names")
    image_size, max_size = config["image_size"], config["max_size"]
    image_size_ok = is_int_in(image_size, 32, 2000)
    max_size_ok = is_int_in(max_size, 32, 4000) and (not image_size_ok or max_size >= image_size)
    checks = {
        "backbone": isinstance(config["backbone"], str),
        "num_classes": config["num_classes"] == len(classes) and is_int_in(config["num_classes"], 1),
        "trainable_layers": is_int_in(config["trainable_layers"], 0),
        "roi_channels": is_int_in(config["roi_channels"], 0, 4096), "roi_size": is_int_in(config["roi_size"], 1, 32),
        "hidden": is_int_in(config["hidden"], 1, 1 << 16),
        "dropout": _fraction(config["dropout"]) and config["dropout"] < 1,
        "image_size": image_size_ok, "max_size": max_size_ok,
        "train_sizes": isinstance(config["train_sizes"], (list, tuple))
        and all(is_int_in(s, 32, max_size if max_size_ok else None) for s in config["train_sizes"]),
        "fg_iou": _fraction(config["fg_iou"], lo_open=True), "bg_iou": _fraction(config["bg_iou"]),
        "rois_per_image": is_int_in(config["rois_per_image"], 1, 4096),
        "fg_fraction": _fraction(config["fg_fraction"], lo_open=True),
        "feature_stride": config["feature_stride"] in (16, 32) and type(config["feature_stride"]) is int
        and (config["feature_stride"] == 32 or is_int_in(config["roi_channels"], 1)),
        "classifier": config["classifier"] in CLASSIFIERS,
        "cosine_scale": isinstance(config["cosine_scale"], (int, float)) and not isinstance(config["cosine_scale"], bool)
        and 0 < config["cosine_scale"] <= 1000,
    }
    bad = next((name for name, ok in checks.items() if not ok), None)
    if bad is not None:
        raise ValueError(f"config {bad} = {config[bad]!r} is invalid")


def pad_to_resizable(image: torch.Tensor, max_size: int) -> torch.Tensor:
    """``image`` (C,H,W) padded at the bottom or right so that, resized to fit ``max_size``, its short
    side keeps at least one feature cell (:data:`FEATURE_STRIDE` px). An image over 25 times longer
    than wide would otherwise shrink to a 0-pixel side; padding there moves no box coordinate."""
    h, w = image.shape[-2:]
    short = -(-FEATURE_STRIDE * max(h, w) // max_size)
    if min(h, w) >= short:
        return image
    pad_w, pad_h = (short - w, 0) if w < h else (0, short - h)
    return nn.functional.pad(image, (0, max(pad_w, 0), 0, max(pad_h, 0)))


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


def image_tensor(image_bgr: np.ndarray) -> torch.Tensor:
    """BGR uint8 (H,W,3) -> RGB float (3,H,W) in 0..1, what GeneralizedRCNNTransform expects."""
    rgb = cv2.cvtColor(image_bgr, cv2.COLOR_BGR2RGB)
    return torch.from_numpy(rgb).permute(2, 0, 1).float().div_(255.0)


def to_continuous(boxes: np.ndarray) -> torch.Tensor:
    """Inclusive-corner boxes -> torchvision's continuous corners (float32 tensor)."""
    return torch.from_numpy(np.asarray(boxes, np.float32).reshape(-1, 4) + INCLUSIVE_SHIFT)


def flip_boxes(boxes: torch.Tensor, width: int) -> torch.Tensor:
    """Continuous-corner boxes mirrored for an image of ``width`` pixels flipped left to right."""
    return torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)


class RoIAlignPool(nn.Module):
    """RoIAlign of every proposal from the single feature map ``"0"``, pixel-aligned.

    The interface of ``MultiScaleRoIAlign`` (what ``RoIHeads`` calls), but with
    ``aligned=True``: torchvision's multi-scale pooler samples half a pixel off (``aligned=False``,
    kept there for old checkpoints), which at stride 32 is a 16-pixel shift in the image.
    """

    def __init__(self, output_size: int, spatial_scale: float = 1 / FEATURE_STRIDE, sampling_ratio: int = 2) -> None:
        super().__init__()
        self.output_size, self.spatial_scale, self.sampling_ratio = output_size, spatial_scale, sampling_ratio

    def forward(self, features: dict[str, torch.Tensor], proposals: list[torch.Tensor],
                image_shapes: list[tuple[int, int]]) -> torch.Tensor:
        return roi_align(features["0"], proposals, self.output_size, spatial_scale=self.spatial_scale,
                         sampling_ratio=self.sampling_ratio, aligned=True)


class CosinePredictor(nn.Module):
    """TFA's classifier (Wang et al., ICML 2020): each class score is ``scale`` times the cosine between the RoI
    feature and that class's weight vector, so no class outscores another by the length of its weights or a
    bias, which a class with many boxes (background above all) otherwise grows at the expense of one with a
    few. Box deltas stay linear. Same interface as ``FastRCNNPredictor``: what ``RoIHeads`` calls."""

    def __init__(self, in_channels: int, num_classes: int, scale: float) -> None:
        super().__init__()
        self.scale = scale
        self.cls_score = nn.Linear(in_channels, num_classes, bias=False)
        self.bbox_pred = nn.Linear(in_channels, num_classes * 4)
        nn.init.normal_(self.cls_score.weight, std=0.01)  # TFA's initialisation
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.bbox_pred.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.flatten(1)
        cosine = nn.functional.normalize(x, dim=1) @ nn.functional.normalize(self.cls_score.weight, dim=1).t()
        return self.scale * cosine, self.bbox_pred(x)


def box_predictor(classifier: str, hidden: int, num_labels: int, cosine_scale: float) -> nn.Module:
    """The last layer: linear class scores (``softmax``) or cosine ones (``cosine``), and box deltas."""
    if classifier == "cosine":
        return CosinePredictor(hidden, num_labels, cosine_scale)
    return FastRCNNPredictor(hidden, num_labels)


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
                 cosine_scale: float = 20.0) -> None:
        super().__init__()
        self.config = {"backbone": backbone, "num_classes": num_classes, "trainable_layers": trainable_layers,
                       "roi_channels": roi_channels, "roi_size": roi_size, "hidden": hidden, "dropout": dropout,
                       "image_size": image_size, "max_size": max_size, "train_sizes": list(train_sizes),
                       "fg_iou": fg_iou, "bg_iou": bg_iou, "rois_per_image": rois_per_image,
                       "fg_fraction": fg_fraction, "feature_stride": feature_stride, "classifier": classifier,
                       "cosine_scale": cosine_scale}
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
        pooled = self.feature_channels * roi_size * roi_size
        head = nn.Sequential(nn.Flatten(), nn.Linear(pooled, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
                             nn.Linear(hidden, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout))
        self.roi_heads = RoIHeads(
            box_roi_pool=RoIAlignPool(roi_size, 1 / feature_stride), box_head=head,
            box_predictor=box_predictor(classifier, hidden, num_classes + 1, cosine_scale), fg_iou_thresh=fg_iou, bg_iou_thresh=bg_iou,
            batch_size_per_image=rois_per_image, positive_fraction=fg_fraction, bbox_reg_weights=None,
            score_thresh=0.0, nms_thresh=1.0, detections_per_img=1)  # post-processing is ours, see module doc
        self.eval_sizes = (image_size,)
        self.train_sizes = tuple(train_sizes) or self.eval_sizes
        self.transform = GeneralizedRCNNTransform(self.train_sizes, max_size, list(IMAGENET_MEAN),
                                                  list(IMAGENET_STD))
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
                  targets: list[dict[str, torch.Tensor]] | None = None):
        """Resize and normalise, run the backbone once; proposals (and targets) scaled to match."""
        images = [pad_to_resizable(img, self.config["max_size"]) for img in images]
        sizes = [tuple(img.shape[-2:]) for img in images]
        batch, targets = self.transform(images, targets)
        scaled = []
        for boxes, (h, w), (nh, nw) in zip(proposals, sizes, batch.image_sizes):
            scale = torch.tensor([nw / w, nh / h, nw / w, nh / h], dtype=boxes.dtype, device=boxes.device)
            scaled.append(boxes * scale)
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

    def losses(self, images: list[torch.Tensor], proposals: list[torch.Tensor],
               targets: list[dict[str, torch.Tensor]]) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """The multi-task loss (the proposer's too) on a fresh RoI sample; also the sampled logits and labels."""
        batch, features, scaled, targets, _ = self._features(images, proposals, targets)
        rois, proposer_losses = self.propose(batch, features, scaled, targets)
        rois, _, labels, box_targets = self.roi_heads.select_training_samples(rois, targets)
        logits, deltas = self._head(features, rois, batch.image_sizes)
        loss_cls, loss_box = fastrcnn_loss(logits.float(), deltas.float(), labels, box_targets)
        return ({**proposer_losses, "loss_classifier": loss_cls, "loss_box_reg": loss_box}, logits.detach(),
                torch.cat(labels))

    def score(self, image: torch.Tensor, proposals: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Softmax scores ``(N, C+1)``, per-class boxes ``(N, C+1, 4)`` and the ``N`` RoIs they came from
        ``(N, 4)``, all in original pixels, continuous corners."""
        batch, features, scaled, _, sizes = self._features([image], [proposals])
        rois, _ = self.propose(batch, features, scaled, None)
        logits, deltas = self._head(features, rois, batch.image_sizes)
        boxes = self.roi_heads.box_coder.decode(deltas.float(), [r.float() for r in rois])  # (N, C+1, 4), resized
        (nh, nw), (h, w) = batch.image_sizes[0], sizes[0]
        scale = torch.tensor([w / nw, h / nh, w / nw, h / nh], dtype=boxes.dtype, device=boxes.device)
        return torch.softmax(logits.float(), dim=1), boxes * scale, rois[0].float() * scale


def detector_kwargs(params: Params, fg_iou: float, bg_iou: float) -> dict[str, Any]:
    """The shared constructor arguments of the model ``params.model``/``params.train`` describe; ``fg_iou``/
    ``bg_iou`` are the thresholds the regions stage labelled with (from its index)."""
    m, t = params.model, params.train
    return {"backbone": m.backbone, "num_classes": len(params.classes), "weights": m.weights,
            "trainable_layers": m.trainable_layers, "roi_channels": m.roi_channels, "roi_size": m.roi_size,
            "hidden": m.hidden, "dropout": m.dropout, "image_size": m.image_size, "max_size": m.max_size,
            "train_sizes": tuple(t.image_sizes), "fg_iou": fg_iou, "bg_iou": bg_iou,
            "rois_per_image": t.rois_per_image, "fg_fraction": t.fg_fraction, "feature_stride": m.feature_stride,
            "classifier": m.classifier, "cosine_scale": m.cosine_scale}


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
            probs, boxes, scored = self.model.score(image, rois)
        probs, boxes = probs.cpu().numpy(), boxes.cpu().numpy() - INCLUSIVE_SHIFT
        self.last_rois = scored.cpu().numpy() - INCLUSIVE_SHIFT
        self.timings.cnn += time.perf_counter() - start
        start = time.perf_counter()
        height, width = image_bgr.shape[:2]
        boxes = clip_boxes(boxes.reshape(-1, 4), width, height).reshape(boxes.shape)
        out = postprocess_detections(boxes, probs, self.score_threshold, self.nms_iou, self.max_detections)
        self.timings.postprocess += time.perf_counter() - start
        return out
