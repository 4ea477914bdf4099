"""Resume points: a killed train stage continues from its last finished epoch.

After every finished epoch a trainer saves everything the rest of the run depends on (model,
optimiser, scheduler, RNG states, best-so-far, the curves logged) into ``<resume_dir>/<key>/``,
atomically. ``key`` hashes everything the result depends on: the params the train stage reads,
the bytes of its input folders, the package's code and the torch version. A train stage started
again with the same key picks the state up and ends with the same bytes an uninterrupted run
writes; any other key never sees it. Only one key is kept (older ones are deleted when a training
starts), and a finished training deletes its own: the result is then in DVC's outputs.

The folder is not a DVC output (DVC would delete it before rerunning the stage): it lives under
``data/`` beside them, ignored by git.
"""

from __future__ import annotations

import hashlib
import json
import platform
import shutil
import warnings
from pathlib import Path
from typing import Any, ContextManager, Iterable

import numpy as np
import torch
from dvclive import Live

import rcnn
from rcnn.engine import live as live_mod
from rcnn.engine.checkpoints import non_finite_tensor, safe_torch_load
from rcnn.engine.device import accelerator_rng_state, restore_accelerator_rng_state
from rcnn.pipeline.params import Params, to_dict
from rcnn.utils.errors import RcnnError
from rcnn.utils.fileio import atomic_dir

STATE_FILE = "state.pt"
# The params the train stage declares in dvc.yaml (tests/test_resume.py checks they agree).
TRAIN_PARAMS = ("seed", "classes", "data.train_split", "data.val_split", "model", "train",
                "evaluate.score_threshold", "evaluate.nms_iou", "evaluate.max_detections", "evaluate.max_proposals")
HASH_CHUNK = 1 << 20


def _dotted(tree: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        tree = tree[part]
    return tree


def _hash_files(digest: "hashlib._Hash", base: Path, paths: Iterable[Path]) -> None:
    """Each file's path relative to ``base`` and its bytes, in sorted order."""
    for path in sorted(p for p in paths if p.is_file() and not p.name.endswith(".tmp")):
        digest.update(str(path.relative_to(base)).encode() + b"\0")
        with open(path, "rb") as fh:
            while chunk := fh.read(HASH_CHUNK):
                digest.update(chunk)


def resume_key(params: Params, input_dirs: Iterable[str | Path], voc_dir: str | Path | None) -> str:
    """The hash naming a training's resume point (see the module docstring)."""
    digest = hashlib.sha256()
    raw = to_dict(params)
    digest.update(json.dumps({key: _dotted(raw, key) for key in TRAIN_PARAMS}, sort_keys=True).encode())
    digest.update(f"torch {torch.__version__} python {platform.python_version()}".encode())
    code = Path(rcnn.__file__).parent
    _hash_files(digest, code, code.rglob("*.py"))
    for folder in map(Path, input_dirs):
        if folder.is_dir():
            _hash_files(digest, folder, folder.rglob("*"))
    if voc_dir is not None and Path(voc_dir).is_dir():
        # images by content too: new pixels in a file of the same size must not reuse a point trained on the old
        # ones (sha256 runs at 1.3 GB/s on this CPU: VOC2007's 0.9 GB of photos in a second or two once cached)
        _hash_files(digest, Path(voc_dir), Path(voc_dir).rglob("*"))
    return digest.hexdigest()[:24]


def open_resume_point(resume_dir: str | Path | None, params: Params, input_dirs: Iterable[str | Path],
                      voc_dir: str | Path | None) -> "ResumePoint | None":
    """The resume point of this training under ``resume_dir`` (None: the caller keeps none)."""
    return None if resume_dir is None else ResumePoint(resume_dir, resume_key(params, input_dirs, voc_dir))


def stage_live(live_dir: str | Path, point: "ResumePoint | None") -> ContextManager[Live]:
    """The train stage's dvclive logger, continuing a resume point's curves when there is one."""
    return point.live(live_dir) if point is not None else live_mod.staged_live(live_dir)


STATE_KEYS = ("model", "optimizer", "scheduler", "rng", "loop", "live_step", "key")


def _state_problem(state: Any, key: str, folder: Path) -> str | None:
    """What is wrong with a loaded resume state, or None: its keys, its model's finiteness, its curves."""
    if not isinstance(state, dict) or any(k not in state for k in STATE_KEYS):
        missing = [k for k in STATE_KEYS if not isinstance(state, dict) or k not in state]
        return f"no {missing[0]!r} entry"
    if state["key"] != key:
        return "saved for another key"
    if not isinstance(state["model"], dict) or not isinstance(state["loop"], dict) \
            or type(state["live_step"]) is not int or state["live_step"] < 0:
        return "malformed entries"
    bad = non_finite_tensor(state["model"])
    if bad is not None:
        return f"{bad} holds non-finite values"
    if state["live_step"] > 0 and not live_mod.has_curves(folder / "live", state["live_step"]):
        return f"its curves of {state['live_step']} epochs are missing or short"
    return None


class ResumePoint:
    """One training's resume point: ``<root>/<key>/state.pt`` and the curves logged up to it.

    ``state`` is what the last run saved for this key (None: start from epoch 0).
    """

    def __init__(self, root: str | Path, key: str) -> None:
        self.root, self.key = Path(root), key
        self.folder = self.root / key
        if self.root.is_dir():
            for other in self.root.iterdir():
                if other.name == key:
                    continue
                if other.is_dir():  # another key's: this checkout's params and data can never use it again
                    shutil.rmtree(other, ignore_errors=True)
                else:
                    other.unlink()
        self.state = self._load()

    def _load(self) -> dict[str, Any] | None:
        """The saved state, or None: no point, or a damaged one (set aside with a warning: it only costs the
        epochs it held, while using it would give a silently different model)."""
        path = self.folder / STATE_FILE
        if not path.is_file():
            return None
        try:
            state = safe_torch_load(path, "missing", "{reason}")
            problem = _state_problem(state, self.key, self.folder)
        except RcnnError as err:
            problem = str(err)
        if problem is None:
            return state
        warnings.warn(f"resume point {self.folder} is damaged ({problem}); starting at epoch 0", RuntimeWarning,
                      stacklevel=3)
        shutil.rmtree(self.folder, ignore_errors=True)
        return None

    def save(self, state: dict[str, Any], live: Live | None) -> None:
        """Replace the resume point with ``state`` and the curves ``live`` has logged so far."""
        with atomic_dir(self.folder) as tmp:
            if live is not None:
                live_mod.snapshot(live, tmp / "live")
            torch.save({**state, "key": self.key}, tmp / STATE_FILE)

    def live(self, live_dir: str | Path) -> ContextManager[Live]:
        """The stage's dvclive logger, holding the curves of the saved epochs when there are any."""
        if self.state is None:
            return live_mod.staged_live(live_dir)
        return live_mod.staged_live(live_dir, self.folder / "live", int(self.state["live_step"]))

    def clear(self) -> None:
        """Delete this key's resume point (the training it belongs to has finished)."""
        shutil.rmtree(self.folder, ignore_errors=True)
        if self.root.is_dir() and not any(self.root.iterdir()):
            self.root.rmdir()


def restore_training(resume: "ResumePoint | None", model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                     scheduler: torch.optim.lr_scheduler.LRScheduler, numpy_rng: np.random.Generator | None = None,
                     generator: torch.Generator | None = None) -> dict[str, Any] | None:
    """Load a saved state into the trainer's objects and RNGs; return the loop's own bookkeeping as
    :func:`save_epoch` got it (``epoch``, ``stopped``, ``best``, ...), or None to start at epoch 1."""
    if resume is None or resume.state is None:
        return None
    saved = resume.state
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    torch.set_rng_state(saved["rng"]["torch"])
    restore_accelerator_rng_state(saved["rng"].get("accelerator"))
    if numpy_rng is not None:
        numpy_rng.bit_generator.state = json.loads(saved["rng"]["numpy"])
    if generator is not None:
        generator.set_state(saved["rng"]["generator"])
    return saved["loop"]


def save_epoch(resume: "ResumePoint | None", live: Live | None, model: torch.nn.Module,
               optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
               numpy_rng: np.random.Generator | None = None, generator: torch.Generator | None = None,
               **loop: Any) -> None:
    """Save a finished epoch: the trainer's objects, torch's global RNG (dropout, RoI sampling,
    multi-scale sizes), the trainer's own generators and ``loop`` (plain values and tensors).
    ``model`` is the part that learns (a frozen backbone is rebuilt identically, so a head-only
    training saves kilobytes, not the backbone, every epoch)."""
    if resume is None:
        return
    rng = {"torch": torch.get_rng_state(), "accelerator": accelerator_rng_state(),
           "numpy": json.dumps(numpy_rng.bit_generator.state) if numpy_rng is not None else None,
           "generator": generator.get_state() if generator is not None else None}
    resume.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "rng": rng, "loop": loop,
                 "live_step": live.step if live is not None else 0}, live)
