"""Fine-tuning a classifier on purified clean images at the calibrated t* (the pieces of
`ssni finetune-classifier`).

Purification at t* blurs away detail the classifier relied on, so clean accuracy drops. The job
purifies clean training images at each image's own t* (score norm -> the defense's reweight),
`copies` times with different seeds, and fine-tunes the defense's classifier on them (plus the
clean images if asked), then reports the defense's clean accuracy before and after and writes a
defense recipe that points at the fine-tuned weights.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..seeding import block_seeds, mix_seeds
from .classifier import random_shift


class PreprocessedCE:
    """Cross-entropy through the defense's preprocessing; batch (images in [0,1], labels) -> [B]."""

    def __init__(self, preprocess, max_shift: int = 1):
        self.preprocess, self.max_shift = preprocess, max_shift

    def __call__(self, net: nn.Module, batch, generator=None) -> Tensor:
        x = random_shift(batch[0], self.max_shift, generator)
        return F.cross_entropy(net(self.preprocess(x)).float(), batch[1], reduction="none")


@torch.no_grad()
def purify_at_calibrated_t(defense, images: Tensor, copies: int, seed: int, batch_size: int,
                           progress: bool = False) -> tuple[Tensor, Tensor]:
    """`copies` purifications of each image at its own t*; images [N,C,H,W] -> ([copies*N,...], t* [N])."""
    from tqdm.auto import tqdm

    device = next(defense.parameters()).device
    outs, ts = [[] for _ in range(copies)], []
    for a in tqdm(range(0, images.shape[0], batch_size), disable=not progress, desc="purify"):
        x = images[a:a + batch_size].to(device)
        seeds = block_seeds(seed, a, x.shape[0])
        t, _ = defense.noise_levels(x, seeds)
        ts.append(t.cpu())
        for k in range(copies):
            outs[k].append(defense.purifier(x, t, seeds=mix_seeds(seeds, 1 + k)).cpu())
    return torch.cat([torch.cat(o) for o in outs]), torch.cat(ts)


@torch.no_grad()
def defense_accuracy(defense, images: Tensor, labels: Tensor, batch_size: int = 256,
                     seed: int = 12345) -> float:
    """Accuracy of a RobustClassifier on images [N,C,H,W] in [0,1] with fixed per-sample seeds."""
    device = next(defense.parameters()).device
    correct = 0
    for a in range(0, images.shape[0], batch_size):
        x, y = images[a:a + batch_size].to(device), labels[a:a + batch_size].to(device)
        seeds = torch.arange(a, a + x.shape[0]) + seed
        correct += (defense(x, seeds=seeds).argmax(1) == y).sum().item()
    return correct / max(1, images.shape[0])


@torch.no_grad()
def bare_accuracy(defense, images: Tensor, labels: Tensor) -> float:
    """Accuracy of the defense's classifier without purification (same preprocessing)."""
    device = next(defense.parameters()).device
    pred = defense.classify(images.to(device)).argmax(1).cpu()
    return float((pred == labels).float().mean())
