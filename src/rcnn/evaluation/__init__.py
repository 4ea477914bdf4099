"""Scoring and showing detections: VOC AP, COCO metrics, bootstrap intervals, confusion, class accuracy, drawing."""
