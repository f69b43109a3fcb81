"""`ssni train-score`: denoising score matching on clean images."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict

import torch

from ..config import save_config, setting
from ..data import DataConfig, build_dataset
from ..dist import DistContext
from ..images import save_grid_png
from ..io import atomic_write_json
from ..models import ModelConfig, create_model, model_spec
from ..noise import NoiseConfig, build_noise
from ..sampling import generate
from ..seeding import seeded
from ..training.loop import LoopConfig, OptimConfig, Trainer, check_run_dir, finished_run
from ..training.losses import DSMLoss, heldout_dsm_loss
from .registry import command


@dataclass
class ScoreTrainConfig:
    """Everything `ssni train-score` needs."""

    run_dir: str = setting("runs/score-digits", directory=True)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    t_eps: float = setting(1e-3, gt=0, lt=1, means="the smallest diffusion time trained on")
    eval_draws: int = setting(4, ge=1)  # noise draws per held-out image for the DSM loss
    sample_count: int = setting(64, ge=1)
    sample_steps: int = setting(250, ge=1)


@command("train-score", ScoreTrainConfig, "train a score network (DSM) on clean images")
def train_score(cfg: ScoreTrainConfig) -> Dict[str, Any]:
    """Train a score network per `cfg`; returns a summary (losses, paths)."""
    dist = DistContext.from_env(cfg.loop.device)
    run_dir = Path(cfg.run_dir)
    check_run_dir(cfg, run_dir)  # resumed checkpoints come from this config; none when not resuming
    if cfg.loop.resume and (done := finished_run(run_dir, cfg.loop.steps, "train-score")) is not None:
        return done
    train_ds, test_ds = build_dataset(cfg.data, "train"), build_dataset(cfg.data, "test")
    c, h, _ = train_ds.image_shape
    with seeded(cfg.loop.seed):  # the recipe's seed fixes the initial weights
        model = create_model(cfg.model.name, **{"in_channels": c, "image_size": h, **cfg.model.kwargs})
    noise = build_noise(cfg.noise)
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir)

    def on_sample(trainer: Trainer, step: int) -> None:
        g = torch.Generator(device=trainer.device).manual_seed(0)
        imgs = generate(trainer.ema, 16, steps=min(100, cfg.sample_steps), generator=g,
                        device=trainer.device)
        from torchvision.utils import make_grid

        trainer.writer.add_image("samples", make_grid(imgs.cpu(), nrow=4), step)

    trainer = Trainer(model, DSMLoss(t_eps=cfg.t_eps, noise=noise), train_ds, cfg.loop, cfg.optim,
                      run_dir, model_spec(model), on_sample=on_sample, dist=dist)
    resumed = trainer.try_resume() if cfg.loop.resume else False
    loss_before = None
    if not resumed:
        loss_before = heldout_dsm_loss(trainer.model, test_ds, cfg.eval_draws, t_eps=cfg.t_eps)
    summary = trainer.fit()
    loss_after = heldout_dsm_loss(trainer.ema, test_ds, cfg.eval_draws, t_eps=cfg.t_eps)
    result: Dict[str, Any] = {"run_dir": str(run_dir), "steps": summary["steps"],
                              "heldout_dsm_before": loss_before, "heldout_dsm_after_ema": loss_after,
                              "checkpoint": str(run_dir / "checkpoints")}
    if dist.is_main:
        g = torch.Generator(device=trainer.device).manual_seed(cfg.loop.seed)
        imgs = generate(trainer.ema, cfg.sample_count, steps=cfg.sample_steps, generator=g,
                        device=trainer.device, progress=cfg.loop.progress)
        result["samples_png"] = str(save_grid_png(imgs, run_dir / "samples.png"))
        trainer.writer.add_scalar("eval/heldout_dsm", loss_after, summary["steps"])
        atomic_write_json(run_dir / "summary.json", result)
    trainer.close()
    dist.close()
    return result
