"""`ssni train-classifier`: train any timm model on a data set (images in [0,1])."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import save_config
from ..data import DataConfig, build_dataset
from ..io import atomic_write_json
from ..models import classifier_spec, create_classifier
from .dist import DistContext
from .loop import LoopConfig, OptimConfig, Trainer


@dataclass
class ClassifierConfig:
    """A timm model name, optional local weights, and extra timm keyword arguments."""

    name: str = "resnet18"
    pretrained: bool = False
    checkpoint: Optional[str] = None
    kwargs: Dict[str, Any] = field(default_factory=dict)


@dataclass
class ClassifierTrainConfig:
    """Everything `ssni train-classifier` needs."""

    run_dir: str = "runs/classifier-digits"
    data: DataConfig = field(default_factory=DataConfig)
    model: ClassifierConfig = field(default_factory=ClassifierConfig)
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(steps=1500, ema_decay=0.99))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(
        lr=1e-3, weight_decay=0.05, warmup_steps=50, schedule="cosine"))
    augment_shift: int = 1  # random translation in pixels (0: off)
    label_smoothing: float = 0.0


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


def train_classifier(cfg: ClassifierTrainConfig) -> Dict[str, Any]:
    """Train a timm classifier per `cfg`; returns test accuracy and paths."""
    dist = DistContext.from_env(cfg.loop.device)
    run_dir = Path(cfg.run_dir)
    train_ds, test_ds = build_dataset(cfg.data, "train"), build_dataset(cfg.data, "test")
    c, h, _ = train_ds.image_shape
    model = create_classifier(cfg.model.name, in_chans=c, num_classes=train_ds.num_classes,
                              image_size=h, pretrained=cfg.model.pretrained,
                              checkpoint=cfg.model.checkpoint, **cfg.model.kwargs)
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir)
    trainer = Trainer(model, AugmentedCE(cfg.augment_shift, cfg.label_smoothing), train_ds,
                      cfg.loop, cfg.optim, run_dir, classifier_spec(model), dist=dist)
    summary = trainer.fit()
    result = {"run_dir": str(run_dir), "steps": summary["steps"],
              "test_accuracy": accuracy(trainer.model, test_ds),
              "test_accuracy_ema": accuracy(trainer.ema, test_ds),
              "test_count": len(test_ds), "checkpoint": str(run_dir / "checkpoints")}
    if dist.is_main:
        trainer.writer.add_scalar("eval/test_accuracy", result["test_accuracy"], summary["steps"])
        atomic_write_json(run_dir / "summary.json", result)
    trainer.close()
    return result
