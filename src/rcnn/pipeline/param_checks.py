"""Checking params: each value against its field's type and range (the one range table: the ``range``
metadata of :mod:`rcnn.pipeline.params`' fields, which checkpoint checks use too), then the rules that
involve more than one key. Every failure is one :class:`~rcnn.utils.errors.ParamError` line naming the key,
the value and what is allowed."""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from typing import TYPE_CHECKING, Any, Literal

from rcnn.utils.boxes import FLIPS
from rcnn.utils.errors import ParamError
from rcnn.utils.fileio import safe_name

if TYPE_CHECKING:
    from rcnn.pipeline.params import ModelParams, Params


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


def build(cls: type, raw: Any, prefix: str) -> Any:
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
            values[name] = build(tp, raw[name], f"{key}.")
            continue
        value = _convert(key, raw[name], tp)
        if "range" in f.metadata:
            _check_range(key, value, f.metadata["range"])
        values[name] = value
    return cls(**values)


def check_consistency(p: Params) -> None:
    """Rules that involve more than one key."""
    from rcnn.pipeline.params import ARCH_NAMES, SPLITS  # params imports this module
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
    if any(name not in FLIPS for name in p.train.flips) or len(set(p.train.flips)) < len(p.train.flips):
        raise ParamError(f"train.flips = {p.train.flips!r} is invalid: each must be one of {', '.join(FLIPS)}, "
                         f"named once ([] trains unmirrored)")
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
                                   or p.train.backbone_lr_objects or p.train.rare_class_objects):
        raise ParamError(f"train.repeat_threshold = {p.train.repeat_threshold}, train.backbone_lr = "
                         f"{p.train.backbone_lr}, train.backbone_lr_objects = {p.train.backbone_lr_objects}, "
                         f"train.rare_class_objects = {p.train.rare_class_objects} and "
                         f"train.prior_init = {str(p.train.prior_init).lower()} are Fast and Faster R-CNN's: R-CNN "
                         f"would ignore them; set them to 0.0, 1.0, 0, 0 and false, or model.arch = 'fast_rcnn' or "
                         f"'faster_rcnn'")
    if bool(p.train.rare_class_objects) != bool(p.train.min_steps_rare):
        raise ParamError(f"train.rare_class_objects = {p.train.rare_class_objects} and train.min_steps_rare = "
                         f"{p.train.min_steps_rare} work together: a set whose rarest class has fewer objects than the "
                         f"first trains at least the second's steps; set both above 0, or both to 0")
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


def allowed(section: type, name: str, value: Any) -> bool:
    """Whether ``value`` is one ``params.yaml`` could give ``section``'s field ``name`` (its type, choices and
    range, with no conversion): the rule a checkpoint's recorded settings are checked by before anything is
    built from them."""
    tp = typing.get_type_hints(section)[name]
    if isinstance(value, str) and tp in (int, float):
        return False
    try:
        converted = _convert(name, value, tp)
        spec = {f.name: f for f in dataclasses.fields(section)}[name].metadata.get("range")
        if spec:
            _check_range(name, converted, spec)
    except ParamError:
        return False
    return True
