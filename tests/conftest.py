"""Shared fixtures: every test runs on data the project generates itself."""

from __future__ import annotations

from pathlib import Path

import pytest

from rcnn.synthetic import generate


@pytest.fixture(scope="session")
def synthetic_voc(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 24-image synthetic VOC-format folder (classes car, dog, person); treat it as read-only."""
    return generate(tmp_path_factory.mktemp("synthetic") / "VOC2007", images=24, seed=0)
