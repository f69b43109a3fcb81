"""`ssni train-classifier`: train any timm model on a data set (images in [0,1])."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

from ..config import save_config, setting
from ..data import DataConfig, build_dataset
from ..dist import DistContext
from ..io import atomic_write_json
from ..models import check_input_size, classifier_spec, create_classifier
from ..seeding import seeded
from ..training.classifier import AugmentedCE, accuracy
from ..training.loop import LoopConfig, OptimConfig, Trainer, check_run_dir, finished_run
from .registry import command


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

    run_dir: str = setting("runs/classifier-digits", directory=True)
    data: DataConfig = field(default_factory=DataConfig)
    model: ClassifierConfig = field(default_factory=ClassifierConfig)
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(steps=1500, ema_decay=0.99))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(
        lr=1e-3, weight_decay=0.05, warmup_steps=50, schedule="cosine"))
    augment_shift: int = setting(1, ge=0)  # random translation in pixels (0: off)
    label_smoothing: float = setting(0.0, ge=0, lt=1)


@command("train-classifier", ClassifierTrainConfig, "train a timm classifier")
def train_classifier(cfg: ClassifierTrainConfig) -> Dict[str, Any]:
    """Train a timm classifier per `cfg`; returns test accuracy and paths."""
    dist = DistContext.from_env(cfg.loop.device)
    run_dir = Path(cfg.run_dir)
    check_run_dir(cfg, run_dir)  # resumed checkpoints come from this config; none when not resuming
    if cfg.loop.resume and (done := finished_run(run_dir, cfg.loop.steps, "train-classifier")) is not None:
        return done
    train_ds, test_ds = build_dataset(cfg.data, "train"), build_dataset(cfg.data, "test")
    if train_ds.num_classes < 2:  # the cross-entropy of one class is 0 whatever the weights
        raise ValueError(f"the {cfg.data.name!r} training data has {train_ds.num_classes} class; a classifier "
                         "needs at least 2 (imagefolder: one sub-folder per class)")
    c, h, _ = train_ds.image_shape
    with seeded(cfg.loop.seed):  # the recipe's seed fixes the initial weights
        model = create_classifier(cfg.model.name, in_chans=c, num_classes=train_ds.num_classes,
                                  image_size=h, pretrained=cfg.model.pretrained,
                                  checkpoint=cfg.model.checkpoint, **cfg.model.kwargs)
    check_input_size(model, c, h)  # before any training: a one-line error, not a traceback mid-run
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
    dist.close()
    return result
