"""Get PASCAL VOC2007 into ``data/voc``: download (resumable, verified, mirrored) or copy a local copy.

``data.source`` is either ``download`` (fetch the official archives from ``data.mirrors``) or a local
VOC-format folder or archive, so the pipeline also runs offline. Either way the output holds only the
requested splits, each cut to ``data.max_images`` sorted ids, so later stages see exactly that data.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import sys
import tempfile
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path
from typing import Callable, Sequence

from tqdm import tqdm

from rcnn.data import voc
from rcnn.data.archives import safe_extract
from rcnn.data.formats.convert import convert_to_voc, resolve_format
from rcnn.pipeline.params import DataParams
from rcnn.utils.errors import RcnnError
from rcnn.utils.fileio import atomic_dir, write_json

# Official VOC2007 archives and their MD5s (the same values torchvision's VOCDetection checks).
ARCHIVE_MD5: dict[str, str] = {
    "VOCtrainval_06-Nov-2007.tar": "c52e279531787c972589f7e41ab4ae64",
    "VOCtest_06-Nov-2007.tar": "b6e924de25625d8de591ea690078ad9f",
}
TRAINVAL_ARCHIVE = "VOCtrainval_06-Nov-2007.tar"
TEST_ARCHIVE = "VOCtest_06-Nov-2007.tar"
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".zip")
BACKOFF_SECONDS = 1.0  # first retry delay; doubles on each further attempt
_CHUNK = 1 << 20
_USER_AGENT = "rcnn-voc-download/1.0"


class _Transient(Exception):
    """A failure worth retrying on the same mirror (dropped connection, timeout, 5xx)."""


def archives_for_splits(splits: Sequence[str]) -> list[str]:
    """Which official archives hold the requested splits."""
    names = []
    if set(splits) & {"train", "val", "trainval"}:
        names.append(TRAINVAL_ARCHIVE)
    if "test" in splits:
        names.append(TEST_ARCHIVE)
    return names


def md5sum(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _fetch_once(url: str, part: Path, timeout: float) -> None:
    """One HTTP request that appends to ``part`` (resuming with a Range header when it has bytes)."""
    offset = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and offset:
            return  # nothing left to send: the partial file is complete, the MD5 check decides
        if err.code >= 500 or err.code in (408, 429):
            raise _Transient(f"HTTP {err.code}") from None
        raise RcnnError(f"HTTP {err.code} {err.reason}") from None
    except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError) as err:
        raise _Transient(str(getattr(err, "reason", err))) from None
    with response:
        resumed = offset > 0 and getattr(response, "status", None) == 206
        if resumed and not response.headers.get("Content-Range", "").startswith(f"bytes {offset}-"):
            part.unlink()
            raise _Transient(f"server resumed at the wrong offset ({response.headers.get('Content-Range')})")
        start = offset if resumed else 0
        length = response.headers.get("Content-Length")
        expected = int(length) if length is not None else None
        received = 0
        with open(part, "ab" if resumed else "wb") as fh, \
                tqdm(total=None if expected is None else start + expected, initial=start, unit="B",
                     unit_scale=True, unit_divisor=1024, desc=part.name.removesuffix(".part")) as bar:
            try:
                for block in iter(lambda: response.read(_CHUNK), b""):
                    fh.write(block)
                    received += len(block)
                    bar.update(len(block))
            except (http.client.HTTPException, ConnectionError, TimeoutError) as err:
                raise _Transient(f"transfer interrupted ({str(err) or type(err).__name__})") from None
    if expected is not None and received < expected:
        raise _Transient(f"transfer interrupted after {start + received} of {start + expected} bytes")


def download_archive(name: str, mirrors: Sequence[str], cache_dir: Path, retries: int, timeout: float) -> Path:
    """Fetch ``name`` into ``cache_dir`` from the first mirror that delivers it intact.

    A partial download is kept as ``<name>.part`` and resumed (HTTP Range), also across runs;
    each mirror gets ``retries`` retries with exponential backoff. A file whose MD5 is wrong is
    deleted; when no mirror delivers a good copy the error lists what went wrong on each.
    """
    md5 = ARCHIVE_MD5[name]
    cache_dir.mkdir(parents=True, exist_ok=True)
    dest, part = cache_dir / name, cache_dir / f"{name}.part"
    if dest.exists():
        if md5sum(dest) == md5:
            return dest
        print(f"{dest}: MD5 mismatch, downloading it again", file=sys.stderr)
        dest.unlink()
    failures = []
    for base in mirrors:
        url = f"{base.rstrip('/')}/{name}"
        for attempt in range(retries + 1):
            try:
                _fetch_once(url, part, timeout)
            except _Transient as err:
                if attempt == retries:
                    failures.append(f"{url}: {err}")
                    break
                delay = BACKOFF_SECONDS * 2 ** attempt
                print(f"warning: {url}: {err}; retrying in {delay:g} s", file=sys.stderr)
                time.sleep(delay)
                continue
            except RcnnError as err:
                failures.append(f"{url}: {err}")
                break
            got = md5sum(part) if part.exists() else "no data"
            if got == md5:
                os.replace(part, dest)
                return dest
            part.unlink(missing_ok=True)
            failures.append(f"{url}: MD5 mismatch (got {got}, expected {md5}); bad file deleted")
            break
    raise RcnnError(f"could not download {name}: " + "; ".join(failures)
                    + " (offline? set data.source to a local VOC-format folder or archive)")


def _select_ids(root: Path, splits: Sequence[str], max_images: int | None) -> dict[str, list[str]]:
    """Ids per requested split: the first ``max_images`` sorted ids; trainval is the union of the
    chosen train and val ids when both are requested, so the three lists stay consistent."""
    chosen = {}
    for split in splits:
        if split == "trainval" and {"train", "val"} <= set(splits):
            continue
        ids = voc.read_split(root, split)
        bad = next((i for i in ids if "/" in i or "\\" in i or i.startswith(".")), None)
        if bad is not None:
            raise RcnnError(f"split {split!r} in {root} lists an invalid image id {bad!r}")
        if not ids:
            raise RcnnError(f"split {split!r} is empty in {root / 'ImageSets' / 'Main' / f'{split}.txt'}")
        chosen[split] = ids[:max_images]
    if "trainval" in splits and "trainval" not in chosen:
        chosen["trainval"] = sorted(set(chosen["train"]) | set(chosen["val"]))
    return {split: chosen[split] for split in splits}


def _build_subset(src: Path, dst: Path, splits: Sequence[str], max_images: int | None,
                  transfer: Callable[[Path, Path], object]) -> dict[str, int]:
    """Write the VOC root ``dst`` with the chosen ids of each split; every listed file must exist."""
    chosen = _select_ids(src, splits, max_images)
    ids = sorted(set().union(*chosen.values()))
    for image_id in ids:
        for path in (voc.image_path(src, image_id), voc.annotation_path(src, image_id)):
            if not path.is_file():
                split = next(s for s in splits if image_id in chosen[s])
                raise RcnnError(f"image {image_id!r} of split {split!r} is listed in {src}/ImageSets/Main "
                                f"but {path} is missing")
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (dst / sub).mkdir(parents=True)
    for image_id in tqdm(ids, desc="copy", unit="image"):
        transfer(voc.image_path(src, image_id), voc.image_path(dst, image_id))
        transfer(voc.annotation_path(src, image_id), voc.annotation_path(dst, image_id))
    for split, split_ids in chosen.items():
        (dst / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in split_ids))
    return {split: len(split_ids) for split, split_ids in chosen.items()}


def _as_given(source: Path, root: Path) -> str:
    """``root`` (the VOC folder found in ``source``) spelled from ``source`` as params.yaml gives it, not
    resolved: the bytes of ``data/voc`` must not depend on where the checkout lives, and a queued
    experiment's temporary folder would be gone by the time a message names it."""
    try:
        return str(source / root.resolve().relative_to(source.resolve()))
    except ValueError:
        return str(root)


def _announced(data: DataParams, fmt: str) -> str:
    """Say which layout ``data.format: auto`` recognised (on stderr, beside the progress bars)."""
    if data.format == "auto":
        print(f"data.format: auto -> {fmt} ({data.source})", file=sys.stderr)
    return fmt


def _convert(fmt: str, root: Path, data: DataParams, out_dir: Path, note: dict) -> dict[str, int]:
    """A COCO or YOLO source written as VOC in a staging folder, then the chosen splits moved into
    ``out_dir`` in one step; ``source.json`` records the format, its class names and what was skipped."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-convert.", suffix=".tmp", dir=out_dir.parent))
    try:
        info = convert_to_voc(fmt, root, staging / "VOC2007", data.on_bad_annotation)
        if info["skipped_objects"]:
            warnings.warn(f"{info['skipped_objects']} objects of the {fmt} source were skipped "
                          f"(data.on_bad_annotation: skip)", RuntimeWarning, stacklevel=2)
        with atomic_dir(out_dir) as tmp:
            write_json(tmp / voc.SOURCE_FILE, {**note, **info})
            return _build_subset(staging / "VOC2007", tmp / "VOC2007", data.splits, data.max_images, os.replace)
    except RcnnError as err:  # name the user's source, not the staging folder deleted below
        raise RcnnError(str(err).replace(str(staging / "VOC2007"), f"{root} (as converted to VOC)")) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def prepare_voc(data: DataParams, out_dir: str | Path, cache_dir: str | Path) -> dict[str, int]:
    """Fill ``out_dir/VOC2007`` from ``data.source`` and return the number of images per split.

    ``out_dir`` is replaced atomically: on any error the previous contents (or nothing) remain.
    Downloaded archives stay in ``cache_dir`` so a rerun (e.g. with another max_images) is offline.
    """
    out_dir, cache_dir = Path(out_dir), Path(cache_dir)
    source = Path(data.source)
    if data.source == "download":
        archives = [download_archive(name, data.mirrors, cache_dir, data.retries, data.timeout)
                    for name in archives_for_splits(data.splits)]
    elif source.is_dir():
        fmt = _announced(data, resolve_format(data.format, source))
        root = voc.find_voc_root(source) if fmt == "voc" else source
        if out_dir.resolve() in (root.resolve(), *root.resolve().parents):
            raise RcnnError(f"data.source = {data.source!r} is inside the output {out_dir}: point it at a copy")
        note = {"kind": "folder", "root": _as_given(source, root)}
        if fmt != "voc":
            return _convert(fmt, source, data, out_dir, note)
        with atomic_dir(out_dir) as tmp:
            write_json(tmp / voc.SOURCE_FILE, note)
            return _build_subset(root, tmp / "VOC2007", data.splits, data.max_images, shutil.copyfile)
    elif source.is_file() and source.name.lower().endswith(ARCHIVE_SUFFIXES):
        archives = [source]
    elif source.exists():
        raise RcnnError(f"data.source = {data.source!r} is not a folder or a {'/'.join(ARCHIVE_SUFFIXES)} archive")
    else:
        raise RcnnError(f"data.source = {data.source!r} does not exist (relative paths are relative to the "
                        f"project root {Path.cwd()}); use 'download' or a local VOC folder or archive")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-extract.", suffix=".tmp", dir=out_dir.parent))
    try:
        for archive in archives:
            safe_extract(archive, staging, data.max_extract_bytes, data.max_extract_files)
        fmt = "voc" if data.source == "download" else _announced(data, resolve_format(data.format, staging))
        if fmt != "voc":
            return _convert(fmt, staging, data, out_dir, {"kind": "archive", "source": str(source)})
        with atomic_dir(out_dir) as tmp:
            if data.source != "download":
                write_json(tmp / voc.SOURCE_FILE, {"kind": "archive", "source": str(source)})
            # staging sits next to out_dir (same file system) and is thrown away: move, don't copy
            return _build_subset(voc.find_voc_root(staging), tmp / "VOC2007", data.splits, data.max_images,
                                 os.replace)
    except RcnnError as err:  # name the archive, not the staging folder deleted below
        shown = "the downloaded archives" if data.source == "download" else str(source)
        raise RcnnError(str(err).replace(str(staging), f"{shown} (extracted)")) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
