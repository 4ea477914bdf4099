"""R-CNN detection: proposals -> warped crops -> CNN class scores (softmax or SVMs) -> per-class boxes.

When the checkpoint carries a bounding-box regressor, each candidate uses its class's refined box
(:meth:`RCNNDetector.class_boxes`); post-processing is the shared :func:`rcnn.modeling.postprocess.postprocess_detections`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from rcnn.evaluation.voc_eval import Detections
from rcnn.families.rcnn.bbox_regression import refine_boxes
from rcnn.families.rcnn.crops import warp_crops
from rcnn.families.rcnn.features import crop_features
from rcnn.families.rcnn.model import load_checkpoint
from rcnn.families.rcnn.svm import svm_scores
from rcnn.modeling.detector_interface import Detector
from rcnn.modeling.postprocess import postprocess_detections
from rcnn.utils.boxes import clip_boxes


@dataclass
class RCNNDetector(Detector):
    """R-CNN's detector: warped crops of every proposal through the CNN, then the softmax head or the SVMs,
    and the box regressor where the checkpoint carries one."""

    @classmethod
    def from_payload(cls, payload: dict, path: str | Path, device: torch.device, **settings: float) -> "RCNNDetector":
        """The detector of an R-CNN checkpoint payload (see :func:`rcnn.pipeline.family_registry.load_detector`)."""
        model, meta = load_checkpoint(path, device, payload)
        return cls(model, meta, device, **settings)

    def crops(self, image_bgr: np.ndarray, proposals: np.ndarray) -> np.ndarray:
        """Warped RGB crops exactly as the regions stage made them for training."""
        start = time.perf_counter()
        rgb = cv2.cvtColor(image_bgr, cv2.COLOR_BGR2RGB)
        out = warp_crops(rgb, proposals, int(self.meta["crop_size"]), int(self.meta["context"]))
        self.timings.crops += time.perf_counter() - start
        return out

    def classify(self, crops: np.ndarray) -> tuple[np.ndarray, torch.Tensor]:
        """Scores ``(N, C+1)`` (softmax, or the SVMs' of :mod:`rcnn.families.rcnn.svm`) and backbone features ``(N, D)``
        of warped crops.

        Features come from :func:`rcnn.families.rcnn.features.crop_features`, the very numerics the head and
        the box regressor were trained on; the head then runs in float32.
        """
        start = time.perf_counter()
        feats = torch.from_numpy(crop_features(self.model, crops, self.device, self.batch_size))
        with torch.inference_mode():
            if self.meta.get("svm") is not None:
                probs = svm_scores(self.meta["svm"], feats).numpy()
            else:
                logits = self.model.classify_features(feats.to(self.device))
                probs = torch.softmax(logits.float(), dim=1).cpu().numpy()
        self.timings.cnn += time.perf_counter() - start
        return probs, feats

    def class_boxes(self, proposals: np.ndarray, features: torch.Tensor, width: int, height: int) -> np.ndarray:
        """Boxes to score: the proposals, or per-class regressed boxes ``(N, C+1, 4)`` clipped to the image."""
        regressor = self.meta.get("bbox_regressor")
        if regressor is None:
            return proposals
        refined = refine_boxes(regressor, features, proposals)
        return clip_boxes(refined.reshape(-1, 4), width, height).reshape(refined.shape)

    def detect(self, image_bgr: np.ndarray, proposals: np.ndarray) -> Detections:
        """Detections of one BGR image given its ranked proposals (inclusive corners)."""
        proposals = self.last_rois = np.asarray(proposals, dtype=np.float32).reshape(-1, 4)
        if len(proposals) == 0:
            return Detections.empty()
        probs, feats = self.classify(self.crops(image_bgr, proposals))
        start = time.perf_counter()
        boxes = self.class_boxes(proposals, feats, image_bgr.shape[1], image_bgr.shape[0])
        out = postprocess_detections(boxes, probs, self.score_threshold, self.nms_iou, self.max_detections)
        self.timings.postprocess += time.perf_counter() - start
        return out
