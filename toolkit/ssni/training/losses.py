"""Training losses: callables `loss(net, batch, generator) -> per-sample loss [B]`."""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
from torch import Tensor, nn

from ..config import bound
from ..diffusion import VPDiffusion, to_model_space
from ..noise import GaussianNoise


class DSMLoss:
    """Denoising score matching with eps-prediction on the continuous VP process.

    batch: (images [B,C,H,W] in [0,1], labels); t ~ U(t_eps, 1) per sample; returns [B].
    """

    def __init__(self, diffusion: VPDiffusion | None = None, t_eps: float = 1e-3,
                 noise: Callable | None = None):
        self.diffusion = diffusion
        self.t_eps = bound(gt=0, lt=1, means="the smallest diffusion time trained on").check(t_eps, "t_eps")
        self.noise = noise or GaussianNoise()

    def __call__(self, net: nn.Module, batch: Tuple[Tensor, ...],
                 generator: Optional[torch.Generator] = None) -> Tensor:
        x0 = to_model_space(batch[0])
        diffusion = self.diffusion or getattr(net, "module", net).diffusion
        b = x0.shape[0]
        t = self.t_eps + (1 - self.t_eps) * torch.rand(b, generator=generator, device=x0.device)
        eps = self.noise(x0.shape, generator, x0.device).to(x0.dtype)
        xt = diffusion.q_sample(x0, t, eps)
        pred = net(xt, t)
        return (pred.float() - eps.float()).pow(2).flatten(1).mean(1)


@torch.no_grad()
def heldout_dsm_loss(model: nn.Module, dataset, draws: int = 4, seed: int = 1234,
                     batch_size: int = 256, t_eps: float = 1e-3) -> float:
    """Mean DSM loss over a data set with fixed noise (repeatable); model in eval mode."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    loss_fn = DSMLoss(t_eps=t_eps)
    g = torch.Generator(device=device).manual_seed(seed)
    total, count = 0.0, 0
    images = dataset.images
    with torch.no_grad():  # an estimate only: no graph to keep
        for _ in range(draws):
            for k in range(0, len(images), batch_size):
                x = images[k:k + batch_size].to(device)
                total += loss_fn(model, (x, None), g).sum().item()
                count += x.shape[0]
    model.train(was_training)
    return total / count
