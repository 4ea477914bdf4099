"""The code each DVC stage runs, found from the imports, so that ``dvc.yaml`` lists exactly that.

A stage script's ``rcnn`` imports are followed module by module (imports inside functions too:
they run when the stage calls them). The detector families are imported by name through
:mod:`rcnn.pipeline.family_registry`; a stage depends on the family functions of the kind it calls (the
proposals stage on every family's proposals function, not on their trainers), so changing a
trainer never reruns selective search. Package ``__init__`` files hold docstrings only and are
left out.

``python -m rcnn.stage_deps`` prints the code deps of every stage; ``--write`` puts them into
``dvc.yaml`` (keeping each stage's data deps, in place). A test checks that ``dvc.yaml`` agrees.
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path
from typing import Sequence

import yaml

from rcnn.pipeline.family_registry import FAMILIES

# The Family fields whose functions each stage script calls through rcnn.pipeline.family_registry.
STAGE_FAMILY_FIELDS = {"proposals": ("proposals_stage",), "regions": ("regions_stage",), "features": ("features_stage",),
                       "train": ("train_stage", "model"), "evaluate": ("detector",)}


def _module_file(name: str, src: Path) -> Path | None:
    """The file of module ``name`` (``rcnn.x.y``) under ``src``, if it is one of ours."""
    base = src.joinpath(*name.split("."))
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return None


def _imported(path: Path, src: Path) -> set[str]:
    """Names of the ``rcnn`` modules ``path`` imports, anywhere in the file."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "rcnn"}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                and node.module.split(".")[0] == "rcnn":
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names if _module_file(f"{node.module}.{a.name}", src)}
    return {name for name in found if _module_file(name, src)}


def stage_modules(script: Path, src: Path, family_fields: Sequence[str] = ()) -> set[Path]:
    """Every ``rcnn`` module file under ``src`` the stage ``script`` runs (``__init__`` files left out)."""
    refs = {getattr(FAMILIES[arch], f) for arch in FAMILIES for f in family_fields}
    roots = _imported(script, src) | {ref.partition(":")[0] for ref in refs if ref}
    seen: set[str] = set()
    todo = sorted(roots)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(2, len(parts))]  # parent packages run first
        todo += sorted(_imported(_module_file(name, src), src) - seen)
    files = {_module_file(name, src) for name in seen}
    return {f for f in files if f is not None and f.name != "__init__.py"}


def code_deps(project: Path) -> dict[str, list[str]]:
    """``{stage: [stages/<stage>.py, src/rcnn/...py, ...]}`` for every stage of ``project``'s ``dvc.yaml``."""
    stages = yaml.safe_load((project / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    out = {}
    for name in stages:
        script = project / "stages" / f"{name}.py"
        found = stage_modules(script, project / "src", STAGE_FAMILY_FIELDS.get(name, ()))
        modules = sorted(p.relative_to(project).as_posix() for p in found)
        out[name] = [script.relative_to(project).as_posix(), *modules]
    return out


def write_deps(project: Path) -> None:
    """Replace the code deps of every stage in ``dvc.yaml``, keeping its data deps and everything else."""
    path = project / "dvc.yaml"
    wanted = code_deps(project)
    lines = path.read_text(encoding="utf-8").splitlines()
    out, stage, in_deps = [], None, False
    for line in lines:
        stripped = line.strip()
        if line.startswith("  ") and not line.startswith("   ") and stripped.endswith(":"):
            stage, in_deps = stripped[:-1], False
        elif stripped == "deps:":
            in_deps = True
            out.append(line)
            indent = line[:len(line) - len(line.lstrip())]
            out += [f"{indent}- {dep}" for dep in wanted[stage]]
            continue
        elif in_deps and not stripped.startswith("- "):
            in_deps = False
        if in_deps and stripped.startswith("- ") and stripped[2:].startswith(("stages/", "src/")):
            continue
        out.append(line)
    path.write_text("\n".join(out) + "\n", encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m rcnn.stage_deps", description=__doc__.split("\n\n")[0])
    parser.add_argument("--project", type=Path, default=Path("."))
    parser.add_argument("--write", action="store_true", help="rewrite the code deps in dvc.yaml")
    args = parser.parse_args(argv)
    if args.write:
        write_deps(args.project)
    for stage, deps in code_deps(args.project).items():
        print(f"{stage}: {' '.join(deps)}")


if __name__ == "__main__":
    main()
