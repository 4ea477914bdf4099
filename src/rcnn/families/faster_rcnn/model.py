"""Faster R-CNN (Ren et al., NeurIPS 2015): the shared two-stage detector (:mod:`rcnn.modeling.two_stage`) with a
region proposal network on its own feature map in place of selective search, trained jointly.

torchvision's ``RegionProposalNetwork``, ``AnchorGenerator`` and ``RPNHead`` do the work, on the same
(reduced) map that RoIAlign pools from: ``model.rpn_anchor_sizes`` x ``model.rpn_aspect_ratios`` anchors
at every cell, ``model.rpn_fg_iou``/``rpn_bg_iou`` matching, ``model.rpn_batch_size`` anchors sampled per
image, NMS at ``model.rpn_nms_iou`` and the top ``rpn_post_nms_top_n_train``/``_test`` proposals kept.
The RPN runs in float32 whatever the autocast dtype, so its boxes are decoded at full precision (a
bf16 decode puts corners on 2-4 px steps). Its loss is part of the validation loss too: the RPN scores
validation images as it does training ones, with the training top-n.
"""

from __future__ import annotations

from typing import Any

import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead

from rcnn.engine.checkpoints import is_int_in
from rcnn.modeling.two_stage import CONFIG_KEYS, RoIDetection, RoIDetector, check_config, detector_kwargs, seeded
from rcnn.pipeline.param_checks import allowed
from rcnn.pipeline.params import ModelParams, Params

RPN_KEYS = ("rpn_anchor_sizes", "rpn_aspect_ratios", "rpn_pre_nms_top_n_train", "rpn_pre_nms_top_n_test",
            "rpn_post_nms_top_n_train", "rpn_post_nms_top_n_test", "rpn_nms_iou", "rpn_fg_iou", "rpn_bg_iou",
            "rpn_batch_size", "rpn_fg_fraction")


class FasterRCNN(RoIDetector):
    """RoIs = the RPN's proposals; the pipeline's proposals are not used."""

    arch = "faster_rcnn"
    config_keys = CONFIG_KEYS + RPN_KEYS
    takes_proposals = False

    def __init__(self, *args: Any, rpn_anchor_sizes: tuple[int, ...] = (32, 64, 128, 256, 512),
                 rpn_aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0), rpn_pre_nms_top_n_train: int = 2000,
                 rpn_pre_nms_top_n_test: int = 1000, rpn_post_nms_top_n_train: int = 2000,
                 rpn_post_nms_top_n_test: int = 300, rpn_nms_iou: float = 0.7, rpn_fg_iou: float = 0.7,
                 rpn_bg_iou: float = 0.3, rpn_batch_size: int = 256, rpn_fg_fraction: float = 0.5,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        rpn = {"rpn_anchor_sizes": list(rpn_anchor_sizes), "rpn_aspect_ratios": list(rpn_aspect_ratios),
               "rpn_pre_nms_top_n_train": rpn_pre_nms_top_n_train, "rpn_pre_nms_top_n_test": rpn_pre_nms_top_n_test,
               "rpn_post_nms_top_n_train": rpn_post_nms_top_n_train,
               "rpn_post_nms_top_n_test": rpn_post_nms_top_n_test, "rpn_nms_iou": rpn_nms_iou,
               "rpn_fg_iou": rpn_fg_iou, "rpn_bg_iou": rpn_bg_iou, "rpn_batch_size": rpn_batch_size,
               "rpn_fg_fraction": rpn_fg_fraction}
        self.config.update(rpn)
        anchors = AnchorGenerator((tuple(rpn_anchor_sizes),), (tuple(rpn_aspect_ratios),))
        self.rpn = RegionProposalNetwork(
            anchors, RPNHead(self.feature_channels, anchors.num_anchors_per_location()[0]),
            fg_iou_thresh=rpn_fg_iou, bg_iou_thresh=rpn_bg_iou, batch_size_per_image=rpn_batch_size,
            positive_fraction=rpn_fg_fraction,
            pre_nms_top_n={"training": rpn_pre_nms_top_n_train, "testing": rpn_pre_nms_top_n_test},
            post_nms_top_n={"training": rpn_post_nms_top_n_train, "testing": rpn_post_nms_top_n_test},
            nms_thresh=rpn_nms_iou)
        self.train(False)

    @classmethod
    def check_config(cls, config: dict[str, Any], classes: Any) -> None:
        check_config(config, classes)
        sizes, ratios = config["rpn_anchor_sizes"], config["rpn_aspect_ratios"]
        checks = {
            "rpn_anchor_sizes": isinstance(sizes, (list, tuple)) and bool(sizes)
            and all(is_int_in(s, 1, 4096) for s in sizes),
            "rpn_aspect_ratios": isinstance(ratios, (list, tuple)) and bool(ratios)
            and all(isinstance(r, (int, float)) and not isinstance(r, bool) and 0 < r <= 100 for r in ratios),
            **{key: allowed(ModelParams, key, config[key]) for key in RPN_KEYS[2:]},
        }
        checks["rpn_bg_iou"] = checks["rpn_bg_iou"] and config["rpn_bg_iou"] <= config["rpn_fg_iou"]
        bad = next((name for name, ok in checks.items() if not ok), None)
        if bad is not None:
            raise ValueError(f"config {bad} = {config[bad]!r} is invalid")

    def propose(self, batch: ImageList, features: dict[str, torch.Tensor], proposals: list[torch.Tensor],
                targets: list[dict[str, torch.Tensor]] | None) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
        """The RPN's proposals, and its losses whenever ``targets`` are given (training and validation)."""
        was_training = self.rpn.training
        self.rpn.training = targets is not None  # top-n and loss of training; no layer of the RPN has a mode
        try:
            with torch.autocast(batch.tensors.device.type, enabled=False):
                images = ImageList(batch.tensors.float(), batch.image_sizes)
                rois, losses = self.rpn(images, {k: v.float() for k, v in features.items()}, targets)
        finally:
            self.rpn.training = was_training
        return [r.detach() for r in rois], losses


class FasterRCNNDetector(RoIDetection):
    model_cls = FasterRCNN


def build_faster_rcnn(params: Params, fg_iou: float = 0.5, bg_iou: float = 0.5) -> FasterRCNN:
    """The FasterRCNN described by ``params``, its new layers (RPN included) initialised from ``params.seed``."""
    m = params.model
    rpn = {key: getattr(m, key) for key in RPN_KEYS}
    rpn["rpn_anchor_sizes"], rpn["rpn_aspect_ratios"] = tuple(m.rpn_anchor_sizes), tuple(m.rpn_aspect_ratios)
    return seeded(params, FasterRCNN, **detector_kwargs(params, fg_iou, bg_iou), **rpn)

