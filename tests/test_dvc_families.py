"""Switching families and R-CNN's paper-way training through `dvc exp run`, on a baseline `dvc repro` of the
synthetic set (its own copy of the project: these are the slowest end-to-end tests, apart from the rest)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from dvc_project import make_project, run, stages_run


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project after a committed baseline run (the default R-CNN recipe)."""
    root = make_project(tmp_path_factory.mktemp("project"), tmp_path_factory.mktemp("dataset"))
    run(["dvc", "repro"], root)
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-qm", "baseline run"], root)
    return root


# Random weights and 8 training images learn nothing here (10 epochs of every layer collapsed to background too),
# so the run keeps its model (train.allow_collapse) and says so: this test is about what reruns, in 2 small epochs.
FAST_RCNN_OPTIONS = ["-S", "model.arch=fast_rcnn", "-S", "model.trainable_layers=5", "-S", "model.image_size=128",
                     "-S", "model.max_size=160", "-S", "model.roi_channels=16", "-S", "model.roi_size=5",
                     "-S", "model.dropout=0.0", "-S", "train.rois_per_image=64", "-S", "train.optimizer=sgd",
                     "-S", "train.lr=0.01", "-S", "train.epochs=2", "-S", "train.patience=2",
                     "-S", "train.allow_collapse=true",
                     "-S", "evaluate.max_proposals=150"]  # every proposal, as the fast-rcnn preset scores


def test_switching_to_fast_rcnn_reruns_exactly_what_it_must(project: Path):
    run(["git", "reset", "-q", "--hard"], project)
    run(["dvc", "checkout", "--force"], project)
    exp = run(["dvc", "exp", "run", "-n", "fast", *FAST_RCNN_OPTIONS], project)
    ran = stages_run(exp.stdout)
    # model.arch is read by the proposals stage (no selective search for faster_rcnn): it reruns, same bytes
    assert ran == {"proposals", "regions", "features", "train", "evaluate", "render"}, exp.stdout
    assert json.loads((project / "metrics" / "regions.json").read_text())["format"] == "boxes"
    features = sorted(p.name for p in (project / "data" / "features").iterdir())
    assert features == ["info.json"]  # nothing cached, nothing stale
    train = json.loads((project / "metrics" / "train.json").read_text())
    # No accuracy margin here: on 8 random-weight training images this recipe collapses to background on this
    # machine (val mAP ~0.02, with this commit's code and the previous one's alike); 4 test images could not
    # show a margin anyway. Accuracy is measured on real photos by bench/families.py.
    assert train["train_images"] > 0 and 0 <= train["val_map"] <= 1 and "collapsed" in train, train
    evaluation = json.loads((project / "metrics" / "eval.json").read_text())
    assert 0 <= evaluation["map"] <= 1 and evaluation["split"] == "test", evaluation
    assert evaluation["map07_ci95"] == [None, None]  # 4 test images: too few for a bootstrap interval
    assert (project / "data" / "render" / "grid.jpg").is_file()
    # A Fast R-CNN-only knob reruns training and what follows, nothing before it.
    again = run(["dvc", "exp", "run", "-n", "fast-lr", *FAST_RCNN_OPTIONS, "-S", "train.lr=0.005"], project)
    assert stages_run(again.stdout) == {"train", "evaluate", "render"}, again.stdout
    source = Path(yaml.safe_load((project / "params.yaml").read_text())["data"]["source"])
    detect = run(["rcnn-detect", str(sorted((source / "JPEGImages").glob("*.jpg"))[0]),
                  "--checkpoint", "data/model/model.pt", "--score", "0.0", "--max-proposals", "50"], project)
    assert detect.stdout.strip(), detect.stderr


def test_switching_to_faster_rcnn_and_back_reruns_only_what_the_run_cache_lacks(project: Path):
    # after the test above, which ran the fast-rcnn options as experiment "fast"
    source = Path(yaml.safe_load((project / "params.yaml").read_text())["data"]["source"])
    faster = run(["dvc", "exp", "run", "-n", "faster", *FAST_RCNN_OPTIONS, "-S", "model.arch=faster_rcnn"], project)
    assert stages_run(faster.stdout) == {"proposals", "regions", "features", "train", "evaluate", "render"}, faster.stdout
    assert json.loads((project / "metrics" / "proposals.json").read_text())["selective_search"] is False
    assert json.loads((project / "metrics" / "eval.json").read_text())["proposal_recall"]["source"] == "learned"
    detect = run(["rcnn-detect", str(sorted((source / "JPEGImages").glob("*.jpg"))[0]),
                  "--checkpoint", "data/model/model.pt", "--score", "0.0"], project)
    assert detect.stdout.strip(), detect.stderr
    back = run(["dvc", "exp", "run", "-n", "fast-again", *FAST_RCNN_OPTIONS], project)  # all in the run cache
    assert stages_run(back.stdout) == set(), back.stdout


def test_rcnn_fine_tuning_svms_and_hard_negatives_run_through_dvc(project: Path):
    run(["git", "reset", "-q", "--hard"], project)
    run(["dvc", "checkout", "--force"], project)
    exp = run(["dvc", "exp", "run", "-n", "paper-way", "-S", "model.trainable_layers=1", "-S", "model.classifier=svm",
               "-S", "train.hard_negative_rounds=1", "-S", "train.optimizer=sgd", "-S", "train.lr=0.01",
               "-S", "train.epochs=2"], project)
    assert stages_run(exp.stdout) == {"features", "train", "evaluate", "render"}, exp.stdout
    train = json.loads((project / "metrics" / "train.json").read_text())
    assert train["epochs_run"] == 2 and train["pool_regions"] > train["regions_per_epoch"] > 0
    assert train["final_classifier"]["classifier"] == "svm" and train["final_classifier"]["mined_per_round"][0] > 0
    evaluation = json.loads((project / "metrics" / "eval.json").read_text())
    assert 0 <= evaluation["map"] <= 1 and (project / "data" / "render" / "grid.jpg").is_file()
