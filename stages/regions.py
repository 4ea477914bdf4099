"""Stage regions: label the proposals of the train and val splits and store them as the detector needs."""
from rcnn.pipeline import family_registry
from rcnn.pipeline.params import load_params
from rcnn.utils.errors import run_cli


def main() -> None:
    params = load_params()
    family_registry.run_regions_stage(params, "data/voc", "data/proposals", "data/regions", "metrics/regions.json")


if __name__ == "__main__":
    run_cli(main)
