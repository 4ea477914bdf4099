"""Fast R-CNN (Girshick, ICCV 2015): RoIs from selective search, scored by the shared two-stage detector."""
