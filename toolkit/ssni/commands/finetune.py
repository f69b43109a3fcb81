"""`ssni finetune-classifier`: fine-tune a classifier on purified clean images at the calibrated t*.

Writes the fine-tuned weights, the defense's clean accuracy before and after, and a defense recipe
that points at the new weights.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List

import torch
import yaml

from ..config import load_config, save_config, setting, to_dict
from ..data import DataConfig, TensorImageDataset, build_dataset
from ..defense import DefenseConfig, build_defense
from ..io import atomic_write_json, atomic_write_text
from ..models import classifier_spec
from ..training.finetune import PreprocessedCE, bare_accuracy, defense_accuracy, purify_at_calibrated_t
from ..training.loop import LoopConfig, OptimConfig, Trainer, check_run_dir, finished_run
from .registry import command


@dataclass
class FinetuneConfig:
    """Everything `ssni finetune-classifier` needs."""

    run_dir: str = setting("runs/classifier-digits-finetuned", directory=True)
    defense_recipe: str = "recipes/defense/digits.yaml"
    defense_overrides: List[str] = field(default_factory=list)
    data: DataConfig = field(default_factory=DataConfig)
    copies: int = setting(2, ge=1)  # purified copies of each training image, each with its own seeds
    include_clean: bool = True  # keep the clean images in the mix (clean accuracy without SSNI)
    augment_shift: int = setting(1, ge=0, means="0: off")
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(
        steps=400, batch_size=64, ema_decay=0.99, ckpt_every=200, log_every=25))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(
        lr=2e-4, weight_decay=0.01, warmup_steps=20, schedule="cosine"))
    eval_count: int = setting(360, ge=1)  # test images for the before/after defense accuracy
    batch_size: int = setting(256, ge=1)
    seed: int = 0
    device: str = "auto"
    progress: bool = True


@command("finetune-classifier", FinetuneConfig,
         "fine-tune a classifier on purified clean images at the calibrated t*")
def run_finetune(cfg: FinetuneConfig) -> Dict[str, Any]:
    """Fine-tune the defense's classifier on purified clean images; returns accuracies and paths."""
    dcfg = load_config(DefenseConfig, cfg.defense_recipe, cfg.defense_overrides)
    if cfg.device != "auto":
        dcfg.device = cfg.device
    defense = build_defense(dcfg)
    train_ds, test_ds = build_dataset(cfg.data, "train"), build_dataset(cfg.data, "test")
    if tuple(train_ds.image_shape) != tuple(defense.score_model.input_shape):
        raise ValueError(f"data images are {list(train_ds.image_shape)} but the defense's score "
                         f"network expects {list(defense.score_model.input_shape)}")
    purified, t_train = purify_at_calibrated_t(defense, train_ds.images, cfg.copies, cfg.seed,
                                               cfg.batch_size, cfg.progress)
    images = [purified] + ([train_ds.images] if cfg.include_clean else [])
    labels = train_ds.labels.repeat(cfg.copies + (1 if cfg.include_clean else 0))
    mix = TensorImageDataset(torch.cat(images), labels, train_ds.num_classes)

    n_eval = min(cfg.eval_count, len(test_ds))
    xe, ye = test_ds.images[:n_eval], test_ds.labels[:n_eval]
    before = defense_accuracy(defense, xe, ye, cfg.batch_size)
    bare_before = bare_accuracy(defense, xe, ye)

    student = copy.deepcopy(defense.classifier).train().requires_grad_(True)
    run_dir = Path(cfg.run_dir)
    check_run_dir(cfg, run_dir)  # resumed checkpoints come from this config; none when not resuming
    if cfg.loop.resume and (done := finished_run(run_dir, cfg.loop.steps, "finetune-classifier")) is not None:
        return done
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir)
    trainer = Trainer(student, PreprocessedCE(defense.preprocess, cfg.augment_shift), mix,
                      cfg.loop, cfg.optim, run_dir, classifier_spec(student))
    summary = trainer.fit()
    original = defense.classifier
    defense.classifier = trainer.ema.eval().requires_grad_(False)
    after = defense_accuracy(defense, xe, ye, cfg.batch_size)
    bare_after = bare_accuracy(defense, xe, ye)
    defense.classifier = original
    trainer.close()

    new_recipe = to_dict(dcfg)
    new_recipe["classifier"]["checkpoint"] = str(run_dir)
    new_recipe["classifier"]["weights"] = "ema"
    atomic_write_text(run_dir / "defense.yaml", yaml.safe_dump(new_recipe, sort_keys=False))
    result = {"run_dir": str(run_dir), "steps": summary["steps"],
              "train_images": len(mix), "mean_t_star_train": float(t_train.mean()),
              "eval_count": n_eval, "defense_accuracy_before": before,
              "defense_accuracy_after": after, "bare_clean_accuracy_before": bare_before,
              "bare_clean_accuracy_after": bare_after, "defense_recipe": str(run_dir / "defense.yaml")}
    atomic_write_json(run_dir / "summary.json", result)
    return result


