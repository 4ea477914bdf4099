"""The detector families, one module (or sub-package) each, chosen by :mod:`rcnn.pipeline.family_registry`.  A
family module imports shared modules of :mod:`rcnn` only, never another family's."""
