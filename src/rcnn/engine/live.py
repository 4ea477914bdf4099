"""Training curves through dvclive, written so that a failed or interrupted training leaves none behind.

dvclive appends to its plot files as epochs finish. The train stage's curves output
(``dvclive/plots/metrics``) must instead hold the curves of the checkpoint beside it, so the logger
writes into a temporary folder that replaces ``dvclive/`` only when the stage succeeds. dvclive's own
summary (``dvclive/metrics.json``, the last epoch's values) is left out: the stage's summary is
``metrics/train.json`` (the chosen epoch), and an undeclared file would keep another run's values
after DVC restores a stage from its run cache.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import Iterator

from dvclive import Live

from rcnn.utils.fileio import atomic_dir

PLOTS = Path("plots") / "metrics"  # what dvc.yaml declares, under the live folder


@contextlib.contextmanager
def staged_live(live_dir: str | Path, history: str | Path | None = None, step: int = 0) -> Iterator[Live]:
    """A dvclive logger whose output replaces ``live_dir`` only if the block succeeds.

    ``history``, ``step``: the curves of earlier epochs (a resume point's folder) and the step to go on
    from, so that a resumed training's curves equal an uninterrupted one's.
    """
    with atomic_dir(live_dir) as tmp:
        with Live(dir=str(tmp), save_dvc_exp=False, dvcyaml=None, report=None) as live:
            if history is not None and (Path(history) / PLOTS).is_dir():
                shutil.copytree(Path(history) / PLOTS, tmp / PLOTS, dirs_exist_ok=True)
                live.step = step
            yield live
        (tmp / "metrics.json").unlink(missing_ok=True)


def snapshot(live: Live, to: str | Path) -> None:
    """Copy the curves logged so far into ``to`` (a resume point's folder)."""
    source = Path(live.dir) / PLOTS
    if source.is_dir():
        shutil.copytree(source, Path(to) / PLOTS, dirs_exist_ok=True)


def has_curves(folder: str | Path, steps: int) -> bool:
    """Whether ``folder`` (a resume point's) holds curves of at least ``steps`` logged steps: dvclive's plot
    files have a header line and one row per logged step (the curves logged every epoch have ``steps``)."""
    files = sorted((Path(folder) / PLOTS).rglob("*.tsv"))
    return max((len(f.read_text(encoding="utf-8", errors="replace").splitlines()) - 1 for f in files),
               default=0) >= steps
