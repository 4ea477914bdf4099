"""How the pipeline scales: every stage on generated synthetic sets of growing size, with seconds, peak
memory and disk per stage.

    python bench/scale.py [--sizes 100 400 1600] [--set KEY=VALUE ...] [--out bench/scale]

Each size gets its own project folder (``params.yaml``, ``data/``, ``metrics/``) and every stage runs as its
own process, ``python stages/<stage>.py``, exactly what ``dvc repro`` runs. Peak memory is the largest
resident set of the stage's process tree (the stage plus its worker processes, sampled every 0.1 s);
disk is the size of the stage's output. Seconds per image divide by the images the stage handles:
all of them for download and proposals, train + val for regions, features and train, the evaluated
split for evaluate and render. The configuration is the fast CPU one at bench scale (:data:`SETTINGS`;
``--set`` overrides). Writes ``results.json`` and ``results.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import psutil
import yaml

from families import save_results  # bench/ is the script's folder
from rcnn.data import voc
from rcnn.pipeline.params import from_dict, set_dotted
from rcnn.synthetic import generate
from rcnn.utils.errors import RcnnError, run_cli

REPO = Path(__file__).resolve().parents[1]
STAGES = {"download": "data/voc", "proposals": "data/proposals", "regions": "data/regions",
          "features": "data/features", "train": "data/model", "evaluate": "data/detections", "render": "data/render"}
SETTINGS = {"classes": ["car", "dog", "person"], "data.splits": ["train", "val", "test"], "proposals.max_side": 128,
            "proposals.max_proposals": 300, "regions.crop_size": 64, "regions.max_boxes": 16,
            "model.backbone": "resnet18", "model.weights": "none", "model.hidden": 64, "train.epochs": 5,
            "train.patience": 5, "evaluate.split": "test", "evaluate.max_proposals": 50, "render.num_images": 4}


def run_stage(stage: str, project: Path) -> dict[str, float]:
    """Run one stage script in ``project``; its seconds and peak resident memory (MB) of its process tree."""
    log = project / "logs" / f"{stage}.log"
    log.parent.mkdir(exist_ok=True)
    start, peak = time.perf_counter(), 0
    with open(log, "w") as out:
        proc = psutil.Popen([sys.executable, str(REPO / "stages" / f"{stage}.py")], cwd=project, stdout=out,
                            stderr=subprocess.STDOUT)
        while proc.poll() is None:
            try:
                tree = [proc, *proc.children(recursive=True)]
                peak = max(peak, sum(p.memory_info().rss for p in tree))
            except psutil.Error:  # a worker ended between listing and reading: sample again
                pass
            time.sleep(0.1)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RcnnError(f"stage {stage} failed with exit code {proc.returncode}; see {log}:\n"
                        + log.read_text()[-2000:])
    return {"seconds": round(seconds, 2), "peak_mb": round(peak / 2**20, 1)}


def disk_mb(path: Path) -> float:
    return round(sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20, 2)


def scale_run(size: int, work: Path, options: dict[str, Any]) -> dict[str, Any]:
    """Every stage on a generated set of ``size`` images; per-stage seconds, s/image, peak MB, disk MB."""
    dataset = generate(work / "dataset" / "VOC2007", images=size, seed=0)
    project = work / "project"
    project.mkdir()
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    for key, value in {**options, "data.source": str(dataset)}.items():
        set_dotted(raw, key, value)
    params = from_dict(raw)
    (project / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    counts = {split: len(voc.read_split(dataset, split)) for split in ("train", "val", "test")}
    handled = {"download": sum(counts[s] for s in params.data.splits),
               "proposals": sum(counts[s] for s in params.data.splits),
               "regions": counts["train"] + counts["val"], "features": counts["train"] + counts["val"],
               "train": counts["train"] + counts["val"], "evaluate": counts[params.evaluate.split],
               "render": counts[params.evaluate.split]}
    stages = {}
    for stage, output in STAGES.items():
        row = run_stage(stage, project)
        row["s_per_image"] = round(row["seconds"] / handled[stage], 5)
        row["disk_mb"] = disk_mb(project / output)
        stages[stage] = row
    return {"images": size, "stages": stages}


def markdown(results: dict[str, Any]) -> str:
    runs = results["runs"]
    lines = ["| stage | " + " | ".join(f"{r['images']} images: s / ms per image / peak MB / disk MB" for r in runs)
             + " | growth, largest vs smallest: s per image / peak MB |",
             "|---|" + "---:|" * (len(runs) + 1)]
    for stage in STAGES:
        cells = [f"{r['stages'][stage]['seconds']:.1f} / {1000 * r['stages'][stage]['s_per_image']:.1f} / "
                 f"{r['stages'][stage]['peak_mb']:.0f} / {r['stages'][stage]['disk_mb']:.1f}" for r in runs]
        first, last = runs[0]["stages"][stage], runs[-1]["stages"][stage]
        growth = f"{last['s_per_image'] / max(first['s_per_image'], 1e-9):.2f}x / {last['peak_mb'] / first['peak_mb']:.2f}x"
        lines.append(f"| {stage} | " + " | ".join(cells) + f" | {growth} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench/scale.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", type=int, default=[100, 400, 1600])
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="params over SETTINGS (YAML values)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "scale")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    options = dict(SETTINGS)
    for option in args.set:
        key, _, value = option.partition("=")
        options[key] = yaml.safe_load(value)
    runs = []
    for size in sorted(args.sizes):
        with tempfile.TemporaryDirectory(prefix=f"rcnn-scale-{size}-") as tmp:
            runs.append(scale_run(size, Path(tmp), options))
            print(f"{size} images: " + ", ".join(f"{s} {r['seconds']:.0f} s {r['peak_mb']:.0f} MB"
                                                 for s, r in runs[-1]["stages"].items()), flush=True)
    results = {"runs": runs, "settings": options, "cpu_count": psutil.cpu_count()}
    save_results(args.out, results, markdown(results))
    return results


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]))
