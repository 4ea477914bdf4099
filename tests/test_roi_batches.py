"""The two-stage trainer's data path (issue 36): worker processes change when batches are ready, never what
they hold; the step reads losses back only to catch divergence; the metrics say how fast it went."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from rcnn.data import voc
from rcnn.engine.two_stage_batches import BatchLoader, in_order_plan, loader_workers, training_examples, training_plan
from rcnn.engine.two_stage_trainer import DIVERGENCE_CHECK_STEPS, _Meter, train_epoch
from rcnn.pipeline.family_registry import run_regions_stage, run_train_stage
from rcnn.pipeline.params import Params, from_dict
from rcnn.proposals.region_boxes import BOXES_FILE, load_boxes
from rcnn.utils.errors import ParamError, RcnnError

TIMING = ("seconds", "seconds_per_epoch", "steps_per_second", "validation_seconds", "workers")


def _params(source: Path, **train) -> Params:
    return from_dict({
        "classes": ["car", "dog", "person"], "data": {"source": str(source)},
        "model": {"arch": "faster_rcnn", "backbone": "resnet18", "weights": "none", "trainable_layers": 1,
                  "image_size": 96, "max_size": 160, "roi_channels": 8, "roi_size": 3, "hidden": 32,
                  "rpn_anchor_sizes": [16, 32, 64]},
        "train": {"optimizer": "sgd", "lr": 0.02, "epochs": 2, "patience": 2, "device": "cpu", "rois_per_image": 32,
                  "image_sizes": [80, 96], "allow_collapse": True, **train},
        "evaluate": {"max_proposals": 50}})


@pytest.fixture(scope="module")
def regions(synthetic_voc: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic set's labelled boxes for Faster R-CNN (ground truth only: no selective search)."""
    root = tmp_path_factory.mktemp("roi-batches")
    run_regions_stage(_params(synthetic_voc), synthetic_voc, root / "proposals", root / "regions",
                      root / "regions.json")
    return root / "regions"


def _examples(regions: Path, synthetic_voc: Path):
    return training_examples(voc.find_voc_root(synthetic_voc), load_boxes(regions / "train" / BOXES_FILE, 3), False)


def test_worker_processes_load_the_same_batches_in_the_same_order(regions: Path, synthetic_voc: Path):
    examples = _examples(regions, synthetic_voc)
    plan = training_plan(len(examples), 2, np.random.default_rng(3), steps=9)
    assert any(flip for batch in plan for _, flip in batch)
    loaded = {workers: list(BatchLoader(examples, workers, torch.device("cpu"))(plan)) for workers in (0, 2)}
    assert len(loaded[0]) == len(loaded[2]) == 9
    for plain, parallel in zip(loaded[0], loaded[2]):
        for left, right in zip(plain, parallel):
            assert len(left) == len(right)
            for a, b in zip(left, right):
                if isinstance(a, dict):
                    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
                else:
                    assert torch.equal(a, b)
    # validation and the trained model's scoring: every image once, in order, unflipped
    assert [i for batch in in_order_plan(5, 2) for i, flip in batch if not flip] == [0, 1, 2, 3, 4]


def test_training_with_two_workers_ends_with_the_same_model_and_metrics(regions: Path, synthetic_voc: Path,
                                                                         tmp_path: Path):
    runs = {}
    for workers in (0, 2):
        out = tmp_path / str(workers)
        runs[workers] = run_train_stage(_params(synthetic_voc, workers=workers), tmp_path / "features", regions,
                                        out / "model.pt", out / "train.json", out / "dvclive", synthetic_voc)
        assert runs[workers]["workers"] == workers
        assert runs[workers]["steps_per_second"] > 0 and runs[workers]["validation_seconds"] > 0
    states = [torch.load(tmp_path / str(w) / "model.pt", weights_only=False)["state_dict"] for w in (0, 2)]
    assert states[0].keys() == states[1].keys() and all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert {k: v for k, v in runs[0].items() if k not in TIMING} == {k: v for k, v in runs[2].items() if k not in TIMING}
    curves = [(tmp_path / str(w) / "dvclive" / "plots" / "metrics" / "train" / "loss.tsv").read_text() for w in (0, 2)]
    assert curves[0] == curves[1]
    assert json.loads((tmp_path / "2" / "train.json").read_text())["workers"] == 2


class _Diverging(torch.nn.Module):
    """A model whose loss turns NaN at a given step, as a too-high learning rate makes it."""

    def __init__(self, nan_at: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(()))
        self.nan_at, self.calls = nan_at, 0

    def losses(self, images, proposals, targets):
        self.calls += 1
        loss = self.weight * (float("nan") if self.calls == self.nan_at else 1.0)
        return {"loss_classifier": loss}, torch.zeros(4, 2), torch.zeros(4, dtype=torch.int64)


@pytest.mark.parametrize("nan_at", [3, 25])
def test_a_non_finite_loss_stops_training_with_one_error_within_the_checked_steps(nan_at: int):
    model = _Diverging(nan_at)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    batch = ([torch.zeros(3, 8, 8)], [torch.zeros(0, 4)], [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0)}])
    meter = _Meter(2, torch.device("cpu"))
    with pytest.raises(RcnnError, match=r"training diverged at epoch 4 \(loss nan\): lower train.lr \(now 0.1\)"):
        train_epoch(model, [batch] * 30, optimizer, scheduler, torch.device("cpu"), meter, epoch=4, lr=0.1)
    # read at every DIVERGENCE_CHECK_STEPS-th step and at the epoch's end, not at every step
    assert model.calls == (DIVERGENCE_CHECK_STEPS if nan_at <= DIVERGENCE_CHECK_STEPS else 30)


def test_the_meter_reads_the_same_numbers_it_was_given():
    meter = _Meter(3, torch.device("cpu"))
    meter.add({"a": torch.tensor(1.0), "b": torch.tensor(2.0)}, torch.tensor([[0.9, 0.1, 0], [0, 0.2, 0.8]]),
              torch.tensor([0, 1]))
    meter.add({"a": torch.tensor(3.0), "b": torch.tensor(0.5)}, torch.tensor([[0, 1.0, 0]]), torch.tensor([1]))
    result = meter.result()
    assert result["loss"] == pytest.approx(3.25) and result["a"] == 2.0 and result["b"] == 1.25
    assert result["accuracy"] == pytest.approx(2 / 3) and result["fg_accuracy"] == 0.5
    assert meter.tally.per_class(["x", "y"]) == {"x": 0.5}


def test_workers_auto_reads_on_the_cpu_and_beside_a_gpu_in_workers():
    assert loader_workers("auto", torch.device("cpu")) == 0
    assert 1 <= loader_workers("auto", torch.device("cuda")) <= 8
    assert loader_workers(3, torch.device("cpu")) == 3
    assert from_dict({"train": {"workers": 4}}).train.workers == 4
    for bad, message in (("many", "expected an integer or one of 'auto'"), (-1, "out of range"), (99, "out of range")):
        with pytest.raises(ParamError, match=message):
            from_dict({"train": {"workers": bad}})
