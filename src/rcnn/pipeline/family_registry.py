"""The detector families, chosen in one place by ``model.arch`` (or, for detection, by the checkpoint).

Each family says whether the proposals stage runs selective search for it, how the regions stage
stores its training regions, whether the features stage caches anything for it, how it trains and
how a checkpoint becomes a detector. Functions are
named by import path and imported only when used, so a stage loads (and DVC tracks) only the
code of what it runs.
"""

from __future__ import annotations

import importlib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from rcnn.pipeline.params import ARCHES, Params
from rcnn.utils.errors import RcnnError


@dataclass(frozen=True)
class Family:
    """What differs between detector families, as ``module:attribute`` references."""

    name: str
    proposals_stage: str
    region_format: str  # "crops" (warped crops in shards) or "boxes" (labelled proposals per image)
    regions_stage: str
    features_stage: str  # caches backbone features for the train stage, or writes why it does not
    train_stage: str
    detector: str  # a Detector subclass with from_payload(payload, path, device, **settings)
    model: str | None = None  # the model builder a shared trainer is given (the two-stage families)
    regions_options: tuple[tuple[str, Any], ...] = ()  # keyword arguments of the regions stage


SELECTIVE_SEARCH = "rcnn.proposals.selective_search:run_proposals_stage"
BOX_REGIONS = "rcnn.proposals.labelling:run_box_regions_stage"
NO_FEATURES = "rcnn.pipeline.feature_cache:run_no_features_stage"
TWO_STAGE_TRAINER = "rcnn.engine.two_stage_trainer:run_train_stage"
FAMILIES = {
    "rcnn": Family("rcnn", SELECTIVE_SEARCH, "crops", "rcnn.families.rcnn.regions:run_regions_stage",
                   "rcnn.families.rcnn.features:run_features_stage", "rcnn.families.rcnn.training:run_train_stage",
                   "rcnn.families.rcnn.detector:RCNNDetector"),
    "fast_rcnn": Family("fast_rcnn", SELECTIVE_SEARCH, "boxes", BOX_REGIONS, NO_FEATURES, TWO_STAGE_TRAINER,
                        "rcnn.families.fast_rcnn.model:FastRCNNDetector",
                        model="rcnn.families.fast_rcnn.model:build_fast_rcnn"),
    "faster_rcnn": Family("faster_rcnn", "rcnn.families.faster_rcnn.proposals:run_no_proposals_stage", "boxes",
                          BOX_REGIONS, NO_FEATURES, TWO_STAGE_TRAINER,
                          "rcnn.families.faster_rcnn.model:FasterRCNNDetector",
                          model="rcnn.families.faster_rcnn.model:build_faster_rcnn",
                          regions_options=(("with_proposals", False),)),  # it proposes its own: ground truth only
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


def run_proposals_stage(params: Params, *args: Any, **kwargs: Any) -> dict:
    """The proposals stage of ``params.model.arch``: selective search, or nothing for a detector that proposes."""
    return _resolve(family(params.model.arch).proposals_stage)(params, *args, **kwargs)


def run_regions_stage(params: Params, *args: Any, **kwargs: Any) -> dict:
    """The regions stage of ``params.model.arch``."""
    chosen = family(params.model.arch)
    return _resolve(chosen.regions_stage)(params, *args, **kwargs, **dict(chosen.regions_options))


def run_features_stage(params: Params, *args: Any, **kwargs: Any) -> dict:
    """The features stage of ``params.model.arch``: R-CNN's feature cache, or a note that there is none."""
    return _resolve(family(params.model.arch).features_stage)(params, *args, **kwargs)


def run_train_stage(params: Params, *args: Any, **kwargs: Any) -> dict:
    """The train stage of ``params.model.arch``; a shared trainer is given the family's model builder and detector."""
    chosen = family(params.model.arch)
    model = (_resolve(chosen.model), _resolve(chosen.detector)) if chosen.model else ()
    return _resolve(chosen.train_stage)(params, *model, *args, **kwargs)


def load_detector(path: str | Path, device: str = "auto", **settings: float):  # noqa: ANN201 - a Detector
    """A detector for the checkpoint at ``path``, of whichever family the checkpoint says it is; a warning where
    it would compute in another precision than its validation did (the AP then moves, docs/stages.md)."""
    from rcnn.engine.checkpoints import checkpoint_arch, read_checkpoint  # torch only where detection runs
    from rcnn.engine.device import precision_name, select_device

    payload = read_checkpoint(path)
    detector_cls = _resolve(family(checkpoint_arch(payload, path, FAMILIES)).detector)
    chosen = select_device(device)
    validated, here = payload["meta"].get("precision"), precision_name(chosen)
    if isinstance(validated, str) and validated != here:
        warnings.warn(f"checkpoint {path} was validated in {validated} and is scored in {here} here: its AP can "
                      f"differ from its validation figure by a few points (docs/stages.md)", RuntimeWarning,
                      stacklevel=2)
    return detector_cls.from_payload(payload, path, chosen, **settings)
