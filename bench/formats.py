"""The same data in three layouts gives the same numbers: the synthetic set written as VOC, COCO (both layouts)
and YOLO by project code, each run through ``dvc repro`` with ``data.format: auto`` in a fresh copy of the
project, and the ``map07`` of each compared with its VOC reference (YOLO has no ``difficult`` flag, so its
reference is the VOC copy with every object's flag cleared).

    python bench/formats.py [--images 48] [--out bench/formats]

Writes ``results.json`` and ``results.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from rcnn.data.formats import coco, yolo
from rcnn.synthetic import DEFAULT_CLASSES, QUICK_PARAMS, generate
from rcnn.utils.errors import run_cli
from rcnn.utils.fileio import write_json

REPO = Path(__file__).resolve().parents[1]
SPLITS = ["train", "val", "test"]


def _project(work: Path, source: Path) -> Path:
    """A git+DVC copy of the project (tracked files only) reading ``source``."""
    listed = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    root = work / f"project-{source.name}"
    for rel in listed:
        if (REPO / rel).is_file() and not rel.startswith(("data/", "metrics/", "dvclive/")) and rel != "dvc.lock":
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, root / rel)
    params = yaml.safe_load((root / "params.yaml").read_text())
    for section, values in QUICK_PARAMS.items():
        if isinstance(values, dict):
            params.setdefault(section, {}).update(values)
        else:
            params[section] = values
    params["data"].update(source=str(source), format="auto")  # the point: the layout is recognised
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.email=b@example.com", "-c", "user.name=bench", "commit", "-qm", "start"]):
        subprocess.run(cmd, cwd=root, check=True, capture_output=True)
    return root


def _repro(root: Path) -> dict:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONHASHSEED": "0"}
    run = subprocess.run(["dvc", "repro"], cwd=root, env=env, capture_output=True, text=True)
    if run.returncode != 0:
        raise SystemExit(f"dvc repro failed in {root}:\n{run.stdout[-2000:]}\n{run.stderr[-2000:]}")
    chosen = re.search(r"data.format: auto -> (\w+)", run.stdout + run.stderr)
    metrics = json.loads((root / "metrics" / "eval.json").read_text())
    return {"format_found": chosen.group(1) if chosen else None, "map07": metrics["map07"], "map": metrics["map"],
            "coco_ap": metrics["coco"]["ap"]}


def _without_difficult(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    for xml in (dst / "Annotations").glob("*.xml"):
        xml.write_text(xml.read_text().replace("<difficult>1</difficult>", "<difficult>0</difficult>"))
    return dst


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python bench/formats.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "formats")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="rcnn-formats-") as tmp:
        work = Path(tmp)
        voc_dir = generate(work / "voc" / "VOC2007", images=args.images, seed=0)
        plain = _without_difficult(voc_dir, work / "voc-plain" / "VOC2007")
        sources = {"voc": voc_dir.parent, "coco": coco.export(voc_dir, work / "coco", SPLITS, DEFAULT_CLASSES),
                   "coco-single-folder": coco.export(voc_dir, work / "coco-single-folder", SPLITS, DEFAULT_CLASSES,
                                                     single_folder=True),
                   "voc-no-difficult": plain.parent, "yolo": yolo.export(voc_dir, work / "yolo", SPLITS, DEFAULT_CLASSES)}
        rows = {name: _repro(_project(work, source)) for name, source in sources.items()}
    reference = {"voc": "voc", "coco": "voc", "coco-single-folder": "voc", "voc-no-difficult": "voc-no-difficult",
                 "yolo": "voc-no-difficult"}
    for name, row in rows.items():
        row["reference"] = reference[name]
        row["map07_difference"] = abs(row["map07"] - rows[reference[name]]["map07"])
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "results.json", {"images": args.images, "command": " ".join(["python", *sys.argv]),
                                           "rows": rows})
    lines = ["| source | recognised as | map07 | map | coco.ap | reference | map07 difference |",
             "|---|---|---:|---:|---:|---|---:|"]
    lines += [f"| {n} | {r['format_found']} | {r['map07']:.6f} | {r['map']:.6f} | {r['coco_ap']:.6f} | {r['reference']} "
              f"| {r['map07_difference']:.1e} |" for n, r in rows.items()]
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    run_cli(main)
