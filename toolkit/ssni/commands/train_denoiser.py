"""`ssni train-denoiser`: train a denoiser at one noise level on random patches (Gaussian or TS noise).

Under torchrun the Trainer splits each global batch over the processes (DDP); rank 0 logs and saves.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict

import torch

from ..config import save_config, setting
from ..data import DataConfig, build_dataset
from ..denoise.metrics import psnr
from ..denoise.patches import RandomPatches
from ..denoise.train import DenoiseLoss, build_denoiser, denoise_quality, noisy_observation
from ..dist import DistContext
from ..io import atomic_write_json
from ..models import ModelConfig, model_spec
from ..noise import NoiseConfig, build_noise
from ..seeding import seeded
from ..training.loop import LoopConfig, OptimConfig, Trainer, check_run_dir, finished_run
from .registry import command


def photo_data_config() -> DataConfig:
    """Grey 128x128 squares of the bundled photos."""
    return DataConfig(name="photos", image_size=128, channels=1)


@dataclass
class DenoiserTrainConfig:
    """Everything `ssni train-denoiser` needs. `sigma` is the noise std on the 0..255 scale."""

    run_dir: str = setting("runs/denoiser-dncnn-s25", directory=True)
    data: DataConfig = field(default_factory=photo_data_config)
    model: ModelConfig = field(default_factory=lambda: ModelConfig(name="dncnn_small"))
    noise: NoiseConfig = field(default_factory=NoiseConfig)  # gaussian | typical_set
    sigma: float = setting(25.0, gt=0)
    patch_size: int = setting(40, ge=1)
    # 0: loop.steps * loop.batch_size, so no patch repeats
    num_patches: int = setting(0, ge=0, means="0: loop.steps * loop.batch_size")
    augment: bool = True  # the 8 flips / rotations
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(
        steps=2000, batch_size=32, ema_decay=0.995, log_every=50, ckpt_every=500))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, warmup_steps=50))
    eval_seed: int = 0  # fixed test noise
    eval_batch: int = setting(4, ge=1)


@command("train-denoiser", DenoiserTrainConfig,
         "train a denoiser (DnCNN / U-Net) at one noise level, Gaussian or TS noise")
def train_denoiser(cfg: DenoiserTrainConfig) -> Dict[str, Any]:
    """Train a denoiser per `cfg`; returns a summary (test PSNR/SSIM before and after, paths)."""
    dist = DistContext.from_env(cfg.loop.device)
    run_dir = Path(cfg.run_dir)
    check_run_dir(cfg, run_dir)  # resumed checkpoints come from this config; none when not resuming
    if cfg.loop.resume and (done := finished_run(run_dir, cfg.loop.steps, "train-denoiser")) is not None:
        return done
    train_ds, test_ds = build_dataset(cfg.data, "train"), build_dataset(cfg.data, "test")
    num_patches = cfg.num_patches or cfg.loop.steps * cfg.loop.batch_size
    patches = RandomPatches(train_ds.images, cfg.patch_size, num_patches, seed=cfg.loop.seed,
                            augment=cfg.augment)
    with seeded(cfg.loop.seed):  # the recipe's seed fixes the initial weights
        model = build_denoiser(cfg.model, train_ds.image_shape[0], cfg.sigma)
    spec = model_spec(model)
    has_bn = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if dist.world_size > 1 and has_bn:
        # each rank sees its share of the batch: BatchNorm needs the whole batch's statistics to match one
        # process, which SyncBatchNorm gives on GPUs only (DDP refuses it on CPU)
        if dist.device.type == "cuda":
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        elif dist.is_main:
            warnings.warn("BatchNorm on CPU under torchrun uses each process's share of the batch, so the "
                          "result differs from one process; set model.kwargs.batch_norm=false or use GPUs")
    noise = build_noise(cfg.noise)
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir)
    x_test = test_ds.images
    y_test = noisy_observation(x_test, cfg.sigma, cfg.eval_seed)
    trainer = Trainer(model, DenoiseLoss(cfg.sigma, noise), patches, cfg.loop, cfg.optim, run_dir,
                      spec, dist=dist)
    resumed = trainer.try_resume() if cfg.loop.resume else False
    before = None if resumed else denoise_quality(trainer.model, x_test, y_test, cfg.eval_batch)
    summary = trainer.fit()
    after = denoise_quality(trainer.ema, x_test, y_test, cfg.eval_batch)
    result: Dict[str, Any] = {
        "run_dir": str(run_dir), "steps": summary["steps"], "final_loss": summary["final_loss"],
        "noise": cfg.noise.name, "sigma": cfg.sigma, "test_images": len(x_test),
        "test_psnr_noisy": psnr(y_test.clamp(0, 1), x_test).mean().item(),
        "test_psnr_before": before["psnr"] if before else None,
        "test_psnr_ema": after["psnr"], "test_ssim_ema": after["ssim"],
        "checkpoint": str(run_dir / "checkpoints")}
    if dist.is_main:
        trainer.writer.add_scalar("eval/test_psnr", after["psnr"], summary["steps"])
        atomic_write_json(run_dir / "summary.json", result)
    trainer.close()
    dist.close()
    return result
