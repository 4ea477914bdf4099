"""COCO and YOLO sources: the synthetic set written in each format (by project code) converts to the same
annotations and image bytes as its VOC copy, and every bad input is one clear error with nothing left behind."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from rcnn.data import download

from rcnn.data import voc
from rcnn.data.formats import coco, yolo
from rcnn.pipeline.params import DataParams
from rcnn.synthetic import generate
from rcnn.utils.errors import RcnnError

CLASSES = ["car", "dog", "person"]
SPLITS = ["train", "val", "test"]


@pytest.fixture(scope="module")
def voc_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The download stage's copy of a 16-image synthetic VOC set (the reference every format must match)."""
    root = tmp_path_factory.mktemp("formats")
    generate(root / "source" / "VOC2007", images=16, seed=3)
    download.prepare_voc(DataParams(source=str(root / "source")), root / "voc", root / "cache")
    return root / "voc" / "VOC2007"


def _prepare(source: Path, out: Path, **data) -> Path:
    download.prepare_voc(DataParams(source=str(source), **data), out, out.parent / "cache")
    return out / "VOC2007"


def _same_data(converted: Path, reference: Path, *, difficult: bool = True) -> None:
    for split in SPLITS:
        got, want = voc.load_split(converted, split, CLASSES), voc.load_split(reference, split, CLASSES)
        assert [a.image_id for a in got] == [a.image_id for a in want], split
        for a, b in zip(got, want):
            assert (a.width, a.height) == (b.width, b.height)
            np.testing.assert_array_equal(a.boxes, b.boxes)
            np.testing.assert_array_equal(a.labels, b.labels)
            np.testing.assert_array_equal(a.difficult, b.difficult if difficult else np.zeros_like(b.difficult))
            assert voc.image_path(converted, a.image_id).read_bytes() == voc.image_path(reference, b.image_id).read_bytes()


def test_coco_layout_converts_to_the_same_annotations_and_images(voc_copy: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture):
    source = coco.export(voc_copy, tmp_path / "coco", SPLITS, CLASSES)
    converted = _prepare(source, tmp_path / "voc")
    _same_data(converted, voc_copy)  # iscrowd <-> difficult both ways
    assert "data.format: auto -> coco" in capsys.readouterr().err
    note = json.loads((converted.parent / voc.SOURCE_FILE).read_text())
    assert note["format"] == "coco" and note["names"] == CLASSES and note["skipped_objects"] == 0


def test_single_folder_coco_export_with_a_valid_split_works_the_same(voc_copy: Path, tmp_path: Path):
    source = coco.export(voc_copy, tmp_path / "roboflow", SPLITS, CLASSES, single_folder=True)
    (source / "val").rename(source / "valid")  # what labelling tools call the validation split
    _same_data(_prepare(source, tmp_path / "voc", format="coco"), voc_copy)


def test_yolo_layout_converts_to_the_same_boxes_without_difficult_flags(voc_copy: Path, tmp_path: Path):
    source = yolo.export(voc_copy, tmp_path / "yolo", SPLITS, CLASSES)
    _same_data(_prepare(source, tmp_path / "voc"), voc_copy, difficult=False)


def test_a_zip_of_a_yolo_export_converts_like_the_folder(voc_copy: Path, tmp_path: Path):
    import shutil

    source = yolo.export(voc_copy, tmp_path / "yolo", SPLITS, CLASSES)
    archive = Path(shutil.make_archive(str(tmp_path / "yolo-export"), "zip", source))
    converted = _prepare(archive, tmp_path / "voc")
    _same_data(converted, voc_copy, difficult=False)
    note = json.loads((converted.parent / voc.SOURCE_FILE).read_text())
    assert note["kind"] == "archive" and note["format"] == "yolo"


def test_a_png_image_is_reencoded_as_jpeg(voc_copy: Path, tmp_path: Path):
    source = yolo.export(voc_copy, tmp_path / "yolo", SPLITS, CLASSES)
    first = sorted((source / "images" / "train").glob("*.jpg"))[0]
    cv2.imwrite(str(first.with_suffix(".png")), cv2.imread(str(first)))
    first.unlink()
    converted = _prepare(source, tmp_path / "voc")
    assert cv2.imread(str(voc.image_path(converted, first.stem))) is not None
    assert json.loads((converted.parent / voc.SOURCE_FILE).read_text())["reencoded_images"] == 1


def _coco_source(voc_copy: Path, tmp_path: Path) -> tuple[Path, Path, dict]:
    source = coco.export(voc_copy, tmp_path / "coco", SPLITS, CLASSES)
    path = source / "annotations" / "instances_train.json"
    return source, path, json.loads(path.read_text())


def _refused(source: Path, out: Path, match: str, **data) -> None:
    out.mkdir()
    (out / "keep.txt").write_text("earlier output")
    with pytest.raises(RcnnError, match=match) as caught:
        _prepare(source, out, **data)
    assert "\n" not in str(caught.value)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]  # nothing half-converted replaced it
    assert not list(out.parent.glob(".voc-*"))  # no staging folder left


@pytest.mark.parametrize(("edit", "match"), [
    (lambda d: d["annotations"][0].update(category_id=99), r"instances_train.json: annotation 1 has unknown "
                                                            r"category id 99"),
    (lambda d: d["annotations"][0].update(bbox=[5000, 5000, 10, 10]), r"annotation 1 has an empty box or one outside"),
    (lambda d: d["annotations"][0].update(bbox=[10, 10, 0, 5]), r"annotation 1 has an empty box"),
    (lambda d: d["images"][0].update(file_name="gone.jpg"), r"image 'gone.jpg' \(id 1\) is listed but missing"),
    (lambda d: d["images"].append(dict(d["images"][0])), r"instances_train.json: duplicate image id 1"),
])
def test_bad_coco_entries_are_one_error_naming_file_and_entry(voc_copy: Path, tmp_path: Path, edit, match: str):
    source, path, data = _coco_source(voc_copy, tmp_path)
    edit(data)
    path.write_text(json.dumps(data))
    _refused(source, tmp_path / "voc", match)


def test_invalid_coco_json_and_duplicate_ids_across_splits_are_refused(voc_copy: Path, tmp_path: Path):
    source, path, data = _coco_source(voc_copy, tmp_path)
    path.write_text(json.dumps(data)[:-5])
    _refused(source, tmp_path / "voc", r"instances_train.json: not valid JSON")
    path.write_text(json.dumps(data))
    val = source / "images" / "val"
    other = sorted(val.glob("*.jpg"))[0]
    train_name = data["images"][0]["file_name"]
    other.rename(val / train_name)  # the same file name, another image, in another split
    val_json = source / "annotations" / "instances_val.json"
    val_data = json.loads(val_json.read_text())
    val_data["images"][0]["file_name"] = train_name
    val_json.write_text(json.dumps(val_data))
    _refused(source, tmp_path / "voc2", rf"duplicate image id '{Path(train_name).stem}'")


def test_skip_mode_warns_counts_and_keeps_the_rest(voc_copy: Path, tmp_path: Path):
    source, path, data = _coco_source(voc_copy, tmp_path)
    data["annotations"][0]["category_id"] = 99
    path.write_text(json.dumps(data))
    with pytest.warns(RuntimeWarning) as caught:
        converted = _prepare(source, tmp_path / "voc", on_bad_annotation="skip")
    messages = [str(w.message) for w in caught]
    assert any("annotation 1 has unknown category id 99" in m for m in messages)
    assert any("1 objects of the coco source were skipped" in m for m in messages)
    assert json.loads((converted.parent / voc.SOURCE_FILE).read_text())["skipped_objects"] == 1


def _yolo_source(voc_copy: Path, tmp_path: Path) -> tuple[Path, Path]:
    source = yolo.export(voc_copy, tmp_path / "yolo", SPLITS, CLASSES)
    return source, sorted((source / "labels" / "train").glob("*.txt"))[0]


@pytest.mark.parametrize(("line", "match"), [
    ("0 0.5 0.5 0.2", r"line 1 has 4 fields, not 5 \(class cx cy w h\)"),
    ("0 0.5 0.5 0.2 0.2 0.1", r"line 1 has 6 fields, not 5"),
    ("0 1.5 0.5 0.2 0.2", r"line 1 has values outside 0..1"),
    ("7 0.5 0.5 0.2 0.2", r"line 1 has unknown class id 7 \(names has 3: 0..2\)"),
    ("0 0.5 0.5 0 0.2", r"line 1 has an empty box"),
    ("car 0.5 0.5 0.2 0.2", r"line 1 is not numbers"),
])
def test_bad_yolo_lines_are_one_error_naming_file_and_line(voc_copy: Path, tmp_path: Path, line: str, match: str):
    source, labels = _yolo_source(voc_copy, tmp_path)
    labels.write_text(line + "\n")
    _refused(source, tmp_path / "voc", rf"{labels.name}, {match}")


def test_a_yolo_label_file_without_an_image_is_refused(voc_copy: Path, tmp_path: Path):
    source, labels = _yolo_source(voc_copy, tmp_path)
    (labels.parent / "orphan.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    _refused(source, tmp_path / "voc", r"orphan.txt: a label file without an image")


def test_unrecognised_layouts_and_a_wrong_format_name_what_was_expected(voc_copy: Path, tmp_path: Path):
    (tmp_path / "empty").mkdir()
    _refused(tmp_path / "empty", tmp_path / "voc", r"no dataset layout recognised \(data.format: auto\): expected "
                                                   r"VOC .*COCO .*YOLO")
    source, _ = _yolo_source(voc_copy, tmp_path)
    _refused(source, tmp_path / "voc2", r"data.format = 'coco' but .* is not in that layout.*it looks like yolo",
             format="coco")


def test_classes_that_the_source_lacks_list_the_source_names(voc_copy: Path, tmp_path: Path):
    source, _, _ = _coco_source(voc_copy, tmp_path)
    for path in sorted((source / "annotations").glob("*.json")):
        data = json.loads(path.read_text())
        data["categories"] = [{"id": c["id"], "name": c["name"].upper()} for c in data["categories"]]
        path.write_text(json.dumps(data))
    converted = _prepare(source, tmp_path / "voc")
    with pytest.raises(RcnnError, match=r"object class 'CAR' is not in classes \['car', 'dog', 'person'\]; the "
                                        r"source's classes are \['CAR', 'DOG', 'PERSON'\]"):
        voc.load_split(converted, "train", CLASSES)


def test_the_download_stage_prints_one_error_line_and_exits_2(voc_copy: Path, tmp_path: Path):
    source, labels = _yolo_source(voc_copy, tmp_path)
    labels.write_text("0 0.5\n")
    project = tmp_path / "project"
    project.mkdir()
    params = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    params["data"].update(source=str(source))
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    stage = Path(__file__).resolve().parents[1] / "stages" / "download.py"
    run = subprocess.run([sys.executable, str(stage)], cwd=project, capture_output=True, text=True)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "has 2 fields, not 5" in errors[0], run.stderr
    assert not (project / "data" / "voc").exists()


def test_params_refuse_an_unknown_format():
    from rcnn.utils.errors import ParamError
    from rcnn.pipeline.params import from_dict
    with pytest.raises(ParamError, match="data.format"):
        from_dict({"data": {"format": "csv"}})
    assert dataclasses.asdict(DataParams())["format"] == "auto"
