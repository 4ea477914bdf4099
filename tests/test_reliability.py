"""Corrupt, hostile and careless inputs: one clear error or a counted skip, never a traceback or silent use.

Each test is named after the defect it pins down (issue 15's numbered list, then the project's own
round of probing, tabled in the README's guarantees).
"""

from __future__ import annotations

import gzip
import json
import pickle
import tarfile
import zipfile
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from rcnn.data import archives, download

from rcnn.proposals import selective_search

from rcnn.proposals import labelling

from rcnn.data import voc
from rcnn.detect_cli import main as detect_main
from rcnn.engine.checkpoints import read_checkpoint, write_checkpoint
from rcnn.evaluation.drawing import run_render_stage
from rcnn.evaluation.voc_eval import Detections, save_detections
from rcnn.families.rcnn import features
from rcnn.families.rcnn.model import RegionClassifier, load_checkpoint, save_checkpoint
from rcnn.modeling.backbones import build_backbone
from rcnn.pipeline.params import DataParams, Params, load_params
from rcnn.utils.errors import ParamError, RcnnError
from rcnn.utils.fileio import load_pickle

CLASSES = ["car", "dog", "person"]


def _copy_voc(src: Path, dst: Path) -> Path:
    """A writable copy of the shared synthetic set (the fixture is read-only)."""
    download.prepare_voc(DataParams(source=str(src), splits=["train", "val", "test"]), dst, dst.parent / "cache")
    return dst / "VOC2007"


def _one_line_exit_2(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as err:
        detect_main(argv)
    message = capsys.readouterr().err
    assert err.value.code == 2 and len(message.strip().splitlines()) == 1 and "Traceback" not in message, message
    return message


# 1 ------------------------------------------------------------------------------------------------

def test_1_a_zero_byte_image_is_skipped_by_render_not_fatal(synthetic_voc, tmp_path):
    root = _copy_voc(synthetic_voc, tmp_path / "voc")
    ids = voc.read_split(root, "val")[:3]
    voc.image_path(root, ids[0]).write_bytes(b"")
    dets = {i: Detections(np.array([[2, 2, 30, 30]], np.float32), np.array([0.9], np.float32), np.array([1]))
            for i in ids}
    save_detections(tmp_path / "det" / "detections.npz", "val", CLASSES, dets)
    params = Params(classes=CLASSES)
    params = replace(params, render=replace(params.render, num_images=2))
    with pytest.warns(RuntimeWarning, match=f"skipping image {ids[0]}"):
        written = run_render_stage(params, tmp_path / "voc", tmp_path / "det", tmp_path / "render")
    assert [p.name for p in written] == [f"{ids[1]}-predictions.jpg", f"{ids[2]}-predictions.jpg", "grid.jpg"]


# 2 ------------------------------------------------------------------------------------------------

@pytest.fixture()
def checkpoint(tmp_path) -> Path:
    path = tmp_path / "model.pt"
    model = RegionClassifier("resnet18", len(CLASSES), hidden=8)
    save_checkpoint(path, model, {"classes": CLASSES, "crop_size": 64, "context": 0, "params": {}})
    return path


def test_2_a_checkpoint_or_weights_file_that_is_not_a_zip_is_one_error(synthetic_voc, tmp_path, capsys):
    junk = tmp_path / "x.pt"
    junk.write_text("hello\n")
    with pytest.raises(RcnnError, match="x.pt is corrupt or not a checkpoint"):
        read_checkpoint(junk)
    with pytest.raises(RcnnError, match="x.pt is not a readable torch state dict"):
        build_backbone("resnet18", str(junk))
    image = voc.image_path(synthetic_voc, voc.read_split(synthetic_voc, "val")[0])
    assert "x.pt" in _one_line_exit_2([str(image), "--checkpoint", str(junk), "--device", "cpu"], capsys)


@pytest.mark.parametrize("field, value", [("hidden", "abc"), ("crop_size", -5), ("context", 40),
                                          ("dropout", 7), ("classes", "car"), ("svm", {"weight": 1})])
def test_2_tampered_checkpoint_metadata_is_one_error(checkpoint, field, value):
    payload = read_checkpoint(checkpoint)
    payload["meta"][field] = value if not isinstance(value, dict) else {"weight": torch.zeros(1)}
    write_checkpoint(checkpoint, payload)
    with pytest.raises(RcnnError, match=f"does not match its own description .*{field}"):
        load_checkpoint(checkpoint)


# 3 ------------------------------------------------------------------------------------------------

def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def test_3_truncated_npz_files_and_bad_contents_are_one_error(regions_dir, tmp_path):
    props = tmp_path / "p.npz"
    np.savez(props, a=np.ones((5, 4), np.float32), b=np.ones((300, 4), np.float32))
    _truncate(props)
    with pytest.raises(RcnnError, match="p.npz is not a valid proposals file .*rerun the proposals stage"):
        selective_search.load_proposals(props)
    params = Params(classes=CLASSES, model=replace(Params().model, backbone="resnet18", weights="none"))
    features.run_features_stage(params, regions_dir, tmp_path / "f")
    good = features.load_features(tmp_path / "f", "train", num_classes=4)
    np.savez(tmp_path / "f" / "val.npz", **{**good, "labels": good["labels"] + 7})
    with pytest.raises(RcnnError, match="labels outside 0..3"):
        features.load_features(tmp_path / "f", "val", num_classes=4)
    _truncate(tmp_path / "f" / "train.npz")
    with pytest.raises(RcnnError, match="train.npz is not a valid features file"):
        features.load_features(tmp_path / "f", "train")
    bad_index = tmp_path / "r"
    bad_index.mkdir()
    (bad_index / "index.json").write_text("[]")
    with pytest.raises(RcnnError, match="is not a regions index"):
        labelling.read_index(bad_index)


# 4 ------------------------------------------------------------------------------------------------

def _flip_middle(path: Path, count: int = 200) -> None:
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid:mid + count] = bytes(b ^ 0xFF for b in data[mid:mid + count])
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("suffix", [".tar.gz", ".zip"])
def test_4_an_archive_corrupted_in_the_middle_is_refused_before_anything_is_kept(synthetic_voc, tmp_path, suffix):
    archive = tmp_path / f"voc{suffix}"
    if suffix == ".zip":
        with zipfile.ZipFile(archive, "w") as zf:
            for path in sorted(synthetic_voc.rglob("*")):
                zf.write(path, path.relative_to(synthetic_voc))
    else:  # stored deflate blocks: the flipped bytes still decode, only the gzip CRC at the end tells
        with tarfile.open(archive, "w:gz", compresslevel=0) as tf:
            tf.add(synthetic_voc, arcname="VOC2007")
    _flip_middle(archive)
    with pytest.raises(RcnnError, match="corrupt"):
        download.prepare_voc(DataParams(source=str(archive), splits=["val"]), tmp_path / "out", tmp_path / "cache")
    assert not (tmp_path / "out").exists()


def test_4_a_truncated_gzip_stream_is_refused(tmp_path):
    archive = tmp_path / "x.tar.gz"
    archive.write_bytes(gzip.compress(b"\0" * 100_000)[:-20])
    with pytest.raises(RcnnError, match="corrupt or truncated"):
        archives.verify_archive(archive)


# 5 ------------------------------------------------------------------------------------------------

def test_5_a_truncated_jpeg_is_skipped_and_counted_not_used(synthetic_voc, tmp_path):
    root = _copy_voc(synthetic_voc, tmp_path / "voc")
    image_id = voc.read_split(root, "val")[0]
    path = voc.image_path(root, image_id)
    _truncate(path)
    assert cv2.imread(str(path)) is not None  # OpenCV alone would decode it partially, silently
    with pytest.raises(RcnnError, match="truncated image"):
        voc.read_image(path)
    params = Params(classes=CLASSES)
    params = replace(params, proposals=replace(params.proposals, max_side=96, n_jobs=1))
    with pytest.warns(RuntimeWarning, match=image_id):
        metrics = selective_search.run_proposals_stage(params, tmp_path / "voc", tmp_path / "p", tmp_path / "p.json")
    assert metrics["files"]["val-fast"]["skipped_ids"] == [image_id]
    # A complete JPEG padded with zero bytes to a block size (as one kangaroo photo is) is fine.
    padded = voc.image_path(root, voc.read_split(root, "val")[1])
    padded.write_bytes(padded.read_bytes() + b"\0" * 4000)
    assert voc.read_image(padded).shape[2] == 3
    png = tmp_path / "x.png"
    cv2.imwrite(str(png), np.zeros((40, 40, 3), np.uint8))
    _truncate(png)
    with pytest.raises(RcnnError, match="truncated image"):
        voc.read_image(png)


# 6 ------------------------------------------------------------------------------------------------

def test_6_the_features_folder_has_the_same_bytes_on_every_run(regions_dir, tmp_path):
    params = Params(classes=CLASSES, model=replace(Params().model, backbone="resnet18", weights="none"))
    for run in ("a", "b"):
        info = features.run_features_stage(params, regions_dir, tmp_path / run, tmp_path / f"{run}.json")
        assert info["seconds"] >= 0
    for name in ("info.json", "train.npz", "val.npz"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert "seconds" not in json.loads((tmp_path / "a" / "info.json").read_text())
    assert json.loads((tmp_path / "a.json").read_text())["regions_per_second"] > 0


# 7 ------------------------------------------------------------------------------------------------

def test_7_a_params_file_that_is_not_utf8_is_one_error(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_bytes("seed: 0\nclasses: [caf\u00e9]\n".encode("latin-1"))
    with pytest.raises(ParamError, match="is not UTF-8 text"):
        load_params(path)


# 8 ------------------------------------------------------------------------------------------------

def test_8_detect_cli_rejects_a_useless_max_side_and_a_file_as_out_folder(checkpoint, synthetic_voc, tmp_path, capsys):
    image = str(voc.image_path(synthetic_voc, voc.read_split(synthetic_voc, "val")[0]))
    for side in ("0", "-3"):
        assert "--max-side" in _one_line_exit_2([image, "--checkpoint", str(checkpoint), "--max-side", side], capsys)
    (tmp_path / "notes.txt").write_text("a file")
    assert "is a file: name a folder" in _one_line_exit_2([image, str(synthetic_voc), "--checkpoint", str(checkpoint),
                                                           "--out", str(tmp_path / "notes.txt")], capsys)


# 9 ------------------------------------------------------------------------------------------------

def test_9_full_size_search_of_a_huge_photo_is_refused_at_once():
    huge = np.zeros((2000, 3000, 3), np.uint8)
    with pytest.raises(RcnnError, match="3000x2000 image .*set proposals.max_side"):
        selective_search.selective_search(huge, max_side=None)


# 10 -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("key, value", [("train.weight_decay", ".inf"), ("train.lr", ".nan"),
                                        ("evaluate.nms_iou", "-.inf"), ("train.bbox_lambda", "1e400")])
def test_10_non_finite_numbers_are_invalid_params(tmp_path, key, value):
    section, name = key.split(".")
    path = tmp_path / "params.yaml"
    path.write_text(f"{section}:\n  {name}: {value}\n")
    with pytest.raises(ParamError, match=f"{key} = .* is invalid: expected a finite number"):
        load_params(path)


# 11 -----------------------------------------------------------------------------------------------

def test_11_a_shard_asking_for_a_huge_allocation_is_one_error(tmp_path):
    class Huge:
        def __reduce__(self):
            return bytearray, (2 ** 62,)

    path = tmp_path / "shard-00000.pkl"
    path.write_bytes(pickle.dumps({"crop_data": Huge()}))
    with pytest.raises(RcnnError, match="is not a valid region pickle"):
        load_pickle(path)


# 12 -----------------------------------------------------------------------------------------------

def test_12_data_errors_name_the_users_own_file(synthetic_voc, tmp_path):
    source = tmp_path / "mine"
    _copy_voc(synthetic_voc, source)  # the user's folder: source/VOC2007
    image_id = voc.read_split(source / "VOC2007", "val")[0]
    voc.image_path(source / "VOC2007", image_id).write_bytes(b"not a jpeg")
    (voc.annotation_path(source / "VOC2007", image_id)).write_text("<annotation><size>")
    download.prepare_voc(DataParams(source=str(source), splits=["val"]), tmp_path / "data", tmp_path / "cache")
    copy = tmp_path / "data" / "VOC2007"
    mine = (source / "VOC2007").resolve()
    with pytest.raises(RcnnError, match=f"copied from {mine / 'JPEGImages' / image_id}.jpg"):
        voc.read_image(voc.image_path(copy, image_id))
    with pytest.raises(RcnnError, match=f"copied from {mine / 'Annotations' / image_id}.xml"):
        voc.parse_annotation(voc.annotation_path(copy, image_id), CLASSES)
    archive = tmp_path / "mine.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(source / "VOC2007", arcname="VOC2007")
    download.prepare_voc(DataParams(source=str(archive), splits=["val"]), tmp_path / "data2", tmp_path / "cache")
    with pytest.raises(RcnnError, match=f"extracted from {archive.resolve()}"):
        voc.read_image(voc.image_path(tmp_path / "data2" / "VOC2007", image_id))


# The project's own round ----------------------------------------------------------------------------

def test_an_annotation_with_exponential_entity_expansion_is_one_error(tmp_path):
    path = tmp_path / "bomb.xml"
    entities = "".join(f'<!ENTITY e{i} "{"&e%d;" % (i - 1) * 10 if i else "lol"}">' for i in range(10))
    path.write_text(f'<?xml version="1.0"?><!DOCTYPE a [{entities}]><annotation><folder>&e9;</folder></annotation>')
    with pytest.raises(RcnnError, match="bomb.xml: malformed XML"):
        voc.parse_annotation(path, CLASSES)


def test_proposals_with_non_finite_boxes_are_refused(tmp_path):
    path = tmp_path / "val-fast.npz"
    np.savez(path, a=np.array([[0, 0, np.nan, 5]], np.float32))
    with pytest.raises(RcnnError, match="non-finite boxes for a"):
        selective_search.load_proposals(path)


@pytest.mark.parametrize("content", [b"", b"\x1f\x8b" + b"\0" * 30])
def test_an_empty_or_bogus_archive_is_one_error(tmp_path, content):
    archive = tmp_path / "voc.tar.gz"
    archive.write_bytes(content)
    with pytest.raises(RcnnError, match="voc.tar.gz"):
        download.prepare_voc(DataParams(source=str(archive), splits=["val"]), tmp_path / "out", tmp_path / "cache")
    assert not (tmp_path / "out").exists()
