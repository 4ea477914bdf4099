"""dvc.yaml lists exactly the code each stage runs, and the families stay apart."""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from rcnn.stage_deps import _imported, code_deps, write_deps

REPO = Path(__file__).resolve().parents[1]
FAMILIES = REPO / "src" / "rcnn" / "families"


def _declared(project: Path) -> dict[str, list[str]]:
    stages = yaml.safe_load((project / "dvc.yaml").read_text())["stages"]
    return {name: [d for d in stage["deps"] if d.startswith(("stages/", "src/"))] for name, stage in stages.items()}


def test_dvc_yaml_code_deps_are_the_stages_imports():
    assert _declared(REPO) == code_deps(REPO), "run: python -m rcnn.stage_deps --write"


def test_a_trainer_change_never_reruns_selective_search_or_evaluation_code_it_does_not_run():
    deps = code_deps(REPO)
    trainers = {"src/rcnn/families/rcnn/training.py", "src/rcnn/roi_training.py", "src/rcnn/families/fast_rcnn/training.py",
                "src/rcnn/families/faster_rcnn/training.py"}
    assert trainers <= set(deps["train"])
    for stage in ("download", "proposals", "regions", "features", "evaluate", "render"):
        assert not trainers & set(deps[stage]), stage
    assert "src/rcnn/families/faster_rcnn/model.py" in deps["evaluate"]  # detection of any checkpoint


def test_writing_deps_fixes_a_stale_list_and_keeps_data_deps(tmp_path: Path):
    project = tmp_path / "project"
    shutil.copytree(REPO / "src", project / "src")
    shutil.copytree(REPO / "stages", project / "stages")
    text = (REPO / "dvc.yaml").read_text()
    stale = text.replace("    - src/rcnn/voc.py\n", "", 1).replace("    - stages/train.py\n",
                                                                     "    - stages/train.py\n    - src/rcnn/gone.py\n")
    (project / "dvc.yaml").write_text(stale)
    write_deps(project)
    assert (project / "dvc.yaml").read_text() == text


def test_no_family_module_imports_another_family():
    src = REPO / "src"
    names = sorted(p.name for p in FAMILIES.iterdir() if p.is_dir() and not p.name.startswith("_"))
    assert names == ["fast_rcnn", "faster_rcnn", "rcnn"]
    for name in names:
        for path in sorted((FAMILIES / name).rglob("*.py")):
            others = {m for m in _imported(path, src) if m.startswith("rcnn.families.")
                      and m.split(".")[2] != name}
            assert not others, f"{path.relative_to(REPO)} imports {sorted(others)}"


def test_shared_modules_import_no_family_module():
    """Shared code reaches a family only through the factory's names (``rcnn.detectors``), never by import."""
    src = REPO / "src"
    for path in sorted((src / "rcnn").glob("*.py")):
        families = {m for m in _imported(path, src) if m.startswith("rcnn.families")}
        assert not families, f"{path.relative_to(REPO)} imports {sorted(families)}"
