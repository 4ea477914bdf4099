"""Stage proposals: selective-search boxes for every image of the splits the pipeline uses (none for a
detector that proposes its own regions, model.arch: faster_rcnn)."""
from rcnn import detectors
from rcnn.errors import run_cli
from rcnn.params import load_params


def main() -> None:
    params = load_params()
    detectors.run_proposals_stage(params, "data/voc", "data/proposals", "metrics/proposals.json")


if __name__ == "__main__":
    run_cli(main)
