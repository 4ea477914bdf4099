"""The evaluation protocol: the evaluated split shares no image with the splits training learns or selects on.

Training learns on ``data.train_split`` and picks its best epoch on ``data.val_split``; a score on
either of them (or on a split overlapping them, such as ``trainval`` against ``val``) measures
memory, not detection. The proposals and evaluate stages check this first, before any work;
``evaluate.allow_overlap: true`` lets a demonstration through (fitting a handful of photos), and the
evaluate stage records it in ``metrics/eval.json``.
"""

from __future__ import annotations

from pathlib import Path

from rcnn.data import voc
from rcnn.pipeline.params import Params
from rcnn.utils.errors import RcnnError


def split_overlap(root: str | Path, params: Params) -> dict[str, int]:
    """How many image ids the evaluated split shares with the training and the validation split."""
    evaluated = set(_ids(root, "evaluate.split", params.evaluate.split))
    out = {}
    for key, split in (("data.train_split", params.data.train_split), ("data.val_split", params.data.val_split)):
        out[split] = len(evaluated.intersection(_ids(root, key, split)))
    return out


def _ids(root: str | Path, key: str, split: str) -> list[str]:
    try:
        return voc.read_split(root, split)
    except RcnnError:
        raise RcnnError(f"{key} = {split!r} is not in {root}: add it to data.splits and rerun the download "
                        f"stage") from None


def check_evaluation_split(root: str | Path, params: Params) -> dict[str, object]:
    """Stop with one error when the evaluated split overlaps training or validation, unless allowed.

    Returns what ``metrics/eval.json`` records: ``allow_overlap`` and the shared-id counts.
    """
    shared = split_overlap(root, params)
    overlapping = {split: n for split, n in shared.items() if n}
    if overlapping and not params.evaluate.allow_overlap:
        e = params.evaluate.split
        parts = ", ".join(f"{n} image ids with {_role(split, params)} split {split!r}" for split, n in overlapping.items())
        raise RcnnError(f"evaluate.split = {e!r} shares {parts}: a score there is not a test score; evaluate on a "
                        f"held-out split (e.g. -S evaluate.split=test) or opt in with -S evaluate.allow_overlap=true")
    return {"allow_overlap": params.evaluate.allow_overlap, "shared_ids": shared}


def _role(split: str, params: Params) -> str:
    roles = [role for role, s in (("training", params.data.train_split), ("validation", params.data.val_split))
             if s == split]
    return "the " + " and ".join(roles)
