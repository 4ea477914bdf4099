"""Shared fixtures: every test runs on data the project generates itself."""

from __future__ import annotations

import dataclasses
import os
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from rcnn.proposals import selective_search

from rcnn.data.formats import coco, yolo
from rcnn.families.fast_rcnn.model import build_fast_rcnn
from rcnn.families.rcnn import features
from rcnn.families.rcnn import regions
from rcnn.modeling.two_stage import save_roi_detector
from rcnn.pipeline.params import ModelParams, Params, TrainParams, from_dict
from rcnn.synthetic import generate

REGION_CLASSES = ["car", "dog", "person"]
REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist, each worker (and the stages and benches it starts) takes its share of the cores, so
    two workers on two cores do not each start two threads."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        threads = max(1, (os.cpu_count() or 1) // int(workers))
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
        torch.set_num_threads(threads)


# The files whose tests run whole pipelines, longest first (measured on 2 cores, docs/testing.md). They start
# first, and the many quick files fill in behind them, so the workers finish together: with pytest-xdist's
# default order (files with the most tests first) the longest files started last and one worker ran on
# alone for a minute. Needs --no-loadscope-reorder (pyproject.toml).
LONGEST_FILES = ("test_dvc_pipeline.py", "test_bench.py", "test_dvc_families.py", "test_faster_rcnn.py",
                 "test_class_accuracy.py", "test_resume.py", "test_finetune.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


def shipped_params_text() -> str:
    """The params.yaml the project ships: the committed one (``git show HEAD:params.yaml``), not the workspace's,
    which ``dvc exp run -S`` rewrites; the file itself outside a git checkout."""
    shown = subprocess.run(["git", "show", "HEAD:params.yaml"], cwd=REPO, capture_output=True, text=True)
    return shown.stdout if shown.returncode == 0 else (REPO / "params.yaml").read_text()


@pytest.fixture(scope="session")
def synthetic_voc(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 24-image synthetic VOC-format folder (classes car, dog, person); treat it as read-only."""
    return generate(tmp_path_factory.mktemp("synthetic") / "VOC2007", images=24, seed=0)


@pytest.fixture(scope="session")
def format_sources(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 6-image synthetic set as ``voc/VOC2007``, its COCO copy ``coco`` and YOLO copy ``yolo``, and an image
    outside all of them, ``outside/secret.jpg``; treat them as read-only (copy one to change it)."""
    root = tmp_path_factory.mktemp("format-sources")
    generate(root / "voc" / "VOC2007", images=6, seed=1)
    splits = ["train", "val", "test"]
    coco.export(root / "voc" / "VOC2007", root / "coco", splits, REGION_CLASSES)
    yolo.export(root / "voc" / "VOC2007", root / "yolo", splits, REGION_CLASSES)
    (root / "outside").mkdir()
    cv2.imwrite(str(root / "outside" / "secret.jpg"), np.full((64, 80, 3), 200, np.uint8))
    return root


@pytest.fixture(scope="session")
def untrained_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained Fast R-CNN checkpoint (resnet18, random weights, classes car, dog, person): detection
    plumbing only, scores near uniform."""
    params = from_dict({"classes": REGION_CLASSES, "model": {"arch": "fast_rcnn", "backbone": "resnet18",
                                                             "weights": "none", "image_size": 128, "max_size": 192,
                                                             "roi_channels": 32, "hidden": 64}})
    path = tmp_path_factory.mktemp("untrained") / "model.pt"
    save_roi_detector(path, build_fast_rcnn(params, 0.5, 0.5), params, {})
    return path


@pytest.fixture(scope="session")
def regions_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Regions (64 px crops) of a 48-image synthetic set's train and val splits, made by the real stages;
    its VOC folder is ``regions_dir.parent / "VOC2007"``. Treat both as read-only.

    Twice the shared 24-image set: with 6 validation images the foreground accuracy of a head on
    random-init features is too noisy to assert a margin over chance.
    """
    root = tmp_path_factory.mktemp("train-inputs")
    voc_dir = generate(root / "VOC2007", images=48, seed=0)
    p = Params(classes=REGION_CLASSES)
    p = dataclasses.replace(p, proposals=dataclasses.replace(p.proposals, max_side=128, max_proposals=200, n_jobs=1),
                            regions=dataclasses.replace(p.regions, crop_size=64, max_boxes=24, shard_size=100,
                                                        fg_iou=0.5, bg_iou=0.3, add_ground_truth=True))
    selective_search.run_proposals_stage(p, voc_dir, root / "proposals", root / "proposals.json")
    regions.run_regions_stage(p, voc_dir, root / "proposals", root / "regions", root / "regions.json", n_jobs=1)
    return root / "regions"



@pytest.fixture(scope="session")
def features_dir(regions_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Cached features of ``regions_dir`` (resnet18, random weights, the params of test_training's
    ``tiny_params``); treat it as read-only."""
    out = tmp_path_factory.mktemp("features") / "features"
    params = Params(classes=REGION_CLASSES, model=ModelParams(backbone="resnet18", weights="none", hidden=64),
                    train=TrainParams(feature_batch_size=64))
    features.run_features_stage(params, regions_dir, out)
    return out
