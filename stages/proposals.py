"""Stage proposals: selective-search boxes for every image of the splits the pipeline uses (none for a
detector that proposes its own regions, model.arch: faster_rcnn)."""
from rcnn.pipeline import family_registry
from rcnn.pipeline.params import load_params
from rcnn.utils.errors import run_cli


def main() -> None:
    params = load_params()
    family_registry.run_proposals_stage(params, "data/voc", "data/proposals", "metrics/proposals.json")


if __name__ == "__main__":
    run_cli(main)
