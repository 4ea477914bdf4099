"""Dataset formats besides VOC (COCO JSON, YOLO txt): recognised, read into one record type and written as the
VOC folder the pipeline reads (:mod:`rcnn.data.formats.convert`); and the synthetic set written in each, for tests."""
