"""``data.format``: which layout a source folder is in, and a COCO or YOLO source written as the VOC folder the
rest of the pipeline reads (once, by the download stage)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Literal

import cv2
from tqdm import tqdm

from rcnn.data import voc
from rcnn.data.formats import coco, yolo
from rcnn.data.formats.records import FormatError, SourceImage
from rcnn.utils.errors import RcnnError

FORMATS = ("voc", "coco", "yolo")
EXPECTED = ("VOC (JPEGImages/, Annotations/, ImageSets/Main/), COCO (annotations/instances_<split>.json, or "
            "<split>/_annotations.coco.json) or YOLO (data.yaml with names, images/<split>/, labels/<split>/)")


def _found(root: Path) -> list[str]:
    found = []
    try:
        voc.find_voc_root(root)
        found.append("voc")
    except RcnnError:
        pass
    if coco.annotation_files(root):
        found.append("coco")
    if yolo.data_file(root) is not None:
        found.append("yolo")
    return found


def resolve_format(requested: str, root: Path) -> str:
    """The format of the source folder ``root``: ``requested``, or for ``auto`` the one layout found."""
    found = _found(root)
    if requested != "auto":
        if requested not in found:
            raise FormatError(f"data.format = {requested!r} but {root} is not in that layout: expected {EXPECTED}"
                              + (f"; it looks like {found[0]} (set data.format: auto)" if found else ""))
        return requested
    if not found:
        raise FormatError(f"{root}: no dataset layout recognised (data.format: auto): expected {EXPECTED}")
    if len(found) > 1:
        raise FormatError(f"{root} holds more than one layout ({', '.join(found)}): set data.format to one of them")
    return found[0]


def _write_image(image: SourceImage, target: Path) -> bool:
    """Copy a JPEG byte for byte; re-encode anything else as JPEG (quality 95). Returns whether it re-encoded."""
    with image.path.open("rb") as f:
        if f.read(3) == b"\xff\xd8\xff":
            shutil.copyfile(image.path, target)
            return False
    try:
        pixels = voc.read_image(image.path)  # the stored pixels, within the pixel limit
    except RcnnError as err:
        raise FormatError(str(err)) from None
    if not cv2.imwrite(str(target), pixels, [cv2.IMWRITE_JPEG_QUALITY, 95]):
        raise FormatError(f"{target}: could not write the image")
    return True


def convert_to_voc(fmt: str, root: Path, dst: Path, on_bad: Literal["error", "skip"]) -> dict:
    """Write the COCO or YOLO source ``root`` as a VOC folder ``dst`` (every split it has; ``valid`` is
    called ``val``); returns what ``source.json`` records: format, class names, objects skipped, images
    re-encoded."""
    reader = {"coco": coco.read, "yolo": yolo.read}[fmt]
    splits, names, skipped = reader(root, on_bad)
    images: dict[str, SourceImage] = {}
    for split, split_images in splits.items():
        for image in split_images:
            other = images.setdefault(image.image_id, image)
            if other.path.resolve() != image.path.resolve():
                raise FormatError(f"duplicate image id {image.image_id!r}: {other.path} and {image.path} (image ids "
                                  f"are file names without their extension; rename one)")
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (dst / sub).mkdir(parents=True)
    reencoded = 0
    for image_id in tqdm(sorted(images), desc=f"convert {fmt}", unit="image"):
        image = images[image_id]
        reencoded += _write_image(image, voc.image_path(dst, image_id))
        objects = [{"name": o.name, "box": o.box, "difficult": o.difficult, "truncated": o.truncated}
                   for o in image.objects]
        voc.annotation_path(dst, image_id).write_bytes(
            voc.annotation_xml(image_id, image.width, image.height, objects, f"converted from {fmt}"))
    for split, split_images in splits.items():
        ids = sorted({image.image_id for image in split_images})
        (dst / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    return {"format": fmt, "names": names, "skipped_objects": skipped, "reencoded_images": reencoded}
