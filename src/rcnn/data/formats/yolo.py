"""YOLO txt sources in the ultralytics layout: ``data.yaml`` with ``names`` and each split's image folder,
``labels/<split>/<stem>.txt`` beside ``images/<split>/`` holding ``class cx cy w h`` per line, normalised to
0..1. An image without a label file has no objects (as ultralytics reads it). YOLO has no ``difficult``
flag. Also writes a VOC folder as YOLO, for tests and users."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, Sequence

import yaml
from PIL import Image, UnidentifiedImageError

from rcnn.data import voc
from rcnn.data.formats.records import BadEntries, FormatError, SourceImage, SourceObject, check_class_name, continuous_to_voc
from rcnn.utils.fileio import contained

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
SPLIT_KEYS = {"train": "train", "val": "val", "valid": "val", "test": "test"}


def data_file(root: Path) -> Path | None:
    """The dataset YAML of a YOLO source at ``root`` (``data.yaml``, or another YAML with ``names``)."""
    candidates = [root / "data.yaml", root / "dataset.yaml", *sorted(root.glob("*.yaml")), *sorted(root.glob("*.yml"))]
    for path in candidates:
        if path.is_file() and (root / "labels").is_dir():
            try:
                data = yaml.safe_load(path.read_text(encoding="utf-8"))
            except (yaml.YAMLError, UnicodeDecodeError, RecursionError):
                return path  # read() reports it
            if isinstance(data, dict) and "names" in data:
                return path
    return None


def _names(path: Path, data: dict[str, Any]) -> list[str]:
    names = data.get("names")
    if isinstance(names, dict) and all(type(k) is int for k in names):
        names = [names[k] for k in sorted(names)] if sorted(names) == list(range(len(names))) else None
    if not isinstance(names, list) or not names:
        raise FormatError(f"{path}: 'names' must be a list of class names (or a mapping 0..N-1 -> name)")
    names = [check_class_name(name, f"{path}: names[{i}]") for i, name in enumerate(names)]
    twice = next((n for n in names if names.count(n) > 1), None)
    if twice is not None:
        raise FormatError(f"{path}: names lists {twice!r} twice")
    return names


def _text(path: Path) -> str:
    """A label or dataset file's text; one FormatError naming it when it is not UTF-8."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise FormatError(f"{path} is not UTF-8 text (byte {err.start}: {err.reason})") from None


def label_path(image: Path) -> Path:
    """Ultralytics' rule: the last ``images`` folder of the path becomes ``labels``, the suffix ``.txt``."""
    parts = list(image.parts)
    index = len(parts) - 1 - parts[::-1].index("images")
    return Path(*parts[:index], "labels", *parts[index + 1:]).with_suffix(".txt")


def _image_size(path: Path) -> tuple[int, int]:
    try:
        with Image.open(path) as image:
            return image.size
    except (UnidentifiedImageError, OSError) as err:
        raise FormatError(f"{path}: not a readable image ({err})") from None


def _read_labels(path: Path, image: SourceImage, names: Sequence[str], bad: BadEntries) -> None:
    for number, line in enumerate(_text(path).splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        where = f"{path}, line {number}"
        if len(fields) != 5:
            bad(f"{where} has {len(fields)} fields, not 5 (class cx cy w h)")
            continue
        try:
            label, values = int(fields[0]), [float(v) for v in fields[1:]]
        except ValueError:
            bad(f"{where} is not numbers: {line.strip()!r}")
            continue
        if not 0 <= label < len(names):
            bad(f"{where} has unknown class id {label} (names has {len(names)}: 0..{len(names) - 1})")
            continue
        if not all(0.0 <= v <= 1.0 for v in values):  # nan fails every comparison, so it is refused here
            bad(f"{where} has values outside 0..1: {line.strip()!r}")
            continue
        cx, cy, w, h = values[0] * image.width, values[1] * image.height, values[2] * image.width, values[3] * image.height
        corners = continuous_to_voc(cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2, image.width, image.height)
        if corners is None:
            bad(f"{where} has an empty box in the {image.width}x{image.height} image: {line.strip()!r}")
            continue
        image.objects.append(SourceObject(names[label], corners))


def _split_images(root: Path, base: Path, path: Path, key: str, entry: Any) -> list[Path]:
    """The images of one split's folders (relative to ``base``, each inside the data set ``root``)."""
    folders = entry if isinstance(entry, list) else [entry]
    images = []
    for folder in folders:
        if not isinstance(folder, str):
            raise FormatError(f"{path}: a split must name an image folder, not {folder!r}")
        where = contained(root, folder, f"{path}: {key}", base=base)
        if not where.is_dir() or "images" not in where.parts:
            raise FormatError(f"{path}: image folder {folder!r} ({where}) does not exist or is not under images/")
        found = sorted(p for p in where.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        images += [contained(root, os.path.relpath(p, root), f"{path}: {key} image") for p in found]  # links too
    return images


def read(root: Path, on_bad: Literal["error", "skip"]) -> tuple[dict[str, list[SourceImage]], list[str], int]:
    """Every split of the YOLO source at ``root``: images per split, class names, objects skipped."""
    path = data_file(root)
    if path is None:
        raise FormatError(f"{root}: no YOLO data.yaml with 'names' beside a labels/ folder")
    try:
        data = yaml.safe_load(_text(path))
    except yaml.YAMLError as err:
        raise FormatError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    except RecursionError:
        raise FormatError(f"{path}: not valid YAML (nested too deeply)") from None
    if not isinstance(data, dict):
        raise FormatError(f"{path}: not a YOLO dataset file (expected keys 'names' and the splits)")
    names = _names(path, data)
    base = contained(root, data["path"], f"{path}: path") if isinstance(data.get("path"), str) else root
    base = base if base.is_dir() else root
    bad = BadEntries(on_bad)
    splits: dict[str, list[SourceImage]] = {}
    labelled: set[Path] = set()
    given = [key for key in SPLIT_KEYS if data.get(key) is not None]
    clash = next(((a, b) for a in given for b in given if a < b and SPLIT_KEYS[a] == SPLIT_KEYS[b]), None)
    if clash is not None:
        raise FormatError(f"{path}: both {clash[0]!r} and {clash[1]!r} are given, and both name split "
                          f"{SPLIT_KEYS[clash[0]]!r}: keep one")
    for key, split in SPLIT_KEYS.items():
        if data.get(key) is None:
            continue
        images = []
        for file in _split_images(root, base, path, key, data[key]):
            width, height = _image_size(file)
            image = SourceImage(file.stem, file, width, height)
            labels = label_path(file)
            if labels.is_file():
                labelled.add(labels.resolve())
                _read_labels(labels, image, names, bad)
            images.append(image)
        splits[split] = images
    if not splits:
        raise FormatError(f"{path}: names no split (train, val, test)")
    orphans = sorted(p for p in (base / "labels").rglob("*.txt") if p.resolve() not in labelled)
    if orphans:
        raise FormatError(f"{orphans[0]}: a label file without an image ({len(orphans)} such files); remove it or "
                          f"add its image under images/")
    return splits, names, bad.skipped


def export(voc_root: str | Path, out_dir: str | Path, splits: Sequence[str], classes: Sequence[str]) -> Path:
    """Write the VOC folder ``voc_root``'s ``splits`` as YOLO under ``out_dir`` (difficult objects are
    written as ordinary ones: YOLO has no such flag). Returns ``out_dir``."""
    out = Path(out_dir)
    for split in splits:
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        (out / "labels" / split).mkdir(parents=True, exist_ok=True)
        for ann in voc.load_split(voc_root, split, classes):
            (out / "images" / split / f"{ann.image_id}.jpg").write_bytes(voc.image_path(voc_root, ann.image_id).read_bytes())
            lines = []
            for (x1, y1, x2, y2), label in zip(ann.boxes.tolist(), ann.labels.tolist()):
                w, h = x2 - x1 + 1, y2 - y1 + 1  # inclusive corners: the box covers x1 .. x2 + 1
                lines.append(f"{label - 1} {(x1 + w / 2) / ann.width:.8f} {(y1 + h / 2) / ann.height:.8f} "
                             f"{w / ann.width:.8f} {h / ann.height:.8f}\n")
            (out / "labels" / split / f"{ann.image_id}.txt").write_text("".join(lines))
    (out / "data.yaml").write_text(yaml.safe_dump({"path": ".", "names": list(classes),
                                                   **{s: f"images/{s}" for s in splits}}, sort_keys=False))
    return out
