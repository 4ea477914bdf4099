"""A temporary git + DVC copy of the project on the synthetic set, and running DVC in it, for the end-to-end
tests (tests/test_dvc_pipeline.py, tests/test_dvc_families.py): each file builds its own copy, so the two run
on different pytest-xdist workers."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from rcnn.synthetic import QUICK_PARAMS, generate

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
STAGES = ["download", "proposals", "regions", "features", "train", "evaluate", "render"]


def env() -> dict[str, str]:
    """The environment DVC runs in: this interpreter's scripts first on PATH, fixed hash seed, no experiment."""
    variables = dict(os.environ)
    variables["PATH"] = f"{BIN}{os.pathsep}{variables.get('PATH', '')}"
    variables["PYTHONHASHSEED"] = "0"
    variables.pop("DVC_EXP_NAME", None)
    return variables


def run(cmd: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return done


def deep_update(base: dict, update: dict) -> None:
    for key, value in update.items():
        if isinstance(value, dict):
            deep_update(base.setdefault(key, {}), value)
        else:
            base[key] = value


def project_files() -> list[str]:
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.split("\n")
    return [f for f in listed if f and (REPO / f).is_file() and not f.startswith(("data/", "metrics/", "dvclive/"))
            and f != "dvc.lock"]


def make_project(root: Path, dataset_dir: Path) -> Path:
    """A fresh git+DVC copy of the project in ``root``, configured for a 16-image synthetic set made in
    ``dataset_dir``."""
    for rel in project_files():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, root / rel)
    dataset = generate(dataset_dir / "synthetic", images=16, seed=0)
    params = yaml.safe_load((root / "params.yaml").read_text())
    deep_update(params, QUICK_PARAMS)
    params["data"]["source"] = str(dataset)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for cmd in (["git", "init", "-q"], ["git", "config", "user.email", "ci@example.com"],
                ["git", "config", "user.name", "CI"], ["git", "add", "-A"], ["git", "commit", "-qm", "start"]):
        run(cmd, root)
    return root


def stages_run(output: str) -> set[str]:
    """Stages DVC actually executed (not restored from cache, not skipped)."""
    return {s for s in STAGES if f"Running stage '{s}'" in output}
