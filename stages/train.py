"""Stage train: train the detector chosen by model.arch, with early stopping on the validation split.

A killed run resumes from its last finished epoch when started again with the same params and inputs
(resume points in data/train-resume/, see rcnn.resume)."""
from rcnn import detectors
from rcnn.errors import run_cli
from rcnn.params import load_params


def main() -> None:
    params = load_params()
    detectors.run_train_stage(params, features_dir="data/features", regions_dir="data/regions",
                              model_path="data/model/model.pt", metrics_path="metrics/train.json",
                              live_dir="dvclive", voc_dir="data/voc", resume_dir="data/train-resume")


if __name__ == "__main__":
    run_cli(main)
