"""Classifier training pieces: random-shift augmentation, cross-entropy loss, accuracy."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def random_shift(x: Tensor, max_shift: int, generator: Optional[torch.Generator]) -> Tensor:
    """Translate each image by up to max_shift pixels (zero padding); x: [B,C,H,W]."""
    if max_shift <= 0:
        return x
    b, _, h, w = x.shape
    pad = F.pad(x, [max_shift] * 4)
    offs = torch.randint(0, 2 * max_shift + 1, (b, 2), generator=generator, device=x.device)
    rows = (offs[:, 0, None] + torch.arange(h, device=x.device))  # [B,H]
    cols = (offs[:, 1, None] + torch.arange(w, device=x.device))  # [B,W]
    idx_b = torch.arange(b, device=x.device)[:, None, None]
    out = pad.permute(0, 2, 3, 1)[idx_b, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous()


class AugmentedCE:
    """Cross-entropy on randomly shifted images; batch: (images, labels) -> [B]."""

    def __init__(self, max_shift: int = 1, label_smoothing: float = 0.0):
        self.max_shift, self.label_smoothing = max_shift, label_smoothing

    def __call__(self, net: nn.Module, batch, generator=None) -> Tensor:
        x = random_shift(batch[0], self.max_shift, generator)
        return F.cross_entropy(net(x).float(), batch[1], reduction="none",
                               label_smoothing=self.label_smoothing)


@torch.no_grad()
def accuracy(model: nn.Module, dataset, batch_size: int = 256) -> float:
    """Top-1 accuracy of `model` on an in-memory data set."""
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    correct = 0
    for k in range(0, len(dataset), batch_size):
        x = dataset.images[k:k + batch_size].to(device)
        y = dataset.labels[k:k + batch_size].to(device)
        correct += (model(x).argmax(1) == y).sum().item()
    model.train(was)
    return correct / len(dataset)
