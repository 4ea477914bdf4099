"""Property-based tests (reliability round 3, item 7): whatever a data set, an archive or params.yaml holds, the
readers either load it or raise the project's error with a one-line message, never another exception; and an
archive never writes outside its target. Hypothesis generates the inputs (a fixed number each, no example
database, so a run is repeatable and writes nothing into the project)."""

from __future__ import annotations

import io
import json
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rcnn.data import archives

from rcnn.data import voc
from rcnn.data.formats import coco, yolo
from rcnn.pipeline.params import from_dict
from rcnn.utils.errors import RcnnError

SETTINGS = settings(max_examples=60, deadline=None, database=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])
JPEG = cv2.imencode(".jpg", np.full((24, 32, 3), 128, np.uint8))[1].tobytes()

scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 2**70), st.floats(allow_nan=True, allow_infinity=True),
                    st.text(max_size=12))
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                            st.dictionaries(st.text(max_size=10), inner, max_size=4)),
                           max_leaves=20)


def _loads_or_says_why(load: Callable[[], Any]) -> None:
    """``load()`` succeeds or raises RcnnError with a one-line message; any other exception fails the test."""
    try:
        load()
    except RcnnError as err:
        assert str(err) and "\n" not in str(err).strip(), str(err)


def _valid_coco() -> dict:
    return {"images": [{"id": 1, "file_name": "a.jpg", "width": 32, "height": 24}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 10, 8], "iscrowd": 0}],
            "categories": [{"id": 1, "name": "car"}]}


coco_paths = st.sampled_from([("images",), ("images", 0), ("images", 0, "id"), ("images", 0, "file_name"),
                              ("images", 0, "width"), ("annotations",), ("annotations", 0),
                              ("annotations", 0, "image_id"), ("annotations", 0, "category_id"),
                              ("annotations", 0, "bbox"), ("annotations", 0, "bbox", 2), ("annotations", 0, "iscrowd"),
                              ("categories",), ("categories", 0, "id"), ("categories", 0, "name")])


@SETTINGS
@given(changes=st.lists(st.tuples(coco_paths, json_values), min_size=1, max_size=3))
def test_the_coco_reader_loads_or_says_why(changes: list) -> None:
    data = _valid_coco()
    for path, value in changes:
        node = data
        try:
            for part in path[:-1]:
                node = node[part]
            node[path[-1]] = value
        except (KeyError, IndexError, TypeError):
            continue  # an earlier change removed the parent
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "annotations").mkdir()
        (root / "images" / "train").mkdir(parents=True)
        (root / "images" / "train" / "a.jpg").write_bytes(JPEG)
        (root / "annotations" / "instances_train.json").write_text(json.dumps(data))
        _loads_or_says_why(lambda: coco.read(root, "error"))


@SETTINGS
@given(data_yaml=st.one_of(st.binary(max_size=80), json_values.map(lambda v: yaml.safe_dump(
    {"names": v, "train": "images/train"}).encode())), labels=st.binary(max_size=60))
def test_the_yolo_reader_loads_or_says_why(data_yaml: bytes, labels: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "images" / "train").mkdir(parents=True)
        (root / "labels" / "train").mkdir(parents=True)
        (root / "images" / "train" / "a.jpg").write_bytes(JPEG)
        (root / "labels" / "train" / "a.txt").write_bytes(labels)
        (root / "data.yaml").write_bytes(data_yaml)
        _loads_or_says_why(lambda: yolo.read(root, "error"))


xml_fields = st.one_of(st.text(max_size=8), st.sampled_from(["nan", "-inf", "1e400", "0", "-1", "99999", "3.5"]))


@SETTINGS
@given(width=xml_fields, xmin=xml_fields, xmax=xml_fields, name=st.text(max_size=8), tail=st.binary(max_size=20))
def test_the_voc_reader_loads_or_says_why(width: str, xmin: str, xmax: str, name: str, tail: bytes) -> None:
    def esc(text: str) -> str:
        return text.replace("&", "&amp;").replace("<", "&lt;")
    body = (f"<annotation><size><width>{esc(width)}</width><height>24</height></size><object><name>{esc(name)}"
            f"</name><bndbox><xmin>{esc(xmin)}</xmin><ymin>1</ymin><xmax>{esc(xmax)}</xmax><ymax>9</ymax></bndbox>"
            f"</object></annotation>").encode("utf-8", "surrogatepass") + tail
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "a.xml"
        path.write_bytes(body)
        _loads_or_says_why(lambda: voc.parse_annotation(path, ["car"]))


member_names = st.one_of(st.text(max_size=20), st.sampled_from(["../x", "/etc/x", "a/../../x", "C:/x", "a\\..\\..\\x",
                                                                 "VOC2007/../../x", "./a", "a//b"]))


@SETTINGS
@given(names=st.lists(member_names, min_size=1, max_size=4), links=st.lists(st.booleans(), min_size=4, max_size=4))
def test_the_extractor_extracts_inside_its_target_or_says_why(names: list[str], links: list[bool]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        archive = root / "a.zip"
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as zf:
            for name, link in zip(names, links):
                if not name:
                    continue
                info = zipfile.ZipInfo(name)
                if link:
                    info.external_attr = 0o120777 << 16
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # duplicate names: the extractor must refuse them
                    zf.writestr(info, b"x")
        archive.write_bytes(buffer.getvalue())
        target = root / "deep" / "target"
        _loads_or_says_why(lambda: archives.safe_extract(archive, target))
        outside = [p for p in root.rglob("*") if p != archive and target not in (p, *p.parents)
                   and p not in target.parents]
        assert not outside, outside


param_keys = st.sampled_from(["seed", "classes", "data.splits", "data.val_split", "proposals.n_jobs", "train.epochs",
                              "train.lr", "model.arch", "model.rpn_anchor_sizes", "model.classifier",
                              "evaluate.split", "data.max_extract_bytes", "train.image_sizes", "nonsense.key"])


@SETTINGS
@given(options=st.lists(st.tuples(param_keys, json_values), max_size=4))
def test_the_params_check_accepts_or_says_why(options: list) -> None:
    raw: dict = {}
    for key, value in options:
        node = raw
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {}) if isinstance(node.get(part, {}), dict) else {}
        node[last] = value
    _loads_or_says_why(lambda: from_dict(raw))
