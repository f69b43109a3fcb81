"""Denoiser evaluation (the engine of `ssni evaluate-denoiser`): PSNR/SSIM clean and under attack,
the typical-set statistic of attacked vs Gaussian inputs, a transfer matrix across denoisers, a
markdown report and PNG figures.

Every model sees the same clean images x and the same Gaussian observation y = x + (sigma/255) n
(fixed by `seed`), so rows and columns of the transfer matrix are comparable. Adversarial deltas
are cached per (model, attack) under <run_dir>/deltas/ with their settings, so a rerun (or a
killed run) reuses what is finished.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from torch import Tensor, nn

from ..attacks.denoiser import DENOISER_ATTACKS, RandomPerturbation
from ..attacks.geometry import delta_norm, random_on_sphere
from ..config import setting
from ..io import atomic_save_safetensors, atomic_write_json, atomic_write_text, load_safetensors
from ..models import weights_fingerprint
from ..seeding import derive_seed
from ..typical import in_typical_set, shell_probability, typicality_statistic
from .figures import example_grid, statistic_histogram, transfer_heatmap
from .metrics import psnr, ssim
from .train import noisy_observation


@dataclass
class AttackConfig:
    """One denoiser attack. `eps` and `step_size` are on the 0..255 scale: per pixel for Linf;
    for L2 they are an RMS per pixel, i.e. ||delta||_2 <= (eps/255) * sqrt(d), so L2 budgets
    mean the same at every image size."""

    method: str = "pgd"  # a DENOISER_ATTACKS name
    norm: str = "linf"  # linf | l2
    eps: float = setting(4.0, ge=0)
    steps: int = setting(10, ge=1)
    step_size: float = setting(0.0, ge=0, means="0: 2.5 * eps / steps")  # 0: 2.5 * eps / steps
    zero_mean: bool = False
    random_start: bool = True
    label: str = ""  # default: "<norm>-<eps>" (+ "-zm" for zero mean)

    def __post_init__(self) -> None:
        DENOISER_ATTACKS.get(self.method)  # an unknown method fails when the recipe loads

    def key(self) -> str:
        """The attack's label in tables and files."""
        if self.label:
            return self.label
        return f"{self.norm}-{self.eps:g}" + ("-zm" if self.zero_mean else "")

    def scale(self, shape) -> float:
        """Factor from the /255 numbers to a raw norm in pixel units, for images [B,C,H,W]."""
        per_pixel = 1.0 / 255.0
        return per_pixel * (math.sqrt(math.prod(shape[1:])) if self.norm == "l2" else 1.0)


def default_attacks() -> List[AttackConfig]:
    """Denoising-PGD Linf at 2/255 and 4/255."""
    return [AttackConfig(norm="linf", eps=2.0), AttackConfig(norm="linf", eps=4.0)]


@torch.no_grad()
def _apply(model: nn.Module, y: Tensor, batch_size: int, device: torch.device) -> Tensor:
    """model(y) in batches, clipped to [0,1]; y: [N,C,H,W] -> [N,C,H,W] on the CPU."""
    return torch.cat([model(y[k:k + batch_size].to(device)).clamp(0, 1).cpu()
                      for k in range(0, len(y), batch_size)])


def _blocks(r: Tensor, size: int) -> Tensor:
    """Non-overlapping size x size blocks of r [N,C,H,W] -> [N*K, C, size, size] (for histograms
    with more samples than images; the statistic of a block uses that block's d)."""
    n, c, h, w = r.shape
    r = r[..., :h - h % size, :w - w % size]
    r = r.reshape(n, c, h // size, size, w // size, size).permute(0, 2, 4, 1, 3, 5)
    return r.reshape(-1, c, size, size)


def _quality(out: Tensor, x: Tensor) -> Dict[str, float]:
    return {"psnr": psnr(out, x).mean().item(), "ssim": ssim(out, x).mean().item()}


def _stat(residual: Tensor, sigma255: float, tol: float) -> Dict[str, float]:
    s = typicality_statistic(residual, sigma255 / 255.0)
    inside = in_typical_set(residual, sigma255 / 255.0, tol)
    return {"ts_stat_mean": s.mean().item(), "ts_stat_std": s.std().item() if len(s) > 1 else 0.0,
            "in_typical": inside.float().mean().item()}


def _file_safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)


class DeltaCache:
    """Adversarial deltas on disk (safetensors), each with the settings that made it."""

    def __init__(self, root: Optional[Path]):
        self.root = root

    def _path(self, model: str, attack: str) -> Path:
        return self.root / f"{_file_safe(model)}__{_file_safe(attack)}.safetensors"

    def get(self, model: str, attack: str, meta: Dict[str, str]) -> Optional[Tensor]:
        """The cached delta if its settings equal `meta`, else None."""
        if self.root is None or not self._path(model, attack).is_file():
            return None
        from safetensors import safe_open

        with safe_open(str(self._path(model, attack)), framework="pt") as fh:
            if (fh.metadata() or {}) != meta:
                return None
        return load_safetensors(self._path(model, attack))["delta"]

    def put(self, model: str, attack: str, meta: Dict[str, str], delta: Tensor) -> None:
        """Store a delta atomically (no-op without a root)."""
        if self.root is not None:
            atomic_save_safetensors(self._path(model, attack), {"delta": delta}, metadata=meta)


def make_attack(a: AttackConfig, shape) -> Any:
    """Build the attack object of `a` for images of `shape` [B,C,H,W] (budgets made raw)."""
    scale = a.scale(shape)
    if a.method == "random":
        return RandomPerturbation(eps=a.eps * scale, norm=a.norm, zero_mean=a.zero_mean)
    return DENOISER_ATTACKS.create(a.method, eps=a.eps * scale, norm=a.norm, steps=a.steps,
                                   step_size=a.step_size * scale or None,
                                   zero_mean=a.zero_mean, random_start=a.random_start)


def run_attack(model: nn.Module, attack, x: Tensor, y: Tensor, batch_size: int, seed: int,
               device: torch.device, bar=None) -> Tensor:
    """Attack deltas for all images, in batches; x, y: [N,C,H,W] -> delta [N,C,H,W] (CPU)."""
    out = []
    for k in range(0, len(x), batch_size):
        g = torch.Generator(device=device).manual_seed(derive_seed(seed, k))
        out.append(attack(model, x[k:k + batch_size].to(device), y[k:k + batch_size].to(device),
                          g).detach().cpu())
        if bar is not None:
            bar.update(1)
    return torch.cat(out)


def evaluate_models(models: Dict[str, nn.Module], x: Tensor, sigma: float,
                    attacks: List[AttackConfig], transfer_attack: str = "", seed: int = 0,
                    batch_size: int = 4, typical_tol: float = 0.0, cache_dir: Optional[Path] = None,
                    device: torch.device | str = "cpu", progress: bool = False,
                    example_index: int = 0) -> Dict[str, Any]:
    """Evaluate denoisers on clean images x [N,C,H,W] at noise `sigma` (/255).

    Returns a JSON-able dict (quality clean / attacked / random baseline, typical-set statistics,
    transfer matrix) under "results", and tensors for figures under "tensors".
    """
    from tqdm.auto import tqdm

    if not models:
        raise ValueError("no models to evaluate: give at least one (label -> checkpoint)")
    if not attacks:
        raise ValueError("no attacks configured: give at least one attack")
    labels = [a.key() for a in attacks]
    if len(set(labels)) != len(labels):
        raise ValueError(f"attack labels must be unique, got {labels}")
    transfer = transfer_attack or labels[-1]
    if transfer not in labels:
        raise ValueError(f"transfer_attack {transfer!r} is not a configured attack; choose one of "
                         f"{', '.join(labels)}")
    device = torch.device(device)
    d = math.prod(x.shape[1:])
    tol_ts = typical_tol or 2.0 * math.sqrt(2.0 / d)
    y = noisy_observation(x, sigma, seed)
    cache = DeltaCache(cache_dir)
    for m in models.values():
        m.eval().to(device)
    res: Dict[str, Any] = {
        "sigma": sigma, "images": len(x), "image_shape": list(x.shape[1:]), "seed": seed,
        "typical_tol": tol_ts, "gaussian_in_typical_exact": shell_probability(d, tol_ts),
        "noisy": {**_quality(y.clamp(0, 1), x), **_stat(y - x, sigma, tol_ts)},
        "attacks": [asdict(a) | {"key": a.key()} for a in attacks], "models": {}}
    deltas: Dict[str, Dict[str, Tensor]] = {}
    outs: Dict[str, Dict[str, Tensor]] = {}
    nb = math.ceil(len(x) / batch_size)
    bar = tqdm(total=len(models) * len(attacks) * nb, desc="attacks", dynamic_ncols=True,
               disable=not progress)
    for name, model in models.items():
        clean_out = _apply(model, y, batch_size, device)
        entry = {"clean": _quality(clean_out, x), "attacks": {}}
        outs[name] = {"clean": clean_out}
        deltas[name] = {}
        fp = weights_fingerprint(model)
        for a in attacks:
            scale = a.scale(x.shape)
            meta = {"attack": json.dumps(asdict(a), sort_keys=True), "sigma": repr(sigma),
                    "seed": str(seed), "images": str(len(x)), "weights": fp}
            delta = cache.get(name, a.key(), meta)
            if delta is None:
                delta = run_attack(model, make_attack(a, x.shape), x, y, batch_size,
                                   derive_seed(seed, "attack", name, a.key()), device, bar)
                cache.put(name, a.key(), meta, delta)
            else:
                bar.update(nb)
            deltas[name][a.key()] = delta
            adv_out = _apply(model, y + delta, batch_size, device)
            # the baseline: random perturbations with each sample's own attack norm
            g = torch.Generator().manual_seed(derive_seed(seed, "random", name, a.key()))
            rnd = random_on_sphere(tuple(x.shape), delta_norm(delta, a.norm), a.norm, g,
                                   zero_mean=a.zero_mean)
            rnd_out = _apply(model, y + rnd, batch_size, device)
            q, qr = _quality(adv_out, x), _quality(rnd_out, x)
            entry["attacks"][a.key()] = {
                **q, "random_psnr": qr["psnr"], "random_ssim": qr["ssim"],
                "psnr_drop": entry["clean"]["psnr"] - q["psnr"],
                "budget": a.eps * scale, "delta_norm_mean": delta_norm(delta, a.norm).mean().item(),
                **_stat(y + delta - x, sigma, tol_ts),
                **{f"random_{k}": v for k, v in _stat(y + rnd - x, sigma, tol_ts).items()}}
            outs[name][a.key()] = adv_out
        res["models"][name] = entry
    bar.close()
    names = list(models)
    matrix = []
    for src in names:
        row = []
        for tgt in names:
            if src == tgt:
                row.append(res["models"][tgt]["attacks"][transfer]["psnr"])
            else:
                out = _apply(models[tgt], y + deltas[src][transfer], batch_size, device)
                row.append(psnr(out, x).mean().item())
        matrix.append(row)
    res["transfer"] = {"attack": transfer, "sources": names, "targets": names, "psnr": matrix,
                       "no_attack": [res["models"][n]["clean"]["psnr"] for n in names]}
    i = min(max(example_index, 0), len(x) - 1)
    block = min(32, *x.shape[-2:])
    tensors = {"x": x[i], "y": y[i], "example_index": i,
               "rows": {n: {"clean": x[i], "noisy": y[i], "attacked": y[i] + deltas[n][transfer][i],
                            "denoised (noisy)": outs[n]["clean"][i],
                            "denoised (attacked)": outs[n][transfer][i]} for n in names},
               "block": block,
               "stats": {"Gaussian": typicality_statistic(_blocks(y - x, block), sigma / 255.0),
                         **{f"{n} / {transfer}": typicality_statistic(
                             _blocks(y + deltas[n][transfer] - x, block), sigma / 255.0)
                            for n in names}}}
    return {"results": res, "tensors": tensors}


def markdown_report(res: Dict[str, Any], title: str = "Denoiser evaluation") -> str:
    """Markdown tables from `evaluate_models(...)["results"]`."""
    keys = [a["key"] for a in res["attacks"]]
    lines = [f"# {title}", "",
             f"{res['images']} test images of shape {res['image_shape']}, Gaussian noise "
             f"sigma = {res['sigma']:g}/255 (seed {res['seed']}); noisy input PSNR "
             f"{res['noisy']['psnr']:.2f} dB, SSIM {res['noisy']['ssim']:.4f}.", "",
             "## PSNR (dB) / SSIM, without and under attack", "",
             "Random: a random perturbation with each sample's own attack norm (Linf: random "
             "signs), the same-norm baseline.", ""]
    head = "| model | no attack | " + " | ".join(f"{k} | random {k}" for k in keys) + " |"
    lines += [head, "|" + "---|" * (2 + 2 * len(keys))]
    for name, m in res["models"].items():
        cells = [f"{m['clean']['psnr']:.2f} / {m['clean']['ssim']:.4f}"]
        for k in keys:
            a = m["attacks"][k]
            cells += [f"{a['psnr']:.2f} / {a['ssim']:.4f}", f"{a['random_psnr']:.2f} / {a['random_ssim']:.4f}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    eps = res["typical_tol"]
    lines += ["", "## Typical-set statistic ||y' - x||^2 / (d s^2) - 1", "",
              f"Mean +- std over images; 'in set': share inside the eps-typical set, eps = {eps:.4f} "
              f"(a Gaussian residual is inside with probability {res['gaussian_in_typical_exact']:.4f}, "
              f"exact chi-square).", "",
              "| input | statistic | in set | random same-norm: statistic | in set |", "|---|---|---|---|---|",
              f"| Gaussian noisy y | {res['noisy']['ts_stat_mean']:+.4f} +- {res['noisy']['ts_stat_std']:.4f} "
              f"| {res['noisy']['in_typical']:.2f} | | |"]
    for name, m in res["models"].items():
        for k in keys:
            a = m["attacks"][k]
            lines.append(f"| {name} / {k} | {a['ts_stat_mean']:+.4f} +- {a['ts_stat_std']:.4f} | "
                         f"{a['in_typical']:.2f} | {a['random_ts_stat_mean']:+.4f} +- "
                         f"{a['random_ts_stat_std']:.4f} | {a['random_in_typical']:.2f} |")
    t = res["transfer"]
    lines += ["", f"## Transfer matrix: PSNR (dB), attack {t['attack']}", "",
              "Rows: the denoiser the attack was made on; columns: the denoiser evaluated. The "
              "diagonal is the white-box attack.", "",
              "| source \\ target | " + " | ".join(t["targets"]) + " |", "|" + "---|" * (1 + len(t["targets"])),
              "| (no attack) | " + " | ".join(f"{v:.2f}" for v in t["no_attack"]) + " |"]
    for src, row in zip(t["sources"], t["psnr"]):
        lines.append(f"| {src} | " + " | ".join(f"{v:.2f}" for v in row) + " |")
    return "\n".join(lines) + "\n"


def write_outputs(out: Dict[str, Any], run_dir: str | Path, title: str = "Denoiser evaluation") -> Dict[str, str]:
    """Write results.json, report.md, transfer.png, examples.png, ts_statistic.png."""
    run_dir = Path(run_dir)
    res, ten = out["results"], out["tensors"]
    t = res["transfer"]
    paths = {"results": str(atomic_write_json(run_dir / "results.json", res)),
             "report": str(atomic_write_text(run_dir / "report.md", markdown_report(res, title))),
             "transfer_png": str(transfer_heatmap(t["psnr"], t["sources"], t["targets"],
                                                  run_dir / "transfer.png",
                                                  f"PSNR (dB) under {t['attack']} attacks",
                                                  reference=t["no_attack"]))}
    caps = {}
    for n, row in ten["rows"].items():
        caps[n] = {"noisy": f"{psnr(row['noisy'][None].clamp(0, 1), row['clean'][None]).item():.2f} dB",
                   "attacked": f"{psnr(row['attacked'][None].clamp(0, 1), row['clean'][None]).item():.2f} dB",
                   "denoised (noisy)": f"{psnr(row['denoised (noisy)'][None], row['clean'][None]).item():.2f} dB",
                   "denoised (attacked)": f"{psnr(row['denoised (attacked)'][None], row['clean'][None]).item():.2f} dB"}
    paths["examples_png"] = str(example_grid(ten["rows"], run_dir / "examples.png", caps))
    b = ten["block"]
    d_block = res["image_shape"][0] * b * b
    paths["ts_png"] = str(statistic_histogram(
        ten["stats"], run_dir / "ts_statistic.png", band=4.0 * math.sqrt(2.0 / d_block),
        title=f"||r||^2/(d s^2) - 1 over {b}x{b} blocks (band: +-4 std of the Gaussian value)"))
    return paths
