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
import time
from pathlib import Path

import pytest
from dvc_project import STAGES, env, make_project, run, stages_run

from rcnn.synthetic import QUICK_PARAMS


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh git+DVC copy of the project configured for the synthetic dataset."""
    return make_project(tmp_path_factory.mktemp("project"), tmp_path_factory.mktemp("dataset"))


def test_repro_then_nothing_to_do(project: Path):
    first = run(["dvc", "repro"], project)
    assert stages_run(first.stdout) == set(STAGES), first.stdout
    for name in ("proposals", "regions", "train", "eval"):
        assert json.loads((project / "metrics" / f"{name}.json").read_text())
    assert "map" in json.loads((project / "metrics" / "eval.json").read_text())
    assert (project / "data" / "render" / "grid.jpg").is_file()
    second = run(["dvc", "repro"], project)
    assert stages_run(second.stdout) == set(), second.stdout
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
    # the train stage alone (its upstream was just forced): same bytes, so evaluate and render stay up to date
    run(["dvc", "repro", "-f", "--single-item", "train"], project)
    status = run(["dvc", "status"], project).stdout
    assert "evaluate" not in status and "render" not in status, status


def test_experiment_reruns_only_training_and_after(project: Path):
    before = {s: (project / "data" / s).stat().st_mtime_ns for s in ("proposals", "regions", "features")}
    exp = run(["dvc", "exp", "run", "-S", "train.lr=0.003", "-n", "lr3"], project)
    ran = stages_run(exp.stdout)
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
    assert not stages_run(allowed.stdout) & {"download", "features", "train"}, allowed.stdout  # regions: same bytes
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
    proc = subprocess.Popen(["dvc", "repro", "--force", "--single-item", "proposals"], cwd=project, env=env(),
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
    cache = project / ".dvc" / "cache"
    cache.rename(tmp_path / "cache")  # as on another machine; put back below for the later tests' checkouts
    shutil.rmtree(project / "data" / "model")
    run(["dvc", "pull"], project)
    assert (project / "data" / "model" / "model.pt").is_file()
    assert "up to date" in run(["dvc", "status"], project).stdout
    shutil.copytree(tmp_path / "cache", cache, dirs_exist_ok=True)


def test_queued_sweep_runs_in_the_background(project: Path):
    run(["git", "reset", "-q", "--hard"], project)
    run(["dvc", "checkout", "--force"], project)
    # 2 epochs: the queue's mechanics are under test, not what 16 images learn (a collapse is kept, not a failure)
    run(["dvc", "exp", "run", "--queue", "-S", "train.lr=0.002,0.004", "-S", "train.epochs=2",
         "-S", "train.allow_collapse=true"], project)
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
