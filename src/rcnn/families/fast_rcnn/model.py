"""Fast R-CNN (Girshick, ICCV 2015): the shared two-stage detector (:mod:`rcnn.modeling.two_stage`) scoring the
pipeline's selective-search proposals."""

from __future__ import annotations

import torch
from torchvision.models.detection.image_list import ImageList

from rcnn.modeling.two_stage import RoIDetection, RoIDetector, detector_kwargs, seeded
from rcnn.pipeline.params import Params


class FastRCNN(RoIDetector):
    """RoIs = the selective-search proposals the regions stage labelled (training) or the evaluate stage read."""

    arch = "fast_rcnn"

    def propose(self, batch: ImageList, features: dict[str, torch.Tensor], proposals: list[torch.Tensor],
                targets: list[dict[str, torch.Tensor]] | None) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
        return proposals, {}


class FastRCNNDetector(RoIDetection):
    model_cls = FastRCNN


def build_fast_rcnn(params: Params, fg_iou: float = 0.5, bg_iou: float = 0.5) -> FastRCNN:
    """The FastRCNN described by ``params``, its new layers initialised from ``params.seed``."""
    return seeded(params, FastRCNN, **detector_kwargs(params, fg_iou, bg_iou))

