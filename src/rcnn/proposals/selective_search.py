"""Selective-search region proposals, computed in parallel with identical results for any ``n_jobs``.

OpenCV's selective search ranks its boxes with C ``rand()``, whose state is global to the
process (and shared by its threads). We therefore reseed the C generator right before every
image, under a lock, so an image's ranking never depends on which images a worker saw before.
``cv2.setRNGSeed`` does not touch that generator.

Output of the stage: ``<dir>/<split>-<mode>.npz`` keyed by image id, each an ``(N, 4)`` float32
array of inclusive-corner boxes in original image coordinates, best first.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import multiprocessing
import sys
import threading
import time
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Literal, Sequence

import cv2
import joblib
import numpy as np
from joblib.parallel import MultiprocessingBackend, get_active_backend
from tqdm import tqdm

from rcnn.data import voc
from rcnn.data.splits import check_evaluation_split
from rcnn.pipeline.params import Params
from rcnn.utils.boxes import box_iou, clip_boxes, xywh_to_xyxy
from rcnn.utils.errors import RcnnError
from rcnn.utils.fileio import atomic_dir, atomic_path, load_npz, write_json

Mode = Literal["fast", "quality"]
RECALL_THRESHOLDS = {"recall_iou50": 0.5, "recall_iou70": 0.7}

# Serialises "reseed C rand() + run selective search": threads of one process share rand()'s state.
_RAND_LOCK = threading.Lock()


def proposal_file(directory: str | Path, split: str, mode: str) -> Path:
    """Where the proposals of ``split`` computed in ``mode`` live."""
    return Path(directory) / f"{split}-{mode}.npz"


def load_proposals(path: str | Path) -> dict[str, np.ndarray]:
    """All proposals of one file: image id -> ``(N, 4)`` float32 boxes, best first."""
    arrays = load_npz(path, "proposals", "proposals")
    try:
        boxes = {key: value.astype(np.float32).reshape(-1, 4) for key, value in arrays.items()}
    except (ValueError, TypeError) as err:
        raise RcnnError(f"{path} is not a valid proposals file ({err}); rerun the proposals stage") from None
    bad = next((key for key, value in boxes.items() if not np.isfinite(value).all()), None)
    if bad is not None:
        raise RcnnError(f"{path} is not a valid proposals file (non-finite boxes for {bad}); rerun the proposals stage")
    return boxes


@functools.lru_cache(maxsize=1)
def _c_srand() -> Callable[[int], None] | None:
    """``srand`` of the C runtime OpenCV uses, or None when it cannot be found."""
    if sys.platform == "win32":
        names = ["ucrtbase", "msvcrt"]  # OpenCV's Windows wheels use the universal CRT
    else:
        names = [None, ctypes.util.find_library("c")]  # None: symbols already loaded into the process
    for name in names:
        try:
            srand = getattr(ctypes.CDLL(name), "srand")
        except (OSError, AttributeError, TypeError):
            continue
        srand.argtypes = [ctypes.c_uint]
        srand.restype = None
        return srand
    return None


def seed_c_rand(seed: int) -> bool:
    """Reseed C ``rand()``; False (with a warning) where no C runtime could be found."""
    srand = _c_srand()
    if srand is None:
        warnings.warn("cannot reseed the C rand() used by selective search: proposal order may "
                      "depend on processing order and n_jobs", RuntimeWarning, stacklevel=2)
        return False
    srand(seed & 0xFFFFFFFF)
    return True


def filter_boxes(boxes: np.ndarray, min_size: int, max_proposals: int) -> np.ndarray:
    """Drop boxes narrower or lower than ``min_size`` pixels and repeats (first kept), keep the top ``max_proposals``."""
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    keep = ((boxes[:, 2] - boxes[:, 0] + 1) >= min_size) & ((boxes[:, 3] - boxes[:, 1] + 1) >= min_size)
    boxes = boxes[keep]
    _, first = np.unique(boxes, axis=0, return_index=True)
    return boxes[np.sort(first)][:max_proposals]


# Largest image searched at full size (proposals.max_side: null): 2.5 MP, e.g. 2000x1250; VOC photos are
# about 0.2 MP and search in seconds, while search time and memory grow faster than the pixel count.
MAX_FULL_SIZE_PIXELS = 2_500_000


# OpenCV's segmentation scale k for both modes (base and increment: Felzenszwalb's k in its strategies).
OPENCV_K = 150


def segmentation_k(pixels: int, reference_pixels: int) -> int:
    """Felzenszwalb's k for a searched image of ``pixels`` pixels: OpenCV's 150, made proportionally finer below
    ``reference_pixels`` (0: never). k is a region size in pixels, so on a small image OpenCV's k merges whole
    objects into the background (neu's 200x200 steel photos: 118 proposals an image and recall@0.5 0.69 at 150,
    282 and 0.80 at 89)."""
    if not reference_pixels or pixels >= reference_pixels:
        return OPENCV_K
    return max(1, round(OPENCV_K * pixels / reference_pixels))


def selective_search(image_bgr: np.ndarray, mode: Mode = "fast", max_proposals: int = 2000,
                     max_side: int | None = 500, min_size: int = 10, seed: int = 0,
                     reference_pixels: int = 0) -> np.ndarray:
    """Ranked selective-search boxes of one BGR image, ``(N, 4)`` float32 inclusive corners in its own pixels.

    With ``max_side`` the search runs on a copy whose longer side is ``max_side`` (never upscaled),
    which is much faster; boxes are mapped back to the original pixel grid. A copy smaller than
    ``reference_pixels`` segments at a finer scale (:func:`segmentation_k`).
    """
    height, width = image_bgr.shape[:2]
    scale = 1.0 if max_side is None or max(height, width) <= max_side else max_side / max(height, width)
    searched = (max(1, round(width * scale)), max(1, round(height * scale)))
    if searched[0] * searched[1] > MAX_FULL_SIZE_PIXELS:  # max_side null, or too large to shrink anything
        raise RcnnError(f"a {width}x{height} image searched at {searched[0]}x{searched[1]} "
                        f"({searched[0] * searched[1] / 1e6:.1f} MP) with proposals.max_side = "
                        f"{'null' if max_side is None else max_side}: selective search that large would take many "
                        f"minutes and GBs of memory (a 6000x4000 photo ran over 300 s at 4.4 GB); set "
                        f"proposals.max_side (default 500, at most about 1500 for this guard)")
    small = image_bgr if scale == 1.0 else cv2.resize(image_bgr, searched, interpolation=cv2.INTER_AREA)
    search = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
    search.setBaseImage(small)
    k = segmentation_k(small.shape[0] * small.shape[1], reference_pixels)
    if mode == "fast":
        search.switchToSelectiveSearchFast(k, k)
    else:
        search.switchToSelectiveSearchQuality(k, k)
    with _RAND_LOCK:
        seed_c_rand(seed)
        rects = search.process()
    boxes = xywh_to_xyxy(np.asarray(rects, dtype=np.float32).reshape(-1, 4))
    if small is not image_bgr:
        # Scale pixel edges, not inclusive corners: [x1, x2 + 1) maps to [x1 * s, (x2 + 1) * s).
        sx, sy = width / small.shape[1], height / small.shape[0]
        scale = np.array([sx, sy, sx, sy], dtype=np.float32)
        boxes = np.round((boxes + [0, 0, 1, 1]) * scale) - [0, 0, 1, 1]
        boxes = clip_boxes(boxes, width, height)
    return filter_boxes(boxes, min_size, max_proposals)


def image_seed(image_id: str) -> int:
    """Per-image seed for C ``rand()``: stable across runs and platforms (unlike ``hash``)."""
    return zlib.crc32(image_id.encode())


def _propose_one(image_id: str, path: str, mode: Mode, max_proposals: int, max_side: int | None,
                 min_size: int, reference_pixels: int) -> tuple[str, np.ndarray | None, str]:
    """Worker: proposals of one image file, or None and the reason when it cannot be read."""
    cv2.setNumThreads(1)
    try:
        image = voc.read_image(path)
    except RcnnError as err:
        return image_id, None, str(err)
    return image_id, selective_search(image, mode, max_proposals, max_side, min_size, image_seed(image_id),
                                      reference_pixels), ""


DASK_CONNECT_SECONDS = 30  # how long to wait for proposals.scheduler before giving up


@contextlib.contextmanager
def parallel_backend(backend: str, n_jobs: int, scheduler: str | None = None) -> Iterator[None]:
    """Make ``backend`` joblib's backend in this block; dask and ray need their packages installed.

    dask: with ``scheduler`` (an address such as ``tcp://host:8786``) the work goes to that cluster's
    workers; without, to the client already active in this process, else to a ``LocalCluster`` of
    ``n_jobs`` single-threaded worker processes started for the block.
    """
    if backend == "dask":
        try:
            from dask.distributed import Client, get_client
        except ImportError:
            raise RcnnError("proposals.backend = 'dask' needs dask[distributed]: pip install -e '.[dask]'") from None
        own = None
        if scheduler is not None:
            try:
                own = Client(scheduler, timeout=DASK_CONNECT_SECONDS)
            except (OSError, TimeoutError, ValueError, TypeError) as err:  # TypeError: tls:// without a security
                raise RcnnError(f"proposals.scheduler = {scheduler!r}: cannot reach the dask scheduler ({err})") from None
        else:
            try:
                get_client()
            except ValueError:
                own = Client(processes=True, n_workers=joblib.effective_n_jobs(n_jobs), threads_per_worker=1)
        try:
            with joblib.parallel_config(backend="dask"):
                yield
        finally:
            if own is not None:
                own.close()
    elif backend == "ray":
        try:
            from ray.util.joblib import register_ray
        except ImportError:
            raise RcnnError("proposals.backend = 'ray' needs ray: pip install 'ray[default]'") from None
        register_ray()
        with joblib.parallel_config(backend="ray"):
            yield
    else:
        with joblib.parallel_config(backend=backend):
            yield


def _parallel(n_jobs: int) -> joblib.Parallel:
    """joblib.Parallel on the active backend, streaming results as they finish (a live progress bar).

    joblib's multiprocessing backend can neither stream nor fork safely once torch or OpenMP threads
    exist in this process (its forked workers deadlock): it gets clean forkserver (or spawn) workers
    and returns the whole list at the end.
    """
    if isinstance(get_active_backend()[0], MultiprocessingBackend):
        method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
        return joblib.Parallel(n_jobs=n_jobs, backend=multiprocessing.get_context(method), return_as="list")
    return joblib.Parallel(n_jobs=n_jobs, return_as="generator")


@dataclass(frozen=True)
class ProposalRun:
    """Proposals of one list of images plus what happened while computing them."""

    boxes: dict[str, np.ndarray]
    skipped: dict[str, str]  # image id -> reason
    seconds: float


def compute_proposals(root: str | Path, image_ids: Sequence[str], mode: Mode = "fast",
                      max_proposals: int = 2000, max_side: int | None = 500, min_size: int = 10,
                      n_jobs: int = -1, backend: str | None = "loky", desc: str = "proposals",
                      reference_pixels: int = 0) -> ProposalRun:
    """Selective search over images of a VOC folder in parallel; unreadable images are skipped with a warning.

    ``backend=None`` uses the joblib backend already active (:func:`parallel_backend` around several calls).
    """
    root = Path(root)
    start = time.perf_counter()
    boxes: dict[str, np.ndarray] = {}
    skipped: dict[str, str] = {}
    jobs = (joblib.delayed(_propose_one)(i, str(voc.image_path(root, i)), mode, max_proposals, max_side, min_size,
                                         reference_pixels) for i in image_ids)
    with parallel_backend(backend, n_jobs) if backend is not None else contextlib.nullcontext():
        results = _parallel(n_jobs)(jobs)
        for image_id, found, reason in tqdm(results, total=len(image_ids), desc=desc, unit="img"):
            if found is None:
                warnings.warn(f"skipping image {image_id}: {reason}", RuntimeWarning, stacklevel=2)
                skipped[image_id] = reason
            else:
                boxes[image_id] = found
    return ProposalRun(boxes, skipped, time.perf_counter() - start)


def proposal_recall(proposals: Sequence[np.ndarray], gt_boxes: Sequence[np.ndarray],
                    gt_labels: Sequence[np.ndarray] | None = None,
                    classes: Sequence[str] | None = None) -> dict[str, object]:
    """Fraction of ground-truth boxes whose best proposal reaches IoU 0.5 / 0.7 (None without any box); with
    ``gt_labels`` (1-based) and ``classes``, the same per class under ``per_class`` too: whether a class failed
    at proposals or at classification."""
    best = [box_iou(gt, props).max(axis=1) if len(props) else np.zeros(len(gt), np.float32)
            for props, gt in zip(proposals, gt_boxes)]
    best_all = np.concatenate(best) if best else np.zeros(0, np.float32)
    out: dict[str, object] = _recall_of(best_all)
    if gt_labels is not None and classes is not None:
        labels = np.concatenate([np.asarray(x, np.int64).ravel() for x in gt_labels]) if best else np.zeros(0, int)
        out["per_class"] = {name: _recall_of(best_all[labels == i]) for i, name in enumerate(classes, start=1)}
    return out


def _recall_of(best_iou: np.ndarray) -> dict[str, float | int | None]:
    out: dict[str, float | int | None] = {"gt_boxes": int(len(best_iou))}
    for key, threshold in RECALL_THRESHOLDS.items():
        out[key] = round(float(np.mean(best_iou >= threshold)), 6) if len(best_iou) else None
    return out


def proposal_jobs(params: Params) -> list[tuple[str, Mode]]:
    """Unique (split, mode) pairs the pipeline needs, in a stable order."""
    wanted = [(params.data.train_split, params.proposals.mode), (params.data.val_split, params.proposals.mode),
              (params.evaluate.split, params.proposals.eval_mode)]
    return list(dict.fromkeys(wanted))


def _summary(boxes: Sequence[np.ndarray], gt: Sequence[np.ndarray], skipped: dict[str, str],
             seconds: float, labels: Sequence[np.ndarray] | None = None,
             classes: Sequence[str] | None = None) -> dict:
    counts = [len(b) for b in boxes]
    return {
        "images": len(boxes),
        "skipped_images": len(skipped),
        "skipped_ids": sorted(skipped),
        "mean_proposals_per_image": float(np.mean(counts)) if counts else 0.0,
        **proposal_recall(boxes, gt, labels, classes),
        "seconds": round(seconds, 3),
        "images_per_second": round(len(boxes) / seconds, 3) if seconds > 0 else None,
    }


def run_proposals_stage(params: Params, voc_dir: str | Path = "data/voc", out_dir: str | Path = "data/proposals",
                        metrics_path: str | Path = "metrics/proposals.json") -> dict:
    """Compute every proposals file the pipeline needs, write them and ``metrics/proposals.json``."""
    p = params.proposals
    root = voc.find_voc_root(voc_dir)
    check_evaluation_split(root, params)
    files: dict[str, dict] = {}
    all_boxes: list[np.ndarray] = []
    all_gt: list[np.ndarray] = []
    all_skipped: dict[str, str] = {}
    seconds = 0.0
    with atomic_dir(out_dir) as tmp, parallel_backend(p.backend, p.n_jobs, p.scheduler):
        for split, mode in proposal_jobs(params):
            annotations = {a.image_id: a for a in voc.load_split(root, split, params.classes,
                                                                  params.data.on_bad_annotation)}
            run = compute_proposals(root, sorted(annotations), mode, p.max_proposals, p.max_side, p.min_size,
                                    p.n_jobs, None, desc=f"proposals {split}-{mode}",
                                    reference_pixels=p.reference_pixels)
            with atomic_path(proposal_file(tmp, split, mode)) as path:
                with open(path, "wb") as fh:
                    np.savez_compressed(fh, **run.boxes)
            ids = sorted(run.boxes)
            boxes = [run.boxes[i] for i in ids]
            gt = [annotations[i].boxes[~annotations[i].difficult] for i in ids]
            labels = [annotations[i].labels[~annotations[i].difficult] for i in ids]
            files[f"{split}-{mode}"] = {"split": split, "mode": mode,
                                        **_summary(boxes, gt, run.skipped, run.seconds, labels, params.classes)}
            all_boxes += boxes
            all_gt += gt
            all_skipped.update({f"{split}/{i}": r for i, r in run.skipped.items()})
            seconds += run.seconds
    metrics = {**_summary(all_boxes, all_gt, all_skipped, seconds), "files": files,
               "n_jobs": joblib.effective_n_jobs(p.n_jobs), "backend": p.backend, "max_side": p.max_side,
               "max_proposals": p.max_proposals, "reference_pixels": p.reference_pixels}
    write_json(metrics_path, metrics)
    return metrics


