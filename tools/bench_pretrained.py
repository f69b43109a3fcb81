"""Benchmark: the network-evaluation cost that prices the SSNI protocol with the public backbones (CPU, random weights).

Builds the two public backbones the SSNI paper uses, with random weights (nothing is downloaded; cost does not
depend on the weights), behind the score-model contract (`VPBackbone`, as `load_pretrained` returns them):

  * score_sde DDPM++ deep continuous, CIFAR-10 32x32 (checkpoint_8.pth, 106.6M parameters), batch --batch;
  * guided-diffusion 256x256 unconditional ImageNet U-Net (552.8M parameters), batch 1.

For each it times, per image, one network evaluation (NFE) under torch.no_grad() and one forward+backward with
respect to the input (the parameters frozen, no activation checkpointing: what a full-gradient attack pays per
purification step), then prints the protocol costs these set, as formulas with the measured numbers plugged in:
the defense (DiffPure's DDPM steps + the SSNI score norm's T' evaluations), the score-norm overhead, one PGD-EOT
iteration through a 20-step surrogate with EOT 20, the 200-iteration attack, and a markdown table.
The figures are CPU figures of the machine it runs on; GPU figures need a GPU run (--device cuda).

    .venv/bin/python tools/bench_pretrained.py                      # both, CPU, 2 threads (~1.5 min idle)
    .venv/bin/python tools/bench_pretrained.py --skip-imagenet      # CIFAR-10 only (~25 s idle)
    .venv/bin/python tools/bench_pretrained.py --batch 8 --repeats 3 --imagenet-repeats 1
"""
from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass
from typing import Callable, List

import torch
from torch import nn

from ssni.diffusion import VPDiffusion
from ssni.models import VPBackbone
from ssni.models.ddpmpp import build_ddpmpp, score_sde_config
from ssni.models.guided import build_guided_unet, guided_flags

EOT = 20            # EOT copies per attack iteration
SURROGATE = 20      # DDPM steps of the attack's purification surrogate
ITERATIONS = 200    # PGD-EOT iterations of the whole attack


@dataclass
class Protocol:
    """One backbone's protocol settings: DiffPure t*, its DDPM steps, and the SSNI score norm's T'."""

    name: str
    t_star: float
    steps: int
    score_steps: int


CIFAR10 = Protocol("CIFAR-10 DDPM++ deep (score_sde), 32x32", 0.1, 100, 20)
IMAGENET = Protocol("ImageNet 256x256 uncond (guided-diffusion)", 0.15, 150, 50)


def _sync(device: torch.device) -> None:
    """Wait for queued device work (CUDA only)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], repeats: int, warmup: int, device: torch.device) -> float:
    """Median wall time of fn() over `repeats` runs after `warmup` untimed runs (seconds)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times: List[float] = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def _unzero(net: nn.Module, seed: int) -> nn.Module:
    """Give zero-initialised parameters (the originals' zeroed output layers) small random values; freeze all."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
            p.requires_grad_(False)
    return net


def cifar10_backbone(seed: int = 0) -> VPBackbone:
    """The deep CIFAR-10 DDPM++ (score_sde's defaults) behind VPBackbone, as load_score_sde builds it."""
    torch.manual_seed(seed)
    cfg = score_sde_config()
    net = _unzero(build_ddpmpp(cfg), seed)
    diffusion = VPDiffusion(cfg["beta_min"], cfg["beta_max"], 1000)
    return VPBackbone(net, in_channels=cfg["in_channels"], image_size=cfg["image_size"], time_input="t999",
                      diffusion=diffusion, config=cfg).eval()


def imagenet_backbone(seed: int = 0) -> VPBackbone:
    """The 256x256 unconditional guided-diffusion U-Net behind VPBackbone, as load_guided_diffusion builds it."""
    torch.manual_seed(seed)
    cfg = guided_flags()
    net = _unzero(build_guided_unet(cfg), seed)
    return VPBackbone(net, in_channels=3, image_size=cfg["image_size"], time_input="step_index",
                      diffusion=VPDiffusion(0.1, 20.0, cfg["diffusion_steps"]), config=cfg).eval()


def measure(model: VPBackbone, batch: int, t: float, repeats: int, warmup: int,
            device: torch.device) -> tuple[float, float]:
    """(forward, forward+backward w.r.t. the input) wall time per image, in seconds.

    `warmup` untimed runs precede each timing; the forward's output is checked to be finite.
    """
    model = model.to(device)
    size = model.image_size
    x = torch.rand(batch, model.in_channels, size, size, generator=torch.Generator().manual_seed(1)).to(device) * 2 - 1
    tt = torch.full((batch,), t, device=device)
    last: List[torch.Tensor] = []

    def forward() -> None:
        with torch.no_grad():
            last[:] = [model(x, tt)]

    def forward_backward() -> None:
        xi = x.detach().requires_grad_(True)
        out = model(xi, tt)
        (grad,) = torch.autograd.grad((out * weights).sum(), xi)
        assert grad.shape == x.shape

    fwd = timed(forward, repeats, warmup, device)
    if not torch.isfinite(last[0]).all():
        raise RuntimeError("the random-weight network returned non-finite values")
    weights = torch.randn_like(last[0])
    fb = timed(forward_backward, repeats, warmup, device)
    return fwd / batch, fb / batch


def report(proto: Protocol, batch: int, fwd: float, fb: float, where: str) -> tuple[float, float]:
    """Print the protocol costs per image as formulas with the measured numbers; return (defense, attack) s."""
    nfe = proto.steps + proto.score_steps
    defense = nfe * fwd
    iteration = EOT * SURROGATE * fb + proto.score_steps * fwd
    attack = ITERATIONS * iteration
    print(f"\n== {proto.name}: batch {batch}, {where}, per image ==")
    print(f"  forward (1 NFE, no_grad)             : {fwd * 1e3:10.1f} ms")
    print(f"  forward+backward w.r.t. input        : {fb * 1e3:10.1f} ms  ({fb / fwd:.2f}x forward)")
    print(f"  defense: DiffPure t*={proto.t_star:g} -> {proto.steps} DDPM steps + SSNI score norm T'={proto.score_steps}")
    print(f"           = ({proto.steps} + {proto.score_steps}) NFE x {fwd * 1e3:.1f} ms = {nfe} x {fwd * 1e3:.1f} ms"
          f" = {defense:.2f} s")
    print(f"  score-norm overhead vs the defense's purification: T'/steps = {proto.score_steps}/{proto.steps}"
          f" = {proto.score_steps / proto.steps:.0%}")
    print(f"  one PGD-EOT iteration (full gradient, {SURROGATE}-step surrogate, EOT {EOT}):")
    print(f"           = {EOT} x {SURROGATE} x {fb * 1e3:.1f} ms (fwd+bwd) + {proto.score_steps} x {fwd * 1e3:.1f} ms"
          f" (score norm) = {iteration:.1f} s")
    print(f"  whole attack: {ITERATIONS} iterations x {iteration:.1f} s = {attack:.0f} s = {attack / 3600:.2f} h")
    return defense, attack


def main() -> None:
    """Time both backbones and print the derived protocol costs and a markdown table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8, help="CIFAR-10 batch (ImageNet runs at batch 1)")
    ap.add_argument("--repeats", type=int, default=3, help="timed CIFAR-10 runs (median), after one warm-up")
    ap.add_argument("--imagenet-repeats", type=int, default=1,
                    help="timed ImageNet runs, no warm-up (15-45 s a forward on 2 CPU threads)")
    ap.add_argument("--skip-imagenet", action="store_true", help="time the CIFAR-10 backbone only")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    device = torch.device(args.device)
    where = (f"CPU ({args.threads} threads) of this machine" if device.type == "cpu"
             else f"{torch.cuda.get_device_name(device)}")
    print(f"torch {torch.__version__}, {where}; random weights, fp32, parameters frozen, no activation checkpointing")
    print(f"load average before the run: {' / '.join(f'{v:.2f}' for v in os.getloadavg())} (1 / 5 / 15 min; the CPU is "
          f"shared, so other work slows these timings)")

    rows = []
    start = time.perf_counter()
    model = cifar10_backbone()
    params = sum(p.numel() for p in model.parameters())
    fwd, fb = measure(model, args.batch, CIFAR10.t_star, args.repeats, 1, device)
    print(f"\nCIFAR-10 DDPM++ deep: {params / 1e6:.1f}M parameters; median of {args.repeats} after 1 warm-up "
          f"({time.perf_counter() - start:.0f} s)")
    rows.append((CIFAR10, args.batch, fwd, fb, *report(CIFAR10, args.batch, fwd, fb, where)))
    del model

    if not args.skip_imagenet:
        start = time.perf_counter()
        model = imagenet_backbone()
        params = sum(p.numel() for p in model.parameters())
        # slow (tens of seconds a forward on 2 threads): no warm-up; a first run's allocations are small beside it
        fwd, fb = measure(model, 1, IMAGENET.t_star, args.imagenet_repeats, 0, device)
        print(f"\nImageNet guided U-Net: {params / 1e6:.1f}M parameters; median of {args.imagenet_repeats}, no warm-up "
              f"({time.perf_counter() - start:.0f} s)")
        rows.append((IMAGENET, 1, fwd, fb, *report(IMAGENET, 1, fwd, fb, where)))
        del model

    kind = "CPU" if device.type == "cpu" else "GPU"
    print(f"\nPer image, {where}; defense = (steps + T') NFE; attack = {ITERATIONS} x ({EOT} x {SURROGATE} fwd+bwd"
          f" + T' fwd). {'GPU figures need a GPU run (--device cuda).' if kind == 'CPU' else ''}\n")
    print(f"| backbone | forward ms/img | fwd+bwd ms/img | defense s/img | PGD-EOT {ITERATIONS}x{SURROGATE} s/img |")
    print("|---|---:|---:|---:|---:|")
    for proto, batch, fwd, fb, defense, attack in rows:
        print(f"| {proto.name} ({kind}, batch {batch}) | {fwd * 1e3:.1f} | {fb * 1e3:.1f} | {defense:.1f} | {attack:,.0f} |")


if __name__ == "__main__":
    main()
