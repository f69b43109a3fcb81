"""Purification benchmarks: efficiency, per-sample t* cost, gradient memory. Prints ratios.

    .venv/bin/python tools/bench_purify.py            # CPU, one thread, all three parts
    .venv/bin/python tools/bench_purify.py --device cuda --parts efficiency spread memory

1. efficiency: purification wall time / (batched network calls x one batched network evaluation)
   at the digits (unet_digits, 1x16x16) and CIFAR-10 (ddpmpp_cifar10, 3x32x32) sizes; target <= 1.15.
2. spread: diffpure at dt = 1e-3 with t* spread over [0.02, 0.1] vs all t* = 0.1; the time ratio
   next to the ideal sum(steps) / (B x max steps); target within 15% of ideal. Printed with it:
   the bare network timed on the same active sub-batch sizes, which separates the network's
   own small-batch cost from the purifier's bookkeeping. (CIFAR-10 size on CPU: dt = 5e-3.)
3. memory: peak memory of one full-gradient backward through 20 reverse steps, with and without
   per-step checkpointing (each in a fresh subprocess after the same warm-up; CPU: growth of the
   peak RSS over the RSS before the run, with glibc returning freed tensors to the OS at once;
   CUDA: peak allocated);
   target: checkpointed <= a quarter of plain.
Networks have random weights: cost does not depend on training.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.utils.checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "toolkit"))

from ssni.models import create_model  # noqa: E402
from ssni.purify import Purifier  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _once(fn, device) -> float:
    """Wall time of one fn() call."""
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def interleaved(fns: dict, device, reps: int) -> dict:
    """Minimum wall time of each callable over `reps` interleaved rounds (after one warm-up each).

    The minimum is the run least disturbed by other processes; interleaving exposes every callable
    to the same background load.
    """
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            times[k].append(_once(fn, device))
    return {k: min(v) for k, v in times.items()}


def _paired(fn_a, fn_b, device, reps: int):
    """`interleaved` for two callables: (min time of a, min time of b)."""
    t = interleaved({"a": fn_a, "b": fn_b}, device, reps)
    return t["a"], t["b"]


def _model(name: str, device: torch.device):
    torch.manual_seed(0)
    m = create_model(name).to(device).eval()
    with torch.no_grad():  # random but non-trivial weights (the output layer starts at zero)
        for p in m.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return m


def _images(n: int, shape, device) -> torch.Tensor:
    return torch.rand((n, *shape), generator=torch.Generator().manual_seed(0)).to(device)


def bench_efficiency(settings, device, reps: int) -> list:
    """Purification time / (calls x one batched network evaluation) per setting."""
    rows = []
    for name, batch, sampler, kw, t_star in settings:
        m = _model(name, device)
        x = _images(batch, m.input_shape, device)
        p = Purifier(m, sampler, **kw)
        seeds = torch.arange(batch)
        tt = torch.full((batch,), t_star, device=device)
        with torch.no_grad():
            p(x, tt, seeds=seeds)
            calls, xm = p.calls_last, x * 2 - 1

            def network_loop():  # the floor: the same number of batched network calls
                for _ in range(calls):
                    m(xm, tt)

            t_loop, t_pur = _paired(network_loop, lambda: p(x, tt, seeds=seeds), device, reps)
        t_net = t_loop / calls
        ratio = t_pur / t_loop
        rows.append(dict(model=name, batch=batch, sampler=sampler, t_star=t_star,
                         calls=p.calls_last, nfe=p.nfe_last, net_ms=1e3 * t_net,
                         purify_s=t_pur, ratio=ratio,
                         overhead_ms_per_step=1e3 * (t_pur / p.calls_last - t_net)))
        print(f"efficiency  {name:15s} B={batch:<3d} {sampler:8s} t*={t_star:<5g} calls={p.calls_last:<4d}"
              f" net={1e3 * t_net:8.2f} ms  purify={t_pur:7.2f} s  ratio={ratio:.3f}"
              f"  (target <= 1.15: {'ok' if ratio <= 1.15 else 'MISSED'})", flush=True)
    return rows


def bench_spread(name: str, batch: int, device, reps: int, dt: float = 1e-3) -> dict:
    """diffpure at a fixed dt: t* spread over [0.02, 0.1] vs all 0.1, against the ideal ratio.

    Also times the bare network on the same sequence of active sub-batch sizes ("floor"): the
    part of the gap to the ideal that comes from the network's own cost per sample at small
    batches, not from the purifier's bookkeeping.
    """
    m = _model(name, device)
    x = _images(batch, m.input_shape, device)
    p = Purifier(m, "diffpure", dt=dt)
    seeds = torch.arange(batch)
    spread = torch.linspace(0.02, 0.1, batch, device=device)
    flat = torch.full((batch,), 0.1, device=device)
    steps = p.steps_per_sample(spread.cpu())
    big = int(steps.max())
    ideal = steps.sum() / (batch * big)
    active = [int((steps >= big - g).sum()) for g in range(big)]
    xm = x * 2 - 1

    def floor():
        for g, a in enumerate(active):
            m(xm[:a], torch.full((a,), (big - g) * dt, device=device))

    with torch.no_grad():
        t_spread, t_flat = _paired(lambda: p(x, spread, seeds=seeds), lambda: p(x, flat, seeds=seeds),
                                   device, reps)
        t_floor, t_flat2 = _paired(floor, lambda: p(x, flat, seeds=seeds), device, reps)
    ratio = t_spread / t_flat
    floor_ratio = t_floor / t_flat2
    off = ratio / ideal - 1
    print(f"spread      {name:15s} B={batch:<3d} diffpure dt={dt:g}  t* in [0.02, 0.1] / all 0.1:"
          f" time ratio={ratio:.3f}  ideal={ideal:.3f}  off by {100 * off:+.1f}%"
          f"  (target within 15%: {'ok' if abs(off) <= 0.15 else 'MISSED'});"
          f" bare network on the same active batches: {floor_ratio:.3f}", flush=True)
    return dict(model=name, batch=batch, dt=dt, time_ratio=ratio, ideal=float(ideal), off=off,
                floor_ratio=floor_ratio, spread_s=t_spread, flat_s=t_flat)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) so earlier (warm-up) peaks do not count."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes(reset_ok: bool) -> int:
    if reset_ok:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def memory_child(name: str, batch: int, ckpt: bool, device_name: str) -> dict:
    """(In a subprocess) peak memory of one full-gradient backward through 20 reverse steps."""
    device = torch.device(device_name)
    m = _model(name, device)
    x0 = _images(batch, m.input_shape, device)
    p = Purifier(m, "ddpm", steps=20, checkpoint=ckpt)
    seeds = torch.arange(batch)
    # warm-up outside the measurement, the same in both modes: the first autograd pass allocates
    # one-time caches and the first checkpoint call imports modules (~170 MiB of RSS on CPU)
    xw = (x0 * 2 - 1).requires_grad_(True)
    tw = torch.full((batch,), 0.1, device=device)
    torch.utils.checkpoint.checkpoint(m, xw, tw, use_reentrant=False).square().sum().backward()
    m.zero_grad(set_to_none=True)
    del xw
    x = x0.clone().requires_grad_(True)
    # t* = 0.1 with steps = 20: 20 reverse steps
    _, peak = peak_memory(lambda: p(x, 0.1, seeds=seeds).square().sum().backward(), device)
    return dict(steps=p.calls_last, peak_bytes=int(peak), grad_norm=float(x.grad.norm()))


def peak_memory(fn, device):
    """(fn(), the peak memory it added in bytes): CUDA peak allocated over what was allocated before;
    CPU growth of the peak RSS over the RSS before (run children with CHILD_ENV for a true RSS)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        gc.collect()
        base = _rss_bytes()
        reset_ok = _reset_peak_rss()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        return out, torch.cuda.max_memory_allocated() - base
    return out, _peak_rss_bytes(reset_ok) - base


# glibc returns freed tensors to the OS at once, so the RSS follows what is really held
CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def run_child(cmd: list) -> dict:
    """Run a measuring child process (with CHILD_ENV); the JSON object on its last output line."""
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env={**os.environ, **CHILD_ENV})
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_memory(name: str, batch: int, device_name: str) -> dict:
    """Run memory_child with and without checkpointing, each in a fresh process."""
    res = {}
    for ckpt in (False, True):
        res[ckpt] = run_child([sys.executable, __file__, "--memory-child", name, str(batch), str(int(ckpt)),
                               "--device", device_name, "--threads", str(torch.get_num_threads())])
    ratio = res[True]["peak_bytes"] / res[False]["peak_bytes"]
    same = abs(res[True]["grad_norm"] - res[False]["grad_norm"]) <= 1e-4 * res[False]["grad_norm"]
    print(f"memory      {name:15s} B={batch:<3d} ddpm 20 steps full-gradient backward:"
          f" plain={res[False]['peak_bytes'] / 2**20:8.1f} MiB  checkpointed="
          f"{res[True]['peak_bytes'] / 2**20:8.1f} MiB  ratio={ratio:.3f}"
          f"  (target <= 0.25: {'ok' if ratio <= 0.25 else 'MISSED'}; same gradient: {same})",
          flush=True)
    return dict(model=name, batch=batch, plain_MiB=res[False]["peak_bytes"] / 2**20,
                ckpt_MiB=res[True]["peak_bytes"] / 2**20, ratio=ratio, same_gradient=same)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--parts", nargs="+", default=["efficiency", "spread", "memory"],
                    choices=["efficiency", "spread", "memory"])
    ap.add_argument("--memory-child", nargs=3, metavar=("MODEL", "BATCH", "CKPT"))
    ap.add_argument("--json", help="also write the results to this JSON file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_child:
        name, batch, ckpt = args.memory_child
        print(json.dumps(memory_child(name, int(batch), bool(int(ckpt)), args.device)))
        return 0
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    print(f"device={device} ({torch.cuda.get_device_name(device) if gpu else f'{args.threads} CPU thread(s)'})"
          f" torch={torch.__version__}", flush=True)
    results = {}
    if "efficiency" in args.parts:
        settings = [
            ("unet_digits", 64, "diffpure", {}, 0.03),
            ("unet_digits", 64, "ddpm", {"steps": 20}, 0.1),
            ("ddpmpp_cifar10", 64 if gpu else 4, "diffpure", {}, 0.1 if gpu else 0.01),
            ("ddpmpp_cifar10", 64 if gpu else 4, "ddpm", {"steps": 20 if gpu else 5}, 0.1),
        ]
        results["efficiency"] = bench_efficiency(settings, device, args.reps)
    if "spread" in args.parts:
        results["spread"] = [bench_spread("unet_digits", 64, device, args.reps)]
        # CIFAR-10 size: on CPU at dt = 5e-3 (t* = 0.1 is 20 steps) so it finishes in minutes
        results["spread"].append(bench_spread("ddpmpp_cifar10", 64 if gpu else 8, device,
                                              args.reps, dt=1e-3 if gpu else 5e-3))
    if "memory" in args.parts:
        results["memory"] = [bench_memory("unet_digits", 32, args.device),
                             bench_memory("ddpmpp_cifar10", 8 if gpu else 1, args.device)]
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
