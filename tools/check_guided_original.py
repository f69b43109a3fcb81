"""Compare the "guided_diffusion" format with openai/guided-diffusion's own UNetModel, on random weights.

    python tools/check_guided_original.py --original path/to/guided-diffusion [--config tiny|imagenet256]

`--original` is a checkout of github.com/openai/guided-diffusion (its guided_diffusion package is
imported from there; nothing is installed). The original model is built by its script_util.create_model
with random weights, saved as guided-diffusion saves a model (a plain state dict), and loaded with
ssni.models.load_pretrained; both run on the same inputs on CPU. Printed, relative L2 errors of eps:

  fp32            original (use_fp16=False) at step i          vs ssni precision="fp32" at t = (i + 1) / N
  fp16            original (use_fp16=True, convert_to_fp16)     vs ssni precision="fp16"
  fp16-vs-fp32    original (use_fp16=True, DiffPure's ImageNet) vs ssni precision="fp32"
  step_floor      original fed DiffPure's SDE runner's (t * N).long() vs ssni time_input="step_floor"
  step_index-vs-diffpure-sde   the same, vs ssni's default time_input="step_index" (t N - 1)
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

CONFIGS = {
    # the tiny test fixture's flags (tests/fixtures/guided_tiny_keys.json)
    "tiny": dict(image_size=32, num_channels=32, num_res_blocks=1, channel_mult="1,2", learn_sigma=True,
                 class_cond=False, attention_resolutions="16", num_heads=4, num_head_channels=16,
                 num_heads_upsample=-1, use_scale_shift_norm=True, dropout=0.0, resblock_updown=True,
                 use_new_attention_order=False),
    # the 256x256 model's structure at 64x64 with a quarter of its width (fp16 convolutions on a CPU are
    # hundreds of times slower than fp32: the full model in fp16 needs a GPU)
    "medium": dict(image_size=64, num_channels=64, num_res_blocks=2, channel_mult="", learn_sigma=True,
                   class_cond=False, attention_resolutions="32,16,8", num_heads=4, num_head_channels=64,
                   num_heads_upsample=-1, use_scale_shift_norm=True, dropout=0.0, resblock_updown=True,
                   use_new_attention_order=False),
    # DiffPure's ImageNet config: the 256x256 unconditional model (552.8M parameters)
    "imagenet256": dict(image_size=256, num_channels=256, num_res_blocks=2, channel_mult="", learn_sigma=True,
                        class_cond=False, attention_resolutions="32,16,8", num_heads=4, num_head_channels=64,
                        num_heads_upsample=-1, use_scale_shift_norm=True, dropout=0.0, resblock_updown=True,
                        use_new_attention_order=False),
}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 error of a against b."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--original", required=True, help="a checkout of openai/guided-diffusion")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda for the imagenet256 config in fp16")
    ap.add_argument("--config", choices=sorted(CONFIGS), default="tiny")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    sys.path.insert(0, str(Path(args.original).resolve()))
    from guided_diffusion.script_util import create_model

    from ssni.models import load_pretrained

    flags = CONFIGS[args.config]
    torch.manual_seed(args.seed)
    orig = create_model(**flags, use_checkpoint=False, use_fp16=False).eval()
    with torch.no_grad():  # random weights everywhere (the original zero-initialises its output layers)
        for name, p in orig.named_parameters():  # norm scales (the only 1-D weights) near 1, as in the tests
            p.copy_(torch.randn_like(p) * 0.05 + (1.0 if p.dim() == 1 and name.endswith("weight") else 0.0))
    g = torch.Generator().manual_seed(args.seed + 1)
    size, n = flags["image_size"], 1000
    dev = torch.device(args.device)
    x = (torch.rand(args.batch, 3, size, size, generator=g) * 2 - 1).to(dev)
    steps = torch.randint(0, n, (args.batch,), generator=g).to(dev)
    t = (steps + 1).float() / n  # ssni's grid: step i at t = (i + 1) / N
    t_any = (torch.rand(args.batch, generator=g) * 0.5).to(dev)  # continuous times, as the SDE runner sees them
    diffpure = (t_any.float() * n).long()  # DiffPure's RevVPSDE._scale_timesteps
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        path = Path(tmp) / "model.pt"
        torch.save(orig.state_dict(), path)  # as guided-diffusion's TrainLoop.save writes a model
        orig.to(dev)
        ref32, ref_sde = orig(x, steps)[:, :3], orig(x, diffpure)[:, :3]
        del orig  # one network of this size in memory at a time
        orig16 = create_model(**flags, use_checkpoint=False, use_fp16=True).eval()
        orig16.load_state_dict(torch.load(path, weights_only=True))
        orig16.to(dev).convert_to_fp16()  # what DiffPure's runners do when use_fp16 is set
        ref16 = orig16(x, steps)[:, :3]
        del orig16
        ours = load_pretrained(path, "guided_diffusion", **flags).to(dev)
        out32, out32_any = ours(x, t), ours(x, t_any)
        ours.time_input = "step_floor"  # what time_input="step_floor" sets
        out_floor = ours(x, t_any)
        del ours
        out16 = load_pretrained(path, "guided_diffusion", precision="fp16", **flags).to(dev)(x, t)
    rows = [("fp32", rel(out32, ref32)), ("fp16", rel(out16, ref16)), ("fp16-vs-fp32", rel(out32, ref16)),
            ("step_floor", rel(out_floor, ref_sde)),
            ("step_index-vs-diffpure-sde", rel(out32_any, ref_sde))]
    print(f"config {args.config}, batch {args.batch}, {args.device}, {time.time() - start:.0f} s")
    for name, err in rows:
        print(f"  {name:28s} relative L2 error {err:.3g}")


if __name__ == "__main__":
    main()
