"""Datasets: PASCAL VOC reading, the download stage, the evaluation protocol's split check, other formats."""
