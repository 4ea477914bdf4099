"""R-CNN the paper's way, step by step: frozen / + hard negatives / + fine-tuning / + both, each scored
with and without box regression, on one dataset.

    python bench/ablation.py VOC_DIR --classes kangaroo --weights mobilenet_v2.pth --split test \
        [--rows frozen fine-tuned ...] [--set KEY=VALUE ...] [--seeds N] [--out bench/ablation]

Every row is the ``rcnn-best`` preset with the row's options on top (frozen rows train the head on
cached features with the tutorial's Adam 1e-4 and early stopping, as the frozen pipeline always has),
run through every stage in a temporary folder (the stage functions ``dvc repro`` calls; whole-pipeline
seconds include selective search). Box regression is fitted after the classifier and never changes it,
so each row is trained once and evaluated twice: with its regressor and with the regressor removed from
the checkpoint. With ``--seeds N`` every row runs N times (seeds 0..N-1) and reports mean ± sd, with
each run's 95% bootstrap interval. Writes ``results.json`` and ``results.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

from families import (ap_cell, dataset_params, dataset_parser, git_commit, intervals_cell, pipeline, seed_summary,
                      write_results)  # bench/ is the script's folder
from rcnn import presets
from rcnn.engine.checkpoints import read_checkpoint, write_checkpoint
from rcnn.pipeline.evaluate_stage import run_evaluate_stage
from rcnn.pipeline.params import from_dict
from rcnn.utils.errors import run_cli

FROZEN = {"model.trainable_layers": 0, "train.optimizer": "adam", "train.lr": 0.0001, "train.schedule": "constant",
          "train.warmup_epochs": 0, "train.epochs": 100, "train.patience": 5, "train.weight_decay": 0.0,
          "train.batch_size": 32}
ROWS: dict[str, dict[str, object]] = {
    "frozen": {**FROZEN, "train.hard_negative_rounds": 0},
    "frozen + hard negatives": {**FROZEN, "train.hard_negative_rounds": 1},
    "fine-tuned": {"train.hard_negative_rounds": 0},
    "fine-tuned + hard negatives": {"train.hard_negative_rounds": 1},
}


def without_regression(work: Path, params: Any) -> dict[str, float]:
    """AP of the row's checkpoint with its box regressor removed (exactly a ``bbox_regression: false`` run's)."""
    payload = read_checkpoint(work / "data" / "model.pt")
    payload["meta"]["bbox_regressor"] = None
    write_checkpoint(work / "data" / "plain.pt", payload)
    d = work / "data"
    result = run_evaluate_stage(params, d / "voc", d / "proposals", d / "plain.pt", d / "plain-detections",
                                work / "plain-eval.json", work / "plain-pr")
    return {key: result[key] for key in ("map07", "map", "map07_ci95", "map_ci95")}


def markdown(rows: dict[str, dict[str, Any]]) -> str:
    lines = ["| configuration | AP07 (no box regression) | AP (no box regression) | AP07 (box regression) "
             "| AP (box regression) | AP07 95% interval per seed (box regression) | training s | whole pipeline s |",
             "|---|---:|---:|---:|---:|---|---:|---:|"]
    for name, r in rows.items():
        cells = [ap_cell(r["plain"], "map07"), ap_cell(r["plain"], "map"), ap_cell(r, "map07"), ap_cell(r, "map")]
        lines.append(f"| {name} | " + " | ".join(cells)
                     + f" | {intervals_cell(r)} | {r['train_seconds']:.0f} | {r['pipeline_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = dataset_parser("bench/ablation.py", __doc__.split("\n\n")[0])
    parser.add_argument("--rows", nargs="*", default=list(ROWS), choices=list(ROWS), metavar="ROW")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "ablation")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    args.commit = git_commit()  # at the start: the code the runs use
    rows: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="rcnn-ablation-") as tmp:
        for name in args.rows:
            runs = []
            for seed in range(args.seeds):
                params = from_dict(dataset_params(args, ["rcnn-best"], {**ROWS[name], "model.bbox_regression": True,
                                                                        "seed": seed}))
                work = Path(tmp) / name.replace(" ", "-").replace("+", "and") / f"seed-{seed}"
                work.mkdir(parents=True)
                with contextlib.chdir(work):
                    run = pipeline(params, work)
                    run["plain"] = without_regression(work, params)
                runs.append(run)
            rows[name] = seed_summary(runs)
            rows[name]["options"] = [f"{k}={presets.format_value(v)}" for k, v in ROWS[name].items()]
            print(markdown({name: rows[name]}), flush=True)
    return write_results(args, rows, lambda results: markdown(results["rows"]))


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]))
