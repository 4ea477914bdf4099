"""Nothing named by a data set reads or writes outside where it belongs (reliability round 3, N1 and D1): a
COCO ``file_name`` or a YOLO ``path``/split folder outside the data set, a link out of it, an image id that
climbs, and a class name with ``../`` are each one clear error; file names built from names stay in their
folder. The outside file is never read, whether it exists or not (no probing)."""

from __future__ import annotations

import json
import os
import tarfile
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from rcnn.data import download

from rcnn.data import voc
from rcnn.evaluation.voc_eval import results_file
from rcnn.pipeline.params import DataParams, from_dict
from rcnn.utils.errors import ParamError, RcnnError
from rcnn.utils.fileio import contained, safe_name

CLASSES = ["car", "dog", "person"]
SPLITS = ["train", "val", "test"]


@pytest.fixture
def sources(format_sources: Path) -> Path:
    return format_sources


def _copy(src: Path, dst: Path) -> Path:
    import shutil
    shutil.copytree(src, dst, symlinks=True)
    return dst


def _prepare(source: Path, tmp_path: Path) -> None:
    download.prepare_voc(DataParams(source=str(source)), tmp_path / "out", tmp_path / "cache")


def _no_secret(tmp_path: Path) -> None:
    assert not list(tmp_path.rglob("secret*")), "a file from outside the data set was copied in"


def _coco_with_file_name(sources: Path, dst: Path, file_name: str) -> Path:
    src = _copy(sources / "coco", dst)
    path = src / "annotations" / "instances_train.json"
    data = json.loads(path.read_text())
    data["images"][0]["file_name"] = file_name
    path.write_text(json.dumps(data))
    return src


@pytest.mark.parametrize("kind", ["relative", "absolute", "missing"])
def test_a_coco_file_name_outside_the_data_set_is_refused_without_reading_it(sources: Path, tmp_path: Path,
                                                                             kind: str):
    name = {"relative": "../../../outside/secret.jpg", "absolute": str(sources / "outside" / "secret.jpg"),
            "missing": "../../../outside/nothing-here.jpg"}[kind]  # same error whether or not it exists
    src = _coco_with_file_name(sources, tmp_path / "coco", name)
    with pytest.raises(RcnnError, match=r"instances_train\.json: image .* file_name .* lies outside the data set"):
        _prepare(src, tmp_path)
    _no_secret(tmp_path)


@pytest.mark.parametrize("archive", [".zip", ".tar.gz"])
def test_a_coco_archive_naming_a_file_outside_its_staging_folder_is_refused(sources: Path, tmp_path: Path,
                                                                            archive: str):
    src = _coco_with_file_name(sources, tmp_path / "staged", "../../../../outside/secret.jpg")
    packed = tmp_path / f"coco{archive}"
    if archive == ".zip":
        with zipfile.ZipFile(packed, "w") as zf:
            for path in sorted(src.rglob("*")):
                zf.write(path, path.relative_to(src).as_posix())
    else:
        with tarfile.open(packed, "w:gz") as tf:
            tf.add(src, arcname=".")
    with pytest.raises(RcnnError, match="lies outside the data set"):
        _prepare(packed, tmp_path / "run")
    _no_secret(tmp_path / "run")


def test_a_coco_image_linked_from_outside_is_refused(sources: Path, tmp_path: Path):
    src = _copy(sources / "coco", tmp_path / "coco")
    image = next((src / "images" / "train").glob("*.jpg"))
    image.unlink()
    image.symlink_to(sources / "outside" / "secret.jpg")
    with pytest.raises(RcnnError, match="lies outside the data set"):
        _prepare(src, tmp_path)


@pytest.mark.parametrize("field, value", [("train", "../outside_yolo/images/train"), ("path", "../outside_yolo"),
                                          ("path", "/")])
def test_a_yolo_data_yaml_pointing_outside_the_data_set_is_refused(sources: Path, tmp_path: Path, field: str,
                                                                   value: str):
    outside = _copy(sources / "yolo", tmp_path / "outside_yolo")
    cv2.imwrite(str(outside / "images" / "train" / "secret.jpg"), np.full((64, 80, 3), 9, np.uint8))
    src = _copy(sources / "yolo", tmp_path / "yolo")
    data = yaml.safe_load((src / "data.yaml").read_text())
    data[field] = value
    (src / "data.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(RcnnError, match=rf"data\.yaml: {field} .* lies outside the data set"):
        _prepare(src, tmp_path / "run")
    _no_secret(tmp_path / "run")


def test_a_yolo_image_linked_from_outside_is_refused(sources: Path, tmp_path: Path):
    src = _copy(sources / "yolo", tmp_path / "yolo")
    (src / "images" / "train" / "secret.jpg").symlink_to(sources / "outside" / "secret.jpg")
    with pytest.raises(RcnnError, match=r"train image .*secret\.jpg.* lies outside the data set"):
        _prepare(src, tmp_path / "run")


def test_a_split_file_id_that_climbs_out_of_the_image_folder_is_refused(sources: Path, tmp_path: Path):
    src = _copy(sources / "voc", tmp_path / "voc")
    split = src / "VOC2007" / "ImageSets" / "Main" / "train.txt"
    split.write_text(split.read_text() + "../../../outside/secret\n")
    with pytest.raises(RcnnError, match=r"train\.txt: image id '\.\./\.\./\.\./outside/secret' is not a plain"):
        voc.read_split(src / "VOC2007", "train")


@pytest.mark.parametrize("name", ["../../../x", "a/b", "a\\b", "..", ".", " car", "car ", "tab\there", "new\nline"])
def test_a_class_name_that_could_become_a_path_is_refused_by_the_params_check(name: str):
    with pytest.raises(ParamError, match=r"^classes\[1\] = .* is invalid: class names may not contain '/'"):
        from_dict({"classes": ["car", name]})


def test_names_with_spaces_inside_stay_allowed_as_coco_has_them():
    assert from_dict({"classes": ["traffic light", "fire hydrant"]}).classes == ["traffic light", "fire hydrant"]


def test_file_names_built_from_names_stay_in_their_folder(tmp_path: Path):
    for name in ["../../../x", "a/b", "..", "c\\d", "e\x00f"]:
        path = results_file(tmp_path, "test", name)
        assert path.parent == tmp_path and "/" not in path.name
    assert safe_name("..") == "_" and safe_name("car") == "car"


def test_the_containment_rule_allows_what_stays_inside(tmp_path: Path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    assert contained(tmp_path, "a/../a/b", "x") == tmp_path / "a/../a/b"
    assert contained(tmp_path, "../b", "x", base=tmp_path / "a") == tmp_path / "a" / "../b"
    with pytest.raises(RcnnError, match="lies outside"):
        contained(tmp_path / "a", "../../etc/passwd", "x")
    os.symlink(tmp_path, tmp_path / "a" / "up")
    with pytest.raises(RcnnError, match="lies outside"):
        contained(tmp_path / "a", "up/secret.jpg", "x")
