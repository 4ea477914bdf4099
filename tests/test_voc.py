"""VOC reading on real VOC2007 XML (tests/fixtures/voc_xml/0000*.xml) and hand-written odd cases."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from rcnn.data.voc import find_voc_root, parse_annotation, read_image, read_split
from rcnn.pipeline.params import VOC_CLASSES
from rcnn.utils.errors import RcnnError

FIXTURES = Path(__file__).parent / "fixtures" / "voc_xml"
LABEL = {name: i + 1 for i, name in enumerate(VOC_CLASSES)}


def test_real_annotation_boxes_are_zero_based_inclusive_with_flags():
    ann = parse_annotation(FIXTURES / "000001.xml", VOC_CLASSES)
    assert (ann.image_id, ann.width, ann.height) == ("000001", 353, 500)
    np.testing.assert_array_equal(ann.boxes, [[47, 239, 194, 370], [7, 11, 351, 497]])
    assert ann.boxes.dtype == np.float32 and ann.labels.dtype == np.int64
    assert ann.labels.tolist() == [LABEL["dog"], LABEL["person"]]  # <owner><name> is not an object
    assert ann.truncated.tolist() == [True, True] and ann.difficult.tolist() == [False, False]


def test_real_annotation_with_many_objects_and_difficult_flags():
    ann = parse_annotation(FIXTURES / "000006.xml", VOC_CLASSES)
    assert ann.labels.tolist() == [LABEL["pottedplant"], LABEL["diningtable"]] + [LABEL["chair"]] * 6
    assert ann.difficult.tolist() == [False, False, False, True, True, True, True, False]
    np.testing.assert_array_equal(ann.boxes[1], [153, 208, 368, 374])  # ymax 375 = last row of a 375-high image


def test_person_parts_are_not_objects():
    ann = parse_annotation(FIXTURES / "000027.xml", VOC_CLASSES)
    assert ann.labels.tolist() == [LABEL["person"]]
    np.testing.assert_array_equal(ann.boxes, [[173, 100, 348, 350]])


def test_tags_read_by_name_in_any_order_with_float_coordinates_and_clipping():
    ann = parse_annotation(FIXTURES / "unusual_order.xml", VOC_CLASSES)
    assert (ann.width, ann.height) == (200, 100)
    assert ann.labels.tolist() == [LABEL["dog"], LABEL["car"]]
    np.testing.assert_allclose(ann.boxes, [[9.5, 19.5, 119.5, 79.5], [149, 0, 199, 99]])
    assert ann.difficult.tolist() == [False, True]  # a missing <difficult> means 0
    assert ann.truncated.tolist() == [False, False]


def test_annotation_without_objects_has_zero_boxes():
    ann = parse_annotation(FIXTURES / "no_objects.xml", VOC_CLASSES)
    assert ann.boxes.shape == (0, 4) and ann.labels.shape == (0,) and ann.difficult.shape == (0,)
    assert ann.boxes.dtype == np.float32


def test_malformed_and_missing_files_name_the_file():
    with pytest.raises(RcnnError, match=r"malformed\.xml: malformed XML"):
        parse_annotation(FIXTURES / "malformed.xml", VOC_CLASSES)
    with pytest.raises(RcnnError, match=r"nope\.xml: annotation file not found"):
        parse_annotation(FIXTURES / "nope.xml", VOC_CLASSES)


def test_unknown_class_is_an_error_or_skipped_with_a_warning():
    path = FIXTURES / "unknown_class.xml"
    with pytest.raises(RcnnError, match=r"unknown_class\.xml: object class 'unicorn' is not in classes"):
        parse_annotation(path, VOC_CLASSES)
    with pytest.warns(UserWarning, match=r"unknown_class\.xml: object class 'unicorn'"):
        ann = parse_annotation(path, VOC_CLASSES, on_bad="skip")
    assert ann.labels.tolist() == [LABEL["dog"]]
    np.testing.assert_array_equal(ann.boxes, [[10, 20, 39, 29]])


def _xml(tmp_path: Path, body: str, size: str = "<size><width>50</width><height>40</height></size>") -> Path:
    path = tmp_path / "odd.xml"
    path.write_text(f"<annotation>{size}<object><name>dog</name>{body}</object></annotation>")
    return path


@pytest.mark.parametrize("body, message", [
    ("", "object 'dog' has no <bndbox>"),
    ("<bndbox><xmin>1</xmin><ymin>1</ymin><xmax>9</xmax></bndbox>", "missing <ymax>"),
    ("<bndbox><xmin>a</xmin><ymin>1</ymin><xmax>9</xmax><ymax>9</ymax></bndbox>", "<xmin> is 'a', not a number"),
    ("<bndbox><xmin>20</xmin><ymin>1</ymin><xmax>10</xmax><ymax>9</ymax></bndbox>", "empty box"),
    ("<bndbox><xmin>70</xmin><ymin>1</ymin><xmax>90</xmax><ymax>9</ymax></bndbox>", "empty box"),
], ids=["no bndbox", "missing coordinate", "not a number", "inverted box", "box outside the image"])
def test_unusable_boxes_are_errors_or_skipped(tmp_path, body, message):
    path = _xml(tmp_path, body)
    with pytest.raises(RcnnError, match=rf"odd\.xml: .*{message}"):
        parse_annotation(path, VOC_CLASSES)
    with pytest.warns(UserWarning, match=message):
        assert parse_annotation(path, VOC_CLASSES, on_bad="skip").boxes.shape == (0, 4)


def test_missing_size_uses_the_image_size_when_given(tmp_path):
    path = _xml(tmp_path, "<bndbox><xmin>1</xmin><ymin>1</ymin><xmax>90</xmax><ymax>9</ymax></bndbox>", size="")
    with pytest.raises(RcnnError, match=r"odd\.xml: missing or zero image <size>"):
        parse_annotation(path, VOC_CLASSES)
    ann = parse_annotation(path, VOC_CLASSES, image_size=(60, 30))
    assert (ann.width, ann.height) == (60, 30)
    np.testing.assert_array_equal(ann.boxes, [[0, 0, 59, 8]])


def _voc_tree(root: Path) -> Path:
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (root / sub).mkdir(parents=True)
    return root


def test_split_lists_are_sorted_and_deduplicated(tmp_path):
    root = _voc_tree(tmp_path)
    (root / "ImageSets" / "Main" / "train.txt").write_text("000005\n000002\n\n000005\n000003  1\n")
    assert read_split(root, "train") == ["000002", "000003", "000005"]
    with pytest.raises(RcnnError, match=r"split 'val' not found: .*val\.txt does not exist"):
        read_split(root, "val")


def test_find_voc_root_in_each_layout(tmp_path):
    direct = _voc_tree(tmp_path / "a")
    assert find_voc_root(direct) == direct
    middle = _voc_tree(tmp_path / "b" / "VOC2007")
    assert find_voc_root(tmp_path / "b") == middle
    nested = _voc_tree(tmp_path / "c" / "VOCdevkit" / "VOC2007")
    assert find_voc_root(tmp_path / "c") == nested
    with pytest.raises(RcnnError, match="no VOC-format folder"):
        find_voc_root(tmp_path / "c" / "VOCdevkit" / "VOC2007" / "JPEGImages")


def test_read_image_decodes_and_rejects_missing_or_corrupt_files(tmp_path):
    image = np.zeros((12, 16, 3), np.uint8)
    image[:, :, 2] = 255  # red in BGR
    assert cv2.imwrite(str(tmp_path / "ok.png"), image)
    loaded = read_image(tmp_path / "ok.png")
    assert loaded.shape == (12, 16, 3) and loaded.dtype == np.uint8 and loaded[0, 0].tolist() == [0, 0, 255]
    with pytest.raises(RcnnError, match=r"missing\.jpg: image not found"):
        read_image(tmp_path / "missing.jpg")
    (tmp_path / "corrupt.jpg").write_bytes(b"not a jpeg at all")
    with pytest.raises(RcnnError, match=r"corrupt\.jpg: not a decodable image"):
        read_image(tmp_path / "corrupt.jpg")
