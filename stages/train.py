"""Stage train: train the detector chosen by model.arch, with early stopping on the validation split.

A killed run resumes from its last finished epoch when started again with the same params and inputs
(resume points in data/train-resume/, see rcnn.engine.resume)."""
from rcnn.pipeline import family_registry
from rcnn.pipeline.params import load_params
from rcnn.utils.errors import run_cli


def main() -> None:
    params = load_params()
    family_registry.run_train_stage(params, features_dir="data/features", regions_dir="data/regions",
                              model_path="data/model/model.pt", metrics_path="metrics/train.json",
                              live_dir="dvclive", voc_dir="data/voc", resume_dir="data/train-resume")


if __name__ == "__main__":
    run_cli(main)
