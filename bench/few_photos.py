"""A many-class, few-photo development set cut from a larger VOC-layout set: the regime of VOC's long tail
and of most users' own data (a handful of photos per class).

    python bench/few_photos.py ../shared/neu data/neu-few [--train-per-class 10] [--val-per-class 10]
        [--test-per-class all] [--seed 0] [--dev]

For each class in turn (sorted by name) it picks that many photos holding the class from the source's
``train`` list (then ``val``, ``test``), among those not picked yet, with a seeded shuffle of the sorted
ids: the same source and options give the same set, byte for byte. ``all`` keeps the whole source list
(``neu-few`` scores on neu's whole test split). Images and annotations are copied unchanged; the new
``ImageSets/Main`` holds ``train``, ``val`` and ``test``, and ``SOURCES.md`` says how the set was made.
``neu-few`` (docs/benchmarks.md) is the default: 10 training and 10 validation photos per class of neu's
6 classes, neu's 590 test photos. ``--dev`` makes ``test`` the source's ``val`` photos that were not picked
for ``val`` instead (neu-few: 235): a larger set to choose configurations on without touching the test split.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Sequence
from xml.etree import ElementTree

import numpy as np

from rcnn.data import voc
from rcnn.utils.errors import CliParser, RcnnError, run_cli
from rcnn.utils.fileio import atomic_dir

SPLITS = ("train", "val", "test")


def classes_of(root: Path, image_id: str) -> set[str]:
    """The class names of an image's objects (difficult ones included)."""
    tree = ElementTree.parse(voc.annotation_path(root, image_id))
    return {(node.text or "").strip() for node in tree.iterfind("object/name")}


def pick(ids: Sequence[str], classes_by_id: dict[str, set[str]], per_class: int | None,
         rng: np.random.Generator) -> list[str]:
    """Up to ``per_class`` ids holding each class (classes in sorted order, an id picked once), or all ids for
    None; sorted."""
    if per_class is None:
        return sorted(ids)
    order = [ids[i] for i in rng.permutation(len(ids))]
    chosen: list[str] = []
    taken: set[str] = set()
    for name in sorted({c for i in ids for c in classes_by_id[i]}):
        holding = [i for i in order if name in classes_by_id[i] and i not in taken]
        chosen += holding[:per_class]
        taken.update(holding[:per_class])
    return sorted(chosen)


def build(source: Path, out: Path, per_class: dict[str, int | None], seed: int, dev: bool = False) -> dict[str, int]:
    """Write the cut set to ``out`` (replaced whole, atomically); returns the number of photos per split. With
    ``dev``, ``test`` is the source's ``val`` photos not picked for ``val``."""
    root = voc.find_voc_root(source)
    rng = np.random.default_rng(seed)
    picked = {}
    for split in SPLITS:
        if split == "test" and dev:
            picked[split] = sorted(set(voc.read_split(root, "val")) - set(picked["val"]))
            continue
        ids = sorted(voc.read_split(root, split))
        picked[split] = pick(ids, {i: classes_of(root, i) for i in ids}, per_class[split], rng)
    with atomic_dir(out) as tmp:
        for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
            (tmp / sub).mkdir(parents=True)
        for split, ids in picked.items():
            (tmp / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
            for image_id in ids:
                shutil.copyfile(voc.annotation_path(root, image_id), voc.annotation_path(tmp, image_id))
                shutil.copyfile(voc.image_path(root, image_id), voc.image_path(tmp, image_id))
        options = ", ".join("test the unpicked val photos" if split == "test" and dev else
                            f"{split} {'all' if n is None else n} per class" for split, n in per_class.items())
        (tmp / "SOURCES.md").write_text(
                   f"# {out.name}\n\nCut from `{source}` by `bench/few_photos.py` ({options}, seed {seed}): "
                   + ", ".join(f"{split} {len(ids)}" for split, ids in picked.items()) + " photos.\n")
    return {split: len(ids) for split, ids in picked.items()}


def _count(text: str) -> int | None:
    if text == "all":
        return None
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number or 'all', got {text!r}")
    return int(text)


def main(argv: Sequence[str] | None = None) -> None:
    def run() -> None:
        parser = CliParser(prog="python bench/few_photos.py", description=__doc__.split("\n\n")[0])
        parser.add_argument("source", type=Path, help="a VOC-layout set with train, val and test lists")
        parser.add_argument("out", type=Path)
        parser.add_argument("--train-per-class", type=_count, default=10)
        parser.add_argument("--val-per-class", type=_count, default=10)
        parser.add_argument("--test-per-class", type=_count, default=None)
        parser.add_argument("--seed", type=int, default=0)
        parser.add_argument("--dev", action="store_true",
                            help="test = the source's val photos not picked for val, in place of "
                                 "--test-per-class (choose on it, not on test)")
        args = parser.parse_args(argv)
        if not args.source.is_dir():
            raise RcnnError(f"{args.source} is not a folder")
        counts = build(args.source, args.out, {"train": args.train_per_class, "val": args.val_per_class,
                                               "test": args.test_per_class}, args.seed, args.dev)
        print(f"{args.out}: " + ", ".join(f"{split} {n}" for split, n in counts.items()) + " photos")

    run_cli(run)


if __name__ == "__main__":
    main(sys.argv[1:])
