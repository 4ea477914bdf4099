"""Checkpoint files: written atomically with stable bytes, read with ``weights_only`` loading, named by family.

Each family stores its own ``meta`` (what rebuilds its model) beside the state dict; the format
number guards against files of another layout.
"""

from __future__ import annotations

import io
import math
import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rcnn.utils.errors import RcnnError
from rcnn.utils.fileio import write_bytes

CHECKPOINT_FORMAT = 1


UNSAFE_PICKLE = "it holds Python objects other than tensors, refused for safety: loading them could run code"


def damaged_member(path: Path) -> str | None:
    """The first member of the torch zip ``path`` whose bytes fail their CRC (torch's reader checks none), or
    None; files in torch's legacy (non-zip) format have no CRC to check."""
    if not zipfile.is_zipfile(path):
        return None
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
        return f"its zip structure ({str(err).splitlines()[0] if str(err) else type(err).__name__})"


def safe_torch_load(path: Path, missing: str, unreadable: str) -> Any:
    """``torch.load(weights_only=True)`` after a CRC pass; a missing, damaged or unreadable file becomes one
    RcnnError line.

    ``unreadable`` may contain ``{reason}``, filled with the first line of the loader's error (for a pickle
    holding code, a plain statement instead of torch's advice to load it unsafely).
    """
    if not path.exists():
        raise RcnnError(missing)
    damaged = damaged_member(path) if path.is_file() else None
    if damaged is not None:
        raise RcnnError(unreadable.replace("{reason}", f"damaged: {damaged} fails its CRC check"))
    try:
        with warnings.catch_warnings():  # torch warns about the pickle protocol of files it then refuses
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise RcnnError(missing) from None
    except Exception as err:  # noqa: BLE001 - bytes that are not a torch zip fail in many ways (KeyError, IndexError, ...)
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        if isinstance(err, pickle.UnpicklingError) or "weights_only" in str(err):
            reason = UNSAFE_PICKLE
        raise RcnnError(unreadable.replace("{reason}", reason)) from None


def non_finite_tensor(state: dict[str, Any]) -> str | None:
    """The name of the first floating-point tensor of ``state`` holding NaN or infinity, or None."""
    for name in sorted(state):
        value = state[name]
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return name
        if isinstance(value, float) and not math.isfinite(value):
            return name
    return None


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
    payload = safe_torch_load(path, f"checkpoint {path} not found: run the train stage first",
                         f"checkpoint {path} is corrupt or not a checkpoint ({{reason}}); rerun the train stage")
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT or \
            not isinstance(payload.get("meta"), dict) or not isinstance(payload.get("state_dict"), dict):
        raise RcnnError(f"checkpoint {path} is not an rcnn checkpoint of format {CHECKPOINT_FORMAT}; "
                        f"rerun the train stage")
    bad = non_finite_tensor(payload["state_dict"])
    if bad is not None:
        raise RcnnError(f"checkpoint {path} is corrupt ({bad} holds non-finite values); rerun the train stage")
    return payload


def checkpoint_arch(payload: dict[str, Any], path: str | Path, arches: Any) -> str:
    """The detector family a checkpoint holds (checkpoints without the key predate Fast R-CNN: R-CNN); a name
    that is not one of ``arches`` blames the checkpoint, not params."""
    arch = payload["meta"].get("arch", "rcnn")
    if not isinstance(arch, str) or arch not in arches:
        raise RcnnError(f"checkpoint {path} does not match its own description (arch = {arch!r} is not "
                        f"{', '.join(arches)}); rerun the train stage")
    return arch


def state_payload(model: nn.Module, meta: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint payload: format, meta and the model's CPU state dict."""
    return {"format": CHECKPOINT_FORMAT, "meta": meta,
            "state_dict": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}}


def is_int_in(value: Any, lo: int, hi: int | None = None) -> bool:
    """``value`` is an int (not a bool) in ``[lo, hi]``: checkpoint metadata is checked before use."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= lo and (hi is None or value <= hi)
