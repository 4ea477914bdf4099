"""Class-specific bounding-box regression (R-CNN, appendix C).

For each object class a ridge regressor maps a proposal's backbone features to the offsets
``(tx, ty, tw, th)`` (see :func:`rcnn.utils.boxes.encode_boxes`) that move it onto its matched
ground-truth box. It learns only from proposals that already overlap their box well
(IoU >= ``min_iou``, 0.6 in the paper): far-off proposals make the problem hopeless.
"""

from __future__ import annotations

import numpy as np
import torch

from rcnn.utils.boxes import decode_boxes, encode_boxes


def fit_box_regressor(features: np.ndarray, labels: np.ndarray, boxes: np.ndarray, gt_boxes: np.ndarray,
                      ious: np.ndarray, num_classes: int, min_iou: float = 0.6,
                      ridge_lambda: float = 1000.0, min_samples: int = 10) -> dict[str, torch.Tensor]:
    """Fit one ridge regressor per class; ``num_classes`` counts background (index 0, never fitted).

    Returns tensors only (so it can live in a ``weights_only`` checkpoint): ``weight``
    ``(num_classes, D, 4)``, ``bias`` ``(num_classes, 4)`` and ``fitted`` ``(num_classes,)``;
    a class with fewer than ``min_samples`` usable proposals keeps the identity (zero offsets).
    """
    features = np.asarray(features, dtype=np.float64)
    dim = features.shape[1]
    weight = np.zeros((num_classes, dim, 4))
    bias = np.zeros((num_classes, 4))
    fitted = np.zeros(num_classes, dtype=bool)
    targets = encode_boxes(boxes, gt_boxes).astype(np.float64)
    usable = (np.asarray(labels) > 0) & (np.asarray(ious) >= min_iou)
    for cls in range(1, num_classes):
        rows = usable & (labels == cls)
        if rows.sum() < min_samples:
            continue
        x, t = features[rows], targets[rows]
        # Centre so the bias is not shrunk by the ridge penalty.
        x_mean, t_mean = x.mean(axis=0), t.mean(axis=0)
        xc, tc = x - x_mean, t - t_mean
        w = np.linalg.solve(xc.T @ xc + ridge_lambda * np.eye(dim), xc.T @ tc)
        weight[cls], bias[cls], fitted[cls] = w, t_mean - x_mean @ w, True
    return {"weight": torch.from_numpy(weight.astype(np.float32)),
            "bias": torch.from_numpy(bias.astype(np.float32)),
            "fitted": torch.from_numpy(fitted)}


def predict_deltas(regressor: dict[str, torch.Tensor], features: torch.Tensor) -> torch.Tensor:
    """Offsets for every proposal and every class: ``(N, num_classes, 4)``."""
    weight = regressor["weight"].to(features.device, features.dtype)
    bias = regressor["bias"].to(features.device, features.dtype)
    return torch.einsum("nd,cdk->nck", features, weight) + bias


def refine_boxes(regressor: dict[str, torch.Tensor], features: torch.Tensor, boxes: np.ndarray) -> np.ndarray:
    """Per-class refined boxes ``(N, num_classes, 4)`` (unfitted classes keep the proposal)."""
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    deltas = predict_deltas(regressor, features.float()).cpu().numpy()
    n, c, _ = deltas.shape
    refined = decode_boxes(np.repeat(boxes, c, axis=0), deltas.reshape(-1, 4))
    return refined.reshape(n, c, 4)
