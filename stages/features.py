"""Stage features: run the frozen backbone once over every training region and cache the features."""
from rcnn import features
from rcnn.errors import run_cli
from rcnn.params import load_params


def main() -> None:
    params = load_params()
    features.run_features_stage(params, regions_dir="data/regions", out_dir="data/features",
                                metrics_path="metrics/features.json")


if __name__ == "__main__":
    run_cli(main)
