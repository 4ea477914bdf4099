"""dvc.yaml lists exactly the code each stage runs, and the families stay apart."""

from __future__ import annotations

import os
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
    trainers = {"src/rcnn/families/rcnn/training.py", "src/rcnn/engine/two_stage_trainer.py",
                "src/rcnn/engine/two_stage_batches.py"}
    assert trainers <= set(deps["train"])
    for stage in ("download", "proposals", "regions", "features", "evaluate", "render"):
        assert not trainers & set(deps[stage]), stage
    assert "src/rcnn/families/faster_rcnn/model.py" in deps["evaluate"]  # detection of any checkpoint


def test_writing_deps_fixes_a_stale_list_and_keeps_data_deps(tmp_path: Path):
    project = tmp_path / "project"
    shutil.copytree(REPO / "src", project / "src")
    shutil.copytree(REPO / "stages", project / "stages")
    text = (REPO / "dvc.yaml").read_text()
    stale = text.replace("    - src/rcnn/data/voc.py\n", "", 1).replace("    - stages/train.py\n",
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
    """Shared code reaches a family only through the factory's names (``rcnn.pipeline.family_registry``), never by import."""
    src = REPO / "src"
    for path in sorted((src / "rcnn").glob("*.py")):
        families = {m for m in _imported(path, src) if m.startswith("rcnn.families")}
        assert not families, f"{path.relative_to(REPO)} imports {sorted(families)}"


def test_every_module_stays_under_400_lines_and_no_folder_has_names_that_differ_by_a_suffix():
    modules = sorted((REPO / "src" / "rcnn").rglob("*.py"))
    long = {p.relative_to(REPO).as_posix(): n for p in modules if (n := len(p.read_text().splitlines())) > 400}
    assert not long, f"split these by concept: {long}"
    for folder in sorted({p.parent for p in modules}):
        stems = sorted(p.stem for p in folder.glob("*.py") if p.stem != "__init__")
        clashes = [(a, b) for a in stems for b in stems if a < b and len(common := os.path.commonprefix([a, b])) >= 5
                   and max(len(a), len(b)) - len(common) <= 3]
        assert not clashes, f"{folder.relative_to(REPO)}: {clashes} (detector/detectors/detection)"


def test_every_module_path_the_architecture_doc_names_exists():
    import importlib
    import re

    text = (REPO / "docs" / "architecture.md").read_text()
    for line in text.splitlines():  # a layer's row names its files relative to the layer's folder
        folder = re.match(r"\| `rcnn/(\w+)/", line)
        roots = [REPO, REPO / "src", REPO / "src" / "rcnn"] + ([REPO / "src" / "rcnn" / folder[1]] if folder else [])
        for path in re.findall(r"`([\w/.]+\.py)`", line):
            assert any((root / path).is_file() for root in roots), f"docs/architecture.md names {path}"
    for dotted in sorted(set(re.findall(r"\b(?:rcnn\.)?(?:utils|data|proposals|modeling|engine|evaluation|pipeline|"
                                        r"families)\.[\w.]+", text))):
        parts = ("rcnn." + dotted if not dotted.startswith("rcnn.") else dotted).rstrip(".").split(".")
        for cut in range(len(parts), 1, -1):  # the longest importable prefix, then attributes
            try:
                node = importlib.import_module(".".join(parts[:cut]))
            except ModuleNotFoundError:
                continue
            for attribute in parts[cut:]:
                assert hasattr(node, attribute), f"docs/architecture.md names {dotted}"
                node = getattr(node, attribute)
            break
        else:
            raise AssertionError(f"docs/architecture.md names {dotted}")
