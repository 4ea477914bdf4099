"""Training R-CNN's region classifier, reproducibly.

Frozen backbone (``model.trainable_layers = 0``): only the head is trained, on the features the
features stage cached, so an epoch over tens of thousands of regions takes seconds. Otherwise the
last ``trainable_layers`` backbone units are fine-tuned end to end on crops warped on the fly
from proposals drawn afresh every epoch (:mod:`rcnn.families.rcnn.finetune`), frozen units' BatchNorm kept in
eval mode, bfloat16 autocast where the hardware has it. Then the final classifier: the softmax
head, or per-class SVMs (:mod:`rcnn.families.rcnn.svm`), retrained over ``train.hard_negative_rounds`` rounds of
hard-negative mining (:mod:`rcnn.families.rcnn.hard_negatives`), kept as configured or, with
``train.classifier_choice: validation``, only where it beats the softmax head on validation AP; then box
regression on the final features.

Class-weighted cross-entropy (background vs objects), Adam or SGD (:mod:`rcnn.engine.optim`), early stopping on the validation
loss (or AP, when fine-tuning) with the best state kept, scored from the epoch ``train.val_start`` sets on;
seeded model init, sampling, dropout and flips, so the same params give the same metrics. Per-epoch curves go to dvclive, the best epoch's numbers to
``metrics/train.json`` and the best model to ``data/model/model.pt``, unless the final classifier
labels no foreground of its training regions correctly (:mod:`rcnn.evaluation.class_accuracy`): then the stage
stops instead, and ``metrics/train.json`` reports each class's foreground accuracy either way.
"""

from __future__ import annotations

import copy
import functools
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from dvclive import Live
from torch import nn
from tqdm import tqdm

from rcnn.data import voc
from rcnn.engine.device import precision_name, select_device
from rcnn.engine.optim import build_optimizer, build_scheduler, first_validated_epoch, patience_spent
from rcnn.engine.resume import ResumePoint, open_resume_point, restore_training, save_epoch, stage_live
from rcnn.evaluation.class_accuracy import (ClassTally, check_trained, check_training_objects, objects_per_class,
                                            with_weights_advice)
from rcnn.families.rcnn import features as features_mod
from rcnn.families.rcnn import regions
from rcnn.families.rcnn.bbox_regression import fit_box_regressor
from rcnn.families.rcnn.finetune import ProposalSampler
from rcnn.families.rcnn.hard_negatives import already_sampled, hard_score, mine_hard_negatives, negative_pool, pool_scores
from rcnn.families.rcnn.model import RegionClassifier, build_model, save_checkpoint
from rcnn.families.rcnn.svm import fit_svms, svm_margins
from rcnn.families.rcnn.train_data import (TrainData, ValidationAP, cached_feature_data, finetune_data, labelled_boxes,
                                           validation_ap)
from rcnn.pipeline.params import Params, to_dict
from rcnn.proposals import labelling
from rcnn.proposals.region_boxes import ImageBoxes
from rcnn.utils.errors import RcnnError
from rcnn.utils.fileio import write_json

METRIC_NAMES = ("loss", "accuracy", "fg_accuracy")


def class_weights(params: Params) -> torch.Tensor:
    """Cross-entropy weights: ``train.background_weight`` for class 0, ``train.object_weight`` for objects."""
    return torch.tensor([params.train.background_weight] + [params.train.object_weight] * len(params.classes),
                        dtype=torch.float32)


class _Meter:
    """Epoch totals: weighted loss (as the whole-epoch weighted mean), accuracy, foreground accuracy (overall
    and per class)."""

    def __init__(self, num_labels: int) -> None:
        self.loss = self.weight = 0.0
        self.tally = ClassTally(num_labels)

    def add(self, logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> None:
        with torch.no_grad():
            self.loss += nn.functional.cross_entropy(logits.float(), labels, weight=weights, reduction="sum").item()
            self.weight += weights[labels].sum().item()
            self.tally.add(logits.argmax(dim=1), labels)

    def result(self) -> dict[str, float]:
        return {"loss": self.loss / max(self.weight, 1e-12),
                "accuracy": int(self.tally.correct.sum()) / max(int(self.tally.seen.sum()), 1),
                "fg_accuracy": self.tally.fg_accuracy()}


def fit(model: RegionClassifier, data: TrainData, params: Params, device: torch.device,
        live: Live | None = None, resume: ResumePoint | None = None) -> dict[str, Any]:
    """Train with early stopping; ``model`` ends holding the best epoch's state. Returns a summary.

    With ``resume``, every finished epoch is saved there, and a saved state is continued from.
    """
    t = params.train
    weights = class_weights(params).to(device)
    learned = model.head if data.head_only else model  # the part that learns, whose best state is kept
    optimizer = build_optimizer(learned.parameters(), t)
    scheduler = build_scheduler(optimizer, data.steps_per_epoch, t)
    best: dict[str, Any] = {"best_epoch": 0}
    best_key = (float("-inf"), float("-inf"))
    best_state: dict[str, torch.Tensor] = {}
    start, epochs_run, resumed_from, stopped, earlier_seconds = time.perf_counter(), 0, None, False, 0.0
    loop = restore_training(resume, learned, optimizer, scheduler, generator=data.generator)
    if loop is not None:
        best, best_key, best_state = loop["best"], tuple(loop["best_key"]), loop["best_state"]
        epochs_run = resumed_from = int(loop["epoch"])
        stopped, earlier_seconds = bool(loop["stopped"]), float(loop["seconds"])
    bar = tqdm(range(epochs_run + 1, t.epochs + 1 if not stopped else epochs_run + 1), desc="train", unit="epoch",
               initial=epochs_run, total=t.epochs)
    for epoch in bar:
        model.train()
        train_meter = _Meter(params.num_classes)
        for x, y in data.train_batches(epoch):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            logits = data.logits(model, x)
            loss = nn.functional.cross_entropy(logits.float(), y, weight=weights)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            train_meter.add(logits.detach(), y, weights)
        model.eval()
        train_m = train_meter.result()
        epochs_run = epoch
        if live is not None:
            for name in METRIC_NAMES:
                live.log_metric(f"train/{name}", train_m[name])
        if epoch >= first_validated_epoch(t):
            val_meter = _Meter(params.num_classes)
            with torch.inference_mode():
                for x, y in data.val_batches():
                    x, y = x.to(device), y.to(device)
                    val_meter.add(data.logits(model, x), y, weights)
            val_m = val_meter.result()
            if data.val_ap is not None:
                val_m.update(data.val_ap(model))
            if live is not None:
                for name in (*METRIC_NAMES, "map"):
                    if name in val_m:
                        live.log_metric(f"val/{name}", val_m[name])
            # The best epoch: highest validation AP when scored (then lowest loss), else lowest loss.
            key = (val_m.get("map", 0.0), -val_m["loss"])
            if math.isfinite(val_m["loss"]) and key > best_key:
                best_key = key
                best = {"best_epoch": epoch, **{f"val_{k}": v for k, v in val_m.items() if k != "fg_accuracy"},
                        "val_fg_accuracy": val_meter.tally.per_class(params.classes),
                        "val_fg_accuracy_overall": val_m["fg_accuracy"],
                        **{f"train_{k}": v for k, v in train_m.items() if k != "fg_accuracy"}}
                best_state = copy.deepcopy(learned.state_dict())
            bar.set_postfix(train_loss=f"{train_m['loss']:.4f}", val_loss=f"{val_m['loss']:.4f}",
                            best=best["best_epoch"])
        else:
            bar.set_postfix(train_loss=f"{train_m['loss']:.4f}", val_from=first_validated_epoch(t))
        if live is not None:
            live.next_step()
        stopped = patience_spent(epoch, best["best_epoch"], t)
        save_epoch(resume, live, learned, optimizer, scheduler, generator=data.generator, epoch=epoch, stopped=stopped, best=best,
                   best_key=list(best_key), best_state=best_state, seconds=earlier_seconds + time.perf_counter() - start)
        if stopped:
            break
    seconds = earlier_seconds + time.perf_counter() - start
    if best["best_epoch"] == 0:
        raise RcnnError(f"training diverged: the validation loss was never finite; lower train.lr (now {t.lr})")
    learned.load_state_dict(best_state)
    model.eval()
    return {**best, "epochs_run": epochs_run, "seconds": round(seconds, 3),
            "seconds_per_epoch": round(seconds / max(epochs_run, 1), 4), "device": str(device),
            "train_regions": data.train_size, "val_regions": data.val_size, "resumed_from_epoch": resumed_from}


def _check_features_info(info: dict[str, Any], params: Params, features_dir: Path) -> None:
    """Cached features must come from the backbone the train stage is about to save."""
    m = params.model
    wanted = {"backbone": m.backbone, "weights": m.weights, "cached": True}
    if m.weights == "none":
        wanted["seed"] = params.seed
    for key, value in wanted.items():
        if info.get(key) != value:
            raise RcnnError(f"{features_dir / 'info.json'} has {key} = {info.get(key)!r} but params say "
                            f"{value!r}: rerun the features stage")


def fit_classifier(model: RegionClassifier, train: dict[str, np.ndarray], val: dict[str, np.ndarray],
                   params: Params, device: torch.device, live: Live | None, root: Path,
                   items: list[ImageBoxes], regions_dir: str | Path) -> tuple[dict[str, torch.Tensor] | None, dict[str, Any]]:
    """The final classifier on ``train``'s features: the softmax head as trained, or SVMs; each retrained
    over ``train.hard_negative_rounds`` rounds of mining. Returns the SVMs (None for softmax) and a summary."""
    t = params.train
    x, y = train["features"], train["labels"]
    svm = fit_svms(x, y, params.num_classes, t.svm_c) if params.model.classifier == "svm" else None
    summary: dict[str, Any] = {"classifier": params.model.classifier, "hard_negative_rounds": t.hard_negative_rounds}
    if t.hard_negative_rounds == 0:
        return svm, summary
    start = time.perf_counter()
    mined, mined_scores = [], []
    with tempfile.TemporaryDirectory(prefix="rcnn-pool-") as scratch:
        settings = regions.region_settings(regions_dir)
        pool = negative_pool(model, root, items, settings.crop_size, settings.context, device,
                             t.feature_batch_size, Path(scratch), max_rank=params.evaluate.max_proposals)
        summary["pool_regions"], summary["pool_seconds"] = len(pool.boxes), round(time.perf_counter() - start, 3)
        taken = already_sampled(pool, items, train["image_ids"], train["boxes"], train["labels"])
        summary["already_in_training_set"] = int(taken.sum())
        for _ in tqdm(range(t.hard_negative_rounds), desc="hard-negative rounds", unit="round"):
            scores = pool_scores(pool, lambda f: _object_scores(model, svm, f, device))
            new = mine_hard_negatives(scores, pool.image_index, taken, settings.max_boxes,
                                      hard_score(svm is not None, params.evaluate.score_threshold))
            taken[new] = True
            mined.append(len(new))
            mined_scores.append(round(float(scores[new].mean()), 6) if len(new) else None)
            x = np.concatenate([x, np.asarray(pool.features[new], np.float32)])
            y = np.concatenate([y, np.zeros(len(new), y.dtype)])
            if svm is not None:
                svm = fit_svms(x, y, params.num_classes, t.svm_c)
            else:
                refit = fit(model, cached_feature_data({"features": x, "labels": y}, val, t.batch_size, params.seed,
                                                       device), params, device, live)
                summary["refit_val_loss"] = round(refit["val_loss"], 6)
    summary.update(mined_per_round=mined, mined_mean_score=mined_scores,
                   seconds=round(time.perf_counter() - start, 3))
    return svm, summary


def _keep_better_on_validation(model: RegionClassifier, svm: dict[str, torch.Tensor] | None, classifier: dict[str, Any],
                               softmax_head: dict[str, torch.Tensor], softmax_ap: dict[str, float],
                               val_ap: ValidationAP) -> tuple[dict[str, torch.Tensor] | None, dict[str, Any]]:
    """``train.classifier_choice: validation``: the retrained classifier (SVMs, hard negatives) stays only where
    its validation AP (all-point, as the best epoch is chosen) beats the softmax head it started from; else
    that head is put back. Both APs and the choice go into ``classifier``."""
    retrained_ap = val_ap(model, svm)
    keep = retrained_ap["map"] > softmax_ap["map"]
    choice = {"choice": "validation", "kept": "retrained" if keep else "softmax head",
              "val_ap_softmax_head": {k: round(v, 6) for k, v in softmax_ap.items()},
              "val_ap_retrained": {k: round(v, 6) for k, v in retrained_ap.items()}}
    if keep:
        return svm, {**classifier, **choice}
    model.head.load_state_dict(softmax_head)
    return None, {**classifier, **choice, "classifier": "softmax"}


def _object_scores(model: RegionClassifier, svm: dict[str, torch.Tensor] | None, feats: np.ndarray,
                   device: torch.device) -> np.ndarray:
    """The highest object-class score of each feature row (SVM margin or softmax probability)."""
    with torch.inference_mode():
        f = torch.from_numpy(feats)
        if svm is not None:
            return svm_margins(svm, f).max(dim=1).values.numpy()
        probs = torch.softmax(model.classify_features(f.to(device)).float(), dim=1).cpu()
        return probs[:, 1:].max(dim=1).values.numpy()


def _final_tally(model: RegionClassifier, svm: dict[str, torch.Tensor] | None, feats: dict[str, np.ndarray],
                 num_labels: int, device: torch.device) -> ClassTally:
    """How the final classifier labels ``feats``' regions: the softmax's most likely class, or the SVM with
    the highest margin when that margin is positive (background otherwise)."""
    tally = ClassTally(num_labels)
    x, labels = feats["features"], torch.from_numpy(np.asarray(feats["labels"], np.int64))
    with torch.inference_mode():
        for s in range(0, len(labels), 4096):
            f = torch.from_numpy(np.ascontiguousarray(x[s:s + 4096], np.float32))
            if svm is not None:
                margins = svm_margins(svm, f)
                best = margins.max(dim=1)
                predicted = torch.where(best.values > 0, best.indices + 1, 0)
            else:
                predicted = model.classify_features(f.to(device)).argmax(dim=1).cpu()
            tally.add(predicted, labels[s:s + 4096])
    return tally


def run_train_stage(params: Params, features_dir: str | Path = "data/features",
                    regions_dir: str | Path = "data/regions", model_path: str | Path = "data/model/model.pt",
                    metrics_path: str | Path = "metrics/train.json", live_dir: str | Path = "dvclive",
                    voc_dir: str | Path = "data/voc", resume_dir: str | Path | None = None) -> dict:
    """Train, write the best checkpoint and ``metrics/train.json``; returns the metrics.

    ``resume_dir``: where resume points live (:mod:`rcnn.engine.resume`; the main training's epochs, after
    which hard-negative rounds and SVMs are recomputed); None keeps none.
    """
    features_dir = Path(features_dir)
    index = labelling.read_index(regions_dir)
    device = select_device(params.train.device)
    torch.manual_seed(params.seed)  # dropout
    model = build_model(params).to(device)
    m, t = params.model, params.train
    train_split, val_split = params.data.train_split, params.data.val_split
    # Fine-tuning and mining warp crops of any proposal of the training images from the images themselves;
    # choosing the classifier on validation AP detects on the validation images.
    retrains = m.classifier == "svm" or t.hard_negative_rounds > 0
    chooses = retrains and t.classifier_choice == "validation"
    reads_images = not model.frozen or t.hard_negative_rounds > 0 or chooses
    root = voc.find_voc_root(voc_dir) if reads_images else Path(voc_dir)
    items = labelled_boxes(regions_dir, train_split) if reads_images else []
    extra: dict[str, Any] = {}
    objects = objects_per_class([item.gt_labels[~item.gt_difficult] for item in (items or labelled_boxes(
        regions_dir, train_split))], params.num_classes)
    check_training_objects(objects, params.classes, train_split)
    point = open_resume_point(resume_dir, params, [regions_dir, features_dir], voc_dir)
    with stage_live(live_dir, point) as live:
        if model.frozen:
            _check_features_info(features_mod.read_info(features_dir), params, features_dir)
            train = features_mod.load_features(features_dir, train_split, params.num_classes)
            val = features_mod.load_features(features_dir, val_split, params.num_classes)
            if train["features"].shape[1] != model.feature_dim:
                raise RcnnError(f"{features_dir / (train_split + '.npz')} has {train['features'].shape[1]}-d "
                                f"features, {m.backbone} gives {model.feature_dim}: rerun the features stage")
            data = cached_feature_data(train, val, t.batch_size, params.seed, device)
        else:
            sampler = ProposalSampler(root, items, regions.region_settings(regions_dir), t, params.seed)
            data = finetune_data(sampler, regions_dir, root, params, device)
            extra = {"pool_regions": sampler.pool_size, "regions_per_epoch": data.train_size}
        if data.train_size == 0 or data.val_size == 0:
            raise RcnnError(f"no regions to train on ({data.train_size} in {train_split}, {data.val_size} in "
                            f"{val_split}): check the regions stage output in {regions_dir}")
        summary = fit(model, data, params, device, live, point)
        if not model.frozen:
            # The final backbone's features of the regions stage's samples.
            train = features_mod.split_features(model, regions_dir, train_split, device, t.feature_batch_size)
            val = features_mod.split_features(model, regions_dir, val_split, device, t.feature_batch_size)
        regressor = None  # fitted on the final backbone's features; the classifier does not change it
        if m.bbox_regression:
            regressor = fit_box_regressor(train["features"], train["labels"], train["boxes"], train["gt_boxes"],
                                          train["ious"], params.num_classes, min_iou=t.bbox_iou,
                                          ridge_lambda=t.bbox_lambda)
        svm, classifier = None, {"classifier": m.classifier, "hard_negative_rounds": 0}
        if retrains:
            val_ap = softmax_ap = None
            if chooses:
                scorer = data.val_ap or validation_ap(regions_dir, root, params, device)
                val_ap = functools.partial(scorer, regressor=regressor)
                # The softmax head as trained: the best epoch's validation AP where fine-tuning scored it.
                softmax_ap = ({"map": summary["val_map"], "map07": summary["val_map07"]} if data.val_ap
                              else val_ap(model))
            softmax_head = copy.deepcopy(model.head.state_dict())
            svm, classifier = fit_classifier(model, train, val, params, device, live, root, items, regions_dir)
            if val_ap is not None:
                svm, classifier = _keep_better_on_validation(model, svm, classifier, softmax_head, softmax_ap, val_ap)
        # Checked, saved and written inside the block: the curves land only with the model they describe.
        trained = _final_tally(model, svm, train, params.num_classes, device)
        collapsed, unlearned = check_trained(
            trained, params.classes, objects, with_weights_advice(
                f"train longer (train.epochs, now {t.epochs}; train.patience, now {t.patience}), another train.lr "
                f"(now {t.lr}) or more weight on objects (train.object_weight, now {t.object_weight})",
                params.model.weights), t.allow_collapse)
        summary.update(collapsed=collapsed, unlearned_classes=unlearned, train_fg_accuracy=trained.per_class(params.classes),
                       train_fg_accuracy_overall=trained.fg_accuracy())
        validated = _final_tally(model, svm, val, params.num_classes, device)
        summary.update(val_fg_accuracy=validated.per_class(params.classes),
                       val_fg_accuracy_overall=validated.fg_accuracy())
        meta = {"classes": list(params.classes), "crop_size": index["crop_size"], "context": index["context"],
                "params": to_dict(params), "weights": m.weights, "bbox_regressor": regressor,
                "classifier": classifier["classifier"], "svm": svm, "best_epoch": summary["best_epoch"],
                "unlearned_classes": [c["class"] for c in unlearned], "precision": precision_name(device)}
        save_checkpoint(model_path, model.cpu(), meta)
        metrics = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in {**summary, **extra}.items()}
        metrics["final_classifier"] = classifier
        write_json(metrics_path, metrics)
    if point is not None:
        point.clear()
    return metrics
