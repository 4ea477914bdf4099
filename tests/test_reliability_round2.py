"""Issue 23's second probe round: each test is named after the defect it pins down and failed before
the fix (the rows of docs/guarantees.md's "round 2" table)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from rcnn import proposals
from rcnn.detectors import load_detector
from rcnn.errors import ParamError, RcnnError
from rcnn.fast_rcnn import FastRCNN, FastRCNNDetector, pad_to_resizable, save_fast_rcnn
from rcnn.params import Params, from_dict

CLASSES = ["car", "dog", "person"]


def _tiny_fast_rcnn(**kw) -> FastRCNN:
    torch.manual_seed(0)
    args = {"backbone": "resnet18", "num_classes": 3, "roi_channels": 8, "roi_size": 3, "hidden": 16,
            "image_size": 96, "max_size": 160, "trainable_layers": 1, **kw}
    return FastRCNN(**args).eval()


# 3 ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(10, 10000, 3), (10000, 10, 3), (1, 3000, 3)])
def test_3_fast_rcnn_detects_on_very_elongated_images(shape):
    detector = FastRCNNDetector(_tiny_fast_rcnn(), {"classes": CLASSES}, torch.device("cpu"), 0.0, 0.3, 5)
    image = np.full(shape, 127, np.uint8)
    height, width = shape[:2]
    proposals = np.array([[0, 0, min(width, 50) - 1, height - 1], [0, 0, width - 1, min(height, 40) - 1]],
                         np.float32)
    found = detector.detect(image, proposals)
    assert len(found) > 0
    assert (found.boxes[:, [0, 2]] <= width - 1).all() and (found.boxes[:, [1, 3]] <= height - 1).all()


def test_3_padding_leaves_ordinary_images_alone():
    image = torch.zeros(3, 480, 640)
    assert pad_to_resizable(image, 800) is image
    padded = pad_to_resizable(torch.zeros(3, 10, 10000), 800)
    assert padded.shape == (3, 400, 10000)  # 10000 px -> 800: 400 px -> 32 px, one feature cell


# 4 ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("field, value", [("image_size", 0), ("max_size", -1), ("fg_fraction", 2.0),
                                          ("train_sizes", "abc"), ("train_sizes", [8]), ("roi_size", 0),
                                          ("dropout", 1.5), ("num_classes", 7), ("backbone", 3)])
def test_4_edited_fast_rcnn_checkpoint_config_is_one_error(tmp_path: Path, field, value):
    save_fast_rcnn(tmp_path / "m.pt", _tiny_fast_rcnn(), Params(classes=CLASSES), {})
    payload = torch.load(tmp_path / "m.pt", weights_only=True)
    payload["meta"]["config"][field] = value
    torch.save(payload, tmp_path / "bad.pt")
    with pytest.raises(RcnnError, match=f"bad.pt does not match its own description .*{field}.*rerun the train"):
        load_detector(tmp_path / "bad.pt", "cpu")


# 5 ------------------------------------------------------------------------------------------------

def test_5_the_multiprocessing_backend_gives_the_same_proposals_as_loky(synthetic_voc, tmp_path):
    ids = sorted(p.name[:-4] for p in (synthetic_voc / "JPEGImages").iterdir())[:3]
    runs = {backend: proposals.compute_proposals(synthetic_voc, ids, max_proposals=50, max_side=96, n_jobs=2,
                                                 backend=backend) for backend in ("loky", "multiprocessing")}
    assert sorted(runs["multiprocessing"].boxes) == ids
    for image_id in ids:
        np.testing.assert_array_equal(runs["multiprocessing"].boxes[image_id], runs["loky"].boxes[image_id])


# 6 ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("address", ["tls://127.0.0.1:8786", "ucx://127.0.0.1:8786"])
def test_6_tls_and_ucx_addresses_are_one_error(monkeypatch, address):
    monkeypatch.setattr(proposals, "DASK_CONNECT_SECONDS", 1)
    with pytest.raises(RcnnError, match=f"proposals.scheduler = '{address}': cannot reach the dask scheduler"):
        with proposals.parallel_backend("dask", 2, address):
            pass


@pytest.mark.parametrize("address", ["tcp://127.0.0.1:99999", "tcp://127.0.0.1:http", "tcp://"])
def test_minor_an_impossible_scheduler_address_is_refused_at_once(address):
    start = time.perf_counter()
    with pytest.raises(ParamError, match="proposals.scheduler = .* is invalid: expected a dask scheduler address"):
        from_dict({"proposals": {"backend": "dask", "scheduler": address}})
    assert time.perf_counter() - start < 1


def test_minor_background_ious_that_leave_fast_rcnn_no_background_are_refused():
    with pytest.raises(ParamError, match=r"train.bg_iou_low = 0.5 is invalid: must be < regions.bg_iou \(0.5\)"):
        from_dict({"regions": {"fg_iou": 0.5, "bg_iou": 0.5}, "train": {"bg_iou_low": 0.5}})
    assert from_dict({"regions": {"fg_iou": 0.5, "bg_iou": 0.5}, "train": {"bg_iou_low": 0.1}})
