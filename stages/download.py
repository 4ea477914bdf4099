"""Stage download: put the requested VOC2007 splits into data/voc (downloaded or from a local copy)."""
from pathlib import Path

from rcnn.data import download
from rcnn.pipeline.params import load_params
from rcnn.utils.errors import run_cli

OUT_DIR = Path("data/voc")
CACHE_DIR = Path("data/.downloads")  # resumable, verified archives; outside the DVC output on purpose


def main() -> None:
    params = load_params()
    counts = download.prepare_voc(params.data, OUT_DIR, CACHE_DIR)
    print(f"{OUT_DIR / 'VOC2007'}: " + ", ".join(f"{split} {n} images" for split, n in counts.items()))


if __name__ == "__main__":
    run_cli(main)
