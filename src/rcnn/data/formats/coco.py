"""COCO JSON sources: the COCO layout (``annotations/instances_<split>.json``, images in ``<split>/`` or
``images/<split>/``) and the single-folder export of labelling tools (``<split>/_annotations.coco.json``
beside its images). Categories are matched by name; ``iscrowd`` regions become VOC ``difficult`` objects
(ignored by the metric, never positives). Also writes a VOC folder as COCO, for tests and users."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal, Sequence

from rcnn.data import voc
from rcnn.data.formats.records import (BadEntries, FormatError, SourceImage, SourceObject, check_class_name,
                                       continuous_to_voc, finite_number)
from rcnn.utils.fileio import contained, write_json

SINGLE_FOLDER_FILE = "_annotations.coco.json"
SPLIT_ALIASES = {"valid": "val", "validation": "val"}  # the names labelling tools give the validation split


def split_name(name: str) -> str:
    return SPLIT_ALIASES.get(name, name)


def annotation_files(root: Path) -> dict[str, Path]:
    """``{split: json file}`` of a COCO source at ``root``; empty when it is not one."""
    candidates = [(split_name(m.group(1)), path)
                  for path in sorted((root / "annotations").glob("instances_*.json"))
                  if (m := re.fullmatch(r"instances_(.+)\.json", path.name))]
    candidates += [(split_name(path.parent.name), path) for path in sorted(root.glob(f"*/{SINGLE_FOLDER_FILE}"))]
    found: dict[str, Path] = {}
    for split, path in candidates:
        if split in found:  # e.g. instances_val.json and instances_validation.json: which one is meant?
            raise FormatError(f"{root}: split {split!r} has two annotation files, {found[split].relative_to(root)} "
                              f"and {path.relative_to(root)}: remove one")
        found[split] = path
    return found


def _load(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise FormatError(f"{path}: not valid JSON ({err})") from None
    except RecursionError:
        raise FormatError(f"{path}: not valid JSON (nested too deeply)") from None
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "categories")) \
            or not isinstance(data.get("annotations", []), list):
        raise FormatError(f"{path}: not a COCO annotation file (expected lists 'images', 'categories' and "
                          f"'annotations')")
    return data


def _entry_id(value: Any) -> bool:
    """COCO ids are integers; labelling tools also write strings. Never booleans, lists or objects."""
    return (isinstance(value, int) and not isinstance(value, bool)) or isinstance(value, str)


def _image_file(root: Path, json_path: Path, split_dir: str, file_name: str, what: str) -> Path | None:
    """Where the image ``file_name`` of a split lies: beside its JSON (single folder), in ``<split>/``,
    ``images/<split>/``, ``images/`` or the root; a name reaching outside the data set is an error."""
    for folder in (json_path.parent, root / split_dir, root / "images" / split_dir, root / "images", root):
        path = contained(root, file_name, what, base=folder)
        if path.is_file():
            return path
    return None


def read_split(root: Path, split_dir: str, path: Path, bad: BadEntries) -> tuple[list[SourceImage], list[str]]:
    """The images of one COCO file, with their objects, and the file's category names."""
    data = _load(path)
    categories: dict[int, str] = {}
    for cat in data["categories"]:
        if not isinstance(cat, dict) or type(cat.get("id")) is not int or not isinstance(cat.get("name"), str):
            raise FormatError(f"{path}: category {cat!r} needs an integer 'id' and a 'name'")
        if cat["id"] in categories:
            raise FormatError(f"{path}: duplicate category id {cat['id']} ({categories[cat['id']]!r} and "
                              f"{cat['name']!r})")
        categories[cat["id"]] = check_class_name(cat["name"], f"{path}: category {cat['id']}")
    images: dict[int, SourceImage] = {}
    for entry in data["images"]:
        if not isinstance(entry, dict) or not isinstance(entry.get("file_name"), str) or not _entry_id(entry.get("id")):
            raise FormatError(f"{path}: image entry {entry!r} needs an integer or string 'id' and a 'file_name'")
        if entry["id"] in images:
            raise FormatError(f"{path}: duplicate image id {entry['id']!r}")
        file = _image_file(root, path, split_dir, entry["file_name"], f"{path}: image {entry['id']!r} file_name")
        if file is None:
            raise FormatError(f"{path}: image {entry['file_name']!r} (id {entry['id']!r}) is listed but missing")
        width, height = entry.get("width"), entry.get("height")
        if not (type(width) is int and type(height) is int and width > 0 and height > 0):
            raise FormatError(f"{path}: image {entry['file_name']!r} needs positive integer 'width' and 'height' "
                              f"(got {width!r} and {height!r})")
        images[entry["id"]] = SourceImage(Path(entry["file_name"]).stem, file, width, height)
    for number, ann in enumerate(data.get("annotations", [])):
        where = f"{path}: annotation {ann.get('id', number) if isinstance(ann, dict) else number}"
        if not isinstance(ann, dict) or not _entry_id(ann.get("image_id")) or ann["image_id"] not in images:
            raise FormatError(f"{where} refers to no listed image")
        image = images[ann["image_id"]]
        if type(ann.get("category_id")) is not int or ann["category_id"] not in categories:
            bad(f"{where} has unknown category id {ann.get('category_id')!r} (categories: "
                f"{sorted(categories)})")
            continue
        box = ann.get("bbox")
        if not (isinstance(box, list) and len(box) == 4 and all(finite_number(v) for v in box)):
            bad(f"{where} has bbox {box!r}, not [x, y, width, height] of finite numbers")
            continue
        crowd = ann.get("iscrowd", 0)
        if crowd not in (0, 1) or isinstance(crowd, float):  # bool("0") is True: a string would make it difficult
            raise FormatError(f"{where} has iscrowd {crowd!r}, expected 0 or 1")
        x, y, w, h = (float(v) for v in box)
        corners = continuous_to_voc(x, y, x + w, y + h, image.width, image.height) if w > 0 and h > 0 else None
        if corners is None:
            bad(f"{where} has an empty box or one outside the {image.width}x{image.height} image: {box}")
            continue
        truncated = corners != (x + 1.0, y + 1.0, x + w, y + h)
        image.objects.append(SourceObject(categories[ann["category_id"]], corners, bool(crowd),
                                          truncated))
    return list(images.values()), [categories[k] for k in sorted(categories)]


def read(root: Path, on_bad: Literal["error", "skip"]) -> tuple[dict[str, list[SourceImage]], list[str], int]:
    """Every split of the COCO source at ``root``: images per split, category names, objects skipped."""
    bad = BadEntries(on_bad)
    splits, names = {}, []
    for split, path in annotation_files(root).items():
        split_dir = path.parent.name if path.name == SINGLE_FOLDER_FILE else path.stem.removeprefix("instances_")
        splits[split], found = read_split(root, split_dir, path, bad)
        names += [n for n in found if n not in names]
    return splits, names, bad.skipped


def export(voc_root: str | Path, out_dir: str | Path, splits: Sequence[str], classes: Sequence[str],
           single_folder: bool = False) -> Path:
    """Write the VOC folder ``voc_root``'s ``splits`` as COCO under ``out_dir`` (``annotations/`` and
    ``images/<split>/``, or one folder per split with ``_annotations.coco.json``); difficult objects
    become ``iscrowd``. Returns ``out_dir``."""
    out = Path(out_dir)
    for split in splits:
        images, objects = [], []
        folder = out / split if single_folder else out / "images" / split
        folder.mkdir(parents=True, exist_ok=True)
        for number, ann in enumerate(voc.load_split(voc_root, split, classes), start=1):
            (folder / f"{ann.image_id}.jpg").write_bytes(voc.image_path(voc_root, ann.image_id).read_bytes())
            images.append({"id": number, "file_name": f"{ann.image_id}.jpg", "width": ann.width, "height": ann.height})
            for box, label, difficult in zip(ann.boxes.tolist(), ann.labels.tolist(), ann.difficult.tolist()):
                x1, y1, x2, y2 = box  # inclusive 0-based: the box covers x1 .. x2 + 1
                objects.append({"id": len(objects) + 1, "image_id": number, "category_id": label,
                                "bbox": [x1, y1, x2 - x1 + 1, y2 - y1 + 1], "area": (x2 - x1 + 1) * (y2 - y1 + 1),
                                "iscrowd": int(difficult)})
        data = {"images": images, "annotations": objects,
                "categories": [{"id": i, "name": name} for i, name in enumerate(classes, start=1)]}
        target = folder / SINGLE_FOLDER_FILE if single_folder else out / "annotations" / f"instances_{split}.json"
        target.parent.mkdir(parents=True, exist_ok=True)
        write_json(target, data)
    return out
