"""TS study: does typical-set (TS) training help a DnCNN denoiser, and in which setting?

Trains a grid of named TS settings and a Gaussian baseline with the same budget and seed (per
architecture: the small DnCNN, 8 x 32, and DnCNN-17, 17 x 64), on scikit-image's bundled photos at
sigma 25/255, then evaluates every model on the same test crops and the same noise: clean PSNR,
PSNR under denoising-PGD (Linf 2/255, Linf 4/255, L2 zero-mean RMS 4/255, ObsAtk-style), under
Linf 4/255 examples transferred from a denoiser of another depth, and the typical-set statistic
of the attacked inputs' residuals. Every PSNR difference to the Gaussian baseline of the same
architecture gets a paired 95% bootstrap interval over the crops.

    bash tools/venv.sh python tools/ts_study.py --models small --steps 1500        # all settings
    bash tools/venv.sh python tools/ts_study.py --models dncnn17 --steps 1000 --settings gaussian,ts,ts_far
    bash tools/venv.sh python tools/ts_study.py --quick                            # smoke run

Writes <out>/report.md, <out>/results.json, <out>/diff.png (differences with intervals) and
<out>/curves.png (validation PSNR during training). Training runs live in
<out>/train/<arch>/<setting>-<hash> (the hash covers the whole training config, so a changed
budget starts a new run instead of resuming a different one); a rerun resumes unfinished runs,
skips finished ones, and reads evaluations and attack deltas from caches keyed on the weights'
content (<out>/eval/).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "toolkit"))

from ssni.checkpoint import complete_checkpoints, latest_checkpoint  # noqa: E402
from ssni.commands.train_denoiser import DenoiserTrainConfig, train_denoiser  # noqa: E402
from ssni.config import load_config, to_dict  # noqa: E402
from ssni.data import DataConfig, build_dataset  # noqa: E402
from ssni.data.photos import PHOTO_TEST, squares  # noqa: E402
from ssni.denoise.evaluate import AttackConfig, DeltaCache, make_attack, run_attack  # noqa: E402
from ssni.denoise.metrics import psnr  # noqa: E402
from ssni.denoise.train import noisy_observation  # noqa: E402
from ssni.device import resolve_device  # noqa: E402
from ssni.evaluate.state import config_fingerprint  # noqa: E402
from ssni.io import atomic_write_json, atomic_write_text  # noqa: E402
from ssni.models import load_model, weights_fingerprint  # noqa: E402
from ssni.plotting import pyplot, save_figure  # noqa: E402
from ssni.seeding import derive_seed  # noqa: E402
from ssni.typical import typicality_statistic  # noqa: E402

BASELINE = "gaussian"
# The TS reference point of this study, written out in full so that the study keeps its meaning
# when the sampler's defaults change: TypicalSetNoise's defaults before the study (which moved the
# default outer range to ts_near's U(1.02, 1.10)). Our own choices (not the paper's).
TS_DEFAULT: Dict[str, Any] = dict(off_shell_fraction=0.5, outer_range=[1.05, 1.30], inner_range=[0.75, 0.95],
                                  inner_fraction=0.0, direction="isotropic", sign_block=1, lowfreq_factor=4)


@dataclass(frozen=True)
class Setting:
    """A named training noise: Gaussian (ts=None) or TS with these changes to TS_DEFAULT."""

    description: str
    ts: Optional[Dict[str, Any]] = None

    def noise_kwargs(self) -> Optional[Dict[str, Any]]:
        """TypicalSetNoise keyword arguments (None for the Gaussian baseline)."""
        return None if self.ts is None else {**TS_DEFAULT, **self.ts}


# One-factor-at-a-time variations around the TS default (a full factorial grid is too big).
SETTINGS: Dict[str, Setting] = {
    BASELINE: Setting("Gaussian noise only (the baseline)"),
    "ts": Setting("TS default: half the patches off the shell, outside, radius U(1.05, 1.30), isotropic", {}),
    "ts_frac25": Setting("a quarter of the patches off the shell", {"off_shell_fraction": 0.25}),
    "ts_frac100": Setting("every patch off the shell", {"off_shell_fraction": 1.0}),
    "ts_near": Setting("outside, near the shell: radius U(1.02, 1.10)", {"outer_range": [1.02, 1.10]}),
    "ts_far": Setting("outside, far from the shell: radius U(1.2, 2.0)", {"outer_range": [1.2, 2.0]}),
    "ts_inner": Setting("half the off-shell patches inside the shell, radius U(0.75, 0.95)",
                        {"inner_fraction": 0.5}),
    "ts_sign": Setting("off-shell directions: random signs per pixel (attack-like)", {"direction": "sign"}),
    "ts_lowfreq": Setting("off-shell directions: Gaussian at 1/4 resolution, bilinear up (smooth)",
                          {"direction": "lowfreq"}),
}

# architecture label -> (registered model name, kwargs, description)
MODELS: Dict[str, Tuple[str, Dict[str, Any], str]] = {
    "small": ("dncnn_small", {"depth": 8, "width": 32}, "DnCNN 8 layers x 32 channels"),
    "dncnn17": ("dncnn", {"depth": 17, "width": 64}, "DnCNN-17, 64 channels (the standard DnCNN-S)"),
}
# the transfer source when the study has only one architecture: a Gaussian DnCNN of another depth
HELPER = "dncnn5"
HELPER_MODEL = ("dncnn_small", {"depth": 5, "width": 32}, "DnCNN 5 x 32 (transfer source only)")

TRANSFER_ATTACK = "linf-4"
PHOTO_SQUARE = 300  # the largest centre square every test photo has (chelsea is 300 px high)

# argument -> (default, --quick default); None on the command line means "not given"
DEFAULTS: Dict[str, Tuple[Any, Any]] = {
    "steps": (1500, 20), "batch": (16, 8), "patch": (40, 24), "crops": (32, 4), "val_crops": (8, 2),
    "crop_size": (64, 32), "attack_steps": (10, 2), "resamples": (2000, 200), "eval_every": (0, 0),
}


# ---- statistics ------------------------------------------------------------------------------

def paired_bootstrap_ci(a: Sequence[float] | Tensor, b: Sequence[float] | Tensor, resamples: int = 2000,
                        level: float = 0.95, seed: int = 0) -> Dict[str, float]:
    """Mean of a - b and its percentile bootstrap interval; a, b: [N] paired values -> {mean, lo, hi, n}.

    Pairs are resampled together (crop indices drawn with replacement, seeded), so what the two
    models share (the crop's difficulty) cancels. Identical inputs give exactly 0 and [0, 0].
    """
    a, b = torch.as_tensor(a, dtype=torch.float64).flatten(), torch.as_tensor(b, dtype=torch.float64).flatten()
    if a.shape != b.shape:
        raise ValueError(f"paired samples must have one length, got {a.numel()} and {b.numel()}")
    if a.numel() == 0:
        raise ValueError("paired bootstrap needs at least one pair, got none")
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise ValueError("paired bootstrap got NaN/Inf values; expected finite numbers")
    if resamples < 1 or not 0 < level < 1:
        raise ValueError(f"need resamples >= 1 and 0 < level < 1, got {resamples} and {level}")
    d = a - b
    g = torch.Generator().manual_seed(int(seed))
    idx = torch.randint(0, d.numel(), (int(resamples), d.numel()), generator=g)
    means = d[idx].mean(1)
    lo, hi = torch.quantile(means, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64))
    mean = d.mean().item()
    # the interval of a constant difference is that constant: no rounding noise from resampling
    if bool((d == d[0]).all()):
        lo = hi = torch.tensor(mean)
    return {"mean": mean, "lo": lo.item(), "hi": hi.item(), "n": int(d.numel())}


def plateau(curve: List[Tuple[int, float]]) -> Dict[str, Optional[float]]:
    """Validation-curve summary from [(step, psnr)]: final, best, gain over the last quarter (dB)."""
    if not curve:
        return {"final": None, "best": None, "final_minus_best": None, "last_gain": None,
                "last_quarter_gain": None, "from_step": None}
    steps, vals = [s for s, _ in curve], [v for _, v in curve]
    final, best = vals[-1], max(vals)
    cut = steps[-1] * 0.75
    # the last point at or before 75% of training (the first point if none)
    ref = max((i for i, s in enumerate(steps) if s <= cut), default=0)
    return {"final": final, "best": best, "final_minus_best": final - best,
            "last_gain": final - vals[-2] if len(vals) > 1 else None,
            "last_quarter_gain": final - vals[ref] if ref < len(vals) - 1 else None,
            "from_step": steps[ref]}


# ---- data ------------------------------------------------------------------------------------

def test_crops(size: int, n_eval: int, n_val: int, seed: int) -> Tuple[Tensor, Tensor, List[str]]:
    """Disjoint evaluation [n_eval,1,s,s] and validation [n_val,1,s,s] crops of the test photos.

    Each test photo's centre 300 px square is tiled into s x s crops; crops are dealt round-robin
    over the photos in a seeded order, the first n_eval for evaluation, the next n_val for
    validation. Returns (eval crops, val crops, names "photo#tile" of the eval crops).
    """
    if size < 8 or size > PHOTO_SQUARE:
        raise ValueError(f"crop size must be in [8, {PHOTO_SQUARE}], got {size}")
    squares_ = build_dataset(DataConfig(name="photos", image_size=PHOTO_SQUARE, channels=1), "test").images
    g = torch.Generator().manual_seed(derive_seed(seed, "crops"))
    per_photo = []
    for i, img in enumerate(squares_):
        tiles = squares(img, size, "train")
        order = torch.randperm(len(tiles), generator=g).tolist()
        per_photo.append([(f"{PHOTO_TEST[i]}#{k}", tiles[k]) for k in order])
    dealt: List[Tuple[str, Tensor]] = []
    for rank in range(max(len(p) for p in per_photo)):
        dealt += [p[rank] for p in per_photo if rank < len(p)]
    if n_eval < 1 or n_val < 1 or n_eval + n_val > len(dealt):
        raise ValueError(f"need 1 <= crops and 1 <= val crops with crops + val crops <= {len(dealt)} "
                         f"(the test photos hold {len(dealt)} crops of {size} px), got {n_eval} + {n_val}")
    x = torch.stack([t for _, t in dealt[:n_eval]])
    v = torch.stack([t for _, t in dealt[n_eval:n_eval + n_val]])
    return x, v, [n for n, _ in dealt[:n_eval]]


def tensor_fingerprint(x: Tensor) -> str:
    """SHA-256 (16 hex digits) of a tensor's shape and float32 values."""
    h = hashlib.sha256(str(tuple(x.shape)).encode())
    h.update(x.detach().cpu().float().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


# ---- training --------------------------------------------------------------------------------

@dataclass
class Run:
    """One training run of the study and what it produced."""

    arch: str
    setting: str
    cfg: DenoiserTrainConfig
    trained_steps_now: int = 0
    seconds: Optional[float] = None  # wall time of the steps trained in the session that trained them
    seconds_steps: int = 0
    summary: Dict[str, Any] = field(default_factory=dict)
    curve: List[Tuple[int, float]] = field(default_factory=list)

    @property
    def run_dir(self) -> Path:
        """Where ssni's train_denoiser keeps this run."""
        return Path(self.cfg.run_dir)


def train_config(out: Path, arch: str, setting: str, args: argparse.Namespace) -> DenoiserTrainConfig:
    """The resolved train-denoiser config of (arch, setting); its run dir is keyed on its content."""
    name, kw, _ = MODELS[arch] if arch in MODELS else HELPER_MODEL
    noise = SETTINGS[setting].noise_kwargs()
    cfg = load_config(DenoiserTrainConfig, ROOT / "recipes" / "denoiser" / "dncnn_photos.yaml", [
        f"sigma={args.sigma:g}", f"patch_size={args.patch}", "data.image_size=128",
        f"model.name={name}", f"loop.steps={args.steps}", f"loop.batch_size={args.batch}",
        f"loop.seed={args.seed}", "loop.ema_decay=0.995", "optim.lr=0.001", "optim.schedule=cosine"])
    cfg.model.kwargs = dict(kw)
    cfg.noise.name = BASELINE if noise is None else "typical_set"
    cfg.noise.kwargs = {} if noise is None else noise
    key = config_fingerprint({k: v for k, v in to_dict(cfg).items() if k != "run_dir"}
                             | {"loop": {k: v for k, v in to_dict(cfg.loop).items()
                                         if k not in ("progress", "device", "ckpt_every", "keep_checkpoints",
                                                      "log_every")}})
    cfg.run_dir = str(out / "train" / arch / f"{setting}-{key[:8]}")
    # settings that do not change the weights (left out of the key above)
    cfg.loop.ckpt_every = args.eval_every
    cfg.loop.keep_checkpoints = args.steps // args.eval_every + 2  # keep them all: the validation curve
    cfg.loop.log_every = max(1, min(50, args.steps))
    cfg.loop.progress = not args.no_progress
    cfg.loop.device = args.device
    return cfg


def _latest_step(run_dir: Path) -> int:
    try:
        return int(json.loads((latest_checkpoint(run_dir / "checkpoints") / "state.json").read_text())["step"])
    except FileNotFoundError:
        return 0


def train_run(run: Run, times: Dict[str, Any], times_file: Path) -> None:
    """Train (or resume, or skip when finished) one run through ssni's train_denoiser."""
    steps = run.cfg.loop.steps
    start = _latest_step(run.run_dir)
    summary_file = run.run_dir / "summary.json"
    label = f"{run.arch}/{run.setting}"
    if start >= steps and summary_file.is_file():
        run.summary = json.loads(summary_file.read_text())
        print(f"[train] {label}: finished earlier ({run.run_dir.name}), not retrained", flush=True)
    else:
        print(f"[train] {label}: steps {start} -> {steps} in {run.run_dir}", flush=True)
        t0 = time.time()
        run.summary = train_denoiser(run.cfg)
        run.trained_steps_now = run.summary["steps"] - start
        old = times.get(run.run_dir.name, {"seconds": 0.0, "steps": 0})
        times[run.run_dir.name] = {"seconds": old["seconds"] + time.time() - t0,
                                   "steps": old["steps"] + run.trained_steps_now}
        atomic_write_json(times_file, times)
    t = times.get(run.run_dir.name)
    if t:
        run.seconds, run.seconds_steps = t["seconds"], t["steps"]


@torch.no_grad()
def denoise(model: nn.Module, y: Tensor, batch: int, device: torch.device) -> Tensor:
    """model(y) in batches, clipped to [0,1]; y: [N,C,H,W] -> [N,C,H,W] on the CPU."""
    return torch.cat([model(y[k:k + batch].to(device)).clamp(0, 1).cpu() for k in range(0, len(y), batch)])


def validation_curve(run: Run, v: Tensor, sigma: float, seed: int, batch: int,
                     device: torch.device) -> List[Tuple[int, float]]:
    """Mean validation PSNR of the EMA weights at every kept checkpoint -> [(step, psnr)], cached."""
    yv = noisy_observation(v, sigma, derive_seed(seed, "validation"))
    key = config_fingerprint({"val": tensor_fingerprint(v), "sigma": sigma, "seed": seed})
    cache_file = run.run_dir / "val_curve.json"
    cache = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
    points = cache.get("points", {}) if cache.get("key") == key else {}
    curve = []
    for ck in complete_checkpoints(run.run_dir / "checkpoints"):
        step = int(json.loads((ck / "state.json").read_text())["step"])
        model = load_model(ck, weights="ema").to(device)
        fp = weights_fingerprint(model)
        hit = points.get(str(step))
        if not hit or hit["weights"] != fp:
            hit = {"weights": fp, "psnr": psnr(denoise(model, yv, batch, device), v).mean().item()}
            points[str(step)] = hit
        curve.append((step, hit["psnr"]))
    atomic_write_json(cache_file, {"key": key, "points": points})
    return sorted(curve)


# ---- evaluation ------------------------------------------------------------------------------

def attack_configs(steps: int) -> List[AttackConfig]:
    """The white-box attacks: denoising-PGD Linf 2/255 and 4/255, L2 zero-mean RMS 4/255."""
    return [AttackConfig(norm="linf", eps=2.0, steps=steps), AttackConfig(norm="linf", eps=4.0, steps=steps),
            AttackConfig(norm="l2", eps=4.0, steps=steps, zero_mean=True)]


class Evaluator:
    """Per-crop evaluation of denoisers on fixed crops x [N,1,s,s] and noise y, cached by weights."""

    def __init__(self, x: Tensor, sigma: float, attacks: List[AttackConfig], seed: int, batch: int,
                 root: Path, device: torch.device, bar=None):
        self.x, self.sigma, self.attacks, self.seed, self.batch = x, sigma, attacks, seed, batch
        self.y = noisy_observation(x, sigma, seed)
        self.device, self.bar = device, bar
        # the batch size is part of the key: attack random starts are seeded per batch
        self.key = config_fingerprint({"x": tensor_fingerprint(x), "sigma": sigma, "seed": seed, "batch": batch,
                                       "attacks": [asdict(a) for a in attacks]})
        self.root = root
        self.deltas = DeltaCache(root / "deltas")

    def _stat(self, delta: Tensor) -> List[float]:
        return typicality_statistic(self.y + delta - self.x, self.sigma / 255.0).tolist()

    def delta(self, model: nn.Module, fp: str, a: AttackConfig) -> Tensor:
        """White-box attack deltas [N,1,s,s] of attack `a` on `model` (weights fingerprint fp), cached."""
        meta = {"attack": json.dumps(asdict(a), sort_keys=True), "sigma": repr(self.sigma), "seed": str(self.seed),
                "crops": tensor_fingerprint(self.x), "batch": str(self.batch), "weights": fp}
        d = self.deltas.get(fp, a.key(), meta)
        if d is None:
            # one random start per attack for every model: the comparison stays paired
            d = run_attack(model, make_attack(a, self.x.shape), self.x, self.y, self.batch,
                           derive_seed(self.seed, "attack", a.key()), self.device, self.bar)
            self.deltas.put(fp, a.key(), meta, d)
        elif self.bar is not None:
            self.bar.update(math.ceil(len(self.x) / self.batch))
        return d

    def model(self, model: nn.Module) -> Dict[str, Any]:
        """Per-crop clean PSNR, PSNR and typical-set statistic under each attack; cached by weights."""
        model.eval().to(self.device)
        fp = weights_fingerprint(model)
        file = self.root / "cache" / f"{fp}-{self.key}.json"
        if file.is_file():
            res = json.loads(file.read_text())
            if self.bar is not None:  # finished attacks still count on the progress bar
                self.bar.update(len(self.attacks) * math.ceil(len(self.x) / self.batch))
            return res
        res: Dict[str, Any] = {"weights": fp, "clean": psnr(denoise(model, self.y, self.batch, self.device),
                                                            self.x).tolist(), "attacks": {}}
        for a in self.attacks:
            d = self.delta(model, fp, a)
            out = denoise(model, self.y + d, self.batch, self.device)
            res["attacks"][a.key()] = {"psnr": psnr(out, self.x).tolist(), "ts_stat": self._stat(d)}
        atomic_write_json(file, res)
        return res

    def transfer(self, source: nn.Module, target: nn.Module, attack: str) -> Dict[str, Any]:
        """Per-crop PSNR of target on y + (source's white-box delta of `attack`); cached by both weights."""
        source.eval().to(self.device)
        target.eval().to(self.device)
        fs, ft = weights_fingerprint(source), weights_fingerprint(target)
        file = self.root / "cache" / f"transfer-{fs}-{ft}-{attack}-{self.key}.json"
        if file.is_file():
            return json.loads(file.read_text())
        a = next(c for c in self.attacks if c.key() == attack)
        d = self.delta(source, fs, a)
        res = {"source": fs, "target": ft, "attack": attack,
               "psnr": psnr(denoise(target, self.y + d, self.batch, self.device), self.x).tolist(),
               "ts_stat": self._stat(d)}
        atomic_write_json(file, res)
        return res


def _mean_std(v: Sequence[float]) -> Dict[str, float]:
    t = torch.tensor(v, dtype=torch.float64)
    return {"mean": t.mean().item(), "std": t.std().item() if len(t) > 1 else 0.0}


def best_setting(diffs: Dict[str, Dict[str, Dict[str, float]]], metrics: List[str]) -> Dict[str, Any]:
    """The report's verdict from {setting: {metric: interval}} -> {setting, metric, per_metric, text}.

    The winner has the largest mean gain under an attack whose interval lies above 0, among settings
    whose clean-PSNR interval reaches 0 or above (no clean cost beyond the interval).
    """
    cands = []
    for s, d in diffs.items():
        if s == BASELINE or d["clean"]["hi"] < 0:
            continue
        cands += [(d[m]["mean"], s, m) for m in metrics if d[m]["lo"] > 0]
    per_metric = {m: max(((d[m]["mean"], s) for s, d in diffs.items() if s != BASELINE
                          and d["clean"]["hi"] >= 0 and d[m]["lo"] > 0), default=(None, None))[1]
                  for m in metrics}
    if not cands:
        return {"setting": None, "metric": None, "per_metric": per_metric,
                "text": "no setting helps beyond the interval"}
    _, s, m = max(cands)
    c, k = diffs[s][m], diffs[s]["clean"]
    return {"setting": s, "metric": m, "per_metric": per_metric,
            "text": f"best setting: {s}, {c['mean']:+.2f} dB under {m} (95% CI [{c['lo']:+.2f}, {c['hi']:+.2f}]); "
                    f"clean {k['mean']:+.2f} dB [{k['lo']:+.2f}, {k['hi']:+.2f}]"}


# ---- report ----------------------------------------------------------------------------------

def _cell(mean: float, d: Dict[str, float]) -> str:
    return f"{mean:.2f} ({d['mean']:+.2f} [{d['lo']:+.2f}, {d['hi']:+.2f}])"


def _num(v: Optional[float], fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def plot_diffs(results: Dict[str, Any], path: Path) -> Path:
    """Difference to the baseline (dB) with 95% intervals, per metric and setting, one panel per arch."""
    plt = pyplot()
    archs = list(results["eval"])
    fig, axes = plt.subplots(len(archs), 1, figsize=(10, 3.6 * len(archs)), squeeze=False)
    for ax, arch in zip(axes[:, 0], archs):
        ev = results["eval"][arch]
        settings = [s for s in ev["settings"] if s != BASELINE]
        metrics = ev["metrics"]
        width = 0.8 / max(1, len(metrics))
        for j, m in enumerate(metrics):
            xs = [i + (j - (len(metrics) - 1) / 2) * width for i in range(len(settings))]
            ds = [ev["settings"][s]["diff"][m] for s in settings]
            mean = [d["mean"] for d in ds]
            err = [[d["mean"] - d["lo"] for d in ds], [d["hi"] - d["mean"] for d in ds]]
            ax.errorbar(xs, mean, yerr=err, fmt="o", capsize=3, label=m)
        ax.axhline(0.0, color="k", lw=0.8)
        ax.set_xticks(range(len(settings)))
        ax.set_xticklabels(settings, rotation=20)
        ax.set_ylabel("PSNR - baseline (dB)")
        ax.set_title(f"{arch}: difference to the Gaussian baseline, 95% paired bootstrap CI "
                     f"({ev['n_crops']} crops)")
        ax.legend(fontsize=7, ncol=len(metrics))
    fig.tight_layout()
    return save_figure(fig, path)


def plot_curves(results: Dict[str, Any], path: Path) -> Path:
    """Validation PSNR against training step, one panel per architecture."""
    plt = pyplot()
    archs = list(results["eval"])
    fig, axes = plt.subplots(1, len(archs), figsize=(6 * len(archs), 4), squeeze=False)
    for ax, arch in zip(axes[0], archs):
        for s, r in results["runs"][arch].items():
            if r["curve"]:
                steps, vals = zip(*r["curve"])
                ax.plot(steps, vals, marker=".", lw=2.5 if s == BASELINE else 1.0, label=s)
        ax.set_xlabel("training step")
        ax.set_ylabel("validation PSNR (dB), EMA weights")
        ax.ticklabel_format(axis="y", useOffset=False)
        ax.set_title(arch)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)


def markdown(results: Dict[str, Any], command: str) -> str:
    """The study's report (markdown) from its results."""
    c = results["config"]
    lines = ["# TS study: typical-set training vs Gaussian training of DnCNN denoisers", "",
             f"Command: `{command}`", "",
             f"Grey-scale photos bundled with scikit-image, sigma = {c['sigma']:g}/255. Training: ssni's "
             f"train-denoiser (recipe dncnn_photos.yaml), {c['steps']} steps, batch {c['batch']} random "
             f"{c['patch']}x{c['patch']} patches of 128 px train tiles, AdamW 1e-3 cosine, EMA 0.995, seed "
             f"{c['seed']} for every run (same initial weights and patches; only the noise differs). "
             f"Evaluation: {c['crops']} crops of {c['crop_size']} px from the test photos ({', '.join(PHOTO_TEST)}), "
             f"one fixed Gaussian noise draw, EMA weights; validation: {c['val_crops']} other crops. Attacks: "
             f"denoising-PGD, {c['attack_steps']} steps, one random start shared by all models; "
             f"`l2-4-zm` is L2 with RMS 4/255 per pixel, projected to zero mean (ObsAtk-style). "
             f"`transfer` applies the {TRANSFER_ATTACK} examples made on the source model named below. "
             f"Differences are PSNR(setting) - PSNR(gaussian) of the same architecture, with "
             f"{c['resamples']}-resample paired bootstrap 95% intervals over crops.", "",
             "## Settings", "",
             f"Radius ratios are relative to sigma*sqrt(d); a Gaussian {c['patch']}x{c['patch']} training patch has "
             f"ratio 1 +- {1 / math.sqrt(2 * c['patch'] ** 2):.3f}. These values are our own choices; the TS "
             "paper's are not public.", "",
             "| setting | off-shell fraction | outer radius | inner fraction (radius) | direction | what |",
             "|---|---|---|---|---|---|"]
    for s in c["settings"]:
        st = SETTINGS[s]
        kw = st.noise_kwargs()
        if kw is None:
            lines.append(f"| {s} | 0 | - | - | - | {st.description} |")
        else:
            inner = f"{kw['inner_fraction']:g}" + (f" (U({kw['inner_range'][0]:g}, {kw['inner_range'][1]:g}))"
                                                  if kw["inner_fraction"] > 0 else "")
            direction = {"sign": f"sign, block {kw['sign_block']}",
                         "lowfreq": f"lowfreq, 1/{kw['lowfreq_factor']} resolution"}.get(kw["direction"], kw["direction"])
            lines.append(f"| {s} | {kw['off_shell_fraction']:g} | U({kw['outer_range'][0]:g}, {kw['outer_range'][1]:g}) | "
                         f"{inner} | {direction} | {st.description} |")
    lines += ["", "## Verdict", "",
              "Rule: among settings whose clean-PSNR interval reaches 0 or above, the largest mean gain "
              "under an attack whose interval lies above 0. With about "
              f"{(len(c['settings']) - 1) * (len(c['attack_keys']) + 1)} intervals per architecture, one or two "
              "may exclude 0 by chance at 95%: trust a winner that repeats across attacks or budgets.", ""]
    for arch, ev in results["eval"].items():
        b = ev["best"]
        per = ", ".join(f"{m}: {s or '-'}" for m, s in b["per_metric"].items())
        lines.append(f"- **{arch}**: {b['text']}. Best per attack: {per}.")
    for arch, ev in results["eval"].items():
        metrics = ev["metrics"]
        lines += ["", f"## {arch}: {MODELS[arch][2]}", "",
                  f"PSNR (dB) on {ev['n_crops']} crops, and in brackets the difference to `gaussian` "
                  f"[95% CI]. Noisy input: {ev['noisy_psnr']:.2f} dB. Transfer source: {ev['transfer_source']}.", "",
                  "| setting | clean | " + " | ".join(metrics[1:]) + " |", "|" + "---|" * (1 + len(metrics))]
        for s, r in ev["settings"].items():
            cells = [_cell(r["psnr"][m], r["diff"][m]) for m in metrics]
            lines.append(f"| {s} | " + " | ".join(cells) + " |")
        lines += ["", "Typical-set statistic ||y' - x||^2 / (d s^2) - 1 of the attacked inputs (mean +- std over "
                  f"crops; d = {ev['d']}; a Gaussian residual: {ev['noisy_stat']['mean']:+.4f} +- "
                  f"{ev['noisy_stat']['std']:.4f}, about +-{math.sqrt(2 / ev['d']):.4f} expected).", "",
                  "| setting | " + " | ".join(metrics[1:]) + " |", "|" + "---|" * len(metrics)]
        for s, r in ev["settings"].items():
            lines.append(f"| {s} | " + " | ".join(f"{r['ts_stat'][m]['mean']:+.4f} +- {r['ts_stat'][m]['std']:.4f}"
                                                  for m in metrics[1:]) + " |")
    lines += ["", "## Training", "",
              "Validation PSNR of the EMA weights at each checkpoint (`curves.png`). Plateau check: the "
              "gain over the last quarter of training (final minus the last point at or before 75% of "
              "the steps) and final minus best; a gain under 0.05 dB reads as plateaued.", "",
              "s/step: wall time of the training sessions (setup included) per step trained.", "",
              "| arch | setting | steps | trained now | s/step | val PSNR final | best | final - best | "
              "gain, last quarter | plateaued | run dir |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for arch, runs in results["runs"].items():
        for s, r in runs.items():
            p = r["plateau"]
            g = p["last_quarter_gain"]
            spp = r["seconds"] / r["seconds_steps"] if r["seconds"] and r["seconds_steps"] else None
            lines.append(f"| {arch} | {s} | {r['steps']} | {r['trained_now']} | {_num(spp, '.2f')} | "
                         f"{_num(p['final'], '.2f')} | {_num(p['best'], '.2f')} | {_num(p['final_minus_best'], '+.3f')} | "
                         f"{_num(g, '+.3f')} | {'-' if g is None else ('yes' if g < 0.05 else 'no')} | "
                         f"`{Path(r['run_dir']).relative_to(results['out'])}` |")
    lines += ["", "Figures: `diff.png` (differences with intervals), `curves.png` (validation curves). "
              "Per-crop values: `results.json`."]
    return "\n".join(lines) + "\n"


# ---- main ------------------------------------------------------------------------------------

def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Command-line options, with --quick defaults for options not given."""
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "runs" / "ts-study"))
    ap.add_argument("--settings", default=",".join(SETTINGS),
                    help=f"comma-separated subset of: {', '.join(SETTINGS)} (the baseline is always run)")
    ap.add_argument("--models", default="small", help=f"comma-separated subset of: {', '.join(MODELS)}")
    ap.add_argument("--steps", type=int, help="training steps per run (default 1500; quick 20)")
    ap.add_argument("--eval-every", type=int, help="validation PSNR every k steps (default steps/10)")
    ap.add_argument("--batch", type=int, help="patches per step (default 16; quick 8)")
    ap.add_argument("--patch", type=int, help="training patch size (default 40; quick 24)")
    ap.add_argument("--crops", type=int, help="evaluation crops (default 32; quick 4)")
    ap.add_argument("--val-crops", type=int, help="validation crops (default 8; quick 2)")
    ap.add_argument("--crop-size", type=int, help="side of the test crops (default 64; quick 32)")
    ap.add_argument("--attack-steps", type=int, help="PGD steps (default 10; quick 2)")
    ap.add_argument("--resamples", type=int, help="bootstrap resamples (default 2000; quick 200)")
    ap.add_argument("--sigma", type=float, default=25.0, help="noise std on the 0..255 scale")
    ap.add_argument("--seed", type=int, default=0, help="training seed (every run) and evaluation seed")
    ap.add_argument("--eval-batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    ap.add_argument("--quick", action="store_true", help="tiny budgets, for a smoke run")
    args = ap.parse_args(argv)
    for name, (normal, quick) in DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else normal)
    for name in ("steps", "batch", "patch", "crops", "val_crops", "attack_steps", "resamples", "eval_batch",
                 "threads"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.eval_every < 0:
        ap.error(f"--eval-every must be >= 1, got {args.eval_every}")
    args.eval_every = args.eval_every or max(1, args.steps // 10)
    settings = [s for s in args.settings.split(",") if s]
    bad = [s for s in settings if s not in SETTINGS]
    if bad:
        ap.error(f"unknown setting(s) {', '.join(bad)}; valid choices: {', '.join(SETTINGS)}")
    if BASELINE not in settings:
        print(f"[ts-study] adding the baseline setting {BASELINE!r} (every difference is taken to it)", flush=True)
    args.settings = [BASELINE] + [s for s in dict.fromkeys(settings) if s != BASELINE]
    models = list(dict.fromkeys(m for m in args.models.split(",") if m))
    bad = [m for m in models if m not in MODELS]
    if bad or not models:
        ap.error(f"unknown or no model(s) {', '.join(bad) or '(none)'}; valid choices: {', '.join(MODELS)}")
    args.models = models
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the study (training, evaluation, report); returns the exit status."""
    from tqdm.auto import tqdm

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out).resolve()
    device = resolve_device(args.device)
    command = "bash tools/venv.sh python tools/ts_study.py " + " ".join(
        argv if argv is not None else sys.argv[1:])
    t_start = time.time()

    # 1. training: every (arch, setting), plus a transfer source of another depth when needed
    times_file = out / "train_seconds.json"
    times = json.loads(times_file.read_text()) if times_file.is_file() else {}
    runs: Dict[str, Dict[str, Run]] = {}
    plan = [(a, s) for a in args.models for s in args.settings]
    if len(args.models) == 1:
        plan.append((HELPER, BASELINE))
    for arch, s in plan:
        run = Run(arch, s, train_config(out, arch, s, args))
        train_run(run, times, times_file)
        runs.setdefault(arch, {})[s] = run

    # 2. validation curves and the evaluation on fixed crops
    x, v, crop_names = test_crops(args.crop_size, args.crops, args.val_crops, args.seed)
    for arch_runs in runs.values():
        for run in arch_runs.values():
            run.curve = validation_curve(run, v, args.sigma, args.seed, args.eval_batch, device)
    attacks = attack_configs(args.attack_steps)
    keys = [a.key() for a in attacks]
    n_models = sum(len(r) for r in runs.values())
    bar = tqdm(total=n_models * len(attacks) * math.ceil(len(x) / args.eval_batch), desc="attacks",
               dynamic_ncols=True, disable=args.no_progress)
    ev = Evaluator(x, args.sigma, attacks, args.seed, args.eval_batch, out / "eval", device, bar)
    models = {(a, s): load_model(r.run_dir, weights="ema") for a, rs in runs.items() for s, r in rs.items()}
    per_model = {k: ev.model(m) for k, m in models.items()}
    bar.close()
    results: Dict[str, Any] = {
        "out": str(out), "command": command,
        "config": {**{k: v_ for k, v_ in vars(args).items() if k not in ("out",)}, "attack_keys": keys,
                   "transfer_attack": TRANSFER_ATTACK,
                   "settings_defined": {s: {"description": st.description, "noise": st.noise_kwargs()}
                                        for s, st in SETTINGS.items()},
                   "models_defined": {m: {"name": n, "kwargs": kw} for m, (n, kw, _) in MODELS.items()}},
        "crops": {"names": crop_names, "fingerprint": tensor_fingerprint(x),
                  "val_fingerprint": tensor_fingerprint(v)},
        "runs": {}, "eval": {}}
    for arch, rs in runs.items():
        results["runs"][arch] = {
            s: {"run_dir": str(r.run_dir), "setting": s, "noise": r.cfg.noise.name, "noise_kwargs": r.cfg.noise.kwargs,
                "steps": r.summary["steps"], "trained_now": r.trained_steps_now, "seconds": r.seconds,
                "seconds_steps": r.seconds_steps, "weights": per_model[(arch, s)]["weights"],
                "test_psnr_ema": r.summary.get("test_psnr_ema"), "curve": r.curve, "plateau": plateau(r.curve)}
            for s, r in rs.items()}

    # 3. per-architecture comparison to the Gaussian baseline, transfer from another depth
    gauss = noisy_observation(x, args.sigma, args.seed) - x
    for arch in args.models:
        others = [a for a in args.models if a != arch]
        src = others[0] if others else HELPER
        print(f"[eval] {arch}: transfer of {TRANSFER_ATTACK} examples from {src}/{BASELINE}", flush=True)
        metrics = ["clean"] + keys + ["transfer"]
        vals: Dict[str, Dict[str, List[float]]] = {}
        stats: Dict[str, Dict[str, List[float]]] = {}
        for s in args.settings:
            pm = per_model[(arch, s)]
            tr = ev.transfer(models[(src, BASELINE)], models[(arch, s)], TRANSFER_ATTACK)
            vals[s] = {"clean": pm["clean"], **{k: pm["attacks"][k]["psnr"] for k in keys}, "transfer": tr["psnr"]}
            stats[s] = {**{k: pm["attacks"][k]["ts_stat"] for k in keys}, "transfer": tr["ts_stat"]}
        base = vals[BASELINE]
        table = {s: {"psnr": {m: float(torch.tensor(vs[m]).double().mean()) for m in metrics},
                     "diff": {m: paired_bootstrap_ci(vs[m], base[m], args.resamples, 0.95,
                                                     derive_seed(args.seed, "bootstrap", m)) for m in metrics},
                     "ts_stat": {m: _mean_std(stats[s][m]) for m in metrics[1:]},
                     "per_crop": vs, "per_crop_ts_stat": stats[s]}
                 for s, vs in vals.items()}
        results["eval"][arch] = {
            "settings": table, "metrics": metrics, "n_crops": len(x), "d": int(math.prod(x.shape[1:])),
            "transfer_source": f"{src}/{BASELINE} ({(MODELS.get(src) or HELPER_MODEL)[2]})",
            "noisy_psnr": psnr(gauss.add(x).clamp(0, 1), x).mean().item(),
            "noisy_stat": _mean_std(typicality_statistic(gauss, args.sigma / 255.0).tolist()),
            "best": best_setting({s: t["diff"] for s, t in table.items()}, metrics[1:])}
    results["seconds_this_invocation"] = time.time() - t_start

    # 4. one report
    out.mkdir(parents=True, exist_ok=True)
    figs = {"diff_png": str(plot_diffs(results, out / "diff.png")),
            "curves_png": str(plot_curves(results, out / "curves.png"))}
    atomic_write_json(out / "results.json", results)
    text = markdown(results, command)
    atomic_write_text(out / "report.md", text)
    print(text)
    print(json.dumps({"report": str(out / "report.md"), "results": str(out / "results.json"), **figs}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
