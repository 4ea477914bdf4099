"""Stage regions: label, sample, warp and shard the training regions of the train and val splits."""
from rcnn import regions
from rcnn.errors import run_cli
from rcnn.params import load_params


def main() -> None:
    params = load_params()
    regions.run_regions_stage(params, "data/voc", "data/proposals", "data/regions", "metrics/regions.json")


if __name__ == "__main__":
    run_cli(main)
