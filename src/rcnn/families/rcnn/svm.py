"""Per-class linear SVMs on backbone features, the R-CNN paper's classifiers (§2.3, App. B).

``model.classifier = svm`` replaces the softmax head's scores by one linear SVM per class:
squared hinge loss, C = ``train.svm_c``, positive loss weight 2 and features scaled to a mean
norm of 20 (the paper's code); positives are the training sample's foreground regions of the
class, negatives everything else (background and other classes). Margins become scores through
a sigmoid, so ``evaluate.score_threshold`` keeps its meaning.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

SVM_POSITIVE_WEIGHT = 2.0
SVM_FEATURE_NORM = 20.0
DEAD_WEIGHT = 1e-6  # largest |weight| below which the SVMs separate nothing


def fit_svms(features: np.ndarray, labels: np.ndarray, num_classes: int, c: float,
             max_iter: int = 200) -> dict[str, torch.Tensor]:
    """One linear SVM per object class (labels 1..num_classes-1; 0 is background).

    Minimises ``0.5 |w|^2 + C sum_i a_i max(0, 1 - y_i (w . s x_i + b))^2`` per class with
    L-BFGS (deterministic, full batch), ``a_i`` = 2 for positives, ``s`` scaling features to a
    mean norm of 20. Returns ``{"weight": (K, D), "bias": (K,), "scale": ()}`` for K object classes.
    """
    x = torch.from_numpy(np.asarray(features, np.float32))
    norm = float(x.norm(dim=1).mean()) if len(x) else 1.0
    scale = SVM_FEATURE_NORM / max(norm, 1e-12)
    x = x * scale
    y = torch.from_numpy(np.asarray(labels, np.int64))
    classes = torch.arange(1, num_classes)
    target = torch.where(y[:, None] == classes[None, :], 1.0, -1.0)  # (N, K)
    alpha = torch.where(target > 0, SVM_POSITIVE_WEIGHT, 1.0)
    weight = torch.zeros(len(classes), x.shape[1], requires_grad=True)
    bias = torch.zeros(len(classes), requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=max_iter, line_search_fn="strong_wolfe",
                                  tolerance_grad=1e-6, tolerance_change=1e-9)

    def objective() -> torch.Tensor:
        optimizer.zero_grad()
        margin = x @ weight.T + bias
        loss = 0.5 * (weight ** 2).sum() + c * (alpha * torch.clamp(1 - target * margin, min=0) ** 2).sum()
        loss.backward()
        return loss

    optimizer.step(objective)
    if len(x) and float(weight.detach().abs().max()) < DEAD_WEIGHT:
        warnings.warn(f"train.svm_c = {c:g} is too small to learn anything: every SVM's weights are zero, so "
                      f"every region scores the same; raise it (the paper's 0.001)", RuntimeWarning, stacklevel=2)
    return {"weight": weight.detach().clone(), "bias": bias.detach().clone(),
            "scale": torch.tensor(scale, dtype=torch.float32)}


def svm_margins(svm: dict[str, torch.Tensor], features: torch.Tensor) -> torch.Tensor:
    """(N, D) features -> (N, K) SVM margins."""
    return (features.float() * svm["scale"]) @ svm["weight"].T + svm["bias"]


def svm_scores(svm: dict[str, torch.Tensor], features: torch.Tensor) -> torch.Tensor:
    """(N, D) features -> (N, K+1) scores in [0, 1] shaped like softmax output: column 0 (background)
    is 0, object columns are sigmoid(margin)."""
    margins = svm_margins(svm, features)
    return torch.cat([torch.zeros(len(margins), 1), torch.sigmoid(margins)], dim=1)
