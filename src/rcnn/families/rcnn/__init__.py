"""R-CNN (Girshick et al., CVPR 2014): warped proposal crops classified by a CNN, with the paper's fine-tuning,
hard negatives, linear SVMs and box regression."""
