"""Drawing detections and ground truth on images, and contact-sheet grids (OpenCV, BGR uint8).

Predictions are solid boxes with a filled "name score" tag; ground truth is a thin dashed box
in the same class colour. Tag text is black or white, whichever contrasts with the tag colour,
so labels stay readable on any background.
"""

from __future__ import annotations

import colorsys
import warnings
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
from tqdm import tqdm

from rcnn.data import voc
from rcnn.evaluation.voc_eval import Detections, load_detections
from rcnn.pipeline.params import Params
from rcnn.utils.errors import RcnnError
from rcnn.utils.fileio import atomic_dir, write_bytes

FONT = cv2.FONT_HERSHEY_SIMPLEX


def class_color(label: int) -> tuple[int, int, int]:
    """Deterministic, well-separated BGR colour of a class label (golden-ratio hue steps)."""
    hue = (label * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.85, 0.95)
    return int(b * 255), int(g * 255), int(r * 255)


def text_color(background_bgr: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black or white, whichever contrasts more with ``background_bgr`` (relative luminance)."""
    b, g, r = background_bgr
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 140 else (255, 255, 255)


def _scale(image: np.ndarray) -> tuple[float, int]:
    """Font scale and line thickness that suit the image size."""
    side = max(image.shape[:2])
    return max(0.4, side / 1000.0), max(1, round(side / 400))


def _dashed_rectangle(image: np.ndarray, p1: tuple[int, int], p2: tuple[int, int],
                      color: tuple[int, int, int], thickness: int, dash: int = 6) -> None:
    (x1, y1), (x2, y2) = p1, p2
    for a, b, fixed, horizontal in ((x1, x2, y1, True), (x1, x2, y2, True), (y1, y2, x1, False),
                                    (y1, y2, x2, False)):
        for start in range(a, b + 1, 2 * dash):
            end = min(start + dash, b)
            s, e = ((start, fixed), (end, fixed)) if horizontal else ((fixed, start), (fixed, end))
            cv2.line(image, s, e, color, thickness, cv2.LINE_AA)


def _tag(image: np.ndarray, text: str, x: int, y: int, color: tuple[int, int, int], font_scale: float,
         thickness: int) -> None:
    """Filled label tag above (x, y), or just inside the box when there is no room above."""
    (tw, th), base = cv2.getTextSize(text, FONT, font_scale, thickness)
    h, w = image.shape[:2]
    top = y - th - base - 2
    if top < 0:
        top = y
    x = max(0, min(x, w - tw - 2))
    cv2.rectangle(image, (x, top), (x + tw + 2, top + th + base + 2), color, -1)
    cv2.putText(image, text, (x + 1, top + th + 1), FONT, font_scale, text_color(color), thickness, cv2.LINE_AA)


def draw_detections(image_bgr: np.ndarray, detections: Detections, classes: Sequence[str],
                    score_threshold: float = 0.5, gt_boxes: np.ndarray | None = None,
                    gt_labels: np.ndarray | None = None) -> np.ndarray:
    """A copy of the image with detections scoring >= ``score_threshold`` and optional ground truth."""
    out = image_bgr.copy()
    font_scale, thickness = _scale(out)
    if gt_boxes is not None:
        for box, label in zip(np.asarray(gt_boxes).reshape(-1, 4), np.asarray(gt_labels).reshape(-1)):
            x1, y1, x2, y2 = (int(round(v)) for v in box)
            _dashed_rectangle(out, (x1, y1), (x2, y2), class_color(int(label)), max(1, thickness // 2))
    keep = np.flatnonzero(detections.scores >= score_threshold)
    # Draw the weakest first so the strongest ends on top.
    for i in keep[::-1]:
        label = int(detections.labels[i])
        color = class_color(label)
        x1, y1, x2, y2 = (int(round(v)) for v in detections.boxes[i])
        cv2.rectangle(out, (x1, y1), (x2, y2), color, thickness + 1)
        _tag(out, f"{classes[label - 1]} {detections.scores[i]:.2f}", x1, y1, color, font_scale, thickness)
    return out


def make_grid(images: Sequence[np.ndarray], columns: int, tile_height: int = 240,
              gap: int = 4) -> np.ndarray:
    """Contact sheet: tiles resized to ``tile_height`` (aspect kept), ``columns`` per row, white gaps."""
    if not images:
        raise ValueError("make_grid needs at least one image")
    tiles = [cv2.resize(im, (max(1, round(im.shape[1] * tile_height / im.shape[0])), tile_height),
                        interpolation=cv2.INTER_AREA) for im in images]
    rows = [tiles[i:i + columns] for i in range(0, len(tiles), columns)]
    width = max(sum(t.shape[1] for t in row) + gap * (len(row) - 1) for row in rows)
    height = len(rows) * tile_height + gap * (len(rows) - 1)
    sheet = np.full((height, width, 3), 255, dtype=np.uint8)
    for r, row in enumerate(rows):
        x, y = 0, r * (tile_height + gap)
        for tile in row:
            sheet[y:y + tile_height, x:x + tile.shape[1]] = tile
            x += tile.shape[1] + gap
    return sheet


def write_image(path: str | Path, image: np.ndarray) -> None:
    """Encode by the file's extension (JPEG at quality 92) and write atomically."""
    path = Path(path)
    try:
        suffix = path.suffix.lower() or ".jpg"
        options = [cv2.IMWRITE_JPEG_QUALITY, 92] if suffix in (".jpg", ".jpeg") else []
        ok, data = cv2.imencode(suffix, image, options)
    except cv2.error:
        ok = False
    if not ok:
        raise RcnnError(f"{path}: cannot encode an image with extension {path.suffix!r}")
    write_bytes(path, data.tobytes())


def picture_name(image_id: str) -> str:
    """``<id>-predictions.jpg``: never all digits, which DVC's image plots would take for a step number (and
    then fail to sort beside ``grid.jpg``: dvc-render 1.0.2)."""
    return f"{image_id}-predictions.jpg"


def run_render_stage(params: Params, voc_dir: str | Path = "data/voc",
                     detections_dir: str | Path = "data/detections",
                     out_dir: str | Path = "data/render") -> list[Path]:
    """Draw stored detections on the first ``render.num_images`` evaluated images, plus ``grid.jpg``."""
    p = params.render
    found = load_detections(Path(detections_dir) / "detections.npz")
    root = voc.find_voc_root(voc_dir)
    ids = sorted(found.detections)
    if not ids:
        raise RcnnError(f"{detections_dir}: no evaluated images to render")
    written, rendered = [], []
    with atomic_dir(out_dir) as tmp, tqdm(total=min(p.num_images, len(ids)), desc="render", unit="img") as bar:
        for image_id in ids:
            if len(rendered) == p.num_images:
                break
            try:
                image = voc.read_image(voc.image_path(root, image_id))
            except RcnnError as err:  # skipped by every earlier stage too: draw the next image instead
                warnings.warn(f"skipping image {image_id}: {err}", RuntimeWarning, stacklevel=2)
                continue
            bar.update()
            gt_boxes = gt_labels = None
            if p.show_ground_truth:
                ann = voc.parse_annotation(voc.annotation_path(root, image_id), found.classes, on_bad="skip",
                                           image_size=(image.shape[1], image.shape[0]))
                gt_boxes, gt_labels = ann.boxes, ann.labels
            drawn = draw_detections(image, found.detections[image_id], found.classes, p.score_threshold,
                                    gt_boxes, gt_labels)
            write_image(tmp / picture_name(image_id), drawn)
            rendered.append(drawn)
            written.append(Path(out_dir) / picture_name(image_id))
        if not rendered:
            raise RcnnError(f"none of the {len(ids)} evaluated images in {root / 'JPEGImages'} is readable")
        write_image(tmp / "grid.jpg", make_grid(rendered, p.grid_columns))
    return written + [Path(out_dir) / "grid.jpg"]

