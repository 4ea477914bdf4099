"""How many distinct batch shapes a training run meets, free against grouped batches (``train.batch_shapes``):
the presets' plan (2 images a step, sizes 400/480/560, max 800, 24 epochs of at least 40 steps) over a VOC
folder's training photos, shaped by the trainer's own transform (on zero images of each photo's size).

    python bench/batch_shapes.py VOC_DIR --classes C [C ...]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from rcnn.data import voc
from rcnn.engine.two_stage_batches import training_plan
from rcnn.engine.two_stage_trainer import CANVAS
from rcnn.modeling.image_input import CanvasTransform

SIZES, MAX_SIZE, EPOCHS, MIN_STEPS = (400, 480, 560), 800, 24, 960


def count_shapes(sizes: list[tuple[int, int]], grouped: bool, epochs: int = EPOCHS) -> int:
    """Distinct (height, width) of the padded batches over ``epochs`` epochs of the run's plan."""
    transform = CanvasTransform(SIZES, MAX_SIZE, [0.5] * 3, [0.25] * 3).train()
    groups = np.array([int(h > w) for h, w in sizes]) if grouped else None
    steps = max(-(-len(sizes) // 2), -(-MIN_STEPS // EPOCHS))
    rng, shapes = np.random.default_rng(0), set()
    torch.manual_seed(0)
    for _ in range(epochs):
        for batch in training_plan(len(sizes), 2, rng, steps, groups=groups, sizes=SIZES):
            with transform.shaped(batch[0].size, CANVAS if grouped else 0):
                images = [torch.zeros(3, *sizes[item.index]) for item in batch]
                shapes.add(tuple(transform(images)[0].tensors.shape[-2:]))
    return len(shapes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("voc_dir")
    parser.add_argument("--classes", nargs="+", required=True)
    parser.add_argument("--split", default="train")
    args = parser.parse_args()
    annotations = voc.load_split(voc.find_voc_root(args.voc_dir), args.split, args.classes, "skip")
    sizes = [(a.height, a.width) for a in annotations]
    for grouped in (False, True):
        print(f"{'grouped' if grouped else 'free'}: {count_shapes(sizes, grouped)} batch shapes over {EPOCHS} epochs "
              f"({len(sizes)} photos)")


if __name__ == "__main__":
    main()
