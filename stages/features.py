"""Stage features: R-CNN with a frozen backbone runs it once over every training region and caches the
features; other configurations write only why there is nothing to cache."""
from rcnn.pipeline import family_registry
from rcnn.pipeline.params import load_params
from rcnn.utils.errors import run_cli


def main() -> None:
    params = load_params()
    family_registry.run_features_stage(params, regions_dir="data/regions", out_dir="data/features",
                                 metrics_path="metrics/features.json")


if __name__ == "__main__":
    run_cli(main)
