"""bench/run.py runs end to end on a tiny synthetic workload and reports every figure."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "run.py"
SECTIONS = ("proposals", "regions", "training", "detection")


def run_bench(*args: str) -> subprocess.CompletedProcess:
    # 120 s only guards against a hang; the tiny run takes 15-35 s on a busy 2-core CPU.
    return subprocess.run([sys.executable, str(BENCH), *args], capture_output=True, text=True, timeout=120)


def number(cell: str) -> float | None:
    return None if cell == "–" else float(cell.replace(",", ""))


def test_tiny_run_writes_json_and_a_markdown_table_of_positive_figures(tmp_path):
    out = tmp_path / "results"
    proc = run_bench("--tiny", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("workload", *SECTIONS, "done"):
        assert f"[bench] {name}:" in proc.stdout

    results = json.loads((out / "results.json").read_text())
    assert {"environment", "workload", *SECTIONS, "rows"} <= set(results)
    env = results["environment"]
    assert env["device"] and env["torch_threads"] >= 1 and env["cpu_count"] >= 1
    assert {"torch", "torchvision", "cv2"} <= set(env["versions"])
    assert results["workload"]["images"] == 4 and results["workload"]["repeats"] == 1
    for name in SECTIONS:
        assert {"ours", "tutorial"} <= set(results[name])
    assert results["proposals"]["ours"]["images_per_second_1_job"] > 0
    assert 0 < results["proposals"]["ours"]["parallel_efficiency"]
    assert results["regions"]["ours"]["shards"] == 1
    assert results["regions"]["tutorial"]["files"] == results["regions"]["tutorial"]["regions"] > 0
    assert results["training"]["ours"]["head_seconds_per_epoch"] > 0
    assert results["detection"]["tutorial"]["seconds_per_image_cnn"] > 0

    rows = results["rows"]
    assert {r["section"] for r in rows} == set(SECTIONS)
    for row in rows:
        assert row["ours"] > 0
        if row["tutorial"] is not None:
            assert row["tutorial"] > 0 and row["ratio"] == row["ours"] / row["tutorial"]

    table = [line for line in (out / "results.md").read_text().splitlines() if line.startswith("| ")]
    header, body = table[0], table[1:]
    assert header.split("|")[1:6] == [" section ", " metric ", " ours ", " tutorial ", " ours / tutorial "]
    assert len(body) == len(rows)
    for line in body:
        cells = [c.strip() for c in line.split("|")[1:-1]]
        ours, tutorial, ratio = (number(c) for c in cells[2:5])
        assert ours > 0
        assert (tutorial is None) == (ratio is None)
        assert tutorial is None or (tutorial > 0 and ratio > 0)


def test_a_folder_that_is_not_a_voc_set_is_a_one_line_error(tmp_path):
    proc = run_bench(str(tmp_path), "--tiny", "--out", str(tmp_path / "results"))
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and "no VOC-format folder" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "results").exists()


FAMILIES = Path(__file__).resolve().parents[1] / "bench" / "families.py"


def test_families_bench_compares_the_families_with_the_stock_peer(tmp_path, synthetic_voc):
    out = tmp_path / "families"
    tiny = ["model.trainable_layers=1", "model.image_size=96", "model.max_size=128", "train.image_sizes=[96]", "model.roi_channels=8",
            "model.roi_size=3", "model.hidden=16", "train.epochs=2", "proposals.max_proposals=100",
            "evaluate.max_proposals=100", "train.min_steps=0", "train.allow_collapse=true",
            # plumbing on random features: 12 steps, not the presets' floors (960; 2,880 for rare classes)
            "train.rare_class_objects=0", "train.min_steps_rare=0", "model.require_weights=false",
            "proposals.mode=fast", "proposals.eval_mode=fast"]  # the presets' quality search is most of the time
    proc = subprocess.run([sys.executable, str(FAMILIES), str(synthetic_voc), "--classes", "car", "dog", "person",
                           "--backbone", "resnet18", "--weights", "none", "--split", "test", "--presets", "fast-rcnn",
                           "faster-rcnn", "--set", *tiny, "--peer-epochs", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert list(rows) == ["fast-rcnn", "faster-rcnn", "stock_faster_rcnn"]
    for row in rows.values():
        assert 0 <= row["map07"] <= 1 and row["train_seconds"] > 0 and row["detect_s_per_image"] > 0
    assert rows["fast-rcnn"]["search_s_per_image"] > 0
    assert rows["faster-rcnn"]["search_s_per_image"] == 0 == rows["stock_faster_rcnn"]["search_s_per_image"]
    for name in ("fast-rcnn", "faster-rcnn"):
        assert rows[name]["pipeline_seconds"] >= rows[name]["train_seconds"]
    for name in ("fast-rcnn", "faster-rcnn"):  # chosen by validation; test AP per class beside the mean
        run = rows[name]["runs"][0]
        assert 1 <= run["best_epoch"] <= 2 and 0 <= run["val_map07"] <= 1 and 0 <= run["val_map"] <= 1
        assert set(run["ap07"]) <= {"car", "dog", "person"} and run["ap07"]
    recall = rows["faster-rcnn"]["runs"][0]["proposal_recall"]
    assert recall["source"] == "learned" and 0 <= recall["recall_iou50"] <= 1
    peer = rows["stock_faster_rcnn"]["runs"][0]
    assert peer["nms_iou"] in (0.3, 0.4, 0.5, 0.6, 0.7) and set(peer["val_map_by_nms"]) == {"0.3", "0.4", "0.5", "0.6", "0.7"}
    assert peer["best_epoch"] == 1 and peer["epochs"] == 1
    table = [line for line in (out / "results.md").read_text().splitlines() if line.startswith("| ")]
    assert len(table) == 4 and table[0].startswith("| detector | AP07 | AP |")


def test_families_bench_reuses_a_seeds_proposals_for_the_next_seeds(tmp_path, synthetic_voc):
    out = tmp_path / "families"
    tiny = ["model.trainable_layers=1", "model.image_size=96", "model.max_size=128", "train.image_sizes=[96]",
            "model.roi_channels=8", "model.roi_size=3", "model.hidden=16", "train.epochs=1", "train.warmup_epochs=0",
            "train.min_steps=0", "train.val_start=0",
            "proposals.max_proposals=50", "evaluate.max_proposals=50", "train.allow_collapse=true",
            "model.require_weights=false", "proposals.mode=fast", "proposals.eval_mode=fast", "data.max_images=12"]
    proc = subprocess.run([sys.executable, str(FAMILIES), str(synthetic_voc), "--classes", "car", "dog", "person",
                           "--backbone", "resnet18", "--weights", "none", "--split", "test", "--presets", "fast-rcnn",
                           "--skip-peer", "--seeds", "2", "--set", *tiny, "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    first, second = json.loads((out / "results.json").read_text())["rows"]["fast-rcnn"]["runs"]
    assert (first["seed"], second["seed"]) == (0, 1)
    assert first["restored"] == [] and second["restored"] == ["download", "proposals"]
    for stage in ("download", "proposals"):  # the first seed's, as DVC's cache restores them
        assert second["stage_seconds"][stage] == first["stage_seconds"][stage]
    assert second["proposal_recall"] == first["proposal_recall"]  # the same selective-search boxes scored


def _bench_module(name: str):  # noqa: ANN202 - a module
    sys.path.insert(0, str(FAMILIES.parent))
    try:
        return __import__(name)
    finally:
        sys.path.remove(str(FAMILIES.parent))


def test_the_stock_peer_freezes_batchnorm_and_decodes_boxes_in_float32(monkeypatch):
    import torch
    from torchvision.ops.misc import FrozenBatchNorm2d

    from rcnn.pipeline.params import from_dict

    stock_peer = _bench_module("stock_peer")
    params = from_dict({"classes": ["car", "dog"], "model": {"backbone": "resnet18", "weights": "none",
                                                             "trainable_layers": 2, "image_size": 96, "max_size": 128}})
    model = stock_peer.build_stock_peer(params, autocast_dtype=torch.bfloat16)  # what a bf16 machine gets
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    frozen = [m for m in model.modules() if isinstance(m, FrozenBatchNorm2d)]
    assert not norms and len(frozen) == 20  # resnet18: every BatchNorm, none left to update its statistics
    before = [m.running_mean.clone() for m in frozen]
    decoded = []
    for coder in (model.rpn.box_coder, model.roi_heads.box_coder):
        original = coder.decode
        monkeypatch.setattr(coder, "decode", lambda codes, boxes, original=original: (
            decoded.append((codes.dtype, boxes[0].dtype)), original(codes, boxes))[1])
    model.train()
    targets = [{"boxes": torch.tensor([[10.0, 10.0, 60.0, 70.0]]), "labels": torch.tensor([1])}]
    sum(model([torch.rand(3, 96, 120)], targets).values()).backward()
    model.eval()
    with torch.inference_mode():
        out = model([torch.rand(3, 96, 120)])[0]
    assert decoded and all(dtypes == (torch.float32, torch.float32) for dtypes in decoded)
    assert out["boxes"].dtype == torch.float32
    assert all(torch.equal(m.running_mean, b) for m, b in zip(frozen, before))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the backbone alone runs in the autocast dtype
        assert model.backbone(torch.rand(1, 3, 64, 64)).dtype == torch.float32


def test_a_killed_stock_peer_continues_from_its_last_epoch_to_the_same_result(tmp_path, monkeypatch):
    from rcnn.pipeline.params import from_dict
    from rcnn.synthetic import generate

    stock_peer = _bench_module("stock_peer")
    work = tmp_path / "work"
    generate(work / "data" / "voc" / "VOC2007", images=8, seed=0)  # 2 steps an epoch: the peer's head is large
    params = from_dict({"classes": ["car", "dog", "person"], "model": {
        "backbone": "resnet18", "weights": "none", "trainable_layers": 1, "image_size": 96, "max_size": 128},
        "train": {"optimizer": "sgd", "lr": 0.01, "epochs": 2, "schedule": "cosine", "device": "cpu"}})
    whole = stock_peer.peer(params, work)
    calls = []
    real_ap = stock_peer._ap

    def killed_at_the_second_validation(*args, **kwargs):  # noqa: ANN202
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_ap(*args, **kwargs)

    monkeypatch.setattr(stock_peer, "_ap", killed_at_the_second_validation)
    with pytest.raises(KeyboardInterrupt):
        stock_peer.peer(params, work, resume_dir=tmp_path / "resume")
    assert len(list((tmp_path / "resume").glob("stock-peer-seed-0/*/state.pt"))) == 1  # epoch 1 kept
    monkeypatch.setattr(stock_peer, "_ap", real_ap)
    resumed = stock_peer.peer(params, work, resume_dir=tmp_path / "resume")
    timing = ("train_seconds", "detect_s_per_image", "detect_with_search_s_per_image")
    def same(row: dict) -> str:  # as text: a split of a few images has a nan interval, and nan != nan
        return json.dumps({k: v for k, v in row.items() if k not in timing}, sort_keys=True)

    assert same(resumed) == same(whole)
    assert not any((tmp_path / "resume").iterdir())  # a finished run leaves no resume point behind


ABLATION = Path(__file__).resolve().parents[1] / "bench" / "ablation.py"


def test_ablation_bench_scores_each_row_with_and_without_box_regression(tmp_path, synthetic_voc):
    out = tmp_path / "ablation"
    tiny = ["model.hidden=16", "regions.crop_size=64", "train.epochs=1", "train.warmup_epochs=0", "train.allow_collapse=true",
            "proposals.max_proposals=100", "evaluate.max_proposals=50", "train.min_steps=0", "model.require_weights=false",
            "proposals.mode=fast", "proposals.eval_mode=fast"]  # the preset's quality search took 60% of the time
    proc = subprocess.run([sys.executable, str(ABLATION), str(synthetic_voc), "--classes", "car", "dog", "person",
                           "--backbone", "resnet18", "--weights", "none", "--split", "test",
                           "--rows", "frozen", "fine-tuned + hard negatives", "--set", *tiny, "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert set(rows) == {"frozen", "fine-tuned + hard negatives"}
    for row in rows.values():
        assert 0 <= row["map07"] <= 1 and 0 <= row["plain"]["map07"] <= 1
        assert row["pipeline_seconds"] >= row["train_seconds"] > 0
    assert "train.hard_negative_rounds=1" in rows["fine-tuned + hard negatives"]["options"]
    table = [line for line in (out / "results.md").read_text().splitlines() if line.startswith("| ")]
    assert len(table) == 3 and "no box regression" in table[0]  # header and two rows


SCALE = Path(__file__).resolve().parents[1] / "bench" / "scale.py"


def test_scale_bench_runs_every_stage_as_its_own_process_per_size(tmp_path):
    out = tmp_path / "scale"
    proc = subprocess.run([sys.executable, str(SCALE), "--sizes", "8", "12", "--set", "proposals.max_proposals=60",
                           "evaluate.max_proposals=20", "train.epochs=1", "train.allow_collapse=true", "--out", str(out)],
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert [r["images"] for r in runs] == [8, 12]
    for run in runs:
        assert set(run["stages"]) == {"download", "proposals", "regions", "features", "train", "evaluate", "render"}
        for stage in run["stages"].values():
            assert stage["seconds"] > 0 and stage["s_per_image"] > 0 and stage["peak_mb"] > 10 and stage["disk_mb"] >= 0
        assert run["stages"]["download"]["disk_mb"] > 0 and run["stages"]["regions"]["disk_mb"] > 0
    table = [line for line in (out / "results.md").read_text().splitlines() if line.startswith("| ")]
    assert len(table) == 1 + 7 and "8 images" in table[0] and "growth" in table[0]  # header, one row per stage


def test_seed_summary_reports_mean_sd_and_every_runs_interval():
    families = _bench_module("families")
    runs = [{"seed": s, "map07": v, "map": v + 0.01, "map07_ci95": [v - 0.1, v + 0.1], "map_ci95": [v - 0.1, v + 0.1],
             "train_seconds": 10.0 * (s + 1), "detect_s_per_image": 0.1, "search_s_per_image": 0.2,
             "detect_with_search_s_per_image": 0.3, "pipeline_seconds": 50.0,
             "plain": {"map07": v - 0.05, "map": v - 0.04, "map07_ci95": [0, 1], "map_ci95": [0, 1]}}
            for s, v in enumerate([0.5, 0.6, 0.7])]
    row = families.seed_summary(runs)
    assert row["seeds"] == [0, 1, 2] and row["map07"] == pytest.approx(0.6) and row["map07_sd"] == pytest.approx(0.1)
    assert row["map07_ci95"] == [r["map07_ci95"] for r in runs] and row["train_seconds"] == pytest.approx(20.0)
    assert row["plain"]["map07"] == pytest.approx(0.55) and row["runs"] == runs
    assert families.ap_cell(row, "map07") == "0.600 ± 0.100"
    assert families.intervals_cell(row) == "[0.40, 0.60] [0.50, 0.70] [0.60, 0.80]"
    single = families.seed_summary(runs[:1])
    assert single["map07_sd"] is None and families.ap_cell(single, "map07") == "0.500"
