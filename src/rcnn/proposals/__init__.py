"""Region proposals and their labels: selective search, proposals labelled against the ground truth, labelled
boxes per image."""
