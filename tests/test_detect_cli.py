"""rcnn-detect on many inputs: a folder of images and a video give drawn outputs and one JSON file with every
detection; a corrupt file among them is skipped and counted, never a traceback."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from rcnn.data import voc
from rcnn.detect_cli import evaluated_search_settings, fill_search_settings, main
from rcnn.utils.errors import RcnnError

CLASSES = ["car", "dog", "person"]


@pytest.fixture
def checkpoint(untrained_checkpoint: Path) -> Path:
    return untrained_checkpoint


def _video(path: Path, frames: int) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10.0, (160, 120))
    rng = np.random.default_rng(0)
    for _ in range(frames):
        writer.write(rng.integers(0, 255, (120, 160, 3), dtype=np.uint8))
    writer.release()
    return path


def test_a_folder_and_a_video_give_drawn_outputs_and_one_json(checkpoint, synthetic_voc, tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    for image in sorted((synthetic_voc / "JPEGImages").glob("*.jpg"))[:10]:
        (folder / image.name).write_bytes(image.read_bytes())
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    video = _video(tmp_path / "clip.mp4", 50)
    out, report = tmp_path / "out", tmp_path / "detections.json"
    with pytest.warns(RuntimeWarning, match="skipping .*broken.jpg"):
        main([str(folder), str(video), "--checkpoint", str(checkpoint), "--score", "0.0", "--every", "5",
              "--out", str(out), "--json", str(report), "--device", "cpu"])
    data = json.loads(report.read_text())
    assert data["images"] == 10 and data["frames"] == 10 and data["classes"] == CLASSES
    assert [s["file"] for s in data["skipped"]] == [str(folder / "broken.jpg")]
    assert data["detections"] and {"file", "frame", "label", "score", "box"} == set(data["detections"][0])
    assert {d["frame"] for d in data["detections"] if d["file"] == str(video)} <= set(range(0, 50, 5))
    assert all(d["frame"] is None for d in data["detections"] if d["file"] != str(video))
    drawn = sorted(p.name for p in out.iterdir())
    assert drawn == sorted([p.name for p in folder.glob("0*.jpg")] + ["clip.mp4"])
    capture = cv2.VideoCapture(str(out / "clip.mp4"))
    assert int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) == 10
    capture.release()
    lines = capsys.readouterr()
    assert len(lines.out.splitlines()) == len(data["detections"])
    assert "10 images, 10 video frames, 1 skipped" in lines.err and "Traceback" not in lines.err


def test_a_glob_pattern_and_an_unreadable_video_are_handled(checkpoint, synthetic_voc, tmp_path, capsys):
    (tmp_path / "junk.mp4").write_bytes(b"not a video")
    pattern = str(synthetic_voc / "JPEGImages" / "00000[12].jpg")
    with pytest.warns(RuntimeWarning, match="junk.mp4: not a readable video"):
        main([pattern, str(tmp_path / "junk.mp4"), "--checkpoint", str(checkpoint), "--score", "0.0",
              "--json", str(tmp_path / "d.json"), "--device", "cpu"])
    data = json.loads((tmp_path / "d.json").read_text())
    assert data["images"] == 2 and data["frames"] == 0 and len(data["skipped"]) == 1
    first = capsys.readouterr().out.splitlines()[0].split()
    assert first[0].endswith("000001.jpg") and first[1] == "-" and first[2] in CLASSES


def test_bad_every_reference_pixels_and_a_json_folder_are_one_line_errors(checkpoint, synthetic_voc, tmp_path, capsys):
    image = str(voc.image_path(synthetic_voc, voc.read_split(synthetic_voc, "val")[0]))
    for extra, message in ((["--every", "0"], "--every 0 is invalid"), (["--json", str(tmp_path)], "is a folder"),
                           (["--reference-pixels", "-1"], "--reference-pixels -1 is invalid"),
                           (["--max-proposals", "0"], "--max-proposals 0 is invalid: at least 1")):
        with pytest.raises(SystemExit) as err:
            main([image, "--checkpoint", str(checkpoint), *extra])
        text = capsys.readouterr().err
        assert err.value.code == 2 and message in text and len(text.strip().splitlines()) == 1


def test_selective_search_runs_as_the_checkpoints_evaluation_did_unless_a_flag_says_otherwise(
        synthetic_voc, tmp_path, monkeypatch):
    from rcnn.families.fast_rcnn.model import build_fast_rcnn
    from rcnn.modeling.two_stage import save_roi_detector
    from rcnn.pipeline.params import from_dict

    params = from_dict({"classes": CLASSES, "model": {"arch": "fast_rcnn", "backbone": "resnet18", "weights": "none",
                                                      "image_size": 128, "max_size": 192, "roi_channels": 8,
                                                      "hidden": 16},
                        "proposals": {"eval_mode": "quality", "max_side": 240, "reference_pixels": 30_000,
                                      "max_proposals": 150},
                        "evaluate": {"max_proposals": 400}})
    path = tmp_path / "model.pt"
    save_roi_detector(path, build_fast_rcnn(params, 0.5, 0.5), params, {})
    calls = []

    def search(image, mode, max_proposals, max_side, min_size, reference_pixels):
        calls.append((mode, max_proposals, max_side, reference_pixels))
        return np.array([[0, 0, 20, 20]], dtype=np.float32)

    monkeypatch.setattr("rcnn.pipeline.evaluate_stage.selective_search", search)
    image = str(voc.image_path(synthetic_voc, voc.read_split(synthetic_voc, "val")[0]))
    main([image, "--checkpoint", str(path), "--device", "cpu"])
    main([image, "--checkpoint", str(path), "--device", "cpu", "--mode", "fast", "--max-proposals", "50",
          "--max-side", "500", "--reference-pixels", "0"])
    # the stage scored the first 400 of its 150 proposals: 150
    assert calls == [("quality", 150, 240, 30_000), ("fast", 50, 500, 0)]
    # a checkpoint searched at full size (max_side null) stays at full size; one saved before the keys existed
    # searches as rcnn-detect always did (fast, 500, 0, 300)
    assert evaluated_search_settings({"proposals": {"max_side": None}}) == {"max_side": None}
    assert evaluated_search_settings({}) == {}


def test_a_checkpoint_with_search_settings_selective_search_cannot_use_asks_for_the_flag():
    def flags(**given):
        return argparse.Namespace(**{"mode": None, "max_side": None, "reference_pixels": None, "max_proposals": None,
                                     **given})

    meta = {"params": {"proposals": {"eval_mode": "exhaustive", "max_side": 8}}}
    with pytest.raises(RcnnError, match=r"searched with mode 'exhaustive', which is invalid .*: give --mode$"):
        fill_search_settings(flags(), meta)
    with pytest.raises(RcnnError, match=r"max-side 8, .*at least 32 pixels\): give --max-side$"):
        fill_search_settings(flags(mode="fast"), meta)
    given = flags(mode="fast", max_side=500)
    fill_search_settings(given, meta)  # the flags replace what the checkpoint says
    assert (given.mode, given.max_side, given.reference_pixels, given.max_proposals) == ("fast", 500, 0, 300)
