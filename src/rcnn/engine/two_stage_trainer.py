"""Training a two-stage detector (:mod:`rcnn.modeling.two_stage`: Fast or Faster R-CNN) end to end.

One implementation for both families: they differ only in where RoIs come from (the labelled
selective-search proposals of the regions stage, or the RPN trained jointly with the head).
Every step takes ``train.images_per_batch`` images (mirrored at random, ``train.flips``), and ``RoIHeads`` draws
a fresh sample of ``train.rois_per_image`` RoIs per image from *all* its proposals plus
the ground truth, ``train.fg_fraction`` of them foreground: each epoch sees a new sample.
On a small training set an epoch passes over the images several times, so that the run makes at
least ``train.min_steps`` steps (``train.min_steps_rare`` where a class has few boxes): a new head needs a number
of *steps*, not of passes, to learn foreground (11 VOC photos, 20 classes: 144 steps learned background only, 1,200
fitted them).
Optimiser and schedule come from :mod:`rcnn.engine.optim` (SGD with warm-up and decay is the Fast R-CNN
recipe). After each epoch (from the one ``train.val_start`` sets on) the model is scored on the
validation split, one backbone pass per image serving both the multi-task loss on a fixed RoI sample and
detection AP with the evaluate stage's settings, the number that matters; the best epoch by validation AP (then loss) is kept, with
early stopping after ``train.patience`` scored epochs without improvement. Curves go to dvclive as for R-CNN. The chosen model
is then scored on its own training images, per class (:mod:`rcnn.evaluation.class_accuracy`): one that
learned no foreground is an error, not a checkpoint.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from dvclive import Live
from tqdm import tqdm

from rcnn.data import voc
from rcnn.engine.device import (in_float32_if_not_finite, inference_autocast, precision_name, seeded_rng,
                                select_device, training_scaler, tune_for_bounded_shapes)
from rcnn.engine.optim import (backbone_rate, build_optimizer, build_scheduler, first_validated_epoch, patience_spent,
                               step_floor)
from rcnn.engine.resume import ResumePoint, open_resume_point, restore_training, save_epoch, stage_live
from rcnn.engine.two_stage_batches import (Batch, BatchLoader, Example, grouped_batches, in_order_plan, load_example,
                                           loader_workers, orientation_groups, repeat_factors, to_device, training_examples,
                                           training_plan)
from rcnn.evaluation.class_accuracy import (ClassTally, check_trained, check_training_objects, objects_per_class,
                                            rarest_class_objects, with_weights_advice)
from rcnn.evaluation.validation import scored_regions_recall, split_ap, warn_if_unscorable
from rcnn.evaluation.voc_eval import Detections
from rcnn.modeling.image_input import to_continuous
from rcnn.modeling.postprocess import postprocess_settings
from rcnn.modeling.two_stage import RoIDetection, RoIDetector, save_roi_detector
from rcnn.pipeline.params import Params, TrainParams
from rcnn.proposals.labelling import read_index
from rcnn.proposals.region_boxes import BOXES_FILE, load_boxes
from rcnn.utils.errors import RcnnError
from rcnn.utils.fileio import write_json

VAL_SAMPLE_SEED = 12345  # the validation loss uses the same RoI sample every epoch
CANVAS = 128  # grouped batches: the long side padded to a multiple of this (a few shapes per training size)
DIVERGENCE_CHECK_STEPS = 20  # a non-finite loss stops training within this many steps


def init_class_prior(model: RoIDetector, fg_fraction: float) -> None:
    """Class scores that start at the share of each label among the sampled RoIs (background ``1 - fg_fraction``,
    each class an equal part of ``fg_fraction``) instead of uniform: the focal-loss paper's prior for rare
    foreground, so that the first steps do not spend themselves pushing every class below background."""
    score = model.roi_heads.box_predictor.cls_score
    classes = score.out_features - 1
    with torch.no_grad():
        score.bias[0] = float(np.log(1 - fg_fraction)) if fg_fraction < 1 else 0.0
        score.bias[1:] = float(np.log(fg_fraction / classes))


def steps_per_epoch(num_images: int, t: TrainParams, min_steps: int) -> int:
    """Optimiser steps in one epoch: a pass over the training images, lengthened on a small set so that
    ``train.epochs`` epochs make at least ``min_steps`` steps (:func:`step_floor`; the schedule, warm-up and
    validation points scale with it)."""
    return max(-(-num_images // t.images_per_batch), -(-min_steps // t.epochs))


class _Meter:
    """Epoch totals of the multi-task loss and RoI accuracy (overall, foreground, and per class), summed where the
    losses are and read once, at the epoch's end."""

    def __init__(self, num_labels: int, device: torch.device) -> None:
        self.sums: dict[str, torch.Tensor] = {}  # "loss" and one entry per loss term (the RPN's too)
        self.dtype = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
        self.steps = 0
        self.tally = ClassTally(num_labels)

    def add(self, losses: dict[str, torch.Tensor], logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.steps += 1
        for key, value in {"loss": sum(losses.values()), **losses}.items():
            value = value.detach().to(self.dtype)
            self.sums[key] = self.sums[key] + value if key in self.sums else value
        self.tally.add(logits.argmax(dim=1), labels)

    def check_finite(self, epoch: int, lr: float) -> None:
        """The divergence error if any loss so far was not finite (a NaN or inf stays in the running sum)."""
        total = float(self.sums.get("loss", 0.0))
        if not np.isfinite(total):
            raise RcnnError(f"training diverged at epoch {epoch} (loss {total}): lower train.lr (now {lr}) or add "
                            f"train.warmup_epochs")

    def result(self) -> dict[str, float]:
        out = {key: float(value) / max(self.steps, 1) for key, value in self.sums.items()}
        out.setdefault("loss", 0.0)
        seen = max(int(self.tally.seen.sum()), 1)
        return {**out, "accuracy": int(self.tally.correct.sum()) / seen, "fg_accuracy": self.tally.fg_accuracy(),
                "fg_share": int(self.tally.seen[1:].sum()) / seen}


def train_epoch(model: RoIDetector, batches: Iterable[Batch], optimizer: torch.optim.Optimizer,
                scheduler: torch.optim.lr_scheduler.LRScheduler, device: torch.device, meter: _Meter, epoch: int,
                lr: float, scaler: torch.amp.GradScaler | None = None, canvas: int = 0) -> None:
    """One pass of optimiser steps over ``batches``; the losses are read (divergence checked) only every
    :data:`DIVERGENCE_CHECK_STEPS` steps and at the end, so that a GPU step waits for nothing. ``scaler``: the
    run's :func:`training_scaler` (none: unscaled); ``canvas``: the long-side padding of grouped batches."""
    scaler = scaler or torch.amp.GradScaler(device.type, enabled=False)
    model.train()
    for step, batch in enumerate(batches, start=1):
        images, proposals, targets, size = to_device(batch, device)
        with inference_autocast(device):
            losses, logits, labels = model.losses(images, proposals, targets, size, canvas)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(sum(losses.values())).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        meter.add(losses, logits, labels)
        if step % DIVERGENCE_CHECK_STEPS == 0:
            meter.check_finite(epoch, lr)
    meter.check_finite(epoch, lr)


def roi_meter(model: RoIDetector, loader: BatchLoader, num_examples: int, images_per_batch: int,
              device: torch.device) -> _Meter:
    """Loss and RoI classification of ``model`` (eval mode) on the examples of ``loader``, with the same RoI
    sample every time: the trained model's accuracy on its own training images."""
    model.eval()
    meter = _Meter(model.config["num_classes"] + 1, device)
    with seeded_rng(VAL_SAMPLE_SEED), torch.inference_mode(), inference_autocast(device):
        for batch in loader(in_order_plan(num_examples, images_per_batch)):
            images, proposals, targets, _ = to_device(batch, device)
            meter.add(*model.losses(images, proposals, targets))
    return meter


def validate(model: RoIDetector, detector_cls: type[RoIDetection], examples: list[Example], params: Params,
             device: torch.device) -> tuple[_Meter, dict]:
    """One epoch's validation numbers from one backbone pass per image: the loss and RoI accuracy on the same
    RoI sample every epoch, and detection AP scored as the evaluate stage scores (its post-processing and its
    ``evaluate.max_proposals``, one image at a time), with the per-class recall of the regions it scored. An
    unreadable image counts with no detections (training warned about it)."""
    model.eval()
    detector = detector_cls(model, {"classes": list(params.classes)}, device, **postprocess_settings(params))
    meter = _Meter(model.config["num_classes"] + 1, device)
    found, rois = {}, []
    with seeded_rng(VAL_SAMPLE_SEED), torch.inference_mode(), inference_autocast(device):
        for example in examples:
            loaded = load_example(example)
            if loaded is None:
                rois.append(np.zeros((0, 4), np.float32))
                continue
            image, proposals, target = loaded
            (image,), (proposals,), (target,), _ = to_device(([image], [proposals], [target], 0), device)
            ranked = example.boxes.proposals[:params.evaluate.max_proposals]
            if detector.takes_proposals and not len(ranked):  # as RoIDetection.detect: nothing to score
                meter.add(*model.losses([image], [proposals], [target]))
                found[example.boxes.image_id], detector.last_rois = Detections.empty(), ranked
            else:
                losses, scored = in_float32_if_not_finite(
                    lambda: model.score_with_losses(image, proposals, target, to_continuous(ranked).to(device)),
                    lambda out: out[1][:2], device)
                meter.add(*losses)
                found[example.boxes.image_id] = detector.finish(scored, tuple(image.shape[-2:]))
            rois.append(detector.last_rois)
    return meter, split_ap(found, rois, [ex.boxes for ex in examples], params.classes, with_proposal_recall=True)


def training_proposal_recall(model: RoIDetector, detector_cls: type[RoIDetection], examples: list[Example],
                             params: Params, device: torch.device) -> dict:
    """Per-class recall of the regions the trained detector scores on its training images (selective search's
    first ``evaluate.max_proposals``, or the RPN's): beside the validation recall, it tells a class that failed
    at proposals from one that failed at classification."""
    detector = detector_cls(model.eval(), {"classes": list(params.classes)}, device, **postprocess_settings(params))
    return scored_regions_recall(detector, [ex.path for ex in examples], [ex.boxes for ex in examples],
                                 params.evaluate.max_proposals)


def fit(model: RoIDetector, detector_cls: type[RoIDetection], train: list[Example], val: list[Example],
        params: Params, device: torch.device, live: Live | None = None, resume: ResumePoint | None = None) -> dict:
    """Train with early stopping on validation AP; ``model`` ends holding the best epoch's state.

    With ``resume``, every finished epoch is saved there, and a saved state is continued from.
    """
    t = params.train
    objects = objects_per_class([ex.boxes.gt_labels[ex.gt_index] for ex in train], params.num_classes)
    check_training_objects(objects, params.classes, params.data.train_split)
    warn_if_unscorable([ex.boxes for ex in val], params.data.val_split)
    if t.prior_init:
        init_class_prior(model, t.fg_fraction)
    repeat, class_repeat = repeat_factors(train, params.num_classes, t.repeat_threshold)
    rarest = rarest_class_objects(objects)
    backbone_lr = backbone_rate(t, rarest)
    optimizer = build_optimizer(model.parameters(), t, model.body.parameters(), backbone_lr)
    min_steps = step_floor(t, rarest)
    steps = steps_per_epoch(len(train), t, min_steps)
    scheduler = build_scheduler(optimizer, steps, t)
    workers = loader_workers(t.workers, device)
    train_loader = BatchLoader(train, workers, device)
    grouped = grouped_batches(t.batch_shapes, device)
    groups, canvas = (orientation_groups(train), CANVAS) if grouped else (None, 0)
    if grouped:
        tune_for_bounded_shapes(device)
    scaler = training_scaler(device)
    rng = np.random.default_rng(params.seed)
    best: dict = {"best_epoch": 0}
    best_key, best_state = (-1.0, float("-inf")), None
    start, epochs_run, resumed_from, stopped, earlier_seconds = time.perf_counter(), 0, None, False, 0.0
    timing = {"step_seconds": 0.0, "steps": 0, "validation_seconds": 0.0, "validated_epochs": 0}
    loop = restore_training(resume, model, optimizer, scheduler, numpy_rng=rng)
    if loop is not None:
        best, best_key, best_state = loop["best"], tuple(loop["best_key"]), loop["best_state"]
        epochs_run = resumed_from = int(loop["epoch"])
        stopped, earlier_seconds, timing = bool(loop["stopped"]), float(loop["seconds"]), loop["timing"]
        if loop.get("scaler"):
            scaler.load_state_dict(loop["scaler"])
    bar = tqdm(range(epochs_run + 1, t.epochs + 1 if not stopped else epochs_run + 1), desc=f"train {model.arch}",
               unit="epoch", initial=epochs_run, total=t.epochs)
    for epoch in bar:
        meter = _Meter(model.config["num_classes"] + 1, device)
        plan = training_plan(len(train), t.images_per_batch, rng, steps, repeat if t.repeat_threshold else None,
                             groups, model.train_sizes, t.flips)
        epoch_start = time.perf_counter()
        train_epoch(model, tqdm(train_loader(plan), total=len(plan), desc=f"epoch {epoch}", unit="batch",
                                leave=False), optimizer, scheduler, device, meter, epoch, t.lr, scaler, canvas)
        train_m = meter.result()  # reads the device: the epoch's steps are done
        timing["step_seconds"] += time.perf_counter() - epoch_start
        timing["steps"] += meter.steps
        epochs_run = epoch
        if live is not None:
            for name in ("loss", "accuracy", "fg_accuracy"):
                live.log_metric(f"train/{name}", train_m[name])
            live.log_metric("train/lr", optimizer.param_groups[0]["lr"])
        if epoch >= first_validated_epoch(t):
            validation_start = time.perf_counter()
            val_meter, val_ap = validate(model, detector_cls, val, params, device)
            val_m = {**val_meter.result(), **val_ap}
            timing["validation_seconds"] += time.perf_counter() - validation_start
            timing["validated_epochs"] += 1
            if live is not None:
                for name in ("loss", "accuracy", "fg_accuracy", "map"):
                    live.log_metric(f"val/{name}", val_m[name])
            key = (val_m["map"], -val_m["loss"])
            if key > best_key:
                best_key, best_state = key, copy.deepcopy(model.state_dict())
                best = {"best_epoch": epoch, **{f"val_{k}": v for k, v in val_m.items() if k != "fg_accuracy"},
                        "val_fg_accuracy": val_meter.tally.per_class(params.classes),
                        "val_fg_accuracy_overall": val_m["fg_accuracy"],
                        **{f"train_{k}": v for k, v in train_m.items() if k != "fg_accuracy"}}
            bar.set_postfix(loss=f"{train_m['loss']:.3f}", val_map=f"{val_m['map']:.3f}", best=best["best_epoch"])
        else:
            bar.set_postfix(loss=f"{train_m['loss']:.3f}", val_from=first_validated_epoch(t))
        if live is not None:
            live.next_step()
        stopped = patience_spent(epoch, best["best_epoch"], t)
        save_epoch(resume, live, model, optimizer, scheduler, numpy_rng=rng, epoch=epoch, stopped=stopped, best=best,
                   best_key=list(best_key), best_state=best_state, seconds=earlier_seconds + time.perf_counter() - start,
                   timing=timing, scaler=scaler.state_dict())
        if stopped:
            break
    seconds = earlier_seconds + time.perf_counter() - start
    model.load_state_dict(best_state)
    trained = roi_meter(model, train_loader, len(train), t.images_per_batch, device).tally
    collapsed, unlearned = check_trained(
        trained, params.classes, objects, with_weights_advice(
            f"train longer (train.min_steps or min_steps_rare: the floor now {min_steps}; train.epochs, now "
            f"{t.epochs}; this run made {steps} steps an epoch) or lower train.lr (now {t.lr})", params.model.weights),
        t.allow_collapse)
    best.update(collapsed=collapsed, unlearned_classes=unlearned, train_fg_accuracy=trained.per_class(params.classes),
                train_fg_accuracy_overall=trained.fg_accuracy(),
                train_proposal_recall=training_proposal_recall(model, detector_cls, train, params, device))
    model.eval()
    return {**best, "epochs_run": epochs_run, "seconds": round(seconds, 3),
            "seconds_per_epoch": round(seconds / max(epochs_run, 1), 4), "device": str(device),
            "steps_per_epoch": steps, "train_images": len(train), "val_images": len(val),
            # optimiser steps a second of training (validation excluded), and seconds a scored epoch's
            # validation took; the loader's worker processes (train.workers)
            "steps_per_second": round(timing["steps"] / max(timing["step_seconds"], 1e-9), 4),
            "validation_seconds": round(timing["validation_seconds"] / max(timing["validated_epochs"], 1), 3),
            "workers": workers, "batch_shapes": "grouped" if grouped else "free",
            # derived from the data: how often each class's images are drawn (train.repeat_threshold), the
            # pre-trained backbone's rate as a multiple of train.lr (train.backbone_lr, train.backbone_lr_objects)
            # and the step floor (train.min_steps, train.min_steps_rare, train.rare_class_objects)
            "backbone_lr": backbone_lr, "min_steps": min_steps, "rarest_class_objects": rarest,
            "repeat_factors": {name: round(float(class_repeat[i]), 4) for i, name in enumerate(params.classes, 1)},
            "resumed_from_epoch": resumed_from}


def run_train_stage(params: Params, build: Callable[[Params, float, float], RoIDetector],
                    detector_cls: type[RoIDetection], features_dir: str | Path = "data/features",
                    regions_dir: str | Path = "data/regions", model_path: str | Path = "data/model/model.pt",
                    metrics_path: str | Path = "metrics/train.json", live_dir: str | Path = "dvclive",
                    voc_dir: str | Path = "data/voc", resume_dir: str | Path | None = None) -> dict:
    """Train the model ``build(params, fg_iou, bg_iou)`` makes (validation AP scored with ``detector_cls``), write
    the best checkpoint and ``metrics/train.json``; returns the metrics.

    ``features_dir`` is accepted for the common train-stage signature and not read: a two-stage
    detector computes its features from whole images while it trains. ``resume_dir``: where resume points
    live (:mod:`rcnn.engine.resume`); None keeps none.
    """
    index = read_index(regions_dir, "boxes")
    if list(index.get("classes", [])) != list(params.classes):
        raise RcnnError(f"{Path(regions_dir) / 'index.json'} was made for classes {index.get('classes')} but "
                        f"params say {params.classes}: rerun the regions stage")
    root = voc.find_voc_root(voc_dir)
    difficult = bool(index["difficult_as_foreground"])
    train, val = (training_examples(root, load_boxes(Path(regions_dir) / split / BOXES_FILE, len(params.classes)),
                                    difficult, params.train.bg_iou_low)
                  for split in (params.data.train_split, params.data.val_split))
    if not train or not val:
        raise RcnnError(f"no images to train on ({len(train)} in {params.data.train_split}, {len(val)} in "
                        f"{params.data.val_split}): check the regions stage output in {regions_dir}")
    device = select_device(params.train.device)
    torch.manual_seed(params.seed)  # RoI sampling, dropout, multi-scale sizes
    model = build(params, index["fg_iou"], index["bg_iou"]).to(device)
    point = open_resume_point(resume_dir, params, [regions_dir], voc_dir)
    with stage_live(live_dir, point) as live:  # the curves land only with the model they describe
        summary = fit(model, detector_cls, train, val, params, device, live, point)
        save_roi_detector(model_path, model.cpu(), params, {
            "best_epoch": summary["best_epoch"], "unlearned_classes": [c["class"] for c in summary["unlearned_classes"]],
            "precision": precision_name(device)})  # what validation scored in: loading elsewhere warns
        metrics = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in summary.items()}
        write_json(metrics_path, metrics)
    if point is not None:
        point.clear()
    return metrics
