"""`ssni purify`: purify your own images (a file or a folder) with a score checkpoint and a t*.

    ssni purify recipes/purify/digits.yaml checkpoint=runs/score-digits input=my_images \
        output=purified t_star=0.1 purifier.sampler=ddpm

    ssni purify recipes/purify/digits.yaml input=my_images \
        calibration=runs/calibration-digits/calibration.json reweight.name=sigmoid

With a calibration (SSNI), each image gets its own t* = reweight(score norm of the image), the
reweight's t_star defaulting to the t_star field; without one, every image gets t_star.
Images are read as grayscale or RGB to match the network, resized to its size (unless
resize=false, then a mismatch is an error), purified under torch.no_grad(), and written as PNGs
(same file stem) at the network's resolution, with a purify.json summary (per-image t*) next to
them.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from ..config import save_config, to_dict
from ..io import atomic_write_json
from ..scoring.reweight import ReweightConfig
from ..scoring.score_norm import ScoreNormConfig
from .config import PurifierConfig, build_purifier
from .noise import draw_seeds

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


@dataclass
class PurifyCommandConfig:
    """What to purify, with which checkpoint, at which t*, and where to write the results."""

    checkpoint: str = "runs/score-digits"  # checkpoint dir or run dir (checkpoints/latest.json)
    weights: str = "auto"                  # auto (ema if present, else model) | ema | model
    input: str = ""                        # an image file or a folder of images
    output: str = "purified"               # output folder for the PNGs
    t_star: float = 0.1                    # noise level for every image, in [0, 1]
    calibration: Optional[str] = None      # calibration.json: per-image t* from score norms
    score_norm: ScoreNormConfig = field(default_factory=ScoreNormConfig)
    reweight: ReweightConfig = field(default_factory=ReweightConfig)  # with a calibration
    seed: int = 0                          # per-image seeds are drawn from this
    batch_size: int = 64
    device: str = "auto"                   # auto | cpu | cuda | cuda:N
    resize: bool = True                    # resize images to the network's size
    progress: bool = True
    purifier: PurifierConfig = field(default_factory=PurifierConfig)


def list_images(path: str | os.PathLike) -> List[Path]:
    """The image files to purify: the file itself, or a folder's images (sorted, not recursive)."""
    p = Path(path).expanduser()
    if not str(path):
        raise ValueError("input must be set: an image file or a folder of images (input=...)")
    if p.is_file():
        if p.suffix.lower() not in IMAGE_EXTENSIONS:
            raise ValueError(f"{p} is not an image file; expected one of {IMAGE_EXTENSIONS}")
        return [p]
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise FileNotFoundError(f"no image files in {p} (extensions {IMAGE_EXTENSIONS})")
        return files
    raise FileNotFoundError(f"input does not exist: {p} (expected an image file or a folder)")


def read_image(path: Path, channels: int, size: int, resize: bool) -> torch.Tensor:
    """One image as [C,H,W] in [0,1] with the network's channels and size."""
    from PIL import Image

    from ..data import resize as resize_images

    mode = {1: "L", 3: "RGB"}.get(channels)
    if mode is None:
        raise ValueError(f"the score network takes {channels} channels; only 1 or 3 can be read")
    with Image.open(path) as im:
        arr = np.asarray(im.convert(mode), dtype=np.float32) / 255.0
    t = torch.from_numpy(arr)
    t = t[None] if t.dim() == 2 else t.permute(2, 0, 1)
    if tuple(t.shape[1:]) != (size, size):
        if not resize:
            raise ValueError(f"{path} is {t.shape[2]}x{t.shape[1]}; the score network takes "
                             f"{size}x{size} (set resize=true to resize)")
        t = resize_images(t[None], size)[0]
    return t.contiguous()


def write_png(image: torch.Tensor, path: Path) -> Path:
    """Write [C,H,W] in [0,1] as an 8-bit PNG atomically (temp file + rename)."""
    from PIL import Image

    arr = (image.detach().cpu().clamp(0, 1) * 255.0).round().to(torch.uint8)
    arr = arr[0].numpy() if arr.shape[0] == 1 else arr.permute(1, 2, 0).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        Image.fromarray(arr).save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _load_score_model(path: str, weights: str):
    from ..models import load_model

    if weights not in ("auto", "ema", "model"):
        raise ValueError(f"weights must be auto, ema or model, got {weights!r}")
    if weights != "auto":
        return load_model(path, weights=weights), weights
    try:
        return load_model(path, weights="ema"), "ema"
    except FileNotFoundError as e:
        if "ema.safetensors" not in str(e):
            raise
        return load_model(path, weights="model"), "model"


def t_star_function(cfg: PurifyCommandConfig, model: torch.nn.Module):
    """x [B,C,H,W], seeds [B] -> t* [B]: the constant t_star, or SSNI's reweighted score norm."""
    if cfg.calibration is None:
        return lambda x, seeds: torch.full((x.shape[0],), float(cfg.t_star), device=x.device)
    from ..defense import mix_seeds
    from ..scoring import Calibration, ScoreNorm, build_reweight

    calibration = Calibration.load(cfg.calibration)
    calibration.check_model(model, cfg.score_norm)  # refuses another network's calibration
    scorer = ScoreNorm.from_config(model, cfg.score_norm)
    reweight = build_reweight(cfg.reweight.name, calibration,
                              **{"t_star": cfg.t_star, **cfg.reweight.kwargs})
    # the score norm draws its own noise, independent of the purification's (salted seeds)
    return lambda x, seeds: reweight(scorer(x, seeds=mix_seeds(seeds, 0)).to(x.device))


def purify_images(cfg: PurifyCommandConfig) -> Dict[str, Any]:
    """Run `ssni purify`: read, purify, write PNGs; returns a summary (also saved as purify.json)."""
    files = list_images(cfg.input)
    if cfg.batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {cfg.batch_size}")
    device = _device(cfg.device)
    model, weights = _load_score_model(cfg.checkpoint, cfg.weights)
    model = model.to(device)
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
    # one seed per image, fixed by cfg.seed and the image's place in the sorted list
    seeds = draw_seeds(len(files), torch.Generator().manual_seed(cfg.seed))
    written, nfe, t_used = [], 0, []
    with torch.no_grad():
        for k in range(0, len(files), cfg.batch_size):
            chunk = files[k:k + cfg.batch_size]
            x = torch.stack([read_image(f, c, h, cfg.resize) for f in chunk]).to(device)
            s = seeds[k:k + len(chunk)]
            t = t_of(x, s)
            out = purifier(x, t, seeds=s)
            nfe += purifier.nfe_last
            t_used += [round(float(v), 6) for v in t.tolist()]
            for f, img in zip(chunk, out):
                written.append(str(write_png(img, out_dir / f"{f.stem}.png")))
    summary = {"images": len(written), "output": str(out_dir),
               "t_star": cfg.t_star if cfg.calibration is None else "per image (calibration)",
               "sampler": cfg.purifier.sampler, "weights": weights,
               "network_evaluations": nfe, "files": written}
    save_config(cfg, out_dir, name="purify_config.yaml")
    atomic_write_json(out_dir / "purify.json",
                      {**summary, "t_star_per_image": dict(zip(written, t_used)), "config": to_dict(cfg)})
    return summary
