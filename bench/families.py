"""Detector families side by side on one dataset: R-CNN and Fast R-CNN (this pipeline) and the peer,
torchvision's Faster R-CNN with the same backbone and weights, all scored by the project's evaluator.

    python bench/families.py VOC_DIR --classes kangaroo --weights mobilenet_v2.pth --split test \
        [--presets rcnn-best fast-rcnn fast-cpu+paper] [--set KEY=VALUE ...] [--seeds N] [--peer-epochs 8]
        [--skip-peer] [--out bench/families]

Each preset runs the whole pipeline in a temporary folder (download from the local folder,
proposals, regions, features, train, evaluate: the stage functions ``dvc repro`` calls) and
reports AP07, AP (mean ± sd over ``--seeds`` full runs, seeds 0..N-1, with each run's 95% bootstrap
interval over the test images), training seconds, detection seconds per image without and with selective
search, and whole-pipeline seconds. The peer trains on the same train split (its own RPN, no
selective search; SGD 0.01, momentum 0.9, batch 2, horizontal flips, shorter side 480, anchors
32-512, the upper half of the backbone trained) and is evaluated on the same split. Writes
``results.json`` and ``results.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torchvision
import yaml
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.ops import MultiScaleRoIAlign
from tqdm import tqdm

from rcnn import download, features, presets, proposals, voc
from rcnn.boxes import INCLUSIVE_SHIFT, clip_boxes
from rcnn.bootstrap import map_intervals
from rcnn.detection import run_evaluate_stage
from rcnn.detectors import run_regions_stage, run_train_stage
from rcnn.errors import run_cli
from rcnn.evaluation import Detections, evaluate_detections
from rcnn.fast_rcnn import flip_boxes, image_tensor
from rcnn.fileio import atomic_path, write_json
from rcnn.model import backbone_units, build_backbone, inference_autocast, inference_dtype, select_device
from rcnn.params import Params, from_dict, set_dotted

PEER_SIZE, PEER_MAX_SIZE = 480, 800


def pipeline(params: Params, work: Path) -> dict[str, Any]:
    """Every stage of the pipeline in ``work``, timed; returns the row of the results table."""
    seconds: dict[str, float] = {}

    def stage(name: str, fn) -> Any:  # noqa: ANN001
        start = time.perf_counter()
        out = fn()
        seconds[name] = round(time.perf_counter() - start, 2)
        return out

    d = work / "data"
    stage("download", lambda: download.prepare_voc(params.data, d / "voc", d / ".downloads"))
    props = stage("proposals", lambda: proposals.run_proposals_stage(params, d / "voc", d / "proposals",
                                                                     work / "proposals.json"))
    stage("regions", lambda: run_regions_stage(params, d / "voc", d / "proposals", d / "regions",
                                               work / "regions.json"))
    stage("features", lambda: features.run_features_stage(params, d / "regions", d / "features"))
    stage("train", lambda: run_train_stage(params, d / "features", d / "regions", d / "model.pt",
                                           work / "train.json", work / "dvclive", d / "voc"))
    result = stage("evaluate", lambda: run_evaluate_stage(params, d / "voc", d / "proposals", d / "model.pt",
                                                          d / "detections", work / "eval.json", work / "pr"))
    eval_file = props["files"][f"{params.evaluate.split}-{params.proposals.eval_mode}"]
    # The stage searched n_jobs images at once; one image alone takes n_jobs / throughput seconds.
    search = int(props.get("n_jobs", 1)) / eval_file["images_per_second"]
    detect = result["seconds_per_image"]
    return {"map07": result["map07"], "map": result["map"], "map07_ci95": result["map07_ci95"],
            "map_ci95": result["map_ci95"], "seed": params.seed, "train_seconds": seconds["train"],
            "detect_s_per_image": detect, "search_s_per_image": round(search, 4),
            "detect_with_search_s_per_image": round(detect + search, 4),
            "pipeline_seconds": round(sum(seconds.values()), 1), "stage_seconds": seconds}


class _Peer:
    """torchvision's Faster R-CNN on the backbone's stride-32 map, trained the way the issue describes."""

    def __init__(self, backbone: str, weights: str, num_classes: int, seed: int) -> None:
        torch.manual_seed(seed)
        trunk, dim = build_backbone(backbone, weights)
        units = backbone_units(trunk)
        trunk.requires_grad_(False)
        for unit in units[len(units) // 2:]:  # the upper half trains
            for module in unit:
                module.requires_grad_(True)
        body = trunk.features if hasattr(trunk, "features") else torch.nn.Sequential(
            *[getattr(trunk, n) for n in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")])
        body.out_channels = dim
        anchors = AnchorGenerator(sizes=((32, 64, 128, 256, 512),), aspect_ratios=((0.5, 1.0, 2.0),))
        self.model = FasterRCNN(body, num_classes=num_classes + 1, rpn_anchor_generator=anchors,
                                box_roi_pool=MultiScaleRoIAlign(["0"], 7, 2), min_size=PEER_SIZE,
                                max_size=PEER_MAX_SIZE, box_score_thresh=0.05, box_nms_thresh=0.3,
                                box_detections_per_img=100)

    def fit(self, root: Path, annotations: list[voc.Annotation], epochs: int, seed: int,
            device: torch.device) -> float:
        model = self.model.to(device)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=0.0005)
        steps = epochs * -(-len(annotations) // 2)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 if s < 0.75 * steps else 0.1)
        rng = np.random.default_rng(seed)
        start = time.perf_counter()
        for epoch in tqdm(range(epochs), desc="faster r-cnn", unit="epoch"):
            model.train()
            order = rng.permutation(len(annotations))
            for i in range(0, len(order), 2):
                images, targets = [], []
                for k in order[i:i + 2]:
                    ann = annotations[k]
                    image = image_tensor(voc.read_image(voc.image_path(root, ann.image_id)))
                    keep = ~ann.difficult
                    boxes = torch.from_numpy(ann.boxes[keep] + INCLUSIVE_SHIFT)
                    if rng.random() < 0.5:
                        width = image.shape[-1]
                        image = image.flip(-1)
                        boxes = flip_boxes(boxes, width)
                    images.append(image.to(device))
                    targets.append({"boxes": boxes.to(device), "labels": torch.from_numpy(ann.labels[keep]).to(device)})
                with inference_autocast(device):
                    losses = model(images, targets)
                loss = sum(losses.values())
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
        return time.perf_counter() - start

    def evaluate(self, root: Path, annotations: list[voc.Annotation], classes: Sequence[str],
                 device: torch.device) -> tuple[dict[str, float], float]:
        model = self.model.eval()
        found = {}
        start = time.perf_counter()
        with torch.inference_mode(), inference_autocast(device):
            for ann in tqdm(annotations, desc="faster r-cnn detect", unit="img"):
                image = voc.read_image(voc.image_path(root, ann.image_id))
                out = model([image_tensor(image).to(device)])[0]
                boxes = clip_boxes(out["boxes"].float().cpu().numpy() - INCLUSIVE_SHIFT, image.shape[1], image.shape[0])
                found[ann.image_id] = Detections(boxes, out["scores"].float().cpu().numpy(),
                                                 out["labels"].cpu().numpy().astype(np.int64))
        seconds = (time.perf_counter() - start) / max(len(annotations), 1)
        result = evaluate_detections(found, annotations, classes)
        return {"map07": result.map07, "map": result.map, **map_intervals(result)}, seconds


def peer(params: Params, work: Path, epochs: int) -> dict[str, Any]:
    """Train and evaluate the Faster R-CNN peer on the splits ``params`` names."""
    root = voc.find_voc_root(work / "data" / "voc")
    device = select_device(params.train.device)
    train = voc.load_split(root, params.data.train_split, params.classes, params.data.on_bad_annotation)
    test = voc.load_split(root, params.evaluate.split, params.classes, "skip")
    model = _Peer(params.model.backbone, params.model.weights, len(params.classes), params.seed)
    train_seconds = model.fit(root, train, epochs, params.seed, device)
    scores, per_image = model.evaluate(root, test, params.classes, device)
    return {**scores, "seed": params.seed, "train_seconds": round(train_seconds, 1),
            "detect_s_per_image": round(per_image, 4),
            "search_s_per_image": 0.0, "detect_with_search_s_per_image": round(per_image, 4),
            "pipeline_seconds": None, "epochs": epochs}


SECONDS_KEYS = ("train_seconds", "detect_s_per_image", "search_s_per_image", "detect_with_search_s_per_image",
                "pipeline_seconds")


def seed_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One row over seeds: AP07 and AP as mean and sample sd (None for one seed), every run's bootstrap
    interval, mean seconds; the runs themselves under ``runs``. Nested rows (``plain``) likewise."""
    out: dict[str, Any] = {"seeds": [r.get("seed") for r in runs], "runs": runs}
    for key in ("map07", "map"):
        values = np.array([r[key] for r in runs], np.float64)
        out[key] = round(float(values.mean()), 6)
        out[f"{key}_sd"] = round(float(values.std(ddof=1)), 6) if len(values) > 1 else None
        out[f"{key}_ci95"] = [r[f"{key}_ci95"] for r in runs]
    for key in SECONDS_KEYS:
        values = [r[key] for r in runs if r.get(key) is not None]
        out[key] = round(float(np.mean(values)), 4) if values else None
    if "plain" in runs[0]:
        out["plain"] = seed_summary([r["plain"] for r in runs])
    return out


def ap_cell(row: dict[str, Any], key: str) -> str:
    """``0.562 ± 0.012`` over seeds (``0.562`` for one seed)."""
    sd = row.get(f"{key}_sd")
    return f"{row[key]:.3f}" + ("" if sd is None else f" ± {sd:.3f}")


def intervals_cell(row: dict[str, Any], key: str = "map07") -> str:
    """Each run's 95% bootstrap interval, ``[0.45, 0.66]``."""
    return " ".join(f"[{low:.2f}, {high:.2f}]" for low, high in row[f"{key}_ci95"])


def markdown(results: dict[str, Any]) -> str:
    lines = ["| detector | AP07 | AP | AP07 95% interval per seed | training s | detection s/image (no search) "
             "| selective search s/image | detection s/image with search | whole pipeline s |",
             "|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    for name, r in results["rows"].items():
        cells = [r["train_seconds"], r["detect_s_per_image"], r["search_s_per_image"],
                 r["detect_with_search_s_per_image"], r["pipeline_seconds"]]
        lines.append(f"| {name} | {ap_cell(r, 'map07')} | {ap_cell(r, 'map')} | {intervals_cell(r)} | "
                     + " | ".join("–" if c is None else f"{c:.3f}" if c < 10 else f"{c:.0f}" for c in cells) + " |")
    return "\n".join(lines) + "\n"


def dataset_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """The options every bench comparing configurations on one dataset shares."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("voc_dir", type=Path)
    parser.add_argument("--classes", nargs="+", required=True)
    parser.add_argument("--weights", default="imagenet", help="imagenet | none | a local .pth (default imagenet)")
    parser.add_argument("--backbone", default="mobilenet_v2")
    parser.add_argument("--split", default="test", help="evaluated split (default test)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="params applied to every configuration last, e.g. train.epochs=2 (YAML values)")
    parser.add_argument("--seeds", type=_positive, default=1, metavar="N",
                        help="full runs per configuration with seed 0..N-1; AP is reported as mean ± sd (default 1)")
    return parser


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def dataset_params(args: argparse.Namespace, presets_names: Sequence[str], options: dict[str, object]) -> dict:
    """The params mapping for ``args``' dataset with presets, then ``options``, then ``--set`` applied."""
    base = {"classes": args.classes, "data": {"source": str(args.voc_dir.resolve()),
                                              "splits": sorted({"train", "val", args.split})},
            "evaluate": {"split": args.split}}
    raw = presets.apply(base, presets_names)
    weights = str(Path(args.weights).resolve()) if Path(args.weights).is_file() else args.weights
    for key, value in {**options, "model.backbone": args.backbone, "model.weights": weights}.items():
        set_dotted(raw, key, value)
    for option in args.set:
        key, _, value = option.partition("=")
        set_dotted(raw, key, yaml.safe_load(value))
    return raw


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = dataset_parser("bench/families.py", __doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="*", default=["rcnn-best", "fast-rcnn"],
                        help="one configuration per name; join presets with + (fast-cpu+paper)")
    parser.add_argument("--peer-epochs", type=int, default=8)
    parser.add_argument("--skip-peer", action="store_true")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "families")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    args.commit = git_commit()  # at the start: the code the runs use, whatever changes while they run
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="rcnn-families-") as tmp:
        first_work = None
        for name in args.presets:
            runs = []
            for seed in range(args.seeds):
                work = Path(tmp) / name / f"seed-{seed}"
                work.mkdir(parents=True)
                first_work = first_work or work
                params = from_dict(dataset_params(args, name.split("+"), {"seed": seed}))  # paths resolved here
                with contextlib.chdir(work):
                    runs.append(pipeline(params, work))
            rows[name] = seed_summary(runs)
        if not args.skip_peer:
            if first_work is None:  # the peer needs the data in place
                first_work = Path(tmp) / "peer"
                download.prepare_voc(from_dict(dataset_params(args, [], {})).data, first_work / "data" / "voc",
                                     Path(tmp) / "dl")
            rows["faster_rcnn"] = seed_summary([peer(from_dict(dataset_params(args, [], {"seed": seed})), first_work,
                                                     args.peer_epochs) for seed in range(args.seeds)])
    return write_results(args, rows, markdown)


def write_results(args: argparse.Namespace, rows: dict[str, dict], table: Callable[[dict], str]) -> dict[str, Any]:
    """``results.json`` (rows, dataset, options, environment, ``args.commit``) and ``results.md``
    (``table(results)``) in ``args.out``; the table is printed too."""
    results = {"rows": rows, "command": " ".join(["python", *sys.argv]), "commit": args.commit,
               "dataset": str(args.voc_dir), "classes": args.classes, "split": args.split,
               "backbone": args.backbone, "weights": args.weights, "set": args.set, "seeds": args.seeds,
               "environment": {"python": platform.python_version(), "torch": torch.__version__,
                               "torchvision": torchvision.__version__, "threads": torch.get_num_threads(),
                               "cpu_count": os.cpu_count(), "machine": platform.machine(),
                               # bf16 where the hardware has it natively, else fp32: figures differ between the two
                               "inference_dtype": str(inference_dtype(select_device("auto")))}}
    save_results(args.out, results, table(results))
    return results


def git_commit() -> str | None:
    """The commit the bench ran on (``+dirty`` when tracked files differ from it); None outside git."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("+dirty" if dirty else "")


def save_results(out: Path, results: dict[str, Any], table: str) -> None:
    """Write ``results.json`` and ``results.md`` (the table, also printed) into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", results)
    with atomic_path(out / "results.md") as path:
        path.write_text(table)
    print(table)


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]))
