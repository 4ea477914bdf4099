"""Milliseconds per training step on whatever device this machine has: the project's trainer (Fast and Faster
R-CNN) and torchvision's stock Faster R-CNN on the same images and batches, reading the batches alone, and each
switch of the data path, layout, precision and RoI pooling on and off.

    python bench/steps.py [VOC_DIR --classes C [C ...] --weights W] [--images 16] [--steps 10] [--warmup 3]
                          [--set KEY=VALUE ...] [--out bench/steps]

Without ``VOC_DIR``, a generated synthetic set (seconds to build, random weights). The params are the
``fast-rcnn`` preset's (``faster-rcnn``'s for Faster R-CNN; ``--set`` last); the stock peer is
``bench/stock_peer.py``'s, configured from the same params. Every configuration trains a fresh model from the
same seed on the same plan of batches (the first ``--images`` training images, flips and multi-scale sizes
drawn alike): ``--warmup`` steps untimed, then ``--steps`` timed, loading included, with the device
synchronised at both ends. Switches, each against the default the code picks on this device:
``workers=2`` (reading in two worker processes), ``channels_last`` flipped, ``precision`` flipped between
float32 and bfloat16 autocast, ``batch_shapes`` flipped between free and grouped batches (the same images, grouped
by orientation at one size per batch, padded to canvases; with ``cudnn.benchmark`` on CUDA), and on CUDA
``cudnn_benchmark`` alone. Writes ``results.json`` and ``results.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator
from unittest import mock

import numpy as np
import torch
import yaml
from families import git_commit, save_results  # bench/ is the script's folder
from stock_peer import _batch, build_stock_peer

from rcnn import presets

from rcnn.data import download

from rcnn.modeling import roi_heads, two_stage

from rcnn.engine import two_stage_trainer

from rcnn.data import voc
from rcnn.engine.device import inference_dtype, select_device, training_scaler, tune_for_bounded_shapes, use_channels_last
from rcnn.engine.optim import build_optimizer, build_scheduler
from rcnn.engine.two_stage_batches import (BatchLoader, PlanItem, grouped_batches, loader_workers, orientation_groups,
                                           training_examples, training_plan)
from rcnn.families.fast_rcnn.model import build_fast_rcnn
from rcnn.families.faster_rcnn.model import build_faster_rcnn
from rcnn.pipeline.family_registry import run_proposals_stage, run_regions_stage
from rcnn.pipeline.params import Params, from_dict, set_dotted
from rcnn.proposals.labelling import read_index
from rcnn.proposals.region_boxes import BOXES_FILE, load_boxes
from rcnn.synthetic import generate
from rcnn.utils.errors import run_cli

SYNTHETIC_CLASSES = ["car", "dog", "person"]


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench/steps.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("voc_dir", type=Path, nargs="?", help="a VOC-layout set (default: a synthetic one)")
    parser.add_argument("--classes", nargs="+", default=SYNTHETIC_CLASSES)
    parser.add_argument("--weights", default="none", help="imagenet | none | a local .pth (default none)")
    parser.add_argument("--images", type=int, default=16, help="training images the batches come from")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (allocations, kernel choice)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="params applied last (YAML values)")
    parser.add_argument("--skip-peer", action="store_true")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "steps")
    return parser.parse_args(argv)


def bench_params(args: argparse.Namespace, preset: str, source: Path) -> Params:
    raw = presets.apply({"classes": args.classes, "data": {"source": str(source.resolve()), "splits": ["train", "val"],
                                                           "max_images": args.images},
                         "evaluate": {"split": "val", "allow_overlap": True}}, [preset])  # no split is scored
    weights = str(Path(args.weights).resolve()) if Path(args.weights).is_file() else args.weights
    set_dotted(raw, "model.weights", weights)
    set_dotted(raw, "model.require_weights", weights != "none")
    for option in args.set:
        key, _, value = option.partition("=")
        set_dotted(raw, key, yaml.safe_load(value))
    return from_dict(raw)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


@contextlib.contextmanager
def switched(name: str, device: torch.device) -> Iterator[None]:
    """The code's own choice for ``device`` with the switch ``name`` flipped ("default": nothing flipped)."""
    with contextlib.ExitStack() as stack:
        if name == "channels_last":
            flipped = not use_channels_last(device)
            stack.enter_context(mock.patch.object(two_stage, "use_channels_last", lambda _: flipped))
        elif name == "precision":
            fp32 = inference_dtype(device) == torch.float32
            cast = (lambda _: torch.autocast(device.type, dtype=torch.bfloat16)) if fp32 else \
                (lambda _: contextlib.nullcontext())
            stack.enter_context(mock.patch.object(two_stage_trainer, "inference_autocast", cast))
        elif name == "roi_pooling":
            flipped = not roi_heads.use_gathered_pooling(device)
            stack.enter_context(mock.patch.object(roi_heads, "use_gathered_pooling", lambda _: flipped))
        elif name == "cudnn_benchmark":
            stack.enter_context(mock.patch.object(torch.backends.cudnn, "benchmark", True))
        yield


def switch_label(name: str, device: torch.device) -> str:
    """What the switch sets, in words (the default's value is the code's rule for this device)."""
    if name == "channels_last":
        return "channels-last " + ("off" if use_channels_last(device) else "on")
    if name == "precision":
        return "bfloat16 autocast" if inference_dtype(device) == torch.float32 else "float32 (no autocast)"
    if name == "roi_pooling":
        return "torchvision's RoIAlign" if roi_heads.use_gathered_pooling(device) else "gathered RoIAlign"
    if name == "batch_shapes":
        return "free batches" if grouped_batches("auto", device) else "grouped batches"
    return {"workers": "2 loader workers", "cudnn_benchmark": "cudnn.benchmark on", "default": "default"}[name]


def time_steps(step: Callable[[list[list[PlanItem]]], None], plan: list[list[PlanItem]], warmup: int,
               device: torch.device) -> float:
    """Milliseconds per step over the plan's batches after the first ``warmup``."""
    step(plan[:warmup])
    synchronize(device)
    start = time.perf_counter()
    step(plan[warmup:])
    synchronize(device)
    return 1000 * (time.perf_counter() - start) / max(len(plan) - warmup, 1)


def examples_of(params: Params, regions: Path, root: Path) -> list:
    """The training examples the train stage would build from ``regions`` (as :mod:`rcnn.engine.two_stage_trainer`)."""
    index = read_index(regions, "boxes")
    return training_examples(root, load_boxes(regions / "train" / BOXES_FILE, len(params.classes)),
                             bool(index["difficult_as_foreground"]), params.train.bg_iou_low)


def ours(params: Params, build: Callable, regions: Path, root: Path, plan: list[list[PlanItem]], warmup: int,
         device: torch.device, workers: int, grouped: bool) -> float:
    """ms per step of the project's trainer (:func:`rcnn.engine.two_stage_trainer.train_epoch`) on ``plan``, its
    images ``grouped`` (as the trainer groups them) or not."""
    index = read_index(regions, "boxes")
    examples = examples_of(params, regions, root)
    torch.manual_seed(params.seed)
    model = build(params, index["fg_iou"], index["bg_iou"]).to(device)
    optimizer = build_optimizer(model.parameters(), params.train, model.body.parameters(), params.train.backbone_lr)
    scheduler = build_scheduler(optimizer, len(plan), params.train)
    loader = BatchLoader(examples, workers, device)
    meter = two_stage_trainer._Meter(params.num_classes, device)
    scaler, canvas = training_scaler(device), two_stage_trainer.CANVAS if grouped else 0
    if grouped:
        plan = grouped_plan(plan, examples, model.train_sizes, params.seed)
        tune_for_bounded_shapes(device)

    def step(batches: list[list[PlanItem]]) -> None:
        two_stage_trainer.train_epoch(model, loader(batches), optimizer, scheduler, device, meter, 1, params.train.lr,
                                      scaler, canvas)
        meter.result()  # the epoch's one read of the device
    try:
        return time_steps(step, plan, warmup, device)
    finally:
        torch.backends.cudnn.benchmark = False


def grouped_plan(plan: list[list[PlanItem]], examples: list, sizes: tuple[int, ...],
                 seed: int) -> list[list[PlanItem]]:
    """``plan``'s images, as many batches, grouped by orientation at one training size per batch."""
    items = [item for batch in plan for item in batch]
    regrouped = training_plan(len(items), len(plan[0]), np.random.default_rng(seed),
                              groups=orientation_groups([examples[item.index] for item in items]), sizes=sizes)
    return [[items[item.index]._replace(size=item.size) for item in batch] for batch in regrouped]


def peer(params: Params, root: Path, plan: list[list[PlanItem]], ids: list[str], warmup: int,
         device: torch.device) -> float:
    """ms per step of torchvision's stock Faster R-CNN on the same images, flips and batch size."""
    by_id = {a.image_id: a for a in voc.load_split(root, params.data.train_split, params.classes, "skip")}
    annotations = [by_id[i] for i in ids]
    dtype = inference_dtype(device)
    model = build_stock_peer(params, None if dtype == torch.float32 else dtype).to(device)
    model.transform.min_size = tuple(params.train.image_sizes) or (params.model.image_size,)
    optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad], params.train)
    model.train()

    def step(batches: list[list[PlanItem]]) -> None:
        for batch in batches:
            order, flips = np.array([item.index for item in batch]), [item.flips for item in batch]
            images, targets = _batch(root, annotations, order, flips, device)
            loss = sum(model(images, targets).values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return time_steps(step, plan, warmup, device)


def loading(regions: Path, root: Path, params: Params, plan: list[list[PlanItem]], warmup: int,
            device: torch.device, workers: int) -> float:
    """ms per batch of reading, decoding and flipping alone (what a step waits for with no workers)."""
    loader = BatchLoader(examples_of(params, regions, root), workers, device)
    return time_steps(lambda batches: [None for _ in loader(batches)], plan, warmup, device)


def main(argv: list[str]) -> dict[str, Any]:
    args = parse_args(argv)
    commit = git_commit()
    device = select_device("auto")
    switches = ["default", "workers", "channels_last", "precision", "batch_shapes", "roi_pooling"] + (
        ["cudnn_benchmark"] if device.type == "cuda" else [])
    rows: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="rcnn-steps-") as tmp:
        work = Path(tmp)
        source = args.voc_dir or generate(work / "synthetic" / "VOC2007", images=max(args.images, 8) * 2, seed=0)
        for preset, family, build in (("fast-rcnn", "fast_rcnn", build_fast_rcnn),
                                      ("faster-rcnn", "faster_rcnn", build_faster_rcnn)):
            params = bench_params(args, preset, source)
            d = work / family
            download.prepare_voc(params.data, d / "voc", d / ".downloads")
            run_proposals_stage(params, d / "voc", d / "proposals", d / "proposals.json")
            run_regions_stage(params, d / "voc", d / "proposals", d / "regions", d / "regions.json")
            root = voc.find_voc_root(d / "voc")
            boxes = load_boxes(d / "regions" / "train" / BOXES_FILE, len(params.classes))
            plan = training_plan(len(boxes), params.train.images_per_batch, np.random.default_rng(params.seed),
                                 steps=args.warmup + args.steps)[:args.warmup + args.steps]
            if family == "fast_rcnn":
                for workers in (0, 2):
                    rows[f"reading batches, {workers} workers"] = {
                        "ms_per_step": loading(d / "regions", root, params, plan, args.warmup, device, workers)}
            for name in switches:
                with switched(name, device):
                    grouped = grouped_batches(params.train.batch_shapes, device) != (name == "batch_shapes")
                    ms = ours(params, build, d / "regions", root, plan, args.warmup, device,
                              2 if name == "workers" else loader_workers(params.train.workers, device), grouped)
                rows[f"{family}, {switch_label(name, device)}"] = {"family": family, "switch": name, "ms_per_step": ms}
                print(f"[steps] {family} {switch_label(name, device)}: {ms:.1f} ms/step", flush=True)
            if family == "faster_rcnn" and not args.skip_peer:
                ms = peer(params, root, plan, [b.image_id for b in boxes], args.warmup, device)
                rows["stock torchvision Faster R-CNN"] = {"family": "stock_peer", "switch": "peer", "ms_per_step": ms}
    for row in rows.values():
        row["ms_per_step"] = round(row["ms_per_step"], 2)
    results = {"rows": rows, "device": str(device), "device_name": device_name(device), "commit": commit,
               "command": " ".join(["python", "bench/steps.py", *argv]), "images": args.images, "steps": args.steps,
               "warmup": args.warmup, "threads": torch.get_num_threads(), "dataset": str(args.voc_dir or "synthetic"),
               "inference_dtype": str(inference_dtype(device)), "channels_last": use_channels_last(device)}
    save_results(args.out, results, markdown(results))
    return results


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type}, {torch.get_num_threads()} threads"


def markdown(results: dict[str, Any]) -> str:
    """One row per configuration with its ms per step and its ratio to the family's default (the stock peer's to
    the project's Faster R-CNN)."""
    lines = [f"Device: {results['device_name']}; {results['dataset']}, {results['images']} images, "
             f"{results['steps']} timed steps after {results['warmup']}; commit {results['commit']}.", "",
             "| configuration | ms per step | vs the family's default |", "|---|---:|---:|"]
    defaults = {r["family"]: r["ms_per_step"] for r in results["rows"].values() if r.get("switch") == "default"}
    defaults["stock_peer"] = defaults.get("faster_rcnn")
    for name, row in results["rows"].items():
        base = defaults.get(row.get("family"))
        ratio = f"{row['ms_per_step'] / base:.2f}x" if base else "–"
        lines.append(f"| {name} | {row['ms_per_step']:.1f} | {ratio} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]))
