"""A deterministic synthetic dataset in VOC format, for tests and offline runs.

Each class is a distinct shape with its own colour and texture, drawn on a cluttered
background of random strokes and blobs; 1-4 objects per image, some overlapping, some
touching the border (truncated), some marked ``difficult``. Same seed, same bytes.

Usage: ``python -m rcnn.synthetic DIR [--images N] [--seed S]``
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from rcnn.data import voc
from rcnn.utils.errors import CliParser, RcnnError, run_cli
from rcnn.utils.fileio import atomic_path, write_bytes

DEFAULT_CLASSES = ("car", "dog", "person")
# One (BGR colour, shape) style per class index; classes beyond the list reuse shapes with new colours.
_COLOURS = ((40, 40, 220), (30, 160, 230), (200, 90, 40), (60, 180, 60), (180, 60, 180), (20, 200, 200))
_SHAPES = ("car", "blob", "figure", "diamond", "ring", "cross")


def _draw_object(canvas: np.ndarray, shape: str, colour: tuple[int, int, int], box: tuple[int, int, int, int],
                 rng: np.random.Generator) -> None:
    """Draw one object filling the inclusive box ``(x1, y1, x2, y2)``."""
    x1, y1, x2, y2 = box
    w, h = x2 - x1 + 1, y2 - y1 + 1
    jitter = rng.integers(-25, 26, size=3)
    col = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(colour, jitter))
    dark = tuple(int(c * 0.4) for c in col)
    if shape == "car":
        cv2.rectangle(canvas, (x1, y1 + h // 4), (x2, y2 - h // 5), col, -1)
        cv2.rectangle(canvas, (x1 + w // 5, y1), (x2 - w // 5, y1 + h // 4), col, -1)
        for yy in range(y1 + h // 4, y2 - h // 5, max(3, h // 8)):
            cv2.line(canvas, (x1, yy), (x2, yy), dark, 1)
        r = max(2, min(w, h) // 6)
        for cx in (x1 + w // 4, x2 - w // 4):
            cv2.circle(canvas, (cx, y2 - r), r, (20, 20, 20), -1)
    elif shape == "blob":
        cv2.ellipse(canvas, ((x1 + x2) // 2, (y1 + y2) // 2), (w // 2, h // 2), 0, 0, 360, col, -1)
        for _ in range(max(4, w * h // 150)):
            px, py = int(rng.integers(x1 + w // 4, x2 - w // 4 + 1)), int(rng.integers(y1 + h // 4, y2 - h // 4 + 1))
            cv2.circle(canvas, (px, py), 2, dark, -1)
    elif shape == "figure":
        head = max(3, min(w, h) // 4)
        cv2.circle(canvas, ((x1 + x2) // 2, y1 + head), head, col, -1)
        pts = np.array([[(x1 + x2) // 2, y1 + head], [x1, y2], [x2, y2]], dtype=np.int32)
        cv2.fillPoly(canvas, [pts], col)
        cv2.line(canvas, ((x1 + x2) // 2, y1 + 2 * head), ((x1 + x2) // 2, y2), dark, max(1, w // 12))
    elif shape == "diamond":
        pts = np.array([[(x1 + x2) // 2, y1], [x2, (y1 + y2) // 2], [(x1 + x2) // 2, y2], [x1, (y1 + y2) // 2]],
                       dtype=np.int32)
        cv2.fillPoly(canvas, [pts], col)
        cv2.polylines(canvas, [pts], True, dark, 2)
    elif shape == "ring":
        cv2.ellipse(canvas, ((x1 + x2) // 2, (y1 + y2) // 2), (w // 2, h // 2), 0, 0, 360, col, max(3, min(w, h) // 5))
    else:
        t = max(3, min(w, h) // 4)
        cv2.rectangle(canvas, ((x1 + x2) // 2 - t // 2, y1), ((x1 + x2) // 2 + t // 2, y2), col, -1)
        cv2.rectangle(canvas, (x1, (y1 + y2) // 2 - t // 2), (x2, (y1 + y2) // 2 + t // 2), col, -1)


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A cluttered background: a colour gradient, noise, random strokes and grey blobs."""
    base = rng.integers(60, 200, size=3)
    ramp = np.linspace(-30, 30, width)[None, :, None]
    canvas = np.clip(base[None, None, :] + ramp + rng.normal(0, 12, (height, width, 3)), 0, 255).astype(np.uint8)
    for _ in range(int(rng.integers(6, 14))):
        p1 = tuple(int(v) for v in rng.integers(0, [width, height]))
        p2 = tuple(int(v) for v in rng.integers(0, [width, height]))
        grey = int(rng.integers(40, 220))
        cv2.line(canvas, p1, p2, (grey, grey, grey), int(rng.integers(1, 4)))
    for _ in range(int(rng.integers(2, 6))):
        c = tuple(int(v) for v in rng.integers(0, [width, height]))
        grey = int(rng.integers(50, 200))
        cv2.circle(canvas, c, int(rng.integers(4, 14)), (grey, grey, grey + 10 if grey < 245 else grey), -1)
    return canvas


def _place_boxes(rng: np.random.Generator, count: int, width: int, height: int) -> list[tuple[int, int, int, int]]:
    """Random inclusive boxes; about one in three starts near the previous box, so objects overlap."""
    boxes: list[tuple[int, int, int, int]] = []
    short = min(width, height)
    for _ in range(count):
        w = int(rng.integers(short // 5, short // 2 + 1))
        h = int(np.clip(w * rng.uniform(0.6, 1.6), short // 6, height - 1))
        if boxes and rng.random() < 0.35:
            px1, py1, px2, py2 = boxes[-1]
            x1 = int(np.clip(px1 + rng.integers(-w // 2, (px2 - px1) // 2 + 1), -w // 4, width - 3 * w // 4))
            y1 = int(np.clip(py1 + rng.integers(-h // 2, (py2 - py1) // 2 + 1), -h // 4, height - 3 * h // 4))
        else:
            # Occasionally run off the border: a truncated object.
            x1 = int(rng.integers(-w // 5, width - 4 * w // 5))
            y1 = int(rng.integers(-h // 5, height - 4 * h // 5))
        boxes.append((x1, y1, x1 + w - 1, y1 + h - 1))
    return boxes


def _render_image(rng: np.random.Generator, classes: Sequence[str], width: int,
                  height: int) -> tuple[np.ndarray, list[dict]]:
    canvas = _background(rng, width, height)
    count = int(rng.integers(1, 5))
    objects = []
    for box in _place_boxes(rng, count, width, height):
        label = int(rng.integers(len(classes)))
        shape = _SHAPES[label % len(_SHAPES)]
        colour = _COLOURS[(label + label // len(_SHAPES)) % len(_COLOURS)]
        _draw_object(canvas, shape, colour, box, rng)
        x1, y1, x2, y2 = box
        clipped = (max(x1, 0), max(y1, 0), min(x2, width - 1), min(y2, height - 1))
        objects.append({"name": classes[label], "box": clipped,
                        "truncated": clipped != box, "difficult": bool(rng.random() < 0.1)})
    return canvas, objects


# params.yaml overrides for a run of seconds per stage on the synthetic set (its classes), for checks of the
# plumbing rather than of accuracy: the DVC tests and bench/formats.py use them.
QUICK_PARAMS = {
    "classes": list(DEFAULT_CLASSES),
    "data": {"max_images": None},
    "proposals": {"max_proposals": 150, "max_side": 192, "n_jobs": 2},
    "regions": {"fg_iou": 0.5, "bg_iou": 0.3, "max_boxes": 24, "crop_size": 64, "add_ground_truth": True},
    "model": {"backbone": "resnet18", "weights": "none", "hidden": 64},
    "train": {"lr": 0.001, "epochs": 4, "patience": 2, "device": "cpu"},
    "evaluate": {"split": "test", "max_proposals": 60},
    "render": {"num_images": 2},
}


def generate(out_dir: str | Path, images: int = 50, seed: int = 0, classes: Sequence[str] = DEFAULT_CLASSES,
             width: int = 256, height: int = 192) -> Path:
    """Write ``images`` synthetic images in VOC layout under ``out_dir``; returns ``out_dir``.

    Splits: about half ``train``, a quarter ``val`` and a quarter ``test``, plus ``trainval``.
    """
    if images < 4:
        raise RcnnError(f"--images {images} is too few: at least 4 are needed to fill train, val and test")
    if not classes:
        raise RcnnError("at least one class is needed")
    if width < 64 or height < 64:
        raise RcnnError(f"image size {width}x{height} is too small: at least 64x64")
    out = Path(out_dir)
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    ids = [f"{i:06d}" for i in range(1, images + 1)]
    for image_id in ids:
        canvas, objects = _render_image(rng, classes, width, height)
        ok, jpeg = cv2.imencode(".jpg", canvas, [cv2.IMWRITE_JPEG_QUALITY, 92])
        if not ok:
            raise RcnnError(f"could not encode synthetic image {image_id}")
        write_bytes(out / "JPEGImages" / f"{image_id}.jpg", jpeg.tobytes())
        write_bytes(out / "Annotations" / f"{image_id}.xml", voc.annotation_xml(image_id, width, height, [
            {**obj, "box": [v + 1 for v in obj["box"]]} for obj in objects], "rcnn synthetic"))
    order = rng.permutation(images)
    n_train, n_val = images // 2, images // 4
    splits = {"train": order[:n_train], "val": order[n_train:n_train + n_val], "test": order[n_train + n_val:]}
    splits["trainval"] = order[:n_train + n_val]
    for split, idx in splits.items():
        with atomic_path(out / "ImageSets" / "Main" / f"{split}.txt") as tmp:
            tmp.write_text("".join(f"{ids[i]}\n" for i in sorted(idx)))
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = CliParser(prog="python -m rcnn.synthetic", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="folder to write (VOC layout: JPEGImages, Annotations, ImageSets)")
    parser.add_argument("--images", type=int, default=50, help="number of images (default 50)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--classes", nargs="+", default=list(DEFAULT_CLASSES),
                        help="class names (default: car dog person, which are VOC classes)")
    parser.add_argument("--size", type=int, nargs=2, default=(256, 192), metavar=("W", "H"),
                        help="image width and height (default 256 192)")
    args = parser.parse_args(argv)
    out = generate(args.out_dir, args.images, args.seed, args.classes, *args.size)
    print(f"wrote {args.images} images of {', '.join(args.classes)} to {out}")


if __name__ == "__main__":
    run_cli(main)
