"""The region classifier: an ImageNet backbone (frozen by default) plus the tutorial's small head.

Fixes two tutorial bugs: pixels are scaled to 0..1 before ImageNet mean/std (:func:`preprocess`),
and a frozen backbone stays in eval mode whatever ``model.train()`` is called with, so its
BatchNorm running statistics never drift.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from torch import nn

from rcnn.errors import RcnnError
from rcnn.fileio import write_bytes

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CHECKPOINT_FORMAT = 1
# State-dict prefixes of torchvision's ImageNet classifiers; the only keys a weights file may carry
# beyond the backbone's own.
_CLASSIFIER_PREFIXES = ("fc.", "classifier.")


def select_device(preference: str = "auto") -> torch.device:
    """The torch device for ``preference`` ("auto": cuda, then mps, then cpu); error if unavailable."""
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    if preference == "auto":
        return torch.device("cuda" if cuda else "mps" if mps else "cpu")
    if preference == "cuda" and not cuda:
        raise RcnnError("train.device = 'cuda' but no CUDA GPU is available: use 'auto' or 'cpu'")
    if preference == "mps" and not mps:
        raise RcnnError("train.device = 'mps' but Apple MPS is not available: use 'auto' or 'cpu'")
    if preference not in ("cpu", "cuda", "mps"):
        raise RcnnError(f"unknown device {preference!r}: expected one of auto, cpu, cuda, mps")
    return torch.device(preference)


def _trunk(name: str) -> tuple[nn.Module, int]:
    """A randomly initialised torchvision ``name`` whose classifier is replaced by Identity.

    Keeping torchvision's module layout means the backbone's state-dict keys are exactly
    torchvision's (minus the classifier), so any torchvision weights file loads strictly.
    """
    try:
        net = torchvision.models.get_model(name, weights=None)
    except ValueError:
        raise RcnnError(f"model.backbone = {name!r} is not a torchvision model") from None
    if hasattr(net, "fc"):  # ResNets: up to avgpool + flatten
        dim = net.fc.in_features
        net.fc = nn.Identity()
    else:  # MobileNets: features + global average pool + flatten
        dim = next(m for m in net.classifier.modules() if isinstance(m, nn.Linear)).in_features
        net.classifier = nn.Identity()
    return net, dim


def _safe_load(path: Path, missing: str, unreadable: str) -> Any:
    """``torch.load(weights_only=True)``; a missing or unreadable file becomes one RcnnError line.

    ``unreadable`` may contain ``{reason}``, filled with the first line of the loader's error.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise RcnnError(missing) from None
    except Exception as err:  # noqa: BLE001 - bytes that are not a torch zip fail in many ways (KeyError, IndexError, ...)
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise RcnnError(unreadable.replace("{reason}", reason)) from None


def _read_weights_file(path: Path, backbone: str) -> dict[str, torch.Tensor]:
    state = _safe_load(path, f"model.weights file {path} not found (backbone {backbone})",
                       f"model.weights file {path} is not a readable torch state dict for backbone "
                       f"{backbone} ({{reason}})")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise RcnnError(f"model.weights file {path} does not hold a state dict of tensors (backbone {backbone})")
    return state


def _imagenet_state_dict(name: str) -> dict[str, torch.Tensor]:
    """torchvision's default ImageNet weights (from the torch hub cache, else downloaded with progress)."""
    weights = torchvision.models.get_model_weights(name).DEFAULT
    try:
        return weights.get_state_dict(progress=True)
    except (OSError, RuntimeError, ValueError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise RcnnError(f"model.weights = 'imagenet': could not get {weights} for backbone {name} from "
                        f"{weights.url} ({reason}); download the file elsewhere and set model.weights to "
                        f"its local .pth path") from None


def _load_strict(trunk: nn.Module, state: dict[str, torch.Tensor], source: str, name: str) -> None:
    """Load every backbone tensor from ``state``; only ImageNet-classifier keys may be left over."""
    state = {k: v for k, v in state.items() if not k.startswith(_CLASSIFIER_PREFIXES)}
    own = trunk.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong_shape = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong_shape:
        parts = [f"{label} {len(keys)} (e.g. {keys[0]})" for label, keys in
                 (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)) if keys]
        raise RcnnError(f"model.weights {source} does not match backbone {name}: " + ", ".join(parts))
    trunk.load_state_dict(state, strict=True)


def build_backbone(name: str, weights: str) -> tuple[nn.Module, int]:
    """Backbone ``name`` mapping normalised (B,3,H,W) float -> (B,D) pooled features, and D.

    ``weights``: "imagenet" (torchvision's default ImageNet weights), "none" (random init) or the
    path of a local .pth state dict, either torchvision's full one (classifier keys are dropped)
    or features-only; every backbone tensor must be present.
    """
    trunk, dim = _trunk(name)
    if weights == "none":
        return trunk, dim
    if weights == "imagenet":
        _load_strict(trunk, _imagenet_state_dict(name), "'imagenet'", name)
    else:
        path = Path(weights)
        _load_strict(trunk, _read_weights_file(path, name), f"file {path}", name)
    return trunk, dim


def backbone_units(backbone: nn.Module) -> list[list[nn.Module]]:
    """The backbone's stages from input to output, the units that ``trainable_layers`` counts from the end.

    ResNet: stem (conv1+bn1), layer1..layer4; MobileNet: each block of ``features``.
    """
    if hasattr(backbone, "layer4"):
        return [[backbone.conv1, backbone.bn1], [backbone.layer1], [backbone.layer2], [backbone.layer3],
                [backbone.layer4]]
    return [[block] for block in backbone.features]


class RegionClassifier(nn.Module):
    """Backbone + head; logits over ``num_classes + 1`` outputs (index 0 is background).

    The last ``trainable_layers`` backbone units are trainable, the rest frozen; frozen units are
    kept in eval mode by :meth:`train`, so BatchNorm statistics of frozen parts never change.
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
        self._frozen = [m for unit in units[:len(units) - trainable_layers] for m in unit]
        self.backbone.requires_grad_(False)
        for unit in units[len(units) - trainable_layers:]:
            for module in unit:
                module.requires_grad_(True)
        # The tutorial's head (no non-linearity between the two linear layers).
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.feature_dim, hidden), nn.Dropout(dropout),
                                  nn.Linear(hidden, num_classes + 1))
        self.train(False)

    @property
    def frozen(self) -> bool:
        """True when no backbone parameter is trained (features can be computed once and cached)."""
        return self.trainable_layers == 0

    def train(self, mode: bool = True) -> "RegionClassifier":
        """Like nn.Module.train, but frozen backbone units always stay in eval mode."""
        super().train(mode)
        if self.frozen:
            self.backbone.eval()
        else:
            for module in self._frozen:
                module.eval()
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
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(params.seed)
        return RegionClassifier(m.backbone, len(params.classes), weights=m.weights if weights is None else weights,
                                hidden=m.hidden, dropout=m.dropout, trainable_layers=m.trainable_layers)


def use_channels_last(device: torch.device) -> bool:
    """Whether NHWC (channels-last) input is faster for the backbone on ``device``.

    Measured on a 2-core AVX-512 CPU: 1.1-2x faster than NCHW for mobilenet_v2, resnet18 and
    resnet50 at 128-224 px; on CUDA it is what cuDNN's tensor-core kernels want.
    """
    return device.type in ("cpu", "cuda")


def _cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX present (torch's own CPU feature probes; absent in old torch -> False)."""
    probes = (getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return any(probe is not None and probe() for probe in probes)


def inference_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 where the hardware computes it natively (CUDA with bf16, CPUs with AVX512-BF16/AMX), else float32.

    Measured on a CPU with AVX512-BF16: 2-4x the fp32 throughput of the backbone, features within
    1% (relative to their largest value); CPUs without native bf16 would be slower, so they stay fp32.
    """
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    if device.type == "cpu" and _cpu_has_native_bf16():
        return torch.bfloat16
    return torch.float32


def inference_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast to :func:`inference_dtype` for backbone inference; use it for every inference pass
    (features stage and detection) so cached and live features have the same numerics."""
    dtype = inference_dtype(device)
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


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


def write_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """Write a checkpoint atomically, with the same bytes for the same payload.

    ``torch.save`` names the zip's inner folder after the file it writes to; saving to memory
    first keeps a temporary file's random name out of the bytes DVC hashes.
    """
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    write_bytes(path, buffer.getvalue())


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The payload of a checkpoint written by :func:`write_checkpoint` (``weights_only`` loading)."""
    path = Path(path)
    payload = _safe_load(path, f"checkpoint {path} not found: run the train stage first",
                         f"checkpoint {path} is corrupt or not a checkpoint ({{reason}}); rerun the train stage")
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT or \
            not isinstance(payload.get("meta"), dict) or not isinstance(payload.get("state_dict"), dict):
        raise RcnnError(f"checkpoint {path} is not an rcnn checkpoint of format {CHECKPOINT_FORMAT}; "
                        f"rerun the train stage")
    return payload


def checkpoint_arch(payload: dict[str, Any]) -> str:
    """The detector family a checkpoint holds (checkpoints without the key predate Fast R-CNN: R-CNN)."""
    return str(payload["meta"].get("arch", "rcnn"))


def state_payload(model: nn.Module, meta: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint payload: format, meta and the model's CPU state dict."""
    return {"format": CHECKPOINT_FORMAT, "meta": meta,
            "state_dict": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}}


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


def is_int_in(value: Any, lo: int, hi: int | None = None) -> bool:
    """``value`` is an int (not a bool) in ``[lo, hi]``: checkpoint metadata is checked before use."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= lo and (hi is None or value <= hi)


def _check_meta(meta: dict[str, Any]) -> None:
    """Raise ValueError naming the first field of an R-CNN checkpoint's meta that cannot be right."""
    classes = meta["classes"]
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) and c for c in classes):
        raise ValueError("classes must be a non-empty list of names")
    checks = {"hidden": is_int_in(meta["hidden"], 1, 1 << 16), "trainable_layers": is_int_in(meta["trainable_layers"], 0),
              "crop_size": is_int_in(meta["crop_size"], 32, 1024),
              "context": is_int_in(meta["context"], 0) and 2 * meta["context"] < meta["crop_size"],
              "dropout": isinstance(meta["dropout"], float) and 0 <= meta["dropout"] < 1,
              "backbone": isinstance(meta["backbone"], str)}
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
