"""`ssni purify`: purify your own images (a file or a folder) with a score checkpoint and a t*.

    ssni purify recipes/purify/digits.yaml checkpoint=runs/demo/score input=my_images \
        output=purified t_star=0.1 purifier.sampler=ddpm

    ssni purify recipes/purify/digits.yaml input=my_images \
        calibration=runs/calibration-digits/calibration.json reweight.name=sigmoid

With a calibration (SSNI), each image gets its own t* = reweight(score norm of the image), the
reweight's t_base defaulting to the t_star field; without one, every image gets t_star.
Images are read as grayscale or RGB to match the network, resized to its size (said on stderr and
listed in purify.json; with resize=false a mismatch is an error), purified under torch.no_grad(), and written as PNGs
(same file stem) at the network's resolution, with a purify.json summary (per-image t*) next to
them.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch

from ..config import save_config, setting, to_dict
from ..data import resize
from ..device import resolve_device
from ..images import IMAGE_EXTENSIONS, list_images, non_images, read_image, write_png
from ..io import atomic_write_json, remove_stale_temps
from ..models.load import load_score_model
from ..purify import PurifierConfig, build_purifier
from ..scoring import Calibration, ReweightConfig, ScoreNorm, ScoreNormConfig, build_reweight
from ..seeding import draw_seeds, mix_seeds
from .registry import command


@dataclass
class PurifyCommandConfig:
    """What to purify, with which checkpoint, at which t*, and where to write the results."""

    # checkpoint dir or run dir (checkpoints/latest.json), or {format: ..., path: ...} (public)
    checkpoint: Union[str, Dict[str, Any]] = "runs/demo/score"
    weights: str = "auto"                  # auto (ema if present, else model) | ema | model
    input: str = ""                        # an image file or a folder of images
    output: str = setting("purified", directory=True)  # output folder for the PNGs
    t_star: float = setting(0.1, ge=0, le=1)  # noise level for every image, in [0, 1]
    calibration: Optional[str] = None      # calibration.json: per-image t* from score norms
    score_norm: ScoreNormConfig = field(default_factory=ScoreNormConfig)
    reweight: ReweightConfig = field(default_factory=ReweightConfig)  # with a calibration
    seed: int = 0                          # per-image seeds are drawn from this
    batch_size: int = setting(64, ge=1)
    device: str = "auto"                   # auto | cpu | cuda | cuda:N
    resize: bool = True                    # resize images to the network's size
    progress: bool = True
    purifier: PurifierConfig = field(default_factory=PurifierConfig)


def load_image(path: Path, channels: int, size: int, resize_ok: bool,
               resized: Optional[Dict[str, str]] = None) -> torch.Tensor:
    """One image as [C,H,W] in [0,1] with the network's channels and size; a resized image is
    recorded in `resized` ({file: 'WxH'})."""
    t = read_image(path, channels)
    if tuple(t.shape[1:]) != (size, size):
        if not resize_ok:
            raise ValueError(f"{path} is {t.shape[2]}x{t.shape[1]}; the score network takes "
                             f"{size}x{size} (set resize=true to resize)")
        if resized is not None:
            resized[str(path)] = f"{t.shape[2]}x{t.shape[1]}"
        t = resize(t[None], size)[0]
    return t.contiguous()


def checkpoint_hint(checkpoint: Any) -> str:
    """Where the usual score networks are, for a checkpoint path that does not exist ('' if it does)."""
    if not isinstance(checkpoint, str) or Path(checkpoint).exists():
        return ""
    return (f"score checkpoint {checkpoint} does not exist; `ssni demo` writes its score network to "
            "runs/demo/score and `ssni train-score recipes/score/digits.yaml` to runs/score-digits: "
            "set checkpoint=<that run directory>")


def t_star_function(cfg: PurifyCommandConfig, model: torch.nn.Module):
    """x [B,C,H,W], seeds [B] -> t* [B]: the constant t_star, or SSNI's reweighted score norm."""
    if cfg.calibration is None:
        return lambda x, seeds: torch.full((x.shape[0],), float(cfg.t_star), device=x.device)
    calibration = Calibration.load(cfg.calibration)
    calibration.check_model(model, cfg.score_norm)  # refuses another network's calibration
    scorer = ScoreNorm.from_config(model, cfg.score_norm)
    reweight = build_reweight(cfg.reweight.name, calibration,
                              **{"t_base": cfg.t_star, **cfg.reweight.kwargs})
    # the score norm draws its own noise, independent of the purification's (salted seeds)
    return lambda x, seeds: reweight(scorer(x, seeds=mix_seeds(seeds, 0)).to(x.device))


@command("purify", PurifyCommandConfig,
         "purify your own images (file or folder) with a score checkpoint and a t*")
def purify_images(cfg: PurifyCommandConfig) -> Dict[str, Any]:
    """Run `ssni purify`: read, purify, write PNGs; returns a summary (also saved as purify.json)."""
    files = list_images(cfg.input)
    if cfg.batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {cfg.batch_size}")
    device = resolve_device(cfg.device)
    if checkpoint_hint(cfg.checkpoint):
        raise FileNotFoundError(checkpoint_hint(cfg.checkpoint))
    model = load_score_model(cfg.checkpoint, cfg.weights).to(device)
    purifier = build_purifier(model, cfg.purifier)
    t_of = t_star_function(cfg, model)
    purifier.progress = cfg.progress
    c, h, _ = model.input_shape
    stems = [f.stem for f in files]
    dupes = sorted({s for s in stems if stems.count(s) > 1})
    if dupes:
        raise ValueError(f"input files share the stems {dupes}; outputs are named <stem>.png")
    out_dir = Path(cfg.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out_dir, depth=0)  # what a killed run's unfinished writes left
    # one seed per image, fixed by cfg.seed and the image's place in the sorted list
    seeds = draw_seeds(len(files), torch.Generator().manual_seed(cfg.seed))
    skipped = [str(f) for f in non_images(cfg.input)]
    if skipped:  # said, not silently dropped
        print(f"[purify] skipping {len(skipped)} file(s) that are not images ({', '.join(Path(f).name for f in skipped[:5])}"
              f"{', ...' if len(skipped) > 5 else ''}); image extensions: {', '.join(sorted(IMAGE_EXTENSIONS))}",
              file=sys.stderr)
    written, nfe, t_used, resized = [], 0, [], {}
    with torch.no_grad():
        for k in range(0, len(files), cfg.batch_size):
            chunk = files[k:k + cfg.batch_size]
            x = torch.stack([load_image(f, c, h, cfg.resize, resized) for f in chunk]).to(device)
            s = seeds[k:k + len(chunk)]
            t = t_of(x, s)
            out = purifier(x, t, seeds=s)
            nfe += purifier.nfe_last
            t_used += [round(float(v), 6) for v in t.tolist()]
            for f, img in zip(chunk, out):
                written.append(str(write_png(img, out_dir / f"{f.stem}.png")))
    if resized:
        sizes = sorted(set(resized.values()))
        print(f"[purify] resized {len(resized)} image(s) ({', '.join(sizes)}) to the network's {h}x{h}; the "
              f"outputs are {h}x{h} (resize=false refuses a size mismatch instead)", file=sys.stderr)
    summary = {"images": len(written), "output": str(out_dir), "resized": resized, "skipped": skipped,
               "t_star": cfg.t_star if cfg.calibration is None else "per image (calibration)",
               "sampler": cfg.purifier.sampler, "weights": getattr(model, "loaded_weights", "as published"),
               "network_evaluations": nfe, "files": written}
    save_config(cfg, out_dir, name="purify_config.yaml")
    atomic_write_json(out_dir / "purify.json",
                      {**summary, "t_star_per_image": dict(zip(written, t_used)), "config": to_dict(cfg)})
    return summary
