"""Reproducible R-CNN object detection: a library of one module per concept, driven by DVC stages."""

import os

__version__ = "0.1.0"
# The process that started this one, noted on the package's first import (before torch, which takes seconds to
# import): a stage started by `dvc repro` that was killed meanwhile finds out (rcnn.utils.errors.run_cli).
PARENT_AT_START = os.getppid()
