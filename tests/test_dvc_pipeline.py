"""The DVC workflow as users run it, end to end on the synthetic dataset with tiny settings.

A temporary copy of the project is made its own git repository; the test then drives it with
the same commands the README gives: ``dvc repro``, ``dvc exp run -S``, ``dvc metrics diff``,
``dvc params diff``, ``dvc exp show``, ``dvc plots show``, a local remote, and a stage killed
mid-way.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from rcnn.synthetic import QUICK_PARAMS, generate

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
STAGES = ["download", "proposals", "regions", "features", "train", "evaluate", "render"]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONHASHSEED"] = "0"
    env.pop("DVC_EXP_NAME", None)
    return env


def run(cmd: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return done


def _deep_update(base: dict, update: dict) -> None:
    for key, value in update.items():
        if isinstance(value, dict):
            _deep_update(base.setdefault(key, {}), value)
        else:
            base[key] = value


def _project_files() -> list[str]:
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.split("\n")
    return [f for f in listed if f and (REPO / f).is_file() and not f.startswith(("data/", "metrics/", "dvclive/"))
            and f != "dvc.lock"]


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh git+DVC copy of the project configured for the synthetic dataset."""
    root = tmp_path_factory.mktemp("project")
    for rel in _project_files():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, root / rel)
    dataset = generate(tmp_path_factory.mktemp("dataset") / "synthetic", images=16, seed=0)
    params = yaml.safe_load((root / "params.yaml").read_text())
    _deep_update(params, QUICK_PARAMS)
    params["data"]["source"] = str(dataset)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for cmd in (["git", "init", "-q"], ["git", "config", "user.email", "ci@example.com"],
                ["git", "config", "user.name", "CI"], ["git", "add", "-A"], ["git", "commit", "-qm", "start"]):
        run(cmd, root)
    return root


def _ran(output: str) -> set[str]:
    """Stages DVC actually executed (not restored from cache, not skipped)."""
    return {s for s in STAGES if f"Running stage '{s}'" in output}


def test_repro_then_nothing_to_do(project: Path):
    first = run(["dvc", "repro"], project)
    assert _ran(first.stdout) == set(STAGES), first.stdout
    for name in ("proposals", "regions", "train", "eval"):
        assert json.loads((project / "metrics" / f"{name}.json").read_text())
    assert "map" in json.loads((project / "metrics" / "eval.json").read_text())
    assert (project / "data" / "render" / "grid.jpg").is_file()
    second = run(["dvc", "repro"], project)
    assert _ran(second.stdout) == set(), second.stdout
    status = run(["dvc", "status"], project)
    assert "up to date" in status.stdout, status.stdout
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "baseline run"], project)


def _hashed_outputs(project: Path) -> dict[str, bytes]:
    files = [p for d in ("model", "features", "detections", "proposals", "regions") for p in (project / "data" / d).rglob("*")
             if p.is_file()]
    return {str(p.relative_to(project)): p.read_bytes() for p in sorted(files)}


def _non_timing(metrics: object) -> object:
    if isinstance(metrics, dict):
        return {k: _non_timing(v) for k, v in metrics.items()
                if not any(t in k for t in ("seconds", "per_second", "time", "threads"))}
    return metrics


def test_forced_reruns_give_the_same_bytes_and_keep_downstream_up_to_date(project: Path):
    before = _hashed_outputs(project)
    metrics = {p.name: json.loads(p.read_text()) for p in sorted((project / "metrics").glob("*.json"))}
    run(["dvc", "repro", "-f"], project)
    assert _hashed_outputs(project) == before
    again = {p.name: json.loads(p.read_text()) for p in sorted((project / "metrics").glob("*.json"))}
    assert _non_timing(again) == _non_timing(metrics)
    run(["dvc", "repro", "-f", "train"], project)
    status = run(["dvc", "status"], project).stdout
    assert "evaluate" not in status and "render" not in status, status


def test_experiment_reruns_only_training_and_after(project: Path):
    before = {s: (project / "data" / s).stat().st_mtime_ns for s in ("proposals", "regions", "features")}
    exp = run(["dvc", "exp", "run", "-S", "train.lr=0.003", "-n", "lr3"], project)
    ran = _ran(exp.stdout)
    assert {"train", "evaluate", "render"} <= ran, exp.stdout
    assert not ran & {"download", "proposals", "regions", "features"}, exp.stdout
    after = {s: (project / "data" / s).stat().st_mtime_ns for s in before}
    assert before == after
    params_diff = run(["dvc", "params", "diff"], project).stdout
    assert "train.lr" in params_diff and "0.003" in params_diff
    metrics_diff = run(["dvc", "metrics", "diff"], project).stdout  # the headline only: metrics/scores.json
    assert "metrics/scores.json" in metrics_diff and "map07" in metrics_diff, metrics_diff
    assert "metrics/train.json" not in metrics_diff, metrics_diff
    details = run(["dvc", "metrics", "diff", "--targets", "metrics/train.json", "--", "HEAD", "lr3"], project).stdout
    assert "metrics/train.json" in details and "best_epoch" in details, details
    shown = run(["dvc", "metrics", "show"], project).stdout
    assert "map07" in shown and max(len(line) for line in shown.splitlines()) <= 120, shown
    shown = run(["dvc", "exp", "show", "--no-pager", "--md"], project).stdout
    assert "lr3" in shown and "workspace" in shown
    # the two experiments' pictures side by side: one image per revision in one page
    diff = json.loads(run(["dvc", "plots", "diff", "HEAD", "lr3", "--json"], project).stdout)["data"]
    grid = diff["data/render/grid.jpg"]
    assert sorted(rev for entry in grid for rev in entry["revisions"]) == ["HEAD", "lr3"], grid


def test_scoring_the_validation_split_stops_unless_the_user_opts_in(project: Path):
    run(["git", "reset", "-q", "--hard"], project)
    run(["dvc", "checkout", "--force"], project)
    refused = run(["dvc", "exp", "run", "-S", "evaluate.split=val"], project, check=False)
    assert refused.returncode != 0
    errors = [line for line in (refused.stdout + refused.stderr).splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "'val'" in errors[0] and "validation" in errors[0], refused.stderr
    assert "evaluate.allow_overlap" in errors[0]
    run(["git", "reset", "-q", "--hard"], project)
    run(["dvc", "checkout", "--force"], project)
    allowed = run(["dvc", "exp", "run", "-S", "evaluate.split=val", "-S", "evaluate.allow_overlap=true"], project)
    assert not _ran(allowed.stdout) & {"download", "features", "train"}, allowed.stdout  # regions: same bytes
    evaluation = json.loads((project / "metrics" / "eval.json").read_text())
    assert evaluation["split"] == "val" and evaluation["allow_overlap"] is True
    assert evaluation["shared_ids"]["val"] == evaluation["images"] > 0


def test_plots_show_writes_html(project: Path):
    out = project / "plots_html"
    run(["dvc", "plots", "show", "-o", str(out)], project)
    html = (out / "index.html").read_text()
    assert "loss" in html and "precision" in html
    # offline: vega, vega-lite and vega-embed are inlined by .dvc/plots.html, no script comes over the network
    assert "<script src=" not in html and "vegaEmbed" in html and 'var e="5.20.2"' in html
    listed = json.loads(run(["dvc", "plots", "show", "--json"], project).stdout)["data"]
    assert "metrics/confusion.json" in listed  # DVC's confusion template over the evaluate stage's records
    # each curve drawn once: in the top-level loss/accuracy charts, not again file by file
    assert {"loss", "accuracy"} <= set(listed) and not [name for name in listed if name.startswith("dvclive/")]
    assert {f"metrics/pr/{name}.json" for name in QUICK_PARAMS["classes"]} <= set(listed)  # one chart per class
    pictures = [name for name in listed if name.startswith("data/render") and name.endswith(".jpg")]
    assert any(name.endswith("grid.jpg") for name in pictures), sorted(listed)
    records = json.loads((project / "metrics" / "confusion.json").read_text())
    assert records and all(set(r) == {"actual", "predicted"} for r in records)


def test_killed_stage_is_rerun_and_completes(project: Path):
    run(["git", "reset", "-q", "--hard"], project)
    run(["dvc", "checkout", "--force"], project)
    reference = json.loads((project / "metrics" / "proposals.json").read_text())
    proc = subprocess.Popen(["dvc", "repro", "--force", "--single-item", "proposals"], cwd=project, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    # Kill while the stage is writing into its temporary folder.
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list((project / "data").glob(".proposals*.tmp")):
        time.sleep(0.05)
    saw_partial_output = bool(list((project / "data").glob(".proposals*.tmp")))
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert saw_partial_output, "the stage finished before it could be killed mid-way"
    assert not (project / "data" / "proposals").exists(), "a killed stage left an output that looks complete"
    status = run(["dvc", "status", "proposals"], project).stdout
    assert "proposals" in status and "up to date" not in status
    # --force: really run the stage again instead of restoring it from DVC's run cache.
    run(["dvc", "repro", "--force", "--single-item", "proposals"], project)
    assert not list((project / "data").glob(".proposals*.tmp"))
    rerun = json.loads((project / "metrics" / "proposals.json").read_text())
    assert _without_timings(rerun) == _without_timings(reference)
    assert "up to date" in run(["dvc", "status"], project).stdout


def _without_timings(metrics: dict) -> dict:
    return {k: _without_timings(v) if isinstance(v, dict) else v for k, v in metrics.items() if "second" not in k}


def test_local_remote_push_and_pull(project: Path, tmp_path: Path):
    remote = tmp_path / "remote"
    run(["dvc", "remote", "add", "-f", "-d", "local", str(remote)], project)
    run(["dvc", "push"], project)
    assert any(remote.rglob("*"))
    shutil.rmtree(project / ".dvc" / "cache")
    shutil.rmtree(project / "data" / "model")
    run(["dvc", "pull"], project)
    assert (project / "data" / "model" / "model.pt").is_file()
    assert "up to date" in run(["dvc", "status"], project).stdout


def test_queued_sweep_runs_in_the_background(project: Path):
    run(["git", "reset", "-q", "--hard"], project)
    run(["dvc", "checkout", "--force"], project)
    run(["dvc", "exp", "run", "--queue", "-S", "train.lr=0.002,0.004"], project)
    run(["dvc", "queue", "start", "--jobs", "1"], project)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        status = run(["dvc", "queue", "status"], project).stdout
        if "Queued" not in status and "Running" not in status:
            break
        time.sleep(2)
    run(["dvc", "queue", "stop", "--kill"], project, check=False)
    assert status.count("Success") == 2, status
    shown = run(["dvc", "exp", "show", "--no-pager", "--csv"], project).stdout
    assert "0.002" in shown and "0.004" in shown


# Random weights and 8 training images: only training every layer for 10 epochs learns anything here, and on a
# float32 CPU even that collapses to background, so the run keeps its model (train.allow_collapse) and says so.
FAST_RCNN_OPTIONS = ["-S", "model.arch=fast_rcnn", "-S", "model.trainable_layers=5", "-S", "model.image_size=192",
                     "-S", "model.max_size=256", "-S", "model.roi_channels=16", "-S", "model.roi_size=5",
                     "-S", "model.dropout=0.0", "-S", "train.rois_per_image=64", "-S", "train.optimizer=sgd",
                     "-S", "train.lr=0.01", "-S", "train.epochs=10", "-S", "train.patience=10",
                     "-S", "train.allow_collapse=true",
                     "-S", "evaluate.max_proposals=150"]  # every proposal, as the fast-rcnn preset scores


def test_switching_to_fast_rcnn_reruns_exactly_what_it_must(project: Path):
    run(["git", "reset", "-q", "--hard"], project)
    run(["dvc", "checkout", "--force"], project)
    exp = run(["dvc", "exp", "run", "-n", "fast", *FAST_RCNN_OPTIONS], project)
    ran = _ran(exp.stdout)
    # model.arch is read by the proposals stage (no selective search for faster_rcnn): it reruns, same bytes
    assert ran == {"proposals", "regions", "features", "train", "evaluate", "render"}, exp.stdout
    assert json.loads((project / "metrics" / "regions.json").read_text())["format"] == "boxes"
    features = sorted(p.name for p in (project / "data" / "features").iterdir())
    assert features == ["info.json"]  # nothing cached, nothing stale
    train = json.loads((project / "metrics" / "train.json").read_text())
    # No accuracy margin here: on 8 random-weight training images this recipe collapses to background on this
    # machine (val mAP ~0.02, with this commit's code and the previous one's alike); 4 test images could not
    # show a margin anyway. Accuracy is measured on real photos by bench/families.py.
    assert train["train_images"] > 0 and 0 <= train["val_map"] <= 1 and "collapsed" in train, train
    evaluation = json.loads((project / "metrics" / "eval.json").read_text())
    assert 0 <= evaluation["map"] <= 1 and evaluation["split"] == "test", evaluation
    assert evaluation["map07_ci95"] == [None, None]  # 4 test images: too few for a bootstrap interval
    assert (project / "data" / "render" / "grid.jpg").is_file()
    # A Fast R-CNN-only knob reruns training and what follows, nothing before it.
    again = run(["dvc", "exp", "run", "-n", "fast-lr", *FAST_RCNN_OPTIONS, "-S", "train.lr=0.005"], project)
    assert _ran(again.stdout) == {"train", "evaluate", "render"}, again.stdout
    source = Path(yaml.safe_load((project / "params.yaml").read_text())["data"]["source"])
    detect = run(["rcnn-detect", str(sorted((source / "JPEGImages").glob("*.jpg"))[0]),
                  "--checkpoint", "data/model/model.pt", "--score", "0.0", "--max-proposals", "50"], project)
    assert detect.stdout.strip(), detect.stderr
    faster = run(["dvc", "exp", "run", "-n", "faster", *FAST_RCNN_OPTIONS, "-S", "model.arch=faster_rcnn",
                  "-S", "train.epochs=2"], project)
    assert _ran(faster.stdout) == {"proposals", "regions", "features", "train", "evaluate", "render"}, faster.stdout
    assert json.loads((project / "metrics" / "proposals.json").read_text())["selective_search"] is False
    assert json.loads((project / "metrics" / "eval.json").read_text())["proposal_recall"]["source"] == "learned"
    detect = run(["rcnn-detect", str(sorted((source / "JPEGImages").glob("*.jpg"))[0]),
                  "--checkpoint", "data/model/model.pt", "--score", "0.0"], project)
    assert detect.stdout.strip(), detect.stderr
    back = run(["dvc", "exp", "run", "-n", "fast-again", *FAST_RCNN_OPTIONS], project)  # all in the run cache
    assert _ran(back.stdout) == set(), back.stdout


def test_rcnn_fine_tuning_svms_and_hard_negatives_run_through_dvc(project: Path):
    run(["git", "reset", "-q", "--hard"], project)
    run(["dvc", "checkout", "--force"], project)
    exp = run(["dvc", "exp", "run", "-n", "paper-way", "-S", "model.trainable_layers=1", "-S", "model.classifier=svm",
               "-S", "train.hard_negative_rounds=1", "-S", "train.optimizer=sgd", "-S", "train.lr=0.01",
               "-S", "train.epochs=2"], project)
    assert _ran(exp.stdout) == {"features", "train", "evaluate", "render"}, exp.stdout
    train = json.loads((project / "metrics" / "train.json").read_text())
    assert train["epochs_run"] == 2 and train["pool_regions"] > train["regions_per_epoch"] > 0
    assert train["final_classifier"]["classifier"] == "svm" and train["final_classifier"]["mined_per_round"][0] > 0
    evaluation = json.loads((project / "metrics" / "eval.json").read_text())
    assert 0 <= evaluation["map"] <= 1 and (project / "data" / "render" / "grid.jpg").is_file()
