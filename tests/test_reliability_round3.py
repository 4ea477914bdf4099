"""Reliability round 3 (``../shared/reliability/round3-repros.md``), grouped by what each test protects: bad
entries in a data set are one clear error naming the user's file; damaged checkpoints, weights and resume
points are refused or set aside; archives and images within limits; errors at the edges (disk, outputs,
command line, a dying parent) are one line; params that cannot work are refused up front. The ids in the
test names are the reproductions' (D = documented promise broken, M = minor, N = new)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from rcnn.data import archives, download

from rcnn.data import voc
from rcnn.data.formats import coco
from rcnn.detect_cli import main as detect_main
from rcnn.engine.checkpoints import read_checkpoint, write_checkpoint
from rcnn.engine.resume import ResumePoint, resume_key
from rcnn.evaluation.bootstrap import map_intervals
from rcnn.evaluation.voc_eval import Detections, evaluate_detections
from rcnn.families.fast_rcnn.model import build_fast_rcnn
from rcnn.pipeline.family_registry import load_detector
from rcnn.pipeline.params import DataParams, from_dict
from rcnn.utils.errors import ParamError, RcnnError, run_cli
from rcnn.utils.fileio import write_bytes

CLASSES = ["car", "dog", "person"]
SPLITS = ["train", "val", "test"]


@pytest.fixture
def sources(format_sources: Path) -> Path:
    return format_sources


def _coco_variant(sources: Path, tmp_path: Path, change) -> Path:
    """A copy of the COCO source with ``change(d)`` applied to its training annotation file."""
    out = tmp_path / "coco"
    shutil.copytree(sources / "coco", out)
    path = out / "annotations" / "instances_train.json"
    data = json.loads(path.read_text())
    replaced = change(data)  # a str replaces the whole file's text
    path.write_text(replaced if isinstance(replaced, str) else json.dumps(data))
    return out


def _prepare(source: Path, tmp_path: Path, fmt: str = "auto") -> dict:
    data = DataParams(source=str(source), format=fmt, splits=SPLITS)
    return download.prepare_voc(data, tmp_path / "data" / "voc", tmp_path / "data" / ".downloads")


def _one_line_error(message: str) -> None:
    assert "\n" not in message and "Traceback" not in message


# --- data sets: every bad entry is one error naming the user's file (D2, D3, D5, M6, M7, M8, N2, D4, D6, M3)

@pytest.mark.parametrize("change, message", [
    (lambda d: d.update(annotations=None), "expected lists 'images', 'categories' and 'annotations'"),
    (lambda d: d["images"][0].update(id={"a": 1}), "needs an integer or string 'id'"),
    (lambda d: d["annotations"][0].update(image_id={"x": 1}), "refers to no listed image"),
    (lambda d: d["annotations"][0].update(category_id=[1]), "unknown category id"),
    (lambda d: d["annotations"][0].update(bbox=[float("nan"), 0, 10, 10]), "not \\[x, y, width, height\\] of finite"),
    (lambda d: d["annotations"][0].update(bbox=[25, 0, float("inf"), 50]), "of finite numbers"),
    (lambda d: "[" * 100_000 + "]" * 100_000, "nested too deeply"),
    (lambda d: d["categories"].append({"id": 1, "name": "extra"}), "duplicate category id 1 \\('car' and 'extra'\\)"),
    (lambda d: [a.update(iscrowd="0") for a in d["annotations"]], "has iscrowd '0', expected 0 or 1"),
    (lambda d: d["images"][0].update(width=True), "needs positive integer 'width' and 'height' \\(got True"),
    (lambda d: d["categories"][0].update(name="background"), "named 'background', which is reserved"),
    (lambda d: d["categories"][0].update(name="\ufeffcar"), "invisible character U\\+FEFF"),
])
def test_d2_d3_m8_bad_coco_entries_are_one_error_naming_the_file(sources: Path, tmp_path: Path, change,
                                                                 message: str):
    source = _coco_variant(sources, tmp_path, change)
    with pytest.raises(RcnnError, match=message) as err:
        _prepare(source, tmp_path)
    _one_line_error(str(err.value))
    assert "instances_train.json" in str(err.value) and ".tmp" not in str(err.value)
    assert not (tmp_path / "data" / "voc").exists()


def test_m4_a_conversion_error_names_the_users_source_not_the_deleted_staging_folder(sources: Path, tmp_path: Path,
                                                                                     monkeypatch):
    def fails(src: Path, *args, **kwargs):
        raise RcnnError(f"image 'x' is listed in {src / 'ImageSets' / 'Main'} but {src / 'JPEGImages' / 'x.jpg'} "
                        f"is missing")

    monkeypatch.setattr(download, "_build_subset", fails)
    with pytest.raises(RcnnError) as err:
        _prepare(sources / "coco", tmp_path)
    assert ".tmp" not in str(err.value) and f"{sources / 'coco'} (as converted to VOC)/JPEGImages" in str(err.value)


def test_m6_two_coco_files_for_one_split_are_refused(sources: Path, tmp_path: Path):
    source = _coco_variant(sources, tmp_path, lambda d: None)
    shutil.copy(source / "annotations" / "instances_val.json", source / "annotations" / "instances_validation.json")
    with pytest.raises(RcnnError, match="split 'val' has two annotation files"):
        _prepare(source, tmp_path)


def _yolo_variant(sources: Path, tmp_path: Path) -> Path:
    out = tmp_path / "yolo"
    shutil.copytree(sources / "yolo", out)
    return out


@pytest.mark.parametrize("edit, message", [
    (lambda root: (root / "labels" / "train" / sorted(os.listdir(root / "labels" / "train"))[0]).write_bytes(
        b"0 0.5 0.5 0.2 0.2 \xff\xfe\n"), "is not UTF-8 text \\(byte 18"),
    (lambda root: (root / "data.yaml").write_bytes((root / "data.yaml").read_bytes() + b"\n# caf\xe9\n"),
     "data.yaml is not UTF-8 text"),
    (lambda root: (root / "data.yaml").write_text((root / "data.yaml").read_text() + "valid: images/test\n"),
     "both 'val' and 'valid' are given"),
    (lambda root: (root / "data.yaml").write_text((root / "data.yaml").read_text().replace("- dog", "- no")),
     "names\\[1\\] is false \\(YAML reads unquoted yes/no"),
    (lambda root: (root / "data.yaml").write_text((root / "data.yaml").read_text().replace("- person", "- 1.0")),
     "names\\[2\\] is 1.0, not a class name"),
    (lambda root: (root / "data.yaml").write_text((root / "data.yaml").read_text().replace("- car", "- \ufeffcar")),
     r"names\[0\] '\\ufeffcar' contains an invisible character U\+FEFF"),
])
def test_d5_m6_m7_bad_yolo_files_are_one_error_naming_the_file(sources: Path, tmp_path: Path, edit, message: str):
    source = _yolo_variant(sources, tmp_path)
    edit(source)
    with pytest.raises(RcnnError, match=message) as err:
        _prepare(source, tmp_path, "yolo")
    _one_line_error(str(err.value))


@pytest.mark.parametrize("corner, text", [("xmax", "nan"), ("ymin", "-inf"), ("xmin", "inf")])
def test_n2_a_voc_box_with_a_non_finite_corner_is_refused(sources: Path, tmp_path: Path, corner: str, text: str):
    root = tmp_path / "voc"
    shutil.copytree(sources / "voc", root)
    xml = root / "VOC2007" / "Annotations" / f"{voc.read_split(root / 'VOC2007', 'train')[0]}.xml"
    body = xml.read_text()
    start = body.index(f"<{corner}>")
    xml.write_text(body[:start] + f"<{corner}>{text}</{corner}>" + body[body.index(f"</{corner}>", start)
                                                                          + len(corner) + 3:])
    with pytest.raises(RcnnError, match=f"<{corner}> is '{text}', not a finite number"):
        voc.parse_annotation(xml, CLASSES)


def test_d4_image_ids_with_spaces_work_in_voc_and_coco_sources(sources: Path, tmp_path: Path):
    root = tmp_path / "voc_space" / "VOC2007"
    shutil.copytree(sources / "voc" / "VOC2007", root)
    first = voc.read_split(root, "train")[0]
    (root / "JPEGImages" / f"{first}.jpg").rename(root / "JPEGImages" / "my photo.jpg")
    (root / "Annotations" / f"{first}.xml").rename(root / "Annotations" / "my photo.xml")
    for split_file in (root / "ImageSets" / "Main").glob("*.txt"):
        split_file.write_text("\n".join("my photo" if line == first else line
                                        for line in split_file.read_text().splitlines()) + "\n")
    counts = _prepare(root.parent, tmp_path / "a")
    assert "my photo" in voc.read_split(tmp_path / "a" / "data" / "voc" / "VOC2007", "train")
    coco.export(root, tmp_path / "coco_space", SPLITS, CLASSES)
    assert _prepare(tmp_path / "coco_space", tmp_path / "b") == counts
    assert voc.split_line_id("000005 -1") == "000005" and voc.split_line_id(" my photo ") == "my photo"


def test_d6_a_photo_with_an_exif_rotation_is_read_as_stored_so_its_boxes_still_fit(tmp_path: Path):
    pixels = np.random.default_rng(0).integers(0, 255, (40, 60, 3), np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees": OpenCV would turn the pixels, the annotation's boxes stay
    Image.fromarray(pixels).save(tmp_path / "rotated.jpg", exif=exif.tobytes(), quality=95)
    assert voc.read_image(tmp_path / "rotated.jpg").shape == (40, 60, 3)


def test_m3_an_image_above_the_pixel_limit_is_refused_before_decoding(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(voc, "MAX_IMAGE_PIXELS", 50 * 40)
    cv2.imwrite(str(tmp_path / "big.png"), np.zeros((41, 50, 3), np.uint8))
    with pytest.raises(RcnnError, match=r"50x41 pixels \(0 MP\) is above the 0 MP limit"):
        voc.read_image(tmp_path / "big.png")
    cv2.imwrite(str(tmp_path / "fits.png"), np.zeros((40, 50, 3), np.uint8))
    assert voc.read_image(tmp_path / "fits.png").shape == (40, 50, 3)


# --- damaged files: refused, or for a resume point set aside (D7, M11, M12, N3, D8, D9)

@pytest.fixture
def checkpoint(untrained_checkpoint: Path) -> Path:
    return untrained_checkpoint


def _flip_first_byte_of(path: Path, out: Path, member_suffix: str) -> None:
    """Copy a torch zip with one bit of a member's stored data flipped (its CRC no longer matches)."""
    shutil.copyfile(path, out)
    info = next(i for i in zipfile.ZipFile(path).infolist() if i.filename.endswith(member_suffix))
    with open(out, "r+b") as fh:
        fh.seek(info.header_offset + 26)
        name_len, extra_len = struct.unpack("<HH", fh.read(4))
        position = info.header_offset + 30 + name_len + extra_len + 3
        fh.seek(position)
        byte = fh.read(1)[0]
        fh.seek(position)
        fh.write(bytes([byte ^ 0x40]))


def test_d7_a_bit_flipped_checkpoint_is_refused_naming_the_damaged_member(checkpoint: Path, tmp_path: Path):
    _flip_first_byte_of(checkpoint, tmp_path / "flip.pt", "/data/0")
    with pytest.raises(RcnnError, match=r"checkpoint .*flip.pt is corrupt or not a checkpoint \(damaged: .*data/0 "
                                        r"fails its CRC check\)"):
        load_detector(tmp_path / "flip.pt", "cpu")


def test_m12_m11_non_finite_weights_and_a_tampered_arch_blame_the_checkpoint(checkpoint: Path, tmp_path: Path):
    payload = read_checkpoint(checkpoint)
    name = sorted(payload["state_dict"])[-1]
    payload["state_dict"][name] = torch.full_like(payload["state_dict"][name], float("nan"))
    write_checkpoint(tmp_path / "nan.pt", payload)
    with pytest.raises(RcnnError, match=f"checkpoint .*nan.pt is corrupt \\({name} holds non-finite values\\)"):
        load_detector(tmp_path / "nan.pt", "cpu")
    for arch in ("yolo", ["rcnn"]):
        payload = read_checkpoint(checkpoint)
        payload["meta"]["arch"] = arch
        write_checkpoint(tmp_path / "arch.pt", payload)
        with pytest.raises(RcnnError, match="checkpoint .*arch.pt does not match its own description \\(arch = "):
            load_detector(tmp_path / "arch.pt", "cpu")


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED_BY_WEIGHTS",))


def test_n3_a_code_carrying_weights_file_is_refused_without_torchs_unsafe_advice(tmp_path: Path, monkeypatch,
                                                                                 capsys):
    import pickle

    monkeypatch.chdir(tmp_path)
    with open("evil.pth", "wb") as fh:
        pickle.dump({"conv1.weight": _Evil()}, fh)
    params = from_dict({"classes": CLASSES, "model": {"arch": "fast_rcnn", "backbone": "resnet18",
                                                      "weights": "evil.pth"}})
    with pytest.raises(SystemExit) as code:
        run_cli(lambda: build_fast_rcnn(params))
    err = capsys.readouterr().err
    assert code.value.code == 2 and not Path("PWNED_BY_WEIGHTS").exists()
    assert err.count("\n") == 1 and "refused for safety" in err and "weights_only=False" not in err


def _train_params(extra: dict | None = None):
    return from_dict({"classes": CLASSES, "model": {"arch": "fast_rcnn", "backbone": "resnet18",
                                                    "weights": "none"}, **(extra or {})})


def _saved_point(root: Path, key: str, live_rows: int = 3) -> ResumePoint:
    point = ResumePoint(root, key)
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "scheduler": {}, "rng": {"torch": torch.get_rng_state()}, "loop": {"epoch": 3}, "live_step": live_rows}
    point.save(state, None)
    curves = point.folder / "live" / "plots" / "metrics" / "train"
    curves.mkdir(parents=True)
    (curves / "loss.tsv").write_text("step\tloss\n" + "".join(f"{i}\t1.0\n" for i in range(live_rows)))
    return point


@pytest.mark.parametrize("damage, reason", [
    ("bad block", "fails its CRC check"),
    ("no curves", "its curves of 3 epochs are missing or short"),
    ("renamed key", "no 'live_step' entry"),
    ("nan weights", "weight holds non-finite values"),
])
def test_d8_a_damaged_resume_point_is_set_aside_with_a_warning(tmp_path: Path, damage: str, reason: str):
    point = _saved_point(tmp_path / "resume", "k")
    state_file = point.folder / "state.pt"
    if damage == "bad block":
        _flip_first_byte_of(state_file, tmp_path / "copy.pt", "/data/0")
        shutil.copyfile(tmp_path / "copy.pt", state_file)
    elif damage == "no curves":
        shutil.rmtree(point.folder / "live")
    elif damage == "renamed key":
        data = bytearray(state_file.read_bytes())
        index = data.index(b"live_step")
        data[index + 5] ^= 1  # 'live_rtep': the zip CRC would catch it, so rewrite it as a valid file
        state = torch.load(state_file, weights_only=True)
        state["live_rtep"] = state.pop("live_step")
        torch.save(state, state_file)
    else:
        state = torch.load(state_file, weights_only=True)
        state["model"]["weight"][0, 0] = float("nan")
        torch.save(state, state_file)
    with pytest.warns(RuntimeWarning, match=f"resume point .* is damaged \\(.*{reason}.*\\); starting at epoch 0"):
        reopened = ResumePoint(tmp_path / "resume", "k")
    assert reopened.state is None and not reopened.folder.exists()
    assert _saved_point(tmp_path / "fresh", "k") and ResumePoint(tmp_path / "fresh", "k").state is not None


def test_d9_new_pixels_in_a_file_of_the_same_size_change_the_resume_key(sources: Path, tmp_path: Path):
    root = tmp_path / "voc"
    shutil.copytree(sources / "voc", root)
    image = root / "VOC2007" / "JPEGImages" / f"{voc.read_split(root / 'VOC2007', 'train')[0]}.jpg"
    before = resume_key(_train_params(), [], root)
    data = bytearray(image.read_bytes())
    data[len(data) // 2] ^= 0x10  # same size, other pixels
    image.write_bytes(bytes(data))
    assert resume_key(_train_params(), [], root) != before


# --- limits: archives and links (M1, M2)

def _zip_of(sources: Path, path: Path, extra) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for file in sorted((sources / "voc").rglob("*")):
            if file.is_file():
                archive.write(file, file.relative_to(sources / "voc").as_posix())
        extra(archive)
    return path


def test_m1_zip_links_and_duplicated_members_are_refused(sources: Path, tmp_path: Path):
    def link(archive: zipfile.ZipFile) -> None:
        info = zipfile.ZipInfo("VOC2007/JPEGImages/link.jpg")
        info.external_attr = 0o120777 << 16
        archive.writestr(info, "../../../../etc/passwd")

    def duplicate(archive: zipfile.ZipFile) -> None:
        with pytest.warns(UserWarning, match="Duplicate name"):
            archive.writestr("VOC2007/ImageSets/Main/train.txt", "x\n")

    with pytest.raises(RcnnError, match="refusing to extract link 'VOC2007/JPEGImages/link.jpg'"):
        _prepare(_zip_of(sources, tmp_path / "link.zip", link), tmp_path)
    with pytest.raises(RcnnError, match="member 'VOC2007/ImageSets/Main/train.txt' appears twice"):
        _prepare(_zip_of(sources, tmp_path / "dup.zip", duplicate), tmp_path)


def test_m2_an_archive_expanding_beyond_the_limits_is_refused_before_extraction(sources: Path, tmp_path: Path):
    def padding(archive: zipfile.ZipFile) -> None:
        archive.writestr(zipfile.ZipInfo("padding.bin"), bytes(1 << 20), compress_type=zipfile.ZIP_DEFLATED)

    archive = _zip_of(sources, tmp_path / "bomb.zip", padding)
    with pytest.raises(RcnnError, match="above the data.max_extract_bytes limit of 0.0 GiB; refusing"):
        archives.safe_extract(archive, tmp_path / "out", max_bytes=1 << 20)
    with pytest.raises(RcnnError, match="above the data.max_extract_files limit of 3"):
        archives.safe_extract(archive, tmp_path / "out", max_files=3)
    assert not any((tmp_path / "out").iterdir())
    archives.safe_extract(archive, tmp_path / "fits")  # the defaults let it through
    with pytest.raises(ParamError, match="data.max_extract_bytes = 0"):
        from_dict({"data": {"max_extract_bytes": 0}})


def test_m2_a_bomb_within_the_byte_limit_is_refused_by_its_ratio_without_inflating_it(sources: Path, tmp_path: Path,
                                                                                       monkeypatch):
    def padding(archive: zipfile.ZipFile) -> None:
        archive.writestr(zipfile.ZipInfo("padding.bin"), bytes(32 << 20), compress_type=zipfile.ZIP_DEFLATED)

    archive = _zip_of(sources, tmp_path / "bomb.zip", padding)
    monkeypatch.setattr(archives, "BOMB_MIN_BYTES", 1 << 20)  # the shipped floor is 64 MiB: too big for a test
    monkeypatch.setattr(archives, "verify_archive", lambda path: pytest.fail("the bomb was inflated to verify it"))
    with pytest.raises(RcnnError, match=r"bomb.zip: .* MiB that expand to 0.0 GiB \(ratio [\d,]+:1; .*zip bomb"):
        archives.safe_extract(archive, tmp_path / "out")
    assert not any((tmp_path / "out").iterdir())


def test_m2_an_archive_larger_than_the_free_space_is_refused(sources: Path, tmp_path: Path, monkeypatch):
    archive = _zip_of(sources, tmp_path / "plain.zip", lambda archive: None)
    usage = download.shutil.disk_usage(tmp_path)
    monkeypatch.setattr(archives.shutil, "disk_usage", lambda path: usage._replace(free=1000))
    with pytest.raises(RcnnError, match=r"plain.zip: expands to .* GiB free; free space and rerun"):
        archives.safe_extract(archive, tmp_path / "out")
    assert not any((tmp_path / "out").iterdir())


# --- errors at the edge: disk, outputs, command line, parent (D10, D11, M10, M9, M5, M15)

def test_d10_a_full_disk_is_one_error_line_naming_the_output_not_its_temporary_file(tmp_path: Path, capsys,
                                                                                   monkeypatch):
    def full(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Path, "write_bytes", full)
    with pytest.raises(SystemExit) as code:
        run_cli(lambda: write_bytes(tmp_path / "model.pt", b"x"))
    err = capsys.readouterr().err
    assert code.value.code == 2 and err == f"error: {tmp_path / 'model.pt'}: No space left on device; free space " \
                                           f"and rerun\n"
    assert not list(tmp_path.iterdir())


@pytest.fixture
def photo(sources: Path, tmp_path: Path) -> Path:
    path = tmp_path / "photo.jpg"
    shutil.copyfile(sorted((sources / "voc" / "VOC2007" / "JPEGImages").iterdir())[0], path)
    return path


def _detect(args: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as code:
        detect_main(args)
    return code.value.code, capsys.readouterr().err


@pytest.mark.parametrize("flag, target, message", [
    ("--json", "notdir/d.json", "notdir is a file, not a folder"),
    ("--out", "notdir/x.jpg", "notdir is a file, not a folder"),
    ("--json", "photo.jpg", "is one of the inputs or the checkpoint"),
    ("--out", "photo.jpg", "is one of the inputs or the checkpoint"),
    ("--out", ".", "holds inputs, which drawn images of the same name would replace"),
])
def test_d11_m10_unwritable_outputs_or_outputs_that_are_inputs_stop_before_any_work(
        photo: Path, checkpoint: Path, capsys, monkeypatch, flag: str, target: str, message: str):
    monkeypatch.chdir(photo.parent)
    Path("notdir").write_text("not a folder")
    before = photo.read_bytes()
    # a checkpoint path that does not exist proves nothing was loaded: the output check comes first
    code, err = _detect([str(photo), "--checkpoint", "never-read.pt", flag, target, "--device", "cpu"], capsys)
    assert code == 2 and message in err and err.count("\n") == 1
    assert photo.read_bytes() == before


def test_m9_a_video_with_no_frame_as_the_only_input_is_an_error(checkpoint: Path, tmp_path: Path, capsys):
    (tmp_path / "empty.mp4").write_bytes(b"")
    code, err = _detect([str(tmp_path / "empty.mp4"), "--checkpoint", str(checkpoint), "--device", "cpu"], capsys)
    assert code == 2 and "empty.mp4: not a readable video (no frame decoded)" in err.splitlines()[-1]


def test_m5_usage_errors_and_paths_with_line_breaks_are_one_line(capsys):
    code, err = _detect(["x.jpg", "--every", "abc"], capsys)
    assert code == 2 and err == "error: argument --every: invalid int value: 'abc' (see rcnn-detect --help)\n"
    code, err = _detect(["a\nb\nc.jpg"], capsys)
    assert code == 2 and err == "error: a\\nb\\nc.jpg: no such file, folder or matching pattern\n"


def _kill_parent_of_stage(tmp_path: Path, child_code: str, started: str, stderr: str = "None") -> None:
    """Start ``child_code`` from a parent process, wait for the file ``started``, ``kill -9`` the parent (as of
    `dvc repro`), then wait up to 20 s for the child to end; fails the test if it outlives its parent."""
    parent_code = ("import subprocess, sys, time\n"
                   f"child = subprocess.Popen([sys.executable, '-c', {child_code!r}], stderr={stderr})\n"
                   f"open({str(tmp_path / 'pid')!r}, 'w').write(str(child.pid)); time.sleep(60)\n")
    parent = subprocess.Popen([sys.executable, "-c", parent_code])
    deadline = time.time() + 30
    while not (tmp_path / started).exists() and time.time() < deadline:
        time.sleep(0.05)
    child = int((tmp_path / "pid").read_text())
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.time() + 20
    while time.time() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return
        try:  # reap it if it is ours to reap (it is not: it was the parent's)
            os.waitpid(child, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.05)
    os.kill(child, signal.SIGKILL)
    pytest.fail("the stage outlived its killed parent")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_m15_a_stage_stops_when_its_parent_is_killed(tmp_path: Path):
    child_code = ("import time; from pathlib import Path; from rcnn.utils.errors import run_cli\n"
                  "def work():\n"
                  "    while True:\n"
                  f"        Path({str(tmp_path / 'beat')!r}).write_text(str(time.time())); time.sleep(0.1)\n"
                  "run_cli(work)\n")
    _kill_parent_of_stage(tmp_path, child_code, "beat")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_m15_a_stage_whose_parent_died_while_it_imported_does_no_work(tmp_path: Path):
    # The race of the replay: dvc repro killed while the train stage was still importing torch, before it could
    # ask to be signalled. The child below waits for that moment, then enters run_cli.
    child_code = ("import os, time; from pathlib import Path; import rcnn\n"
                  f"Path({str(tmp_path / 'ready')!r}).write_text('')\n"
                  "while os.getppid() == rcnn.PARENT_AT_START: time.sleep(0.05)\n"
                  "from rcnn.utils.errors import run_cli\n"
                  f"run_cli(lambda: Path({str(tmp_path / 'worked')!r}).write_text(''))\n")
    _kill_parent_of_stage(tmp_path, child_code, "ready", stderr=f"open({str(tmp_path / 'stderr')!r}, 'w')")
    assert not (tmp_path / "worked").exists()
    assert (tmp_path / "stderr").read_text() == "interrupted: no partial output was kept\n"


# --- params that cannot work, refused up front (D12, N4, M13, M14)

@pytest.mark.parametrize("raw, message", [
    ({"seed": 2 ** 70}, "seed = 1180591620717411303424 is out of range"),
    ({"proposals": {"n_jobs": -5}}, "proposals.n_jobs = -5 is out of range"),
    ({"proposals": {"n_jobs": 100_000}}, "proposals.n_jobs = 100000 is out of range"),
    ({"train": {"epochs": 10 ** 12}}, "train.epochs = 1000000000000 is out of range"),
    ({"data": {"splits": ["train", "train", "val", "test"]}}, "lists 'train' twice"),
    ({"classes": ["a", "c\nd"]}, "classes\\[1\\] = 'c\\\\nd' is invalid"),
    ({"data": {"val_split": "train"}}, "data.val_split = 'train' is invalid: it must not be or overlap"),
    ({"data": {"splits": ["train", "val", "trainval", "test"], "val_split": "trainval"}}, "must not be or overlap"),
    ({"model": {"arch": "faster_rcnn", "rpn_anchor_sizes": [4096], "image_size": 128, "max_size": 128}},
     "every anchor is larger than the largest resized image"),
    ({"model": {"arch": "faster_rcnn", "rpn_aspect_ratios": [100.0]}}, "must be in \\[0.05, 20\\]"),
    ({"model": {"arch": "faster_rcnn", "rpn_pre_nms_top_n_test": 1, "rpn_post_nms_top_n_test": 100_000}},
     "model.rpn_post_nms_top_n_test = 100000 is invalid: it must be <= model.rpn_pre_nms_top_n_test"),
])
def test_d12_n4_m13_m14_params_that_cannot_work_are_refused(raw: dict, message: str):
    with pytest.raises(ParamError, match=message):
        from_dict(raw)


def test_n4_trainval_training_with_test_for_validation_stays_allowed():
    from_dict({"data": {"splits": ["trainval", "test"], "train_split": "trainval", "val_split": "test"},
               "evaluate": {"split": "test", "allow_overlap": True}})


# --- a one-image test split reports no interval (D13)

def test_d13_too_few_images_give_no_bootstrap_interval_and_a_warning():
    boxes = np.array([[0, 0, 9, 9]], np.float32)
    truth = [voc.Annotation("a", 20, 20, boxes, np.array([1]), np.zeros(1, bool), np.zeros(1, bool))]
    found = {"a": Detections(boxes, np.array([0.9], np.float32), np.array([1]))}
    result = evaluate_detections(found, truth, ["car"])
    with pytest.warns(RuntimeWarning, match="has 1 image: too few for a bootstrap interval"):
        intervals = map_intervals(result)
    assert all(np.isnan(v) for key in ("map07_ci95", "map_ci95") for v in intervals[key])
