"""Shared fixtures: every test runs on data the project generates itself."""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path

import pytest

from rcnn import proposals, regions
from rcnn.families.rcnn import features
from rcnn.params import ModelParams, Params, TrainParams
from rcnn.synthetic import generate

REGION_CLASSES = ["car", "dog", "person"]
REPO = Path(__file__).resolve().parents[1]


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
    proposals.run_proposals_stage(p, voc_dir, root / "proposals", root / "proposals.json")
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
