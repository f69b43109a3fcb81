"""`ssni train-denoiser`: train a denoiser at one noise level on random patches (Gaussian or TS noise)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from ..config import save_config
from ..data import DataConfig, build_dataset
from ..io import atomic_write_json
from ..models import MODELS, create_model, list_models, model_spec
from ..training.dist import DistContext
from ..training.loop import LoopConfig, OptimConfig, Trainer
from ..training.losses import NOISE_SAMPLERS, GaussianNoise
from ..training.score import ModelConfig, NoiseConfig
from . import data as _photo_data  # noqa: F401  (registers the photos / photofolder data sets)
from .metrics import psnr, ssim
from .patches import RandomPatches


def _photo_data_config() -> DataConfig:
    return DataConfig(name="photos", image_size=128, channels=1)


@dataclass
class DenoiserTrainConfig:
    """Everything `ssni train-denoiser` needs. `sigma` is the noise std on the 0..255 scale."""

    run_dir: str = "runs/denoiser-dncnn-s25"
    data: DataConfig = field(default_factory=_photo_data_config)
    model: ModelConfig = field(default_factory=lambda: ModelConfig(name="dncnn_small"))
    noise: NoiseConfig = field(default_factory=NoiseConfig)  # gaussian | typical_set
    sigma: float = 25.0
    patch_size: int = 40
    num_patches: int = 0  # 0: loop.steps * loop.batch_size, so no patch repeats
    augment: bool = True  # the 8 flips / rotations
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(
        steps=2000, batch_size=32, ema_decay=0.995, log_every=50, ckpt_every=500))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, warmup_steps=50))
    eval_seed: int = 0  # fixed test noise
    eval_batch: int = 4


class DenoiseLoss:
    """Per-sample MSE of a denoiser on x + (sigma/255) * noise; batch: (x [B,C,H,W], _) -> [B].

    `noise` is a noise sampler (shape, generator, device) -> unit-std-like noise (Gaussian or
    TS), so TS training moves a share of the noisy patches off the typical shell.
    """

    def __init__(self, sigma: float, noise: Optional[Callable] = None):
        if not 0 < sigma < 255:
            raise ValueError(f"sigma is the noise std on the 0..255 scale, expected (0, 255), got {sigma}")
        self.sigma = float(sigma)
        self.noise = noise or GaussianNoise()

    def __call__(self, net: nn.Module, batch: Tuple[Tensor, ...],
                 generator: Optional[torch.Generator] = None) -> Tensor:
        x = batch[0]
        y = x + (self.sigma / 255.0) * self.noise(x.shape, generator, x.device).to(x.dtype)
        return (net(y).float() - x.float()).pow(2).flatten(1).mean(1)


def noisy_observation(x: Tensor, sigma: float, seed: int) -> Tensor:
    """x + N(0, (sigma/255)^2) with noise fixed by `seed` (same draw whatever the batching)."""
    g = torch.Generator().manual_seed(int(seed))
    return x + (sigma / 255.0) * torch.randn(x.shape, generator=g).to(x.device, x.dtype)


@torch.no_grad()
def denoise_quality(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 4) -> Dict[str, float]:
    """Mean PSNR / SSIM of model(y) (clipped to [0,1]) against x; x, y: [N,C,H,W]."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    outs = [model(y[k:k + batch_size].to(device)).clamp(0, 1).cpu()
            for k in range(0, len(y), batch_size)]
    model.train(was_training)
    out = torch.cat(outs)
    return {"psnr": psnr(out, x).mean().item(), "ssim": ssim(out, x).mean().item()}


def build_denoiser(cfg: ModelConfig, in_channels: int, sigma: float) -> nn.Module:
    """Create a registered denoiser (kind 'denoiser') for `in_channels` at `sigma` (/255)."""
    if cfg.name not in list_models(kind="denoiser"):
        MODELS.get(cfg.name)  # unknown names: the registry's error lists every model
        raise ValueError(f"model {cfg.name!r} is not a denoiser; choose one of "
                         f"{', '.join(list_models(kind='denoiser'))}")
    return create_model(cfg.name, **{"in_channels": in_channels, "sigma": sigma, **cfg.kwargs})


def train_denoiser(cfg: DenoiserTrainConfig) -> Dict[str, Any]:
    """Train a denoiser per `cfg`; returns a summary (test PSNR/SSIM before and after, paths)."""
    dist = DistContext.from_env(cfg.loop.device)
    run_dir = Path(cfg.run_dir)
    train_ds, test_ds = build_dataset(cfg.data, "train"), build_dataset(cfg.data, "test")
    num_patches = cfg.num_patches or cfg.loop.steps * cfg.loop.batch_size
    patches = RandomPatches(train_ds.images, cfg.patch_size, num_patches, seed=cfg.loop.seed,
                            augment=cfg.augment)
    model = build_denoiser(cfg.model, train_ds.image_shape[0], cfg.sigma)
    noise = NOISE_SAMPLERS.create(cfg.noise.name, **cfg.noise.kwargs)
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir)
    x_test = test_ds.images
    y_test = noisy_observation(x_test, cfg.sigma, cfg.eval_seed)
    trainer = Trainer(model, DenoiseLoss(cfg.sigma, noise), patches, cfg.loop, cfg.optim, run_dir,
                      model_spec(model), dist=dist)
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
    return result
