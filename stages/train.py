"""Stage train: train the region classifier (head on cached features, or end to end) with early stopping."""
from rcnn import training
from rcnn.errors import run_cli
from rcnn.params import load_params


def main() -> None:
    params = load_params()
    training.run_train_stage(params, features_dir="data/features", regions_dir="data/regions",
                             model_path="data/model/model.pt", metrics_path="metrics/train.json",
                             live_dir="dvclive")


if __name__ == "__main__":
    run_cli(main)
