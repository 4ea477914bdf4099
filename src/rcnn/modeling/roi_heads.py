"""The parts of the two-stage head that differ from torchvision's: pixel-aligned RoIAlign from one feature
map (with an optional context region around each RoI; on a CPU as a weighted gather, :func:`gathered_roi_align`),
and TFA's cosine classifier beside the linear one (both with the interfaces ``RoIHeads`` calls)."""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.ops import roi_align

FEATURE_STRIDE = 32  # of the last feature map of every supported backbone (ResNet layer4, MobileNet features)


def _bilinear_corners(coords: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                 torch.Tensor, torch.Tensor]:
    """For sample coordinates along one axis of ``size`` cells: the lower and upper cell, their bilinear weights
    and whether the sample counts, by torchvision's RoIAlign rules (beyond -1 or ``size``: zero; else clamped)."""
    inside = (coords >= -1) & (coords <= size)
    coords = coords.clamp(min=0)
    low = coords.floor().long().clamp(max=size - 1)
    coords = torch.where(low >= size - 1, low.to(coords.dtype), coords)
    high = (low + 1).clamp(max=size - 1)
    upper_weight = coords - low
    return low, high, 1 - upper_weight, upper_weight, inside


def use_gathered_pooling(device: torch.device) -> bool:
    """Whether RoIs are pooled by :func:`gathered_roi_align` on ``device`` rather than torchvision's kernel: on a
    CPU, whose torchvision backward is a serial loop; GPUs keep torchvision's parallel kernels."""
    return device.type == "cpu"


def gathered_roi_align(features: torch.Tensor, boxes: list[torch.Tensor], output_size: int, spatial_scale: float,
                       sampling_ratio: int) -> torch.Tensor:
    """``torchvision.ops.roi_align(..., aligned=True)`` with a fixed ``sampling_ratio``, as one weighted gather
    (``embedding_bag``): each output cell sums its samples' four bilinear corners. The same numbers to float
    rounding, but torchvision's CPU backward is a serial loop: on a 2-core CPU a Faster R-CNN step spent 44% of
    its time there, and this is 5x faster forward and backward (docs/performance.md)."""
    n, channels, height, width = features.shape
    image = torch.cat([torch.full((len(b),), i, dtype=torch.long, device=features.device)
                       for i, b in enumerate(boxes)])
    rois = torch.cat(boxes).to(torch.float32) * spatial_scale - 0.5
    bins = (rois[:, 2:] - rois[:, :2]) / output_size  # (R, 2): bin width and height
    steps = (torch.arange(output_size * sampling_ratio, device=features.device, dtype=torch.float32) + 0.5) \
        / sampling_ratio
    x_low, x_high, x_wlow, x_whigh, x_in = _bilinear_corners(rois[:, :1] + steps * bins[:, :1], width)
    y_low, y_high, y_wlow, y_whigh, y_in = _bilinear_corners(rois[:, 1:2] + steps * bins[:, 1:], height)
    row = (image * height)[:, None]
    cells = [((row + y)[:, :, None] * width + x[:, None, :]) for y in (y_low, y_high) for x in (x_low, x_high)]
    weights = [wy[:, :, None] * wx[:, None, :] for wy in (y_wlow, y_whigh) for wx in (x_wlow, x_whigh)]
    inside = (y_in[:, :, None] & x_in[:, None, :]).to(torch.float32) / sampling_ratio ** 2

    def by_output_cell(parts: list[torch.Tensor]) -> torch.Tensor:  # (R, ys, xs) x 4 -> (R * out * out, samples)
        side = (len(parts[0]), output_size, sampling_ratio, output_size, sampling_ratio, 4)
        return torch.stack(parts, dim=-1).view(side).permute(0, 1, 3, 2, 4, 5).reshape(
            len(parts[0]) * output_size ** 2, sampling_ratio ** 2 * 4)

    table = features.permute(0, 2, 3, 1).reshape(n * height * width, channels).to(torch.float32)
    pooled = nn.functional.embedding_bag(by_output_cell(cells), table, mode="sum",
                                         per_sample_weights=by_output_cell([w * inside for w in weights]))
    return pooled.view(len(image), output_size, output_size, channels).permute(0, 3, 1, 2).to(features.dtype)


class RoIAlignPool(nn.Module):
    """RoIAlign of every proposal from the single feature map ``"0"``, pixel-aligned; with ``context`` > 0 also
    of the same box enlarged ``context`` times about its centre, the two stacked on the channel axis.

    The interface of ``MultiScaleRoIAlign`` (what ``RoIHeads`` calls), but with
    ``aligned=True``: torchvision's multi-scale pooler samples half a pixel off (``aligned=False``,
    kept there for old checkpoints), which at stride 32 is a 16-pixel shift in the image. On a CPU the pooling is
    :func:`gathered_roi_align` (:func:`use_gathered_pooling`); elsewhere torchvision's kernel. The context region
    (Gidaris & Komodakis' multi-region features, 2015) lets the head see what surrounds a box, which helped
    most where classes have few boxes (docs/few-photos.md). The enlarged box is not clipped: RoIAlign
    samples zeros beyond the map.
    """

    def __init__(self, output_size: int, spatial_scale: float = 1 / FEATURE_STRIDE, sampling_ratio: int = 2,
                 context: float = 0.0) -> None:
        super().__init__()
        if sampling_ratio < 1:
            raise ValueError(f"sampling_ratio = {sampling_ratio}: a fixed number of samples per bin side is needed")
        self.output_size, self.spatial_scale, self.sampling_ratio = output_size, spatial_scale, sampling_ratio
        self.context = context

    def channels(self, feature_channels: int) -> int:
        """Channels of the pooled output for a map of ``feature_channels``."""
        return feature_channels * (2 if self.context else 1)

    def enlarged(self, boxes: torch.Tensor) -> torch.Tensor:
        """``boxes`` (x1, y1, x2, y2) scaled ``context`` times about their centres."""
        centre, half = (boxes[:, :2] + boxes[:, 2:]) / 2, (boxes[:, 2:] - boxes[:, :2]) * (self.context / 2)
        return torch.cat([centre - half, centre + half], dim=1)

    def forward(self, features: dict[str, torch.Tensor], proposals: list[torch.Tensor],
                image_shapes: list[tuple[int, int]]) -> torch.Tensor:
        def pool(boxes: list[torch.Tensor]) -> torch.Tensor:
            if use_gathered_pooling(features["0"].device):
                return gathered_roi_align(features["0"], boxes, self.output_size, self.spatial_scale,
                                          self.sampling_ratio)
            return roi_align(features["0"], boxes, self.output_size, spatial_scale=self.spatial_scale,
                             sampling_ratio=self.sampling_ratio, aligned=True)

        if not self.context:
            return pool(proposals)
        return torch.cat([pool(proposals), pool([self.enlarged(boxes) for boxes in proposals])], dim=1)


class CosinePredictor(nn.Module):
    """TFA's classifier (Wang et al., ICML 2020): each class score is ``scale`` times the cosine between the RoI
    feature and that class's weight vector, so no class outscores another by the length of its weights or a
    bias, which a class with many boxes (background above all) otherwise grows at the expense of one with a
    few. Box deltas stay linear. Same interface as ``FastRCNNPredictor``: what ``RoIHeads`` calls."""

    def __init__(self, in_channels: int, num_classes: int, scale: float) -> None:
        super().__init__()
        self.scale = scale
        self.cls_score = nn.Linear(in_channels, num_classes, bias=False)
        self.bbox_pred = nn.Linear(in_channels, num_classes * 4)
        nn.init.normal_(self.cls_score.weight, std=0.01)  # TFA's initialisation
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.bbox_pred.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.flatten(1)
        cosine = nn.functional.normalize(x, dim=1) @ nn.functional.normalize(self.cls_score.weight, dim=1).t()
        return self.scale * cosine, self.bbox_pred(x)


def box_predictor(classifier: str, hidden: int, num_labels: int, cosine_scale: float) -> nn.Module:
    """The last layer: linear class scores (``softmax``) or cosine ones (``cosine``), and box deltas."""
    if classifier == "cosine":
        return CosinePredictor(hidden, num_labels, cosine_scale)
    return FastRCNNPredictor(hidden, num_labels)
