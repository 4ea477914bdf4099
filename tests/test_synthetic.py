import subprocess
import sys
from pathlib import Path

import pytest

from rcnn.data.voc import class_counts, load_split, read_split
from rcnn.synthetic import DEFAULT_CLASSES, generate
from rcnn.utils.errors import RcnnError


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes(tmp_path):
    a = generate(tmp_path / "a", images=8, seed=3)
    b = generate(tmp_path / "b", images=8, seed=3)
    c = generate(tmp_path / "c", images=8, seed=4)
    assert _tree_bytes(a) == _tree_bytes(b)
    assert _tree_bytes(a) != _tree_bytes(c)


def test_voc_layout_splits_and_annotations(synthetic_voc):
    train, val, test = (read_split(synthetic_voc, s) for s in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (12, 6, 6)
    assert not set(train) & set(val) and not set(train) & set(test) and not set(val) & set(test)
    assert sorted(train + val) == read_split(synthetic_voc, "trainval")
    anns = load_split(synthetic_voc, "trainval", DEFAULT_CLASSES) + load_split(synthetic_voc, "test", DEFAULT_CLASSES)
    counts = class_counts(anns, DEFAULT_CLASSES)
    assert all(n > 0 for n in counts.values()), counts
    assert all(1 <= len(a.labels) <= 4 for a in anns)
    assert any(a.difficult.any() for a in anns)
    for a in anns:
        assert (a.boxes[:, :2] >= 0).all() and (a.boxes[:, 2] < a.width).all() and (a.boxes[:, 3] < a.height).all()
        assert (synthetic_voc / "JPEGImages" / f"{a.image_id}.jpg").is_file()


def test_cli_writes_dataset(tmp_path):
    out = tmp_path / "cli"
    done = subprocess.run([sys.executable, "-m", "rcnn.synthetic", str(out), "--images", "5", "--seed", "1"],
                          capture_output=True, text=True, check=True)
    assert "wrote 5 images" in done.stdout
    assert len(list((out / "JPEGImages").glob("*.jpg"))) == 5
    bad = subprocess.run([sys.executable, "-m", "rcnn.synthetic", str(tmp_path / "x"), "--images", "1"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "too few" in bad.stderr


def test_custom_classes(tmp_path):
    root = generate(tmp_path / "k", images=6, classes=["kangaroo"])
    anns = load_split(root, "trainval", ["kangaroo"])
    assert all((a.labels == 1).all() for a in anns)
    with pytest.raises(RcnnError):
        generate(tmp_path / "none", images=6, classes=[])
