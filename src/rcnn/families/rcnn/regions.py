"""R-CNN's training regions: proposals labelled against ground truth, sampled, warped and stored in shards.

Labels come from :func:`rcnn.proposals.labelling.label_candidates`. Per image at most ``max_boxes``
regions are drawn at random, at most ``fg_fraction`` of ``max_boxes`` of them foreground, with a
generator seeded by (seed, image id): independent of order and ``n_jobs``.

Storage: ``<dir>/<split>/shard-00000.pkl`` ... (``shard_size`` regions each) and ``<dir>/index.json``.
Crops are stored JPEG-encoded (quality 95, 4:4:4) in one byte buffer per shard, about 8x smaller
than raw pixels; :func:`iter_shards` decodes them. Read regions only through
:func:`rcnn.proposals.labelling.read_index` and :func:`iter_shards`. Every labelled proposal of each split
also goes to ``<dir>/<split>/boxes.npz`` (:mod:`rcnn.proposals.region_boxes`; ``index["labelled_boxes"]``),
which fine-tuning and hard-negative mining draw from.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
import zlib
from pathlib import Path
from typing import Iterator

import cv2
import joblib
import numpy as np
from tqdm import tqdm

from rcnn.data import voc
from rcnn.families.rcnn.crops import warp_crops
from rcnn.pipeline.params import Params, RegionParams
from rcnn.proposals.labelling import label_candidates, read_index, split_boxes, split_inputs
from rcnn.utils.errors import RcnnError
from rcnn.utils.fileio import atomic_dir, load_pickle, write_json, write_pickle

JPEG_QUALITY = 95
_JPEG_FLAGS = [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY,
               cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444]
SHARD_KEYS = ("crops", "labels", "image_ids", "boxes", "gt_boxes", "ious")


def image_rng(seed: int, image_id: str) -> np.random.Generator:
    """Generator for one image's sample: same (seed, id), same sample, whatever the processing order."""
    return np.random.default_rng([seed, zlib.crc32(image_id.encode())])


def sample_regions(labels: np.ndarray, max_boxes: int, fg_fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Indices (sorted) of a random sample: at most ``fg_fraction * max_boxes`` foreground, background fills up."""
    fg = np.flatnonzero(labels > 0)
    bg = np.flatnonzero(labels == 0)
    n_fg = min(len(fg), int(np.floor(max_boxes * fg_fraction + 1e-9)))
    n_bg = min(len(bg), max_boxes - n_fg)
    chosen = np.concatenate([rng.choice(fg, n_fg, replace=False), rng.choice(bg, n_bg, replace=False)])
    return np.sort(chosen).astype(np.int64)


def encode_crops(crops_rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """JPEG-encode crops into one uint8 buffer plus ``N + 1`` offsets."""
    parts = []
    for crop in crops_rgb:
        ok, buf = cv2.imencode(".jpg", cv2.cvtColor(crop, cv2.COLOR_RGB2BGR), _JPEG_FLAGS)
        if not ok:
            raise RcnnError("JPEG encoding of a region crop failed")
        parts.append(buf.reshape(-1))
    offsets = np.zeros(len(parts) + 1, np.int64)
    offsets[1:] = np.cumsum([len(p) for p in parts])
    data = np.concatenate(parts) if parts else np.zeros(0, np.uint8)
    return data, offsets


def decode_crops(data: np.ndarray, offsets: np.ndarray, size: int) -> np.ndarray:
    """Inverse of :func:`encode_crops`: ``(N, size, size, 3)`` uint8 RGB."""
    out = np.empty((len(offsets) - 1, size, size, 3), np.uint8)
    for i in range(len(out)):
        bgr = cv2.imdecode(data[offsets[i]:offsets[i + 1]], cv2.IMREAD_COLOR)
        if bgr is None or bgr.shape != (size, size, 3):
            raise RcnnError(f"region crop {i} does not decode to {size}x{size}; rerun the regions stage")
        cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB, dst=out[i])
    return out


def _image_regions(annotation: voc.Annotation, path: str, proposals: np.ndarray, settings: RegionParams,
                   seed: int) -> dict | None:
    """Worker: sampled, labelled and encoded regions of one image (None when the image cannot be read)."""
    cv2.setNumThreads(1)
    try:
        image = voc.read_image(path)
    except RcnnError:
        return None
    cand = label_candidates(proposals, annotation, settings)
    keep = sample_regions(cand.labels, settings.max_boxes, settings.fg_fraction, image_rng(seed, annotation.image_id))
    crops = warp_crops(cv2.cvtColor(image, cv2.COLOR_BGR2RGB), cand.boxes[keep], settings.crop_size, settings.context)
    data, offsets = encode_crops(crops)
    return {"crop_data": data, "crop_offsets": offsets, "labels": cand.labels[keep],
            "image_ids": np.full(len(keep), annotation.image_id), "boxes": cand.boxes[keep],
            "gt_boxes": cand.gt_boxes[keep], "ious": cand.ious[keep]}


class _ShardWriter:
    """Buffers per-image regions and writes exactly ``shard_size`` regions per shard (the last may be smaller)."""

    def __init__(self, out_dir: Path, relative_to: Path, shard_size: int) -> None:
        self.out_dir, self.relative_to, self.shard_size = out_dir, relative_to, shard_size
        self.pending: list[dict] = []
        self.count = 0
        self.shards: list[str] = []
        self.bytes = 0

    def add(self, regions: dict) -> None:
        self.pending.append(regions)
        self.count += len(regions["labels"])
        while self.count >= self.shard_size:
            self._flush(self.shard_size)

    def close(self) -> None:
        if self.count:
            self._flush(self.count)

    def _flush(self, n: int) -> None:
        merged = _concat(self.pending)
        head, tail = _split(merged, n)
        self.pending = [tail] if len(tail["labels"]) else []
        self.count = len(tail["labels"])
        path = self.out_dir / f"shard-{len(self.shards):05d}.pkl"
        write_pickle(path, head)
        self.bytes += path.stat().st_size
        self.shards.append(path.relative_to(self.relative_to).as_posix())


def _concat(parts: list[dict]) -> dict:
    """Concatenate region dicts, re-basing crop offsets onto the joined byte buffer."""
    offsets, base = [np.zeros(1, np.int64)], 0
    for part in parts:
        offsets.append(part["crop_offsets"][1:] + base)
        base += int(part["crop_offsets"][-1])
    merged = {k: np.concatenate([p[k] for p in parts]) for k in parts[0] if k != "crop_offsets"}
    merged["crop_offsets"] = np.concatenate(offsets)
    return merged


def _split(regions: dict, n: int) -> tuple[dict, dict]:
    """First ``n`` regions and the rest."""
    cut = int(regions["crop_offsets"][n])
    head = {k: v[:n] for k, v in regions.items() if k not in ("crop_offsets", "crop_data")}
    tail = {k: v[n:] for k, v in regions.items() if k not in ("crop_offsets", "crop_data")}
    head["crop_data"], tail["crop_data"] = regions["crop_data"][:cut], regions["crop_data"][cut:]
    head["crop_offsets"] = regions["crop_offsets"][:n + 1]
    tail["crop_offsets"] = regions["crop_offsets"][n:] - cut
    return head, tail


def region_settings(regions_dir: str | Path) -> RegionParams:
    """The ``regions.*`` params the crop regions in ``regions_dir`` were made with (what the train
    stage must sample, warp and label the same way; read from the data, not params.yaml)."""
    path = Path(regions_dir) / "index.json"
    try:
        return RegionParams(**read_index(regions_dir)["settings"])
    except (KeyError, TypeError):
        raise RcnnError(f"{path} does not record its regions settings: rerun the regions stage (dvc repro)") from None


def iter_shards(regions_dir: str | Path, split: str) -> Iterator[dict]:
    """Shards of a split in order, each ``{"crops": (N,S,S,3) uint8 RGB, "labels", "image_ids", "boxes",
    "gt_boxes", "ious"}``."""
    index = read_index(regions_dir)
    if split not in index["splits"]:
        raise RcnnError(f"split {split!r} has no regions in {regions_dir}: found {sorted(index['splits'])}")
    for rel in index["splits"][split]["shards"]:
        path = Path(regions_dir) / rel
        shard = load_pickle(path)
        if not isinstance(shard, dict) or not {"crop_data", "crop_offsets", *SHARD_KEYS[1:]} <= set(shard):
            raise RcnnError(f"{path} is not a region shard; rerun the regions stage")
        crops = decode_crops(shard["crop_data"], shard["crop_offsets"], index["crop_size"])
        yield {"crops": crops, **{k: shard[k] for k in SHARD_KEYS[1:]}}


def _split_regions(params: Params, root: Path, proposals_dir: Path, split: str, out_dir: Path, rel_root: Path,
                   n_jobs: int) -> tuple[dict, float]:
    """Extract and write the regions of one split; returns its index entry and seconds taken."""
    start = time.perf_counter()
    todo, proposals, missing = split_inputs(params, root, proposals_dir, split)
    jobs = (joblib.delayed(_image_regions)(a, str(voc.image_path(root, a.image_id)), proposals[a.image_id],
                                           params.regions, params.seed) for a in todo)
    writer = _ShardWriter(out_dir / split, rel_root, params.regions.shard_size)
    (out_dir / split).mkdir(parents=True, exist_ok=True)
    class_counts = np.zeros(params.num_classes, np.int64)
    skipped = list(missing)
    images = 0
    for ann, regions in zip(todo, tqdm(joblib.Parallel(n_jobs=n_jobs, return_as="generator")(jobs),
                                       total=len(todo), desc=f"regions {split}", unit="img")):
        if regions is None:
            warnings.warn(f"skipping image {ann.image_id} of {split}: unreadable image", RuntimeWarning,
                          stacklevel=2)
            skipped.append(ann.image_id)
            continue
        images += 1
        np.add.at(class_counts, regions["labels"], 1)
        writer.add(regions)
    writer.close()
    n = int(class_counts.sum())
    entry = {"shards": writer.shards, "regions": n, "foreground": int(class_counts[1:].sum()),
             "background": int(class_counts[0]), "per_class": {c: int(class_counts[i + 1])
                                                                for i, c in enumerate(params.classes)},
             "images": images, "skipped_images": len(skipped),
             "skipped_ids": sorted(skipped), "bytes": writer.bytes}
    return entry, time.perf_counter() - start


def _read_speed(regions_dir: Path, split: str) -> tuple[int, float]:
    """Regions decoded from the first shard of a split and the seconds it took."""
    start = time.perf_counter()
    shard = next(iter_shards(regions_dir, split), None)
    return (0 if shard is None else len(shard["labels"])), time.perf_counter() - start


def run_regions_stage(params: Params, voc_dir: str | Path = "data/voc", proposals_dir: str | Path = "data/proposals",
                      out_dir: str | Path = "data/regions", metrics_path: str | Path = "metrics/regions.json",
                      n_jobs: int = 1) -> dict:
    """Write region shards and ``index.json`` for the train and val splits, and ``metrics/regions.json``.

    Sequential by default: an image takes ~30 ms, so worker start-up (~9 s) outweighs the gain
    on small sets, and two loky workers measured only 1.2x faster once warm. Output does not
    depend on ``n_jobs``.
    """
    root = voc.find_voc_root(voc_dir)
    out_dir = Path(out_dir)
    splits = list(dict.fromkeys([params.data.train_split, params.data.val_split]))
    r = params.regions
    index = {"format": "crops", "crop_size": r.crop_size, "context": r.context, "classes": list(params.classes),
             "encoding": f"jpeg{JPEG_QUALITY}-444", "proposals_mode": params.proposals.mode, "seed": params.seed,
             "settings": dataclasses.asdict(r), "splits": {}}
    seconds = 0.0
    with atomic_dir(out_dir) as tmp:
        for split in splits:
            entry, took = _split_regions(params, root, Path(proposals_dir), split, tmp, tmp, n_jobs)
            index["splits"][split] = entry
            seconds += took
        # Every labelled proposal: fine-tuning and hard-negative mining draw from the training split's,
        # fine-tuning's validation AP scores the validation split's.
        index["labelled_boxes"] = {}
        for split in splits:
            boxes_entry, took = split_boxes(params, root, Path(proposals_dir), split, tmp)
            index["labelled_boxes"][split] = boxes_entry["files"][0]
            seconds += took
        write_json(tmp / "index.json", index)
    read_n, read_s = 0, 0.0
    for split in splits:
        n, s = _read_speed(out_dir, split)
        read_n, read_s = read_n + n, read_s + s
    total = sum(e["regions"] for e in index["splits"].values())
    total_bytes = sum(e["bytes"] for e in index["splits"].values())
    metrics = {
        "splits": {s: {k: v for k, v in e.items() if k != "shards"} | {"shards": len(e["shards"])}
                   for s, e in index["splits"].items()},
        "regions": total,
        "foreground": sum(e["foreground"] for e in index["splits"].values()),
        "background": sum(e["background"] for e in index["splits"].values()),
        "shards": sum(len(e["shards"]) for e in index["splits"].values()),
        "bytes": total_bytes,
        "bytes_per_region": round(total_bytes / total, 1) if total else None,
        "seconds": round(seconds, 3),
        "regions_per_second_written": round(total / seconds, 1) if seconds > 0 else None,
        "regions_per_second_read": round(read_n / read_s, 1) if read_s > 0 else None,
        "encoding": index["encoding"],
        "n_jobs": joblib.effective_n_jobs(n_jobs),
    }
    write_json(metrics_path, metrics)
    return metrics
