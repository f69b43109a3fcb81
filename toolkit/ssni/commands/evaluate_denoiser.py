"""`ssni evaluate-denoiser`: PSNR/SSIM clean and under attack, typical-set statistics and a
transfer matrix across denoisers, with a report and figures (see ssni.denoise.evaluate)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List

from ..config import save_config, setting
from ..data import DataConfig, build_dataset
from ..denoise.evaluate import AttackConfig, default_attacks, evaluate_models, write_outputs
from ..device import resolve_device
from ..models import load_model
from .registry import command


@dataclass
class DenoiserEvalConfig:
    """Everything `ssni evaluate-denoiser` needs. models: label -> checkpoint (run or ckpt dir)."""

    run_dir: str = setting("runs/denoiser-eval", directory=True)
    models: Dict[str, str] = field(default_factory=dict)
    weights: str = "ema"  # ema | model
    data: DataConfig = field(default_factory=lambda: DataConfig(name="photos", image_size=128,
                                                                channels=1))
    sigma: float = setting(0.0, ge=0, means="0: the models' training sigma")  # noise std on the 0..255 scale
    attacks: List[AttackConfig] = field(default_factory=default_attacks)
    transfer_attack: str = ""  # label of the attack for the transfer matrix; "": the last one
    # 0: 2*tol = 4 std of the Gaussian statistic (sqrt(2/d) each)
    typical_tol: float = setting(0.0, ge=0, means="0: automatic")
    max_images: int = setting(0, ge=0, means="0: all test images")
    batch_size: int = setting(4, ge=1)
    seed: int = 0
    example_index: int = setting(0, ge=0)
    device: str = "auto"
    progress: bool = True


@command("evaluate-denoiser", DenoiserEvalConfig,
         "denoiser PSNR/SSIM clean and under attack, typical-set statistic, transfer matrix")
def evaluate_denoiser(cfg: DenoiserEvalConfig) -> Dict[str, Any]:
    """Run the evaluation described by `cfg`; returns a summary with the output paths."""
    if not cfg.models:
        raise ValueError("models is empty: set models.<label>=<checkpoint dir> (one or more)")
    device = resolve_device(cfg.device)
    models = {label: load_model(path, weights=cfg.weights) for label, path in cfg.models.items()}
    sigmas = {label: getattr(m, "sigma", None) for label, m in models.items()}
    sigma = cfg.sigma
    if not sigma:
        known = {s for s in sigmas.values() if s is not None}
        if len(known) != 1:
            raise ValueError(f"the models were trained at different or unknown noise levels "
                             f"{sigmas}; set sigma=<value on the 0..255 scale>")
        sigma = known.pop()
    test = build_dataset(cfg.data, "test")
    x = test.images[:cfg.max_images] if cfg.max_images else test.images
    for label, m in models.items():
        want = getattr(m, "in_channels", x.shape[1])
        if want != x.shape[1]:
            raise ValueError(f"model {label!r} takes {want}-channel images but the data has "
                             f"{x.shape[1]} (set data.channels)")
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir)
    out = evaluate_models(models, x, sigma, cfg.attacks, cfg.transfer_attack, cfg.seed,
                          cfg.batch_size, cfg.typical_tol, run_dir / "deltas", device,
                          cfg.progress, cfg.example_index)
    paths = write_outputs(out, run_dir)
    res = out["results"]
    summary = {"run_dir": str(run_dir), "sigma": sigma, "images": res["images"], **paths,
               "psnr": {n: {"no_attack": m["clean"]["psnr"],
                            **{k: a["psnr"] for k, a in m["attacks"].items()}}
                        for n, m in res["models"].items()}}
    return summary
