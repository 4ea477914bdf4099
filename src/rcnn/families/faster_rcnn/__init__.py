"""Faster R-CNN (Ren et al., NeurIPS 2015): RoIs from a region proposal network trained with the head."""
