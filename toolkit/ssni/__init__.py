"""ssni: diffusion-based adversarial purification with sample-specific noise injection (SSNI),
and typical-set (TS) training for robust denoisers and score networks."""
from .diffusion import VPDiffusion, to_model_space, to_pixel_space
from .registry import Registry, UnknownNameError

__version__ = "0.1.0"
__all__ = ["VPDiffusion", "to_model_space", "to_pixel_space", "Registry", "UnknownNameError",
           "RobustClassifier", "wrap_timm"]


def __getattr__(name: str):
    """Lazy access to the defense wrapper (keeps `import ssni` light)."""
    if name in ("RobustClassifier", "wrap_timm"):
        from . import defense

        return getattr(defense, name)
    raise AttributeError(f"module 'ssni' has no attribute {name!r}")
