"""The two-stage trainer's data path (issue 36): worker processes change when batches are ready, never what
they hold; the step reads losses back only to catch divergence; the metrics say how fast it went."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch

from rcnn.data import voc
from rcnn.engine.device import training_scaler
from rcnn.engine.two_stage_batches import (BatchLoader, grouped_batches, in_order_plan, loader_workers,
                                           training_examples, training_plan)
from rcnn.engine.two_stage_trainer import DIVERGENCE_CHECK_STEPS, _Meter, train_epoch, validate
from rcnn.evaluation.validation import labelled_split_ap
from rcnn.families.faster_rcnn.model import FasterRCNNDetector, build_faster_rcnn
from rcnn.modeling.image_input import CanvasTransform
from rcnn.modeling.postprocess import postprocess_settings
from rcnn.pipeline.family_registry import run_regions_stage, run_train_stage
from rcnn.pipeline.params import Params, from_dict
from rcnn.proposals.region_boxes import BOXES_FILE, load_boxes
from rcnn.utils.errors import ParamError, RcnnError

TIMING = ("seconds", "seconds_per_epoch", "steps_per_second", "validation_seconds", "workers")
CPU = torch.device("cpu")


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
    assert any(item.flips for batch in plan for item in batch)
    loaded = {workers: list(BatchLoader(examples, workers, torch.device("cpu"))(plan)) for workers in (0, 2)}
    assert len(loaded[0]) == len(loaded[2]) == 9
    for plain, parallel in zip(loaded[0], loaded[2]):
        assert plain[3] == parallel[3] == 0  # the model draws each image's size (free batches)
        for left, right in zip(plain[:3], parallel[:3]):
            assert len(left) == len(right)
            for a, b in zip(left, right):
                if isinstance(a, dict):
                    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
                else:
                    assert torch.equal(a, b)
    # validation and the trained model's scoring: every image once, in order, unflipped
    assert [item.index for batch in in_order_plan(5, 2) for item in batch if not item.flips] == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("shapes", ["free", "grouped"])
def test_training_with_two_workers_ends_with_the_same_model_and_metrics(regions: Path, synthetic_voc: Path,
                                                                         tmp_path: Path, shapes: str):
    runs = {}
    for workers in (0, 2):
        out = tmp_path / str(workers)
        runs[workers] = run_train_stage(_params(synthetic_voc, workers=workers, batch_shapes=shapes),
                                        tmp_path / "features", regions, out / "model.pt", out / "train.json",
                                        out / "dvclive", synthetic_voc)
        assert runs[workers]["workers"] == workers and runs[workers]["batch_shapes"] == shapes
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

    def losses(self, images, proposals, targets, size=0, canvas=0):
        self.calls += 1
        loss = self.weight * (float("nan") if self.calls == self.nan_at else 1.0)
        return {"loss_classifier": loss}, torch.zeros(4, 2), torch.zeros(4, dtype=torch.int64)


@pytest.mark.parametrize("nan_at", [3, 25])
def test_a_non_finite_loss_stops_training_with_one_error_within_the_checked_steps(nan_at: int):
    model = _Diverging(nan_at)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    batch = ([torch.zeros(3, 8, 8)], [torch.zeros(0, 4)], [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0)}], 0)
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


def test_grouped_batches_hold_one_orientation_at_one_size_and_the_same_images_as_free_ones():
    groups = np.array([0, 1, 0, 0, 1, 1, 0, 1, 0])  # 5 landscape, 4 portrait images
    free = training_plan(9, 2, np.random.default_rng(5), steps=11)
    grouped = training_plan(9, 2, np.random.default_rng(5), steps=11, groups=groups, sizes=(80, 96))
    assert len(grouped) == len(free) == 11
    assert sorted(item[:2] for b in grouped for item in b) == sorted(item[:2] for b in free for item in b)
    mixed = [b for b in grouped if len({groups[item.index] for item in b}) > 1]
    assert len(mixed) <= 1 and (not mixed or mixed[0] is grouped[-1])  # only the leftovers, at the end
    assert all(len({item.size for item in b}) == 1 and b[0].size in (80, 96) for b in grouped)
    assert {b[0].size for b in grouped} == {80, 96}
    assert all(item.size == 0 for b in free for item in b)  # free batches: the model draws per image
    again = training_plan(9, 2, np.random.default_rng(5), steps=11, groups=groups, sizes=(80, 96))
    assert again == grouped


def test_grouped_batches_meet_a_fixed_set_of_canvases_and_keep_every_pixel():
    # a tenth of the presets' scale (sizes 400-560, max 800, padding 32 / 128): fast, and the same arithmetic
    sizes, canvas = (40, 48, 56), 16
    transform = CanvasTransform(sizes, 80, [0.5] * 3, [0.25] * 3, size_divisible=4).train()
    rng = np.random.default_rng(0)
    images = [torch.rand(3, int(h), int(w)) for h, w in rng.integers(20, 70, size=(90, 2))]
    groups = np.array([int(img.shape[1] > img.shape[2]) for img in images])
    canvases = {(long_side, short) for short in (40, 48, 56) for long_side in (48, 64, 80)}
    canvases |= {(short, long_side) for long_side, short in canvases}
    shapes = {"free": set(), "grouped": set()}
    for name in shapes:
        plan = training_plan(len(images), 2, np.random.default_rng(1), steps=400,
                             groups=groups if name == "grouped" else None, sizes=sizes)
        for batch in plan:
            with transform.shaped(batch[0].size, canvas if name == "grouped" else 0):
                shapes[name].add(tuple(transform([images[item.index] for item in batch])[0].tensors.shape[-2:]))
    mixed = shapes["grouped"] - canvases  # the leftover batch of an epoch, both sides padded to the canvas
    assert all(side % canvas == 0 for shape in mixed for side in shape) and len(mixed) <= 3
    assert len(shapes["grouped"]) <= len(canvases) + len(mixed) < len(shapes["free"]) / 2
    one = images[0]
    with transform.shaped(48, canvas):
        padded = transform([one])[0]
    (h, w), = padded.image_sizes
    with transform.shaped(48, 0):
        plain = transform([one])[0]
    assert plain.image_sizes == padded.image_sizes and min(h, w) == 48
    assert torch.equal(padded.tensors[..., :h, :w], plain.tensors[..., :h, :w])
    assert float(padded.tensors[..., h:, :].abs().sum() + padded.tensors[..., :, w:].abs().sum()) == 0.0


def test_batch_shapes_auto_groups_on_a_gpu_only_and_a_bad_value_is_one_error():
    assert grouped_batches("auto", torch.device("cuda")) and not grouped_batches("auto", CPU)
    assert grouped_batches("grouped", CPU) and not grouped_batches("free", torch.device("cuda"))
    assert from_dict({"train": {"batch_shapes": "grouped"}}).train.batch_shapes == "grouped"
    with pytest.raises(ParamError, match="batch_shapes"):
        from_dict({"train": {"batch_shapes": "square"}})


def test_float16_training_scales_its_gradients_and_bfloat16_or_float32_training_does_not():
    with mock.patch("rcnn.engine.device.inference_dtype", lambda _: torch.float16):
        assert training_scaler(CPU).is_enabled()
    with mock.patch("rcnn.engine.device.inference_dtype", lambda _: torch.bfloat16):
        assert not training_scaler(CPU).is_enabled()


def test_a_float16_step_with_the_scaler_learns_and_skips_overflowing_steps(regions: Path, synthetic_voc: Path):
    params = _params(synthetic_voc)
    examples = _examples(regions, synthetic_voc)
    torch.manual_seed(0)
    model = build_faster_rcnn(params, 0.5, 0.3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 20)  # overflows 4 times (to 2 ** 16), then steps
    meter = _Meter(4, CPU)
    plan = training_plan(len(examples), 2, np.random.default_rng(0), steps=8)
    with mock.patch("rcnn.engine.two_stage_trainer.inference_autocast",
                    lambda device: torch.autocast(device.type, dtype=torch.float16)):
        train_epoch(model, BatchLoader(examples, 0, CPU)(plan), optimizer, scheduler, CPU, meter, 1, 0.01, scaler)
    assert scaler.get_scale() < 2.0 ** 20  # backed off
    assert np.isfinite(meter.result()["loss"])
    changed = [k for k, v in model.named_parameters() if v.requires_grad and not torch.equal(v, before[k])]
    assert changed  # the steps that did not overflow updated the trained weights


def _untrained(regions: Path, synthetic_voc: Path, count: int):
    """Params, the first ``count`` training examples and an untrained Faster R-CNN (seed 0) to validate."""
    params = _params(synthetic_voc)
    torch.manual_seed(0)
    return params, _examples(regions, synthetic_voc)[:count], build_faster_rcnn(params, 0.5, 0.3)


def test_validation_scores_ap_as_the_evaluate_stage_does_from_the_same_backbone_pass_as_its_loss(
        regions: Path, synthetic_voc: Path):
    params, examples, model = _untrained(regions, synthetic_voc, 6)
    calls = []
    real = model._features
    with mock.patch.object(model, "_features", lambda *a, **k: calls.append(1) or real(*a, **k)):
        meter, ap = validate(model, FasterRCNNDetector, examples, params, CPU)
    assert len(calls) == len(examples)  # one backbone pass per image, for the loss and the AP together
    detector = FasterRCNNDetector(model.eval(), {"classes": list(params.classes)}, CPU, **postprocess_settings(params))
    alone = labelled_split_ap(detector, [ex.path for ex in examples], [ex.boxes for ex in examples],
                              params.evaluate.max_proposals, with_proposal_recall=True)
    assert ap == alone  # what the evaluate stage's scoring gives, to the bit
    again, _ = validate(model, FasterRCNNDetector, examples, params, CPU)
    assert again.result() == meter.result() and meter.steps == len(examples)  # the same RoI sample every epoch


def test_validation_scores_an_image_again_in_float32_where_its_reduced_precision_scores_are_not_finite(
        regions: Path, synthetic_voc: Path):
    # bf16 CPU kernels now and then return NaN on a degenerate map (docs/stages.md): such an image lowered that
    # epoch's validation AP, and so which epoch was kept, until validation rescored it as detection does.
    params, examples, model = _untrained(regions, synthetic_voc, 4)
    with mock.patch("rcnn.engine.two_stage_trainer.inference_autocast", lambda device: contextlib.nullcontext()):
        _, in_float32 = validate(model, FasterRCNNDetector, examples, params, CPU)
    real = model.score_with_losses
    autocast_calls = []

    def nan_under_autocast(*args):
        losses, (probs, boxes, rois) = real(*args)
        autocast_calls.append(torch.is_autocast_enabled("cpu"))
        return losses, (probs.float().fill_(float("nan")) if autocast_calls[-1] else probs, boxes, rois)

    with mock.patch("rcnn.engine.two_stage_trainer.inference_autocast",
                    lambda device: torch.autocast(device.type, dtype=torch.bfloat16)), \
            mock.patch.object(model, "score_with_losses", nan_under_autocast):
        meter, rescored = validate(model, FasterRCNNDetector, examples, params, CPU)
    assert autocast_calls == [True, False] * len(examples)
    assert rescored == in_float32 and in_float32["map"] > 0
    assert np.isfinite(meter.result()["loss"])


def test_the_batch_shapes_bench_counts_fewer_shapes_for_grouped_batches():
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from batch_shapes import count_shapes
    rng = np.random.default_rng(2)
    sizes = [(int(h), int(w)) for h, w in rng.integers(240, 640, size=(30, 2))]
    free, grouped = count_shapes(sizes, False, epochs=2), count_shapes(sizes, True, epochs=2)
    assert 0 < grouped <= 2 * 3 * 7 + 3 and 2 * grouped < free  # 2 orientations x 3 sizes x 7 long sides
