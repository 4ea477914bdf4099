"""The detector families, chosen in one place by ``model.arch`` (or, for detection, by the checkpoint).

Each family says how the regions stage stores its training regions, whether the features stage
caches anything for it, how it trains and how a checkpoint becomes a detector. Functions are
named by import path and imported only when used, so a stage loads (and DVC tracks) only the
code of what it runs.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from rcnn.errors import RcnnError
from rcnn.params import ARCHES, Params


@dataclass(frozen=True)
class Family:
    """What differs between detector families, as ``module:attribute`` references."""

    name: str
    region_format: str  # "crops" (warped crops in shards) or "boxes" (labelled proposals per image)
    caches_features: bool  # the features stage computes backbone features once for the train stage
    regions_stage: str
    train_stage: str
    detector: str  # a Detector subclass with from_payload(payload, path, device, **settings)


FAMILIES = {
    "rcnn": Family("rcnn", "crops", True, "rcnn.regions:run_regions_stage", "rcnn.training:run_train_stage",
                   "rcnn.detection:Detector"),
    "fast_rcnn": Family("fast_rcnn", "boxes", False, "rcnn.regions:run_box_regions_stage",
                        "rcnn.fast_rcnn_training:run_train_stage", "rcnn.fast_rcnn:FastRCNNDetector"),
}
assert set(FAMILIES) == set(ARCHES)


def family(arch: str) -> Family:
    """The family of ``arch``; an unknown name is one clear error."""
    try:
        return FAMILIES[arch]
    except KeyError:
        raise RcnnError(f"model.arch = {arch!r} is unknown: expected one of {', '.join(FAMILIES)}") from None


def _resolve(ref: str) -> Callable[..., Any]:
    module, _, attribute = ref.partition(":")
    return getattr(importlib.import_module(module), attribute)


def run_regions_stage(params: Params, *args: Any, **kwargs: Any) -> dict:
    """The regions stage of ``params.model.arch``."""
    return _resolve(family(params.model.arch).regions_stage)(params, *args, **kwargs)


def run_train_stage(params: Params, *args: Any, **kwargs: Any) -> dict:
    """The train stage of ``params.model.arch``."""
    return _resolve(family(params.model.arch).train_stage)(params, *args, **kwargs)


def load_detector(path: str | Path, device: str = "auto", **settings: float):  # noqa: ANN201 - a Detector
    """A detector for the checkpoint at ``path``, of whichever family the checkpoint says it is."""
    from rcnn.model import checkpoint_arch, read_checkpoint, select_device  # torch only where detection runs

    payload = read_checkpoint(path)
    detector_cls = _resolve(family(checkpoint_arch(payload)).detector)
    return detector_cls.from_payload(payload, path, select_device(device), **settings)
