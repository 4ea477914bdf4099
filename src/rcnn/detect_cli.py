"""``rcnn-detect``: detection with a trained checkpoint of any family on images, folders, glob patterns and
videos, printing ``label score x1 y1 x2 y2`` (1-based VOC corners) per detection.

One image prints as before; several inputs prefix each line with the file and the frame (``-`` for an
image). ``--out DIR`` writes the drawn images (and, for a video, an annotated video of the frames it
scored), ``--json FILE`` every detection in one file. An input that cannot be read is skipped with a
warning and counted; a path that does not exist at all is a typo and stops before any work.
"""

from __future__ import annotations

import argparse
import glob
import inspect
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import cv2
import numpy as np
from tqdm import tqdm

from rcnn.data import voc
from rcnn.evaluation.drawing import draw_detections, write_image
from rcnn.evaluation.voc_eval import Detections
from rcnn.modeling.detector_interface import Detector
from rcnn.pipeline.evaluate_stage import detect_image
from rcnn.pipeline.family_registry import load_detector
from rcnn.utils.errors import CliParser, RcnnError, run_cli
from rcnn.utils.fileio import write_json

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = CliParser(prog="rcnn-detect", description="Detect objects with a trained checkpoint in "
                                     "images, folders, glob patterns or videos; prints 'label score x1 y1 x2 y2' "
                                     "(1-based VOC corners), prefixed by file and frame for several inputs.")
    parser.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER_OR_VIDEO")
    parser.add_argument("--checkpoint", type=Path, default=Path("data/model/model.pt"))
    parser.add_argument("--out", type=Path, help="folder for the drawn images and videos (for one image, also "
                        "an image file name such as out.jpg)")
    parser.add_argument("--json", type=Path, help="write every detection (file, frame, label, score, box) here")
    parser.add_argument("--every", type=int, default=1, help="score every N-th frame of a video (default 1)")
    parser.add_argument("--score", type=float, default=0.5, help="minimum score to report (default 0.5)")
    parser.add_argument("--nms", type=float, default=0.3, help="class-wise NMS IoU (default 0.3)")
    parser.add_argument("--max-detections", type=int, default=100)
    # Selective search as the checkpoint's evaluation ran it unless given: proposals made another way than
    # the ones the model was chosen on cost AP without a word.
    parser.add_argument("--max-proposals", type=int, help="proposals scored an image (default: the checkpoint's "
                        "evaluate.max_proposals, else 300)")
    parser.add_argument("--mode", choices=("fast", "quality"), help="selective search mode (default: the "
                        "checkpoint's proposals.eval_mode, else fast)")
    parser.add_argument("--max-side", type=int, help="selective search image size, longer side (default: the "
                        "checkpoint's proposals.max_side, else 500)")
    parser.add_argument("--reference-pixels", type=int,
                        help="selective search segments an image of fewer pixels more finely, as "
                             "proposals.reference_pixels (default: the checkpoint's, else 0: OpenCV's scale)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), default="auto")
    return parser.parse_args(argv)


def _is_count(value: object, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


# What selective search can run with, for a flag and for a value saved in a checkpoint alike.
SEARCH_RULES = {
    "mode": (lambda v: v in ("fast", "quality"), "fast or quality"),
    "max_side": (lambda v: v is None or _is_count(v, 32), "selective search needs at least 32 pixels"),
    "reference_pixels": (lambda v: _is_count(v, 0), "0 (off) or a pixel count"),
    "max_proposals": (lambda v: _is_count(v, 1), "at least 1"),
}


def _check_args(args: argparse.Namespace) -> None:
    if not 0 <= args.score < 1 or not 0 < args.nms <= 1 or args.max_detections < 1:
        raise RcnnError("--score must be in [0, 1), --nms in (0, 1], --max-detections >= 1")
    for flag, (valid, expected) in SEARCH_RULES.items():
        value = getattr(args, flag)
        if value is not None and not valid(value):
            raise RcnnError(f"--{flag.replace('_', '-')} {value} is invalid: {expected}")
    if args.every < 1:
        raise RcnnError(f"--every {args.every} is invalid: score every N-th frame with N >= 1")
    if args.json is not None and args.json.is_dir():
        raise RcnnError(f"--json {args.json} is a folder: name the file to write, e.g. {args.json / 'detections.json'}")


# For a checkpoint that does not say how its evaluation searched: detect_image's own defaults.
SEARCH_DEFAULTS = {flag: parameter.default for flag, parameter in inspect.signature(detect_image).parameters.items()
                   if flag in SEARCH_RULES}


def evaluated_search_settings(params: dict) -> dict:
    """The selective-search settings the evaluate stage ran with, from a checkpoint's saved params (the keys
    it lacks left out; ``max_side`` null is the full size): it scored the first ``evaluate.max_proposals`` of
    ``proposals.max_proposals``."""
    search, evaluate = params.get("proposals") or {}, params.get("evaluate") or {}
    found = {flag: search[key] for flag, key in (("mode", "eval_mode"), ("max_side", "max_side"),
                                                 ("reference_pixels", "reference_pixels")) if key in search}
    counts = [n for n in (search.get("max_proposals"), evaluate.get("max_proposals")) if n is not None]
    if counts:
        found["max_proposals"] = min(counts)
    return found


def fill_search_settings(args: argparse.Namespace, meta: dict) -> None:
    """Every selective-search flag not given takes the value the checkpoint's evaluation used, or the old
    default where the checkpoint does not say (one saved before the key existed)."""
    saved = evaluated_search_settings(meta.get("params") or {})
    for flag, default in SEARCH_DEFAULTS.items():
        if getattr(args, flag) is None:
            value = saved.get(flag, default)
            valid, expected = SEARCH_RULES[flag]
            if not valid(value):
                option = flag.replace("_", "-")
                raise RcnnError(f"the checkpoint says its evaluation searched with {option} {value!r}, which is "
                                f"invalid ({expected}): give --{option}")
            setattr(args, flag, value)


def _writable_place(flag: str, path: Path) -> None:
    """``path`` can be created: the nearest existing folder above it is a folder and writable."""
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise RcnnError(f"{flag} {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK):
        raise RcnnError(f"{flag} {path}: {parent} is not writable")


def check_outputs(args: argparse.Namespace, paths: Sequence[Path], single_file: bool) -> None:
    """Before any work: ``--json`` and ``--out`` can be written, and writing them replaces no input and not the
    checkpoint."""
    protected = {p.resolve() for p in [*paths, args.checkpoint]}
    if args.json is not None:
        _writable_place("--json", args.json)
        if args.json.resolve() in protected:
            raise RcnnError(f"--json {args.json} is one of the inputs or the checkpoint: choose another name")
    if args.out is None:
        return
    if single_file:
        _writable_place("--out", args.out)
        if args.out.resolve() in protected:
            raise RcnnError(f"--out {args.out} is one of the inputs or the checkpoint: choose another name")
        return
    if args.out.exists() and not args.out.is_dir():
        raise RcnnError(f"--out {args.out} is a file: name a folder for the drawn images and videos")
    _writable_place("--out", args.out / "x")
    if any(p.resolve().parent == args.out.resolve() for p in paths):
        raise RcnnError(f"--out {args.out} holds inputs, which drawn images of the same name would replace: "
                        f"choose another folder")


def expand_inputs(inputs: Sequence[str]) -> list[Path]:
    """Files named, folders' images and videos (sorted, recursively) and glob matches, in order, each once.
    A name that is neither an existing path nor a pattern matching something is one error."""
    found: list[Path] = []
    for text in inputs:
        path = Path(text)
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.is_file()
                            and p.suffix.lower() in IMAGE_SUFFIXES + VIDEO_SUFFIXES)
        elif path.exists():
            found.append(path)
        elif glob.has_magic(text) and (matches := sorted(glob.glob(text, recursive=True))):
            found += [Path(m) for m in matches if Path(m).is_file()]
        else:
            raise RcnnError(f"{text}: no such file, folder or matching pattern")
    return list(dict.fromkeys(found))


@dataclass
class Report:
    """Every detection for ``--json`` and the inputs skipped, with the count of scored images and frames."""

    detections: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    images: int = 0
    frames: int = 0

    def skip(self, path: Path, reason: str) -> None:
        warnings.warn(f"skipping {path}: {reason}", RuntimeWarning, stacklevel=2)
        self.skipped.append({"file": str(path), "reason": reason})


def _frames(path: Path, every: int) -> Iterator[tuple[int, np.ndarray, float]]:
    """``(frame index, BGR frame, frames per second)`` of every ``every``-th frame; nothing if unreadable."""
    capture = cv2.VideoCapture(str(path))
    try:
        fps = capture.get(cv2.CAP_PROP_FPS) or 25.0
        index = 0
        while True:
            ok, frame = capture.read()
            if not ok:
                return
            if index % every == 0:
                yield index, frame, fps
            index += 1
    finally:
        capture.release()


class _Outputs:
    """Names under ``--out`` (one per input, never two alike) and the annotated videos being written."""

    def __init__(self, out: Path | None, single_file: bool) -> None:
        self.out, self.single_file, self.used = out, single_file, set()
        if out is not None and not single_file:
            out.mkdir(parents=True, exist_ok=True)

    def name(self, path: Path, suffix: str) -> Path:
        if self.single_file:
            return self.out
        stem, number = path.stem, 1
        while (candidate := f"{stem}{suffix}" if number == 1 else f"{stem}-{number}{suffix}") in self.used:
            number += 1
        self.used.add(candidate)
        return self.out / candidate


def _record(report: Report, path: Path, frame: int | None, found: Detections, classes: Sequence[str],
            prefix: bool) -> None:
    for box, score, label in zip(found.boxes + 1.0, found.scores, found.labels):
        corners = [round(float(v), 1) for v in box]
        report.detections.append({"file": str(path), "frame": frame, "label": classes[label - 1],
                                  "score": round(float(score), 4), "box": corners})
        head = f"{path} {'-' if frame is None else frame} " if prefix else ""
        print(f"{head}{classes[label - 1]} {score:.4f} " + " ".join(f"{v:.1f}" for v in corners))


def _detect_video(path: Path, detector: Detector, args: argparse.Namespace, outputs: _Outputs, report: Report,
                  prefix: bool) -> None:
    writer, scored = None, 0
    target = outputs.name(path, ".mp4") if args.out is not None else None
    tmp = None if target is None else target.with_name(f".{target.stem}.tmp.mp4")  # whole videos only
    try:
        for index, frame, fps in tqdm(_frames(path, args.every), desc=path.name, unit="frame", leave=False):
            found = detect_image(frame, detector, args.mode, args.max_proposals, args.max_side,
                                 reference_pixels=args.reference_pixels)
            _record(report, path, index, found, detector.classes, prefix)
            scored += 1
            if tmp is not None:
                if writer is None:
                    writer = cv2.VideoWriter(str(tmp), cv2.VideoWriter_fourcc(*"mp4v"), fps / args.every,
                                             (frame.shape[1], frame.shape[0]))
                writer.write(draw_detections(frame, found, detector.classes, args.score))
    except BaseException:
        if writer is not None:
            writer.release()
            tmp.unlink(missing_ok=True)
        raise
    if writer is not None:
        writer.release()
        tmp.replace(target)
    if scored == 0:
        report.skip(path, "not a readable video (no frame decoded)")
    report.frames += scored


def writes_one_image(paths: Sequence[Path], args: argparse.Namespace) -> bool:
    """``--out`` names the drawn image itself (one image in, an image file name out) rather than a folder."""
    return len(paths) == 1 and paths[0].suffix.lower() not in VIDEO_SUFFIXES and args.out is not None \
        and args.out.suffix.lower() in IMAGE_SUFFIXES


def detect_inputs(paths: Sequence[Path], detector: Detector, args: argparse.Namespace) -> Report:
    """Detect on every image and video of ``paths``; unreadable ones are skipped and reported."""
    report = Report()
    single = len(paths) == 1 and paths[0].suffix.lower() not in VIDEO_SUFFIXES
    outputs = _Outputs(args.out, writes_one_image(paths, args))
    for path in tqdm(paths, desc="detect", unit="input", disable=single):
        if path.suffix.lower() in VIDEO_SUFFIXES:
            _detect_video(path, detector, args, outputs, report, not single)
            continue
        try:
            image = voc.read_image(path)
        except RcnnError as err:
            if single:
                raise
            report.skip(path, str(err).removeprefix(f"{path}: "))
            continue
        found = detect_image(image, detector, args.mode, args.max_proposals, args.max_side,
                             reference_pixels=args.reference_pixels)
        _record(report, path, None, found, detector.classes, not single)
        report.images += 1
        if args.out is not None:
            write_image(outputs.name(path, ".jpg"), draw_detections(image, found, detector.classes, args.score))
    return report


def main(argv: Sequence[str] | None = None) -> None:
    """``rcnn-detect`` entry point; user errors print one line and exit with code 2."""
    def run() -> None:
        args = _parse_args(argv)
        _check_args(args)
        paths = expand_inputs(args.inputs)
        if not paths:
            raise RcnnError(f"no image or video in {' '.join(args.inputs)}")
        check_outputs(args, paths, writes_one_image(paths, args))
        try:
            detector = load_detector(args.checkpoint, args.device, score_threshold=args.score, nms_iou=args.nms,
                                     max_detections=args.max_detections)
        except RcnnError as err:  # the device check speaks of params.yaml's key; here it came from --device
            raise RcnnError(str(err).replace("train.device", "--device")) from None
        fill_search_settings(args, detector.meta)
        report = detect_inputs(paths, detector, args)
        if report.skipped and not report.images and not report.frames:
            first = report.skipped[0]
            raise RcnnError(f"{first['file']}: {first['reason']}" if len(paths) == 1 else
                            f"none of the {len(paths)} inputs could be read (the first, {first['file']}: "
                            f"{first['reason']})")
        if args.json is not None:
            write_json(args.json, {"checkpoint": str(args.checkpoint), "classes": detector.classes,
                                   "images": report.images, "frames": report.frames, "skipped": report.skipped,
                                   "detections": report.detections})
        if len(paths) > 1 or report.frames:
            print(f"{report.images} images, {report.frames} video frames, {len(report.skipped)} skipped, "
                  f"{len(report.detections)} detections", file=sys.stderr)

    run_cli(run)


if __name__ == "__main__":
    main()
