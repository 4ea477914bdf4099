"""Stage evaluate: detect on the evaluation split, write VOC results files, mAP metrics and PR curves."""
from rcnn.pipeline.evaluate_stage import run_evaluate_stage
from rcnn.pipeline.params import load_params
from rcnn.utils.errors import run_cli


def main() -> None:
    params = load_params()
    run_evaluate_stage(params, voc_dir="data/voc", proposals_dir="data/proposals", model_path="data/model/model.pt",
                       detections_dir="data/detections", metrics_path="metrics/eval.json", pr_dir="metrics/pr")


if __name__ == "__main__":
    run_cli(main)
