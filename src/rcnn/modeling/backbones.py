"""ImageNet backbones from torchvision and their weights (downloaded, or a local file checked key by key).

Every family builds its backbone here, so a weights file that fits one fits all, and the
``trainable_layers`` units are counted the same way everywhere.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision
from torch import nn

from rcnn.engine.checkpoints import non_finite_tensor, safe_torch_load
from rcnn.utils.errors import RcnnError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# State-dict prefixes of torchvision's ImageNet classifiers; the only keys a weights file may carry
# beyond the backbone's own.
_CLASSIFIER_PREFIXES = ("fc.", "classifier.")


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


def _read_weights_file(path: Path, backbone: str) -> dict[str, torch.Tensor]:
    state = safe_torch_load(path, f"model.weights file {path} not found (backbone {backbone})",
                       f"model.weights file {path} is not a readable torch state dict for backbone "
                       f"{backbone} ({{reason}})")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise RcnnError(f"model.weights file {path} does not hold a state dict of tensors (backbone {backbone})")
    bad = non_finite_tensor(state)
    if bad is not None:
        raise RcnnError(f"model.weights file {path} is corrupt ({bad} holds non-finite values)")
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
