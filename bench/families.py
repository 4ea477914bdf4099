"""Detector families side by side on one dataset: R-CNN, Fast R-CNN and Faster R-CNN (this pipeline) and
torchvision's stock Faster R-CNN with the same backbone and weights, all scored by the project's evaluator.

    python bench/families.py VOC_DIR --classes kangaroo --weights mobilenet_v2.pth --split test \
        [--presets rcnn-best fast-rcnn faster-rcnn fast-cpu+paper] [--set KEY=VALUE ...] [--seeds N]
        [--peer-epochs N] [--skip-peer] [--resume-dir DIR] [--out bench/families]

Each preset runs the whole pipeline in a temporary folder (download from the local folder,
proposals, regions, features, train, evaluate: the stage functions ``dvc repro`` calls) and
reports AP07, AP (mean ± sd over ``--seeds`` full runs, seeds 0..N-1, the later seeds with the first one's
download and proposals, with each run's 95% bootstrap
interval over the test images), training seconds, detection seconds per image without and with selective
search, and whole-pipeline seconds. The stock peer (``bench/stock_peer.py``) trains on the same train split
with the ``fast-rcnn`` preset's params (and ``--set``): the same backbone units trained, sizes, schedule
and epochs (``--peer-epochs`` to shorten it), FrozenBatchNorm2d, float32 box decoding, best epoch by
validation AP, NMS chosen on validation; torchvision's own box head. Its 24 epochs take about three hours on
a 2-core CPU: ``--resume-dir`` keeps each finished epoch, and the same command run again continues from the
last one. Writes ``results.json`` and ``results.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
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
from stock_peer import peer

from rcnn import presets

from rcnn.data import download
from rcnn.engine.device import inference_dtype, select_device
from rcnn.pipeline.evaluate_stage import run_evaluate_stage
from rcnn.pipeline.family_registry import run_features_stage, run_proposals_stage, run_regions_stage, run_train_stage
from rcnn.pipeline.params import Params, from_dict, set_dotted
from rcnn.utils.errors import run_cli
from rcnn.utils.fileio import atomic_path, write_json


# The stages that do not read the seed and that a later seed copies from the first (DVC's cache restores them).
SEED_FREE_STAGES = ("download", "proposals")


def pipeline(params: Params, work: Path, earlier: tuple[Path, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Every stage of the pipeline in ``work``, timed; returns the row of the results table. With ``earlier``
    (the work folder and row of another seed of the same configuration) its download and proposals are copied
    instead of recomputed, as ``dvc exp run -S seed=K`` restores them from the cache: neither stage reads the
    seed, and selective search is most of a run's time on a large test split. Their seconds are then the earlier
    run's."""
    seconds: dict[str, float] = {}

    def stage(name: str, fn) -> Any:  # noqa: ANN001
        start = time.perf_counter()
        out = fn()
        seconds[name] = round(time.perf_counter() - start, 2)
        return out

    d = work / "data"
    if earlier is not None:
        earlier_work, earlier_row = earlier
        for folder in ("voc", "proposals"):
            shutil.copytree(earlier_work / "data" / folder, d / folder, symlinks=True)
        shutil.copy2(earlier_work / "proposals.json", work / "proposals.json")
        props = json.loads((work / "proposals.json").read_text())
        seconds.update({name: earlier_row["stage_seconds"][name] for name in SEED_FREE_STAGES})
    else:
        stage("download", lambda: download.prepare_voc(params.data, d / "voc", d / ".downloads"))
        props = stage("proposals", lambda: run_proposals_stage(params, d / "voc", d / "proposals",
                                                               work / "proposals.json"))
    stage("regions", lambda: run_regions_stage(params, d / "voc", d / "proposals", d / "regions",
                                               work / "regions.json"))
    stage("features", lambda: run_features_stage(params, d / "regions", d / "features"))
    stage("train", lambda: run_train_stage(params, d / "features", d / "regions", d / "model.pt",
                                           work / "train.json", work / "dvclive", d / "voc"))
    result = stage("evaluate", lambda: run_evaluate_stage(params, d / "voc", d / "proposals", d / "model.pt",
                                                          d / "detections", work / "eval.json", work / "pr"))
    search = 0.0  # a detector that proposes its own regions runs no selective search
    if props.get("selective_search", True):
        eval_file = props["files"][f"{params.evaluate.split}-{params.proposals.eval_mode}"]
        # The stage searched n_jobs images at once; one image alone takes n_jobs / throughput seconds.
        search = int(props.get("n_jobs", 1)) / eval_file["images_per_second"]
    detect = result["seconds_per_image"]
    trained = json.loads((work / "train.json").read_text())
    return {"map07": result["map07"], "map": result["map"], "map07_ci95": result["map07_ci95"],
            "map_ci95": result["map_ci95"], "ap07": result["ap07"], "seed": params.seed,
            # the numbers a configuration is chosen by: the best epoch's, on the validation split
            "best_epoch": trained.get("best_epoch"), "val_map07": trained.get("val_map07"),
            "val_map": trained.get("val_map"),
            "train_seconds": seconds["train"],
            "detect_s_per_image": detect, "search_s_per_image": round(search, 4),
            "detect_with_search_s_per_image": round(detect + search, 4),
            "pipeline_seconds": round(sum(seconds.values()), 1), "stage_seconds": seconds,
            "proposal_recall": result["proposal_recall"], "restored": list(SEED_FREE_STAGES) if earlier else []}


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
    parser.add_argument("--presets", nargs="*", default=["rcnn-best", "fast-rcnn", "faster-rcnn"],
                        help="one configuration per name; join presets with + (fast-cpu+paper)")
    parser.add_argument("--peer-epochs", type=_positive, default=None,
                        help="epochs of the stock peer (default: the fast-rcnn preset's)")
    parser.add_argument("--skip-peer", action="store_true")
    parser.add_argument("--resume-dir", type=Path, default=None,
                        help="keep the stock peer's finished epochs here; a rerun with the same params, data and code "
                             "continues from them (default: none kept)")
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
                earlier = (Path(tmp) / name / "seed-0", runs[0]) if runs else None
                with contextlib.chdir(work):
                    runs.append(pipeline(params, work, earlier))
            rows[name] = seed_summary(runs)
        if not args.skip_peer:
            if first_work is None:  # the peer needs the data in place
                first_work = Path(tmp) / "peer"
                download.prepare_voc(from_dict(dataset_params(args, [], {})).data, first_work / "data" / "voc",
                                     Path(tmp) / "dl")
            rows["stock_faster_rcnn"] = seed_summary([
                peer(from_dict(dataset_params(args, ["fast-rcnn"], {"seed": seed})), first_work, args.peer_epochs,
                     args.resume_dir and args.resume_dir.resolve())
                for seed in range(args.seeds)])
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
