"""Benchmark the pipeline against the tutorial's way on one fixed workload.

    python bench/run.py [VOC_DIR] [--classes ...] [--out bench/results] [--repeats 3]
                        [--backbone mobilenet_v2] [--weights none|imagenet|PATH] [--crop-size 224]
                        [--max-images N] [--detect-images N] [--detect-proposals N] [--head-epochs N]
                        [--jobs N] [--tiny]

Without VOC_DIR the workload is a synthetic VOC set (``rcnn.synthetic``, 12 images) generated into a
temporary folder; with it, the first ``--max-images`` ids (sorted) of its split files. Detection is
timed on the first ``--detect-images`` of them. Every step runs
through the library (proposals, regions, features, training, detection) and through
``tutorial_way.py``; each figure is the median over ``--repeats`` runs. Writes ``results.json``
and ``results.md`` (a table with the ratio ours / tutorial per row) into ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import cv2
import joblib
import numpy as np
import torch
import torchvision

from rcnn import synthetic
from rcnn.data import voc
from rcnn.engine.device import inference_dtype, select_device
from rcnn.families.rcnn import features, train_data, training
from rcnn.families.rcnn import regions
from rcnn.families.rcnn.detector import RCNNDetector
from rcnn.families.rcnn.model import RegionClassifier, build_model
from rcnn.modeling.detector_interface import Timings
from rcnn.pipeline.params import (BACKBONES, SPLITS, VOC_CLASSES, DataParams, EvaluateParams, ModelParams, Params,
                                  ProposalParams, RegionParams, TrainParams)
from rcnn.proposals import selective_search
from rcnn.utils.errors import RcnnError, run_cli
from rcnn.utils.fileio import atomic_path, write_json

import tutorial_way as tutorial  # bench/ is on sys.path when this file runs as a script

SPLIT = "train"  # the bench's own split file in its workspace, listing the workload's images
TRAIN_EPOCHS_FOR_TOTAL = 10  # the derived "whole training" row: features once + this many head epochs
DETECT_PARTS = ("proposals", "crops", "cnn", "postprocess")
DEFAULTS = {"max_images": 12, "repeats": 3, "crop_size": 224, "weights": "none", "backbone": "mobilenet_v2",
            "detect_images": 2, "detect_proposals": 300, "head_epochs": 5}
TINY = {"max_images": 4, "repeats": 1, "crop_size": 32, "weights": "none", "backbone": "mobilenet_v2",
        "detect_images": 1, "detect_proposals": 50, "head_epochs": 2}


@dataclass(frozen=True)
class Row:
    """One line of the results table; ``better`` says which direction is an improvement."""

    section: str
    metric: str
    ours: float
    tutorial: float | None
    better: str  # "higher" or "lower"

    def as_dict(self) -> dict[str, Any]:
        ratio = self.ours / self.tutorial if self.tutorial else None
        return {**dataclasses.asdict(self), "ratio": ratio}


@dataclass(frozen=True)
class Workload:
    """The images every section works on and the Params that describe the run."""

    root: Path  # bench workspace: VOC layout whose SPLIT file lists the workload
    source: str
    annotations: list[voc.Annotation]
    detect_ids: list[str]
    params: Params

    @property
    def ids(self) -> list[str]:
        return [a.image_id for a in self.annotations]


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def section(name: str, text: str) -> None:
    print(f"[bench] {name}: {text}", flush=True)


# ---------------------------------------------------------------- workload

def _source_ids(root: Path) -> list[str]:
    """Sorted ids of every standard split file of a VOC folder."""
    found = [s for s in SPLITS if (root / "ImageSets" / "Main" / f"{s}.txt").is_file()]
    if not found:
        raise RcnnError(f"{root / 'ImageSets' / 'Main'} has none of the split files {', '.join(SPLITS)}")
    return sorted({i for s in found for i in voc.read_split(root, s)})


def prepare_workload(args: argparse.Namespace, tmp: Path) -> Workload:
    """Link the chosen images into a workspace VOC folder and describe the run in Params."""
    if args.voc_dir is None:
        classes = args.classes or list(synthetic.DEFAULT_CLASSES)
        src = synthetic.generate(tmp / "synthetic", images=args.max_images, seed=0, classes=classes)
        source = f"synthetic ({args.max_images} images, seed 0)"
    else:
        classes = args.classes or list(VOC_CLASSES)
        src = voc.find_voc_root(args.voc_dir).resolve()
        source = str(src)
    ids = _source_ids(src)[:args.max_images]
    root = tmp / "workload" / "VOC2007"
    (root / "ImageSets" / "Main").mkdir(parents=True)
    for sub in ("JPEGImages", "Annotations"):
        (root / sub).symlink_to(src / sub, target_is_directory=True)
    (root / "ImageSets" / "Main" / f"{SPLIT}.txt").write_text("".join(f"{i}\n" for i in ids))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # objects of other classes are dropped, as the pipeline does
        annotations = voc.load_split(root, SPLIT, classes, on_bad="skip")
    params = Params(
        seed=0, classes=list(classes),
        data=DataParams(splits=[SPLIT], train_split=SPLIT, val_split=SPLIT, on_bad_annotation="skip"),
        proposals=ProposalParams(n_jobs=args.jobs),
        regions=RegionParams(crop_size=args.crop_size),
        model=ModelParams(backbone=args.backbone, weights=args.weights),
        train=TrainParams(epochs=args.head_epochs, patience=args.head_epochs),
        # A timing workload, not a score: one split serves every role.
        evaluate=EvaluateParams(split=SPLIT, max_proposals=args.detect_proposals, allow_overlap=True))
    return Workload(root, source, annotations, ids[:args.detect_images], params)


# ---------------------------------------------------------------- sections

def bench_proposals(w: Workload, repeats: int) -> tuple[dict, list[Row], selective_search.ProposalRun, selective_search.ProposalRun]:
    """Images/s of selective search with 1 job and with ``proposals.n_jobs``, and the tutorial's way."""
    p = w.params.proposals
    n_jobs = joblib.effective_n_jobs(p.n_jobs)
    # Start the worker pool outside the timings (joblib reuses it; the stages pay this once per run).
    _, pool_start = timed(lambda: selective_search.compute_proposals(w.root, w.ids[:n_jobs], p.mode, p.max_proposals,
                                                              p.max_side, p.min_size, n_jobs=p.n_jobs,
                                                              backend=p.backend, desc="proposals warm-up",
                                                              reference_pixels=p.reference_pixels))
    one, many, tut = [], [], []
    for r in range(repeats):
        run1 = selective_search.compute_proposals(w.root, w.ids, p.mode, p.max_proposals, p.max_side, p.min_size, n_jobs=1,
                                           backend=p.backend, desc=f"proposals 1 job #{r + 1}",
                                           reference_pixels=p.reference_pixels)
        run_n = selective_search.compute_proposals(w.root, w.ids, p.mode, p.max_proposals, p.max_side, p.min_size,
                                            n_jobs=p.n_jobs, backend=p.backend,
                                            desc=f"proposals {n_jobs} jobs #{r + 1}",
                                            reference_pixels=p.reference_pixels)
        run_t = tutorial.compute_proposals(w.root, w.ids)
        one.append(len(run1.boxes) / run1.seconds)
        many.append(len(run_n.boxes) / run_n.seconds)
        tut.append(len(run_t.boxes) / run_t.seconds)
    speed_up = median(many) / median(one)
    result = {
        "ours": {"mode": p.mode, "max_side": p.max_side, "max_proposals": p.max_proposals, "n_jobs": n_jobs,
                 "backend": p.backend, "pool_start_seconds": pool_start, "images_per_second_1_job": median(one),
                 "images_per_second_all_jobs": median(many), "speed_up": speed_up,
                 "parallel_efficiency": speed_up / n_jobs,
                 "mean_proposals_per_image": float(np.mean([len(b) for b in run_n.boxes.values()])),
                 "repeats": {"1_job": one, "all_jobs": many}},
        "tutorial": {"mode": "fast", "max_side": None, "max_proposals": tutorial.TRAIN_PROPOSALS, "n_jobs": 1,
                     "images_per_second": median(tut), "repeats": tut,
                     "mean_proposals_per_image": float(np.mean([len(b) for b in run_t.boxes.values()]))},
    }
    rows = [Row("proposals", "images/s, 1 job", median(one), median(tut), "higher"),
            Row("proposals", f"images/s, {n_jobs} jobs", median(many), median(tut), "higher"),
            Row("proposals", f"parallel efficiency (speed-up / {n_jobs} jobs)", speed_up / n_jobs, None, "higher")]
    section("proposals", f"{median(one):.2f} img/s with 1 job, {median(many):.2f} img/s with {n_jobs} jobs "
                         f"(efficiency {speed_up / n_jobs:.2f}); tutorial {median(tut):.2f} img/s")
    return result, rows, run_n, run_t


def bench_regions(w: Workload, repeats: int, ours_boxes: dict[str, np.ndarray], tut_boxes: dict[str, np.ndarray],
                  tmp: Path) -> tuple[dict, list[Row], Path, list[Path]]:
    """Regions written per second, bytes per region, files; and how fast they read back."""
    p = w.params
    proposals_dir = tmp / "proposals"
    with atomic_path(selective_search.proposal_file(proposals_dir, SPLIT, p.proposals.mode)) as path:
        with open(path, "wb") as fh:
            np.savez_compressed(fh, **ours_boxes)
    regions_dir = tmp / "regions"

    def write_ours() -> dict:
        return regions.run_regions_stage(p, w.root, proposals_dir, regions_dir, tmp / "regions.json",
                                         n_jobs=p.proposals.n_jobs)

    # An untimed first run: the stage's worker pool starts (and imports torch) once per pipeline run.
    _, cold = timed(write_ours)
    write, read, tut_write, tut_read = [], [], [], []
    tut_files: list[Path] = []
    for r in range(repeats):
        metrics, seconds = timed(write_ours)
        write.append(metrics["regions"] / seconds)
        n_read, seconds = timed(lambda: sum(len(s["labels"]) for s in regions.iter_shards(regions_dir, SPLIT)))
        read.append(n_read / seconds)
        tut_dir = tmp / f"tutorial-regions-{r}"
        tut_files, seconds = timed(lambda: tutorial.write_regions(w.root, w.annotations, tut_boxes, tut_dir))
        tut_write.append(len(tut_files) / seconds)
        _, seconds = timed(lambda: sum(1 for f in tut_files if tutorial.read_region(f, p.regions.crop_size)))
        tut_read.append(len(tut_files) / seconds)
        if r + 1 < repeats:
            for f in tut_files:
                f.unlink()
            tut_dir.rmdir()
    tut_bytes = sum(f.stat().st_size for f in tut_files)
    ours_bpr = metrics["bytes"] / metrics["regions"]
    tut_bpr = tut_bytes / len(tut_files)
    result = {
        "ours": {"regions": metrics["regions"], "foreground": metrics["foreground"], "shards": metrics["shards"],
                 "bytes": metrics["bytes"], "bytes_per_region": ours_bpr, "encoding": metrics["encoding"],
                 "crop_size": p.regions.crop_size, "n_jobs": metrics["n_jobs"], "first_run_seconds": cold,
                 "regions_per_second_written": median(write), "regions_per_second_read": median(read),
                 "repeats": {"written": write, "read": read}},
        "tutorial": {"regions": len(tut_files), "files": len(tut_files), "bytes": tut_bytes,
                     "bytes_per_region": tut_bpr, "n_jobs": 1, "regions_per_second_written": median(tut_write),
                     "regions_per_second_read": median(tut_read), "repeats": {"written": tut_write, "read": tut_read}},
    }
    rows = [Row("regions", "regions/s written", median(write), median(tut_write), "higher"),
            Row("regions", "regions/s read (decoded, crop size)", median(read), median(tut_read), "higher"),
            Row("regions", "bytes per region", ours_bpr, tut_bpr, "lower"),
            Row("regions", "files (shards)", metrics["shards"], len(tut_files), "lower")]
    section("regions", f"{metrics['regions']} regions in {metrics['shards']} shard(s), {median(write):.0f}/s, "
                       f"{ours_bpr:.0f} B each; tutorial {len(tut_files)} files, {median(tut_write):.0f}/s, "
                       f"{tut_bpr:.0f} B each")
    return result, rows, regions_dir, tut_files


def bench_training(w: Workload, repeats: int, regions_dir: Path, tut_files: list[Path],
                   device: torch.device) -> tuple[dict, list[Row], RegionClassifier]:
    """Backbone regions/s of the features stage and head seconds per epoch on cached features, against
    the tutorial's epoch (pickles read, backbone run again, head step)."""
    p = w.params
    model = build_model(p).to(device).eval()
    warm_up = next(regions.iter_shards(regions_dir, SPLIT))["crops"][:p.train.feature_batch_size]
    features.crop_features(model, warm_up, device, p.train.feature_batch_size)  # one-off kernel set-up
    extract: list[float] = []
    feats: dict[str, np.ndarray] = {}
    for _ in range(repeats):
        feats, seconds = timed(lambda: features.split_features(model, regions_dir, SPLIT, device,
                                                               p.train.feature_batch_size))
        extract.append(len(feats["labels"]) / seconds)
    # Our epoch: the head on cached features, plus fit's validation pass (here over the same features).
    head_epoch: list[float] = []
    for _ in range(repeats):
        torch.manual_seed(p.seed)
        model = build_model(p).to(device)
        data = train_data.cached_feature_data(feats, feats, p.train.batch_size, p.seed, device)
        summary, seconds = timed(lambda: training.fit(model, data, p, device))
        head_epoch.append(seconds / summary["epochs_run"])
    one_epoch = dataclasses.replace(p, train=dataclasses.replace(p.train, epochs=1, patience=1))
    tut_epoch: list[float] = []
    for _ in range(repeats):
        torch.manual_seed(p.seed)
        tut_model = build_model(p).to(device)
        data = tutorial.train_data(tut_files, p.regions.crop_size, p.train.batch_size, p.seed, device)
        _, seconds = timed(lambda: training.fit(tut_model, data, one_epoch, device))
        tut_epoch.append(seconds)
    n, n_tut = len(feats["labels"]), len(tut_files)
    tut_backbone = [n_tut / s for s in tut_epoch]
    ours_total = n / median(extract) + TRAIN_EPOCHS_FOR_TOTAL * median(head_epoch)
    tut_total = TRAIN_EPOCHS_FOR_TOTAL * median(tut_epoch)
    result = {
        "ours": {"regions": n, "backbone": p.model.backbone, "weights": p.model.weights,
                 "precision": str(inference_dtype(device)).removeprefix("torch."),
                 "feature_batch_size": p.train.feature_batch_size, "batch_size": p.train.batch_size,
                 "feature_regions_per_second": median(extract), "head_seconds_per_epoch": median(head_epoch),
                 "head_epochs_per_repeat": p.train.epochs, f"seconds_{TRAIN_EPOCHS_FOR_TOTAL}_epochs": ours_total,
                 "repeats": {"feature_regions_per_second": extract, "head_seconds_per_epoch": head_epoch}},
        "tutorial": {"regions": n_tut, "precision": "float32", "batch_size": p.train.batch_size,
                     "backbone_regions_per_second": median(tut_backbone), "seconds_per_epoch": median(tut_epoch),
                     f"seconds_{TRAIN_EPOCHS_FOR_TOTAL}_epochs": tut_total,
                     "repeats": {"seconds_per_epoch": tut_epoch}},
    }
    rows = [Row("training", "backbone regions/s (ours: once, features stage; tutorial: every epoch)",
                median(extract), median(tut_backbone), "higher"),
            Row("training", "seconds per epoch (ours: head on cached features)", median(head_epoch),
                median(tut_epoch), "lower"),
            Row("training", f"seconds for {TRAIN_EPOCHS_FOR_TOTAL} epochs (ours incl. the one feature pass)",
                ours_total, tut_total, "lower")]
    section("training", f"features {median(extract):.1f} regions/s, head {median(head_epoch):.4f} s/epoch; "
                        f"tutorial {median(tut_epoch):.2f} s/epoch ({median(tut_backbone):.1f} regions/s)")
    return result, rows, model


def _detect_pass(w: Workload, detector: RCNNDetector, image_ids: Sequence[str],
                 max_proposals: int) -> tuple[dict, dict, int, int]:
    """Detect on ``image_ids`` both ways; seconds per part summed over the images, and detection counts."""
    p = w.params
    detector.timings = Timings()
    ours = dict.fromkeys(DETECT_PARTS, 0.0)
    tut = dict.fromkeys(DETECT_PARTS, 0.0)
    found = tut_found = 0
    for image_id in image_ids:
        image = voc.read_image(voc.image_path(w.root, image_id))
        boxes, seconds = timed(lambda: selective_search.selective_search(
            image, p.proposals.eval_mode, max_proposals, p.proposals.max_side, p.proposals.min_size,
            selective_search.image_seed(image_id), p.proposals.reference_pixels))
        ours["proposals"] += seconds
        found += len(detector.detect(image, boxes))
        count, times = tutorial.detect(detector.model, image, p.regions.crop_size, max_proposals, detector.device)
        tut_found += count
        for k in DETECT_PARTS:
            tut[k] += times[k]
    ours.update(crops=detector.timings.crops, cnn=detector.timings.cnn, postprocess=detector.timings.postprocess)
    return ours, tut, found, tut_found


def bench_detection(w: Workload, repeats: int, model: RegionClassifier, device: torch.device) -> tuple[dict, list[Row]]:
    """Seconds per image in proposals, crop preparation, CNN and post-processing, both ways."""
    p, e = w.params, w.params.evaluate
    detector = RCNNDetector(model, {"classes": p.classes, "crop_size": p.regions.crop_size,
                                "context": p.regions.context, "bbox_regressor": None}, device,
                        score_threshold=e.score_threshold, nms_iou=e.nms_iou, max_detections=e.max_detections,
                        batch_size=e.batch_size)
    # Untimed, one batch each way: the CNN's kernels are set up on the first use of a batch shape.
    _detect_pass(w, detector, w.detect_ids[:1], min(e.batch_size, e.max_proposals))
    ours: dict[str, list[float]] = {k: [] for k in (*DETECT_PARTS, "total")}
    tut: dict[str, list[float]] = {k: [] for k in (*DETECT_PARTS, "total")}
    n = len(w.detect_ids)
    found = tut_found = 0
    for _ in range(repeats):
        ours_s, tut_s, found, tut_found = _detect_pass(w, detector, w.detect_ids, e.max_proposals)
        for out, sums in ((ours, ours_s), (tut, tut_s)):
            for k in DETECT_PARTS:
                out[k].append(sums[k] / n)
            out["total"].append(sum(sums.values()) / n)
    result = {
        "images": n,
        "ours": {"proposal_mode": p.proposals.eval_mode, "max_side": p.proposals.max_side,
                 "max_proposals": e.max_proposals, "score_threshold": e.score_threshold, "nms": "torchvision "
                 "batched_nms", "nms_iou": e.nms_iou, "precision": str(inference_dtype(device)).removeprefix("torch."),
                 "detections_per_image": found / n,
                 **{f"seconds_per_image_{k}": median(v) for k, v in ours.items()}, "repeats": ours},
        "tutorial": {"proposal_mode": "quality", "max_side": None, "max_proposals": e.max_proposals,
                     "score_threshold": tutorial.SCORE_THRESHOLD, "nms": "greedy Python", "nms_iou": tutorial.NMS_IOU,
                     "precision": "float32", "detections_per_image": tut_found / n,
                     **{f"seconds_per_image_{k}": median(v) for k, v in tut.items()}, "repeats": tut},
    }
    labels = {"proposals": "proposals", "crops": "crop preparation", "cnn": "CNN", "postprocess": "post-processing",
              "total": "total"}
    rows = [Row("detection", f"s/image, {labels[k]}", median(ours[k]), median(tut[k]), "lower") for k in ours]
    section("detection", f"{median(ours['total']):.3f} s/image ({n} images); "
                         f"tutorial {median(tut['total']):.3f} s/image")
    return result, rows


# ---------------------------------------------------------------- output

def environment(device: torch.device) -> dict[str, Any]:
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "device": str(device), "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "usable_cpus": usable, "inference_dtype": str(inference_dtype(device)).removeprefix("torch."),
        "platform": platform.platform(), "machine": platform.machine(), "processor": platform.processor(),
        "cuda_device": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "load_average_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "torchvision": torchvision.__version__, "cv2": cv2.__version__, "numpy": np.__version__,
                     "joblib": joblib.__version__},
    }


def fmt(value: float | None) -> str:
    if value is None:
        return "–"
    if float(value).is_integer():
        return f"{int(value):,}"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def markdown(results: dict[str, Any]) -> str:
    env, work = results["environment"], results["workload"]
    lines = [
        "# Benchmark: ours vs the tutorial's way",
        "",
        f"Workload: {work['source']}, {work['images']} images ({work['detect_images']} for detection), classes "
        f"{', '.join(work['classes'])}; backbone {work['backbone']} (weights {work['weights']}), crops "
        f"{work['crop_size']} px; median of {work['repeats']} repeat(s).",
        f"Machine: {env['device']}, {env['usable_cpus']} usable CPUs, {env['torch_threads']} torch threads, "
        f"inference {env['inference_dtype']}; torch {env['versions']['torch']}, torchvision "
        f"{env['versions']['torchvision']}, cv2 {env['versions']['cv2']}; load average at start "
        f"{', '.join(f'{v:.1f}' for v in env['load_average_at_start'] or [])}.",
        "",
        "| section | metric | ours | tutorial | ours / tutorial | better |",
        "|---|---|---:|---:|---:|---|",
    ]
    for row in results["rows"]:
        lines.append(f"| {row['section']} | {row['metric']} | {fmt(row['ours'])} | {fmt(row['tutorial'])} | "
                     f"{fmt(row['ratio'])} | {row['better']} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- CLI

def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench/run.py", description=__doc__.splitlines()[0])
    parser.add_argument("voc_dir", nargs="?", type=Path, help="VOC-format folder (default: a synthetic set)")
    parser.add_argument("--classes", nargs="+", help="object classes (default: the synthetic set's, or VOC's 20)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results",
                        help="folder for results.json and results.md (default bench/results)")
    parser.add_argument("--repeats", type=int, help=f"repeats per figure (default {DEFAULTS['repeats']})")
    parser.add_argument("--backbone", choices=BACKBONES, help=f"default {DEFAULTS['backbone']}")
    parser.add_argument("--weights", help="none | imagenet | path to a .pth (default none)")
    parser.add_argument("--crop-size", type=int, help=f"region crop size in pixels (default {DEFAULTS['crop_size']})")
    parser.add_argument("--max-images", type=int, help=f"images in the workload (default {DEFAULTS['max_images']})")
    parser.add_argument("--detect-images", type=int,
                        help=f"images of the workload timed in detection (default {DEFAULTS['detect_images']})")
    parser.add_argument("--detect-proposals", type=int,
                        help=f"proposals per image in detection, both ways (default {DEFAULTS['detect_proposals']}, "
                             f"the tutorial's)")
    parser.add_argument("--head-epochs", type=int,
                        help=f"head epochs timed per repeat (default {DEFAULTS['head_epochs']})")
    parser.add_argument("--jobs", type=int, default=-1, help="parallel jobs for 'all cores' (default -1: all)")
    parser.add_argument("--tiny", action="store_true",
                        help="a few seconds of work for tests: 4 images, 1 repeat, 32 px crops, 50 proposals")
    args = parser.parse_args(argv)
    for key, value in (TINY if args.tiny else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    checks = [(args.repeats >= 1, "--repeats must be >= 1"), (args.crop_size >= 32, "--crop-size must be >= 32"),
              (args.max_images >= 1, "--max-images must be >= 1"),
              (args.detect_images >= 1, "--detect-images must be >= 1"),
              (args.detect_proposals >= 1, "--detect-proposals must be >= 1"),
              (args.head_epochs >= 1, "--head-epochs must be >= 1"), (args.jobs != 0, "--jobs must not be 0"),
              (args.voc_dir is not None or args.max_images >= 4, "a synthetic workload needs --max-images >= 4")]
    for ok, message in checks:
        if not ok:
            raise RcnnError(message)
    return args


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = select_device("auto")
    env = environment(device)
    with tempfile.TemporaryDirectory(prefix="rcnn-bench-") as scratch:
        tmp = Path(scratch)
        w = prepare_workload(args, tmp)
        if not w.annotations:
            raise RcnnError(f"{w.source}: no images to benchmark")
        workload = {"source": w.source, "images": len(w.ids), "detect_images": len(w.detect_ids),
                    "classes": w.params.classes, "backbone": args.backbone, "weights": args.weights,
                    "crop_size": args.crop_size, "repeats": args.repeats, "jobs": args.jobs,
                    "objects": int(sum(len(a.boxes) for a in w.annotations))}
        section("workload", f"{w.source}: {len(w.ids)} images, {workload['objects']} objects; device {device}, "
                            f"{env['torch_threads']} torch threads, {env['usable_cpus']} CPUs")
        prop, rows, ours_run, tut_run = bench_proposals(w, args.repeats)
        reg, reg_rows, regions_dir, tut_files = bench_regions(w, args.repeats, ours_run.boxes, tut_run.boxes, tmp)
        train, train_rows, model = bench_training(w, args.repeats, regions_dir, tut_files, device)
        det, det_rows = bench_detection(w, args.repeats, model, device)
    env["load_average_at_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    results = {"environment": env, "workload": workload, "proposals": prop, "regions": reg, "training": train,
               "detection": det, "rows": [r.as_dict() for r in (*rows, *reg_rows, *train_rows, *det_rows)]}
    write_json(args.out / "results.json", results)
    with atomic_path(args.out / "results.md") as path:
        path.write_text(markdown(results))
    section("done", f"wrote {args.out / 'results.json'} and {args.out / 'results.md'}")
    return results


if __name__ == "__main__":
    run_cli(lambda: run(sys.argv[1:]))
