"""R-CNN's region classifier: an ImageNet backbone (frozen by default) plus the tutorial's small head.

Fixes two tutorial bugs: pixels are scaled to 0..1 before ImageNet mean/std (:func:`preprocess`),
and the backbone stays in eval mode whatever ``model.train()`` is called with, so its
BatchNorm running statistics never drift (fine-tuned units included, as in Fast R-CNN).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from rcnn.engine.checkpoints import read_checkpoint, state_payload, write_checkpoint
from rcnn.engine.device import seeded_rng, use_channels_last
from rcnn.modeling.backbones import IMAGENET_MEAN, IMAGENET_STD, backbone_units, build_backbone
from rcnn.pipeline.param_checks import allowed
from rcnn.pipeline.params import ModelParams, RegionParams
from rcnn.utils.errors import RcnnError


class RegionClassifier(nn.Module):
    """Backbone + head; logits over ``num_classes + 1`` outputs (index 0 is background).

    The last ``trainable_layers`` backbone units are trainable, the rest frozen and kept in eval mode by
    :meth:`train`. With pre-trained weights the trainable units stay in eval mode too: every BatchNorm
    keeps its pre-trained statistics, because re-estimating them from batches of crops made validation
    AP swing by up to 12 points from one epoch to the next on kangaroo (docs/experiments.md), while their
    weights still learn. A randomly initialised backbone (``weights="none"``) has no statistics worth
    keeping, so there the trainable units' BatchNorm learns them.
    """

    def __init__(self, backbone: str, num_classes: int, weights: str = "none", hidden: int = 512,
                 dropout: float = 0.2, trainable_layers: int = 0) -> None:
        super().__init__()
        self.backbone_name = backbone
        self.backbone, self.feature_dim = build_backbone(backbone, weights)
        units = backbone_units(self.backbone)
        if not 0 <= trainable_layers <= len(units):
            raise RcnnError(f"model.trainable_layers = {trainable_layers} is out of range for {backbone}: "
                            f"it has {len(units)} units")
        self.trainable_layers = trainable_layers
        self.backbone.requires_grad_(False)
        trained = [module for unit in units[len(units) - trainable_layers:] for module in unit]
        for module in trained:
            module.requires_grad_(True)
        # The units whose BatchNorm re-estimates its statistics in train mode: none with pre-trained weights.
        self._learning_statistics = trained if weights == "none" else []
        # The tutorial's head (no non-linearity between the two linear layers).
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.feature_dim, hidden), nn.Dropout(dropout),
                                  nn.Linear(hidden, num_classes + 1))
        self.train(False)

    @property
    def frozen(self) -> bool:
        """True when no backbone parameter is trained (features can be computed once and cached)."""
        return self.trainable_layers == 0

    def train(self, mode: bool = True) -> "RegionClassifier":
        """Like nn.Module.train, but the backbone stays in eval mode (fixed BatchNorm statistics), except
        a randomly initialised backbone's trainable units."""
        super().train(mode)
        self.backbone.eval()
        for module in self._learning_statistics:
            module.train(mode)
        return self

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B,3,S,S) preprocessed images -> (B,D) pooled backbone features."""
        return self.backbone(images)

    def classify_features(self, feats: torch.Tensor) -> torch.Tensor:
        """(B,D) backbone features -> (B, num_classes+1) logits."""
        return self.head(feats.float())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classify_features(self.features(images))


def build_model(params: Any, weights: str | None = None) -> RegionClassifier:
    """The RegionClassifier described by ``params.model`` for ``params.classes``, initialised from ``params.seed``."""
    m = params.model
    # Seeded here, not by the caller: with weights "none" the features stage and the train stage
    # must build the very same random backbone; the caller's RNG state is left untouched.
    with seeded_rng(params.seed):
        return RegionClassifier(m.backbone, len(params.classes), weights=m.weights if weights is None else weights,
                                hidden=m.hidden, dropout=m.dropout, trainable_layers=m.trainable_layers)


def preprocess(crops: np.ndarray | torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """(B,S,S,3) uint8 RGB crops -> (B,3,S,S) float32 on ``device``: /255, ImageNet mean/std.

    The result keeps the NHWC memory layout (channels-last) where that is faster for the backbone.
    """
    device = torch.device(device)
    x = torch.as_tensor(crops)
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected (B,S,S,3) uint8 crops, got {tuple(x.shape)} {x.dtype}")
    x = x.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    x = (x - mean) / std
    memory_format = torch.channels_last if use_channels_last(device) else torch.contiguous_format
    return x.contiguous(memory_format=memory_format)


def save_checkpoint(path: str | Path, model: RegionClassifier, meta: dict[str, Any]) -> None:
    """Write a self-describing R-CNN checkpoint: full state dict + how to rebuild the model.

    ``meta`` needs ``classes``, ``crop_size``, ``context``, ``params`` and may carry ``weights``
    and ``bbox_regressor`` (None or a dict of tensors); only tensors and plain containers are
    stored so :func:`load_checkpoint` can use ``weights_only=True``.
    """
    for key in ("classes", "crop_size", "context", "params"):
        if key not in meta:
            raise ValueError(f"checkpoint meta needs {key!r}")
    full_meta = {
        "arch": "rcnn",
        "classes": list(meta["classes"]),
        "backbone": model.backbone_name,
        "weights": meta.get("weights"),
        "feature_dim": model.feature_dim,
        "hidden": model.head[1].out_features,
        "dropout": model.head[0].p,
        "trainable_layers": model.trainable_layers,
        "crop_size": int(meta["crop_size"]),
        "context": int(meta["context"]),
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "params": meta["params"],
        "bbox_regressor": meta.get("bbox_regressor"),
        **{k: v for k, v in meta.items() if k not in ("classes", "crop_size", "context", "params",
                                                     "weights", "bbox_regressor")},
    }
    write_checkpoint(path, state_payload(model, full_meta))


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu",
                    payload: dict[str, Any] | None = None) -> tuple[RegionClassifier, dict]:
    """Rebuild the R-CNN model saved by :func:`save_checkpoint` (in eval mode, on ``device``) and its meta."""
    path = Path(path)
    payload = read_checkpoint(path) if payload is None else payload
    meta = payload["meta"]
    try:
        _check_meta(meta)
        model = RegionClassifier(meta["backbone"], len(meta["classes"]), weights="none", hidden=meta["hidden"],
                                 dropout=meta["dropout"], trainable_layers=meta["trainable_layers"])
        model.load_state_dict(payload["state_dict"], strict=True)
    except (KeyError, TypeError, ValueError, RuntimeError, RcnnError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise RcnnError(f"checkpoint {path} does not match its own description ({reason}); "
                        f"rerun the train stage") from None
    return model.to(device).eval(), meta


def _check_meta(meta: dict[str, Any]) -> None:
    """Raise ValueError naming the first field of an R-CNN checkpoint's meta that cannot be right."""
    classes = meta["classes"]
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) and c for c in classes):
        raise ValueError("classes must be a non-empty list of names")
    checks = {**{key: allowed(ModelParams, key, meta[key])
                 for key in ("hidden", "trainable_layers", "dropout", "backbone")},
              "crop_size": allowed(RegionParams, "crop_size", meta["crop_size"]),
              "context": allowed(RegionParams, "context", meta["context"]) and 2 * meta["context"] < meta["crop_size"]}
    bad = next((name for name, ok in checks.items() if not ok), None)
    if bad is not None:
        raise ValueError(f"{bad} = {meta[bad]!r} is invalid")
    k, dim = len(classes), meta.get("feature_dim")
    for name, shapes in (("svm", {"weight": (k, dim), "bias": (k,), "scale": ()}),
                         ("bbox_regressor", None)):
        value = meta.get(name)
        if value is None:
            continue
        if not isinstance(value, dict) or not all(isinstance(v, torch.Tensor) for v in value.values()):
            raise ValueError(f"{name} must be a mapping of tensors")
        if shapes and any(key not in value or tuple(value[key].shape) != shape for key, shape in shapes.items()):
            raise ValueError(f"{name} has the wrong shapes for {k} classes of {dim}-d features")
