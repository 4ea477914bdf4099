"""Stage evaluate: detect on the evaluation split, write VOC results files, mAP metrics and PR curves."""
from rcnn.detection import run_evaluate_stage
from rcnn.errors import run_cli
from rcnn.params import load_params


def main() -> None:
    params = load_params()
    run_evaluate_stage(params, voc_dir="data/voc", proposals_dir="data/proposals", model_path="data/model/model.pt",
                       detections_dir="data/detections", metrics_path="metrics/eval.json", pr_dir="metrics/pr")


if __name__ == "__main__":
    run_cli(main)
