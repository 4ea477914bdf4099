"""Stage features: R-CNN with a frozen backbone runs it once over every training region and caches the
features; other configurations write only why there is nothing to cache."""
from rcnn import detectors
from rcnn.errors import run_cli
from rcnn.params import load_params


def main() -> None:
    params = load_params()
    detectors.run_features_stage(params, regions_dir="data/regions", out_dir="data/features",
                                 metrics_path="metrics/features.json")


if __name__ == "__main__":
    run_cli(main)
