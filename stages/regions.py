"""Stage regions: label the proposals of the train and val splits and store them as the detector needs."""
from rcnn import detectors
from rcnn.errors import run_cli
from rcnn.params import load_params


def main() -> None:
    params = load_params()
    detectors.run_regions_stage(params, "data/voc", "data/proposals", "data/regions", "metrics/regions.json")


if __name__ == "__main__":
    run_cli(main)
