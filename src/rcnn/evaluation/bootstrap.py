"""Percentile-bootstrap intervals for mAP: how much the figure would move on another draw of test images.

A resample draws the evaluated images with replacement (as many as there are). An image drawn k
times brings k copies of its detections and objects, and each copy keeps the match it has in the
full evaluation (matching never crosses images), so a resample's PR curve is the full ranking with
each detection counted k times: the AP of the expanded set exactly, without re-matching. All
resamples of a class are computed at once as a ``(resamples, detections)`` matrix.
"""

from __future__ import annotations

import warnings

import numpy as np

from rcnn.evaluation.voc_eval import EvalResult, batched_average_precision, pr_curve

MIN_IMAGES = 5  # fewer images give resamples of so few distinct draws that the interval says nothing
RESAMPLES = 2000  # the ends of the 95% interval move by < 0.005 between seeds at this count (tests/test_bootstrap.py)
SEED = 0
_CHUNK_ELEMENTS = 262_144  # (resamples x detections) per matrix: 2 MB of float64, cache-sized (fastest measured)


def image_draws(num_images: int, resamples: int = RESAMPLES, seed: int = SEED) -> np.ndarray:
    """``(resamples, num_images)``: how often each image is drawn in each resample (seeded, so repeatable)."""
    if num_images == 0:
        return np.zeros((resamples, 0), np.int64)
    return np.random.default_rng(seed).multinomial(num_images, np.full(num_images, 1.0 / num_images), size=resamples)


def resampled_maps(result: EvalResult, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """mAP (all-point) and mAP07 of each resample given its per-image draw ``counts`` ``(resamples, images)``;
    a class whose objects a resample missed entirely is left out of that resample's mean, as the
    evaluation leaves out classes without objects."""
    resamples = len(counts)
    scored = [c for c in result.per_class if c.num_gt > 0]
    if result.num_images == 0 or not scored:
        return np.full(resamples, np.nan), np.full(resamples, np.nan)
    ap = np.full((len(scored), resamples), np.nan)
    ap07 = np.full((len(scored), resamples), np.nan)
    for k, cls in enumerate(scored):
        npos = counts @ cls.gt_per_image
        chunk = max(1, _CHUNK_ELEMENTS // max(len(cls.true_positive), 1))
        hits = np.flatnonzero(cls.true_positive)
        for start in range(0, resamples, chunk):
            rows = slice(start, start + chunk)
            weight = counts[rows][:, cls.image_index].astype(np.float64)
            recall, precision = pr_curve(weight * cls.true_positive, weight * ~cls.true_positive, npos[rows])
            # Recall only rises at true positives, and a false positive never beats the point before it, so
            # both APs read the curve at the true-positive points alone: far fewer columns to scan.
            recall, precision = recall[:, hits], precision[:, hits]
            ap[k, rows] = batched_average_precision(recall, precision)
            ap07[k, rows] = batched_average_precision(recall, precision, use_07_metric=True)
        missing = npos == 0
        ap[k, missing] = ap07[k, missing] = np.nan
    with warnings.catch_warnings():  # a resample without any scored class has a nan mean
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(ap, axis=0), np.nanmean(ap07, axis=0)


def interval(samples: np.ndarray, point: float, level: float = 0.95) -> list[float]:
    """The percentile interval of ``samples`` at ``level``, widened to hold ``point`` where it falls outside
    (possible on a handful of images); ``[point, point]`` when no resample could be scored."""
    samples = samples[np.isfinite(samples)]
    if not np.isfinite(point):
        return [point, point]
    if len(samples) == 0:
        return [round(point, 6)] * 2
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(samples, [tail, 100 - tail])
    return [round(float(min(low, point)), 6), round(float(max(high, point)), 6)]


def map_intervals(result: EvalResult, resamples: int = RESAMPLES, seed: int = SEED) -> dict[str, list[float]]:
    """``map07_ci95`` and ``map_ci95``: 95% percentile-bootstrap intervals over the evaluated images; both
    nan (null in ``metrics/eval.json``) with a warning below :data:`MIN_IMAGES` images (one image would report a zero-width
    interval: certainty where there is least)."""
    if 0 < result.num_images < MIN_IMAGES and np.isfinite(result.map07):
        warnings.warn(f"the evaluated split has {result.num_images} image{'s' * (result.num_images > 1)}: too few "
                      f"for a bootstrap interval (map07_ci95 and map_ci95 are null; {MIN_IMAGES} or more give one)",
                      RuntimeWarning, stacklevel=2)
        return {"map07_ci95": [float("nan")] * 2, "map_ci95": [float("nan")] * 2,
                "bootstrap": {"resamples": 0, "seed": seed, "unit": "image"}}
    maps, maps07 = resampled_maps(result, image_draws(result.num_images, resamples, seed))
    return {"map07_ci95": interval(maps07, result.map07), "map_ci95": interval(maps, result.map),
            "bootstrap": {"resamples": resamples, "seed": seed, "unit": "image"}}

