"""Stage render: draw stored detections (and ground truth) on the first evaluation images, plus a grid."""
from rcnn.evaluation.drawing import run_render_stage
from rcnn.pipeline.params import load_params
from rcnn.utils.errors import run_cli


def main() -> None:
    params = load_params()
    run_render_stage(params, voc_dir="data/voc", detections_dir="data/detections", out_dir="data/render")


if __name__ == "__main__":
    run_cli(main)
