"""ssni's purifier against a DiffPure-style torchsde integrator, and the network speed options.

    pip install -e ".[bench]"                               # torchsde, for this script only
    .venv/bin/python tools/bench_reference.py               # CPU, all parts, digits-size network (~30 min)
    .venv/bin/python tools/bench_reference.py --quick       # the same, smaller and without compile (~5 min)
    .venv/bin/python tools/bench_reference.py --device cuda --model ddpmpp_cifar10 --batch 16

The reference integrates the reverse VP SDE with `torchsde.sdeint` (Euler, dt = 1e-3, one t* per
call, flattened state, diagonal noise) as DiffPure does, in reverse time s = -t from -t* to 0; the
same score network serves both sides. Parts (each prints one line per comparison, ratios side by
side, timings interleaved so background load hits both alike; the minimum over repeats is kept):

1. agree: with the same noise (the reference reads ssni's per-sample noise stream through a
   Brownian motion of its own), purified images and input gradients of both must coincide; the
   adjoint's gradient is its own discretisation, so its cosine to the exact one is printed.
2. constant: purification at t* = 0.1 for the whole batch: ssni / reference time.
3. spread: t* spread over [0.01, 0.1] (on the dt grid); the reference runs one call per group of
   equal t* (DiffPure has one t* per call), ssni one call for the batch.
4. gradient: one input gradient through the purifier (batch --grad-batch, averaged over --eot
   draws): ssni checkpointed, ssni plain autograd, reference autograd, reference adjoint
   (`sdeint_adjoint`): time, peak memory (each in a fresh subprocess; CPU: growth of peak RSS,
   CUDA: peak allocated), and that time projected to a protocol (--project, default the SSNI
   paper's CIFAR-10 one: 512 images, PGD-200; with --eot 20 on a GPU: its EOT-20).
5. options: the network's speed options (`EpsModel.set_speed`: bf16 autocast, channels_last,
   torch.compile) against fp32 eager: purification images/s at t* = 0.1, the largest pixel
   difference of the purified images on the same seeds, and the cosine of the input gradient.

Networks have random weights: cost and agreement do not depend on training.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "toolkit"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_purify import _images, _model, interleaved, peak_memory, run_child  # noqa: E402

from ssni.diffusion import to_model_space, to_pixel_space  # noqa: E402
from ssni.purify import Purifier  # noqa: E402
from ssni.purify.noise import NoiseStream  # noqa: E402

try:
    import torchsde
except ImportError:  # pragma: no cover - a benchmark-only extra
    torchsde = None


class ReverseVPSDE(torch.nn.Module):
    """The reverse VP SDE in torchsde's form, on flattened images, in reverse time s = -t.

    ds > 0 is dt < 0: drift beta(t) (x / 2 + score), diffusion sqrt(beta(t)), score = -eps / sigma.
    `nfe` counts batched network calls (sdeint may add one tiny step where times round). t is
    floored at `t_min`: the adjoint evaluates the drift at t = 0, where sigma(0) = 0; the forward
    solve never goes below one step.
    """

    noise_type = "diagonal"
    sde_type = "ito"

    def __init__(self, model, shape, t_min: float):
        super().__init__()
        self.model = model
        self.shape = tuple(shape)
        self.t_min = t_min
        self.nfe = 0

    def _t(self, s, y):
        return (-s).to(y.dtype).clamp(min=self.t_min).expand(y.shape[0])

    def f(self, s, y):
        """Drift [B, D] at reverse time s (scalar tensor)."""
        d = self.model.diffusion
        x = y.view(-1, *self.shape)
        t = self._t(s, y)
        self.nfe += 1
        score = -self.model(x, t) / d.sigma(t).view(-1, 1, 1, 1)
        return (d.beta(t).view(-1, 1, 1, 1) * (0.5 * x + score)).flatten(1)

    def g(self, s, y):
        """Diagonal diffusion [B, D] at reverse time s."""
        t = self._t(s, y)
        return self.model.diffusion.beta(t).sqrt()[:, None].expand_as(y)


class SharedBrownian(torchsde.BaseBrownian if torchsde else object):
    """A Brownian motion whose increment over [s0 + k dt, s0 + (k+1) dt] is sqrt(dt) z_k, with z_k
    given (ssni's per-sample noise draws): both integrators then see the same noise."""

    def __init__(self, s0: float, dt: float, draws):
        self.s0, self.dt = s0, dt
        self.steps = [(dt ** 0.5) * z.flatten(1) for z in draws]

    def __call__(self, ta, tb=None, return_U=False, return_A=False):
        k = int(round((float(min(ta, tb)) - self.s0) / self.dt))
        if abs(abs(float(tb) - float(ta)) - self.dt) > 1e-3 * self.dt or not 0 <= k < len(self.steps):
            raise ValueError(f"SharedBrownian serves single steps of dt={self.dt}, got [{ta}, {tb}]")
        return self.steps[k]

    def __repr__(self):
        return f"SharedBrownian(s0={self.s0}, dt={self.dt}, steps={len(self.steps)})"

    dtype = property(lambda self: self.steps[0].dtype)
    device = property(lambda self: self.steps[0].device)
    shape = property(lambda self: self.steps[0].shape)
    levy_area_approximation = property(lambda self: "none")


def reference_purify(model, x, t_star: float, dt: float, *, seeds=None, adjoint: bool = False):
    """DiffPure-style purification of x [B,C,H,W] in [0,1] at one t*: [B,C,H,W] in [0,1].

    seeds given: the forward diffusion and every step take ssni's per-sample noise draws for these
    seeds (in ssni's order: diffusion first, then one draw per step); else torchsde's own
    BrownianInterval and torch's global RNG.
    """
    d = model.diffusion
    n = int(round(t_star / dt))
    t = torch.full((x.shape[0],), n * dt, device=x.device, dtype=x.dtype)
    log_ab = d.log_alpha_bar(t.double())
    a, s = torch.exp(0.5 * log_ab).to(x), torch.sqrt(-torch.expm1(log_ab)).to(x)
    bm = None
    if seeds is not None:
        stream = NoiseStream(seeds.tolist(), x.shape[1:], x.device, x.dtype)
        z = stream.draw()
        bm = SharedBrownian(-n * dt, dt, [stream.draw() for _ in range(n)])
    else:
        z = torch.randn_like(x)
    xt = a.view(-1, 1, 1, 1) * to_model_space(x) + s.view(-1, 1, 1, 1) * z
    sde = ReverseVPSDE(model, x.shape[1:], t_min=0.5 * dt)
    ts = torch.tensor([-n * dt, 0.0], device=x.device, dtype=x.dtype)
    solve = torchsde.sdeint_adjoint if adjoint else torchsde.sdeint
    kw = dict(adjoint_params=(), adjoint_method="euler") if adjoint else {}
    ys = solve(sde, xt.flatten(1), ts, bm=bm, method="euler", dt=dt, **kw)
    reference_purify.nfe_last = sde.nfe
    return to_pixel_space(ys[-1].view_as(x)).clamp(0.0, 1.0)


def reference_spread(model, x, t_star, dt: float):
    """Per-sample t* [B] the DiffPure way: one reference call per group of equal t*."""
    out = torch.empty_like(x)
    steps = torch.round(t_star / dt).long()
    for k in torch.unique(steps).tolist():
        idx = (steps == k).nonzero()[:, 0]
        out[idx] = reference_purify(model, x[idx], k * dt, dt)
    return out


def _cos(a, b) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))


def _grad(fn, x, v):
    """d (fn(x) . v) / dx for x [B,C,H,W]."""
    xg = x.clone().requires_grad_(True)
    (fn(xg) * v).sum().backward()
    return xg.grad


def part_agree(model, args, device) -> dict:
    """Same noise: purified images and input gradients, ssni vs reference (and adjoint)."""
    b = args.grad_batch
    x = _images(b, model.input_shape, device)
    seeds = torch.arange(b)
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(device)
    p = Purifier(model, "diffpure", dt=args.dt)
    with torch.no_grad():
        ours = p(x, args.t_star, seeds=seeds)
        ref = reference_purify(model, x, args.t_star, args.dt, seeds=seeds)
    g_ours = _grad(lambda z: p(z, args.t_star, seeds=seeds), x, v)
    g_ref = _grad(lambda z: reference_purify(model, z, args.t_star, args.dt, seeds=seeds), x, v)
    g_adj = _grad(lambda z: reference_purify(model, z, args.t_star, args.dt, seeds=seeds,
                                             adjoint=True), x, v)
    row = dict(max_pixel_diff=float((ours - ref).abs().max()), ref_nfe=reference_purify.nfe_last,
               ssni_calls=p.calls_last, cos_autograd=_cos(g_ours, g_ref), cos_adjoint=_cos(g_ours, g_adj),
               rel_norm_adjoint=float(g_adj.norm() / g_ours.norm()))
    print(f"agree       same noise, t*={args.t_star} dt={args.dt} B={b}: max |ssni - ref| = "
          f"{row['max_pixel_diff']:.2e} (pixels in [0,1]); input-gradient cosine vs ssni: reference "
          f"autograd {row['cos_autograd']:.6f}, reference adjoint {row['cos_adjoint']:.6f} "
          f"(norm ratio {row['rel_norm_adjoint']:.3f}); network calls ssni {p.calls_last}, "
          f"ref {row['ref_nfe']}", flush=True)
    return row


def part_constant(model, args, device) -> dict:
    """All t* = 0.1: ssni / reference time."""
    x = _images(args.batch, model.input_shape, device)
    seeds = torch.arange(args.batch)
    p = Purifier(model, "diffpure", dt=args.dt)
    with torch.no_grad():
        t = interleaved({"ssni": lambda: p(x, args.t_star, seeds=seeds),
                          "ref": lambda: reference_purify(model, x, args.t_star, args.dt)},
                         device, args.reps)
    row = dict(batch=args.batch, ssni_s=t["ssni"], ref_s=t["ref"], ratio=t["ssni"] / t["ref"])
    print(f"constant    B={args.batch} t*={args.t_star} dt={args.dt}: ssni {t['ssni']:.3f}s  reference "
          f"{t['ref']:.3f}s  ssni/ref = {row['ratio']:.3f}  ({args.batch / t['ssni']:.1f} vs "
          f"{args.batch / t['ref']:.1f} images/s)", flush=True)
    return row


def part_spread(model, args, device) -> dict:
    """t* spread over [0.01, 0.1] on the dt grid: ssni one call vs reference one call per group."""
    b = args.batch
    x = _images(b, model.input_shape, device)
    gen = torch.Generator().manual_seed(2)
    t_star = (torch.round((0.01 + 0.09 * torch.rand(b, generator=gen)) / args.dt) * args.dt).to(device)
    seeds = torch.arange(b)
    p = Purifier(model, "diffpure", dt=args.dt)
    groups = len(torch.unique(torch.round(t_star / args.dt)))
    with torch.no_grad():
        t = interleaved({"ssni": lambda: p(x, t_star, seeds=seeds),
                          "ref": lambda: reference_spread(model, x, t_star, args.dt)},
                         device, max(1, args.reps // 2))
    row = dict(batch=b, groups=groups, ssni_s=t["ssni"], ref_s=t["ref"], ratio=t["ssni"] / t["ref"])
    print(f"spread      B={b} t* in [0.01, 0.1] ({groups} distinct): ssni {t['ssni']:.3f}s  reference "
          f"({groups} calls) {t['ref']:.3f}s  ssni/ref = {row['ratio']:.3f}", flush=True)
    return row


GRAD_MODES = ("ssni-checkpointed", "ssni-plain", "ref-autograd", "ref-adjoint")


def _grad_fn(mode: str, model, args, seeds):
    """x [b,C,H,W] -> mean over args.eot purification draws [b,C,H,W] for one of GRAD_MODES
    (same noise on every side: seeds [eot * b], draw-major)."""
    eot = args.eot
    if mode.startswith("ssni"):
        p = Purifier(model, "diffpure", dt=args.dt, checkpoint=mode == "ssni-checkpointed")

        def purify(z):
            return p(z, args.t_star, seeds=seeds)
    else:
        def purify(z):
            return reference_purify(model, z, args.t_star, args.dt, seeds=seeds,
                                    adjoint=mode == "ref-adjoint")
    return lambda z: purify(z.repeat(eot, 1, 1, 1)).view(eot, *z.shape).mean(0)


def grad_child(mode: str, args) -> dict:
    """(In a subprocess) peak memory of one input gradient in `mode`."""
    device = torch.device(args.device)
    model = _model(args.model, device).requires_grad_(False)
    x = _images(args.grad_batch, model.input_shape, device)
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(device)
    seeds = torch.arange(args.grad_batch * args.eot)
    fn = _grad_fn(mode, model, args, seeds)
    small = copy.copy(args)
    small.t_star = 2 * args.dt  # warm-up: two steps, the same code paths, one-time allocations
    _grad(_grad_fn(mode, model, small, seeds), x, v)
    g, peak = peak_memory(lambda: _grad(fn, x, v), device)
    return dict(peak_bytes=int(peak), grad_norm=float(g.norm()))


def part_gradient(model, args, device) -> dict:
    """One input gradient: time (interleaved, here) and peak memory (fresh subprocesses)."""
    model.requires_grad_(False)
    b = args.grad_batch
    x = _images(b, model.input_shape, device)
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(device)
    seeds = torch.arange(b * args.eot)
    modes = args.grad_modes
    fns = {m: (lambda f=_grad_fn(m, model, args, seeds): _grad(f, x, v)) for m in modes}
    times = interleaved(fns, device, max(1, args.reps // 2))
    mem = {}
    for m in modes:
        mem[m] = run_child([sys.executable, __file__, "--grad-child", m, "--device", args.device,
                            "--model", args.model, "--grad-batch", str(b), "--eot", str(args.eot),
                            "--t-star", str(args.t_star), "--dt", str(args.dt),
                            "--threads", str(torch.get_num_threads())])["peak_bytes"] / 2**20
    first = modes[0]
    base = times[first]
    n_img, pgd = args.project
    batches = -(-n_img // b)
    hours = {m: times[m] * pgd * batches / 3600 for m in modes}
    for m in modes:
        print(f"gradient    B={b} EOT={args.eot} t*={args.t_star} dt={args.dt} {m:18s} {times[m]:7.3f}s "
              f"(x{times[m] / base:5.2f} of {first})  peak {mem[m]:8.1f} MiB  projected "
              f"{n_img} images x PGD-{pgd}: {hours[m]:.1f} h", flush=True)
    return dict(batch=b, eot=args.eot, seconds=times, peak_MiB=mem, projected_hours=hours,
                projection=dict(images=n_img, pgd_steps=pgd))


OPTIONS = {  # name -> set_speed keyword arguments
    "bf16": dict(precision="bf16"),
    "channels_last": dict(channels_last=True),
    "compile": dict(compile=True),
    "bf16+compile": dict(precision="bf16", compile=True),
}


def part_options(model, args, device) -> list:
    """Each speed option vs fp32 eager: images/s, largest purified-pixel difference, gradient cosine."""
    x = _images(args.batch, model.input_shape, device)
    seeds = torch.arange(args.batch)
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(device)
    base = Purifier(model, "diffpure", dt=args.dt)
    with torch.no_grad():
        ref = base(x, args.t_star, seeds=seeds)
    g_ref = _grad(lambda z: base(z[:args.grad_batch], args.t_star, seeds=seeds[:args.grad_batch]),
                  x[:args.grad_batch], v[:args.grad_batch])
    rows = []
    for name in args.options:
        fast_model = copy.deepcopy(model)
        t0 = time.perf_counter()
        fast_model.set_speed(**OPTIONS[name])
        fast = Purifier(fast_model, "diffpure", dt=args.dt)
        with torch.no_grad():
            out = fast(x, args.t_star, seeds=seeds)  # first call: compiles where asked
            first = time.perf_counter() - t0
            t = interleaved({"fp32": lambda: base(x, args.t_star, seeds=seeds),
                              name: lambda: fast(x, args.t_star, seeds=seeds)}, device, args.reps)
        g = _grad(lambda z: fast(z, args.t_star, seeds=seeds[:args.grad_batch]),
                  x[:args.grad_batch], v[:args.grad_batch])
        row = dict(option=name, speedup=t["fp32"] / t[name], fp32_images_s=args.batch / t["fp32"],
                   images_s=args.batch / t[name], max_pixel_diff=float((out - ref).abs().max()),
                   grad_cos=_cos(g, g_ref), first_call_s=first)
        rows.append(row)
        print(f"options     {name:14s} B={args.batch} t*={args.t_star}: {row['images_s']:8.1f} images/s vs "
              f"fp32 eager {row['fp32_images_s']:8.1f}  speed-up x{row['speedup']:.2f}  max |pixel diff| "
              f"{row['max_pixel_diff']:.1e}  gradient cosine {row['grad_cos']:.5f}  (first call "
              f"{first:.1f}s)", flush=True)
    return rows


PARTS = {"agree": part_agree, "constant": part_constant, "spread": part_spread,
         "gradient": part_gradient, "options": part_options}


def main() -> int:
    """Parse arguments, run the chosen parts, print one line per comparison (and --json)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default="unet_digits", help="a registered score network (random weights)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--grad-batch", type=int, default=16)
    ap.add_argument("--eot", type=int, default=1, help="purification draws averaged per gradient")
    ap.add_argument("--grad-modes", nargs="+", default=list(GRAD_MODES), choices=GRAD_MODES,
                    help="gradients to compare (the plain ones keep every step's activations: leave "
                         "them out where they do not fit)")
    ap.add_argument("--project", type=int, nargs=2, default=(512, 200), metavar=("IMAGES", "PGD_STEPS"),
                    help="project the gradient time to this protocol (one gradient per PGD step and "
                         "batch; the classifier's own cost is left out)")
    ap.add_argument("--t-star", type=float, default=0.1)
    ap.add_argument("--dt", type=float, default=1e-3)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (default 1: steadier timings)")
    ap.add_argument("--parts", nargs="+", default=list(PARTS), choices=list(PARTS))
    ap.add_argument("--options", nargs="+", default=list(OPTIONS), choices=list(OPTIONS))
    ap.add_argument("--quick", action="store_true",
                    help="a few minutes on 2 CPU cores: batch 16, gradient batch 4, one repeat, no compile")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--grad-child", choices=GRAD_MODES, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if torchsde is None:
        print("tools/bench_reference.py needs torchsde: pip install -e '.[bench]'", file=sys.stderr)
        return 2
    if args.quick:
        args.batch, args.grad_batch, args.reps = 16, 4, 1
        args.options = [o for o in args.options if "compile" not in o]
    torch.set_num_threads(args.threads)
    if args.grad_child:
        print(json.dumps(grad_child(args.grad_child, args)))
        return 0
    device = torch.device(args.device)
    model = _model(args.model, device)
    print(f"# {args.model} on {device} ({torch.get_num_threads()} thread(s)), torch {torch.__version__}, "
          f"torchsde {torchsde.__version__}", flush=True)
    results = {name: PARTS[name](model, args, device) for name in args.parts}
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
