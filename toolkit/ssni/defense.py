"""The SSNI defense as one `nn.Module`: images in [0,1] -> logits, and the views attacks see.

score norm -> reweight (t* per sample) -> purifier (diffuse to t*, reverse to 0) -> resize to the
classifier's input size -> normalisation -> classifier, optionally K purifications voted.

What an attack differentiates is one value, a `ViewSpec` (purifier: the defense's own or the
recipe's cheaper `surrogate`; gradient mode; through t*(x) or not; the vote; fixed seeds), built
once and passed to `RobustClassifier.view`, which runs the one pipeline method
`RobustClassifier.run` with it. The registered names (registry VIEWS) are ViewSpecs:
- `full`: gradients through every purification step, t*(x) recomputed at every call without
  gradients (what the SSNI authors' adaptive attack does);
- `adaptive`: also through the score norm and the smooth reweight, so the attacker can push a
  sample towards a low t* (our stronger SSNI-adaptive attack);
- `bpda`: identity in place of the purifier's backward pass, t* without gradients;
- `bare`: the classifier alone with the wrapper's preprocessing (transfer source, "none").
`FIXED` (the evaluation's `fixed_seeds: true`) is the defense itself with full gradients: given
the seeds the defense later uses, the attack differentiates exactly that draw.
Every view (and the defense) also has `stepwise(x, seeds)`: the logits at every reverse step
[S,B,n], for the per-step loss of attacks/perstep.py. Every view also has `with_t_star(x, seeds)`:
its logits, and the t*(x) and score norm of the same pass (differentiable in `adaptive`; in `bare`,
the defense's smooth t*), for the low-noise attack of attacks/lownoise.py.
"""
from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint as _checkpoint

from .config import from_dict, load_config, setting, to_dict
from .device import resolve_device
from .images import check_images
from .models import create_classifier
from .models.load import ClassifierRef, load_classifier, load_score_model  # noqa: F401  (also importable from here)
from .purify import PurifierConfig, build_purifier
from .registry import Registry
from .scoring import Calibration, Reweight, ReweightConfig, ScoreNorm, ScoreNormConfig, build_reweight
from .seeding import draw_seeds, mix_seeds

VOTES = Registry("vote rule")
VIEWS = Registry("attack view")

PURIFIERS = ("defense", "surrogate")
GRADS = ("full", "bpda", "none")


@dataclass(frozen=True)
class ViewSpec:
    """What an attack differentiates; `RobustClassifier.view(spec)` builds the module.

    purifier: "defense" (the defense's own) or "surrogate" (the recipe's cheaper attack_purifier;
    the defense's own where the recipe has none). grad: "full" (through every step), "bpda"
    (identity backward through the purifier) or "none" (no purifier: the bare classifier).
    through_t_star: gradients also through the score norm and the smooth t*(x). vote: how ensemble
    members are combined ("mean_prob", or "defense": the defense's own vote). fixed_seeds: the view
    is called with the seeds the defense later uses (bound by `view(spec, seeds=...)`).

    Example:
        >>> ViewSpec(purifier="defense", through_t_star=True)
        ViewSpec(purifier='defense', grad='full', through_t_star=True, vote='mean_prob', fixed_seeds=False)
    """

    purifier: str = "surrogate"
    grad: str = "full"
    through_t_star: bool = False
    vote: str = "mean_prob"
    fixed_seeds: bool = False

    def __post_init__(self):
        if self.purifier not in PURIFIERS:
            raise ValueError(f"ViewSpec.purifier must be one of {', '.join(PURIFIERS)}, got {self.purifier!r}")
        if self.grad not in GRADS:
            raise ValueError(f"ViewSpec.grad must be one of {', '.join(GRADS)}, got {self.grad!r}")
        if self.vote != "defense" and self.vote not in VOTES:
            raise ValueError(f"ViewSpec.vote must be defense or a vote rule ({', '.join(VOTES.names())}), "
                             f"got {self.vote!r}")


@VOTES.register("mean_prob")
def vote_mean_prob(logits: Tensor) -> Tensor:
    """Average the K members' probabilities; logits [K,B,n] -> log mean probability [B,n]."""
    return torch.logsumexp(torch.log_softmax(logits.float(), -1), 0) - torch.log(
        torch.tensor(float(logits.shape[0])))


@VOTES.register("majority")
def vote_majority(logits: Tensor) -> Tensor:
    """Majority vote (ties broken by mean probability); logits [K,B,n] -> log vote share [B,n]."""
    k, _, n = logits.shape
    votes = F.one_hot(logits.argmax(-1), n).float().sum(0)  # [B,n] integers
    mean_p = torch.softmax(logits.float(), -1).mean(0)  # each < 1, sum 1: cannot flip a vote gap
    return torch.log((votes + mean_p) / (k + 1))


# -- preprocessing -----------------------------------------------------------------------------
def _pair(size: Union[int, Sequence[int]]) -> Tuple[int, int]:
    if isinstance(size, int):
        return (size, size)
    size = tuple(int(v) for v in size)
    return size[-2:] if len(size) >= 2 else (size[0], size[0])  # type: ignore[return-value]


def is_timm_model(model: nn.Module) -> bool:
    """Whether `model` is a timm model (it carries timm's pretrained_cfg / default_cfg)."""
    return any(isinstance(getattr(model, a, None), dict) for a in ("pretrained_cfg", "default_cfg"))


def resolve_preprocessing(classifier: nn.Module, channels: int,
                          input_size: Union[int, Sequence[int], None] = None,
                          mean: Optional[Sequence[float]] = None,
                          std: Optional[Sequence[float]] = None
                          ) -> Tuple[Tuple[int, int], List[float], List[float]]:
    """Input size (H, W) and per-channel mean/std for a classifier: its preprocessing contract.

    Explicit values win. A timm model (it has a `pretrained_cfg`) fills the rest from its own
    config: the size from our create_classifier's config, a ViT's patch embedding, or timm's data
    config, and mean/std from timm.data.resolve_data_config (3-value stats are averaged for
    1-channel inputs). Any other module (torchvision, RobustBench, your own) must be given
    `input_size`; its mean/std default to none (identity: the module normalises itself, as
    RobustBench models do). Nothing falls back silently to timm's 224 px ImageNet defaults.
    """
    timm_model = is_timm_model(classifier)
    data_cfg: Dict[str, Any] = {}
    if timm_model:
        from timm.data import resolve_data_config

        data_cfg = resolve_data_config({}, model=classifier)
    if input_size is None:
        cfg = getattr(classifier, "config", None)
        pe = getattr(getattr(classifier, "patch_embed", None), "img_size", None)
        if isinstance(cfg, dict) and cfg.get("image_size"):
            input_size = cfg["image_size"]
        elif timm_model and pe is not None:
            input_size = pe
        elif "input_size" in data_cfg:
            input_size = data_cfg["input_size"][1:]
        else:
            raise ValueError(f"the classifier ({type(classifier).__name__}) is not a timm model, so its "
                             f"input size is unknown: pass input_size=(H, W) (and mean/std, or leave them "
                             f"None if it normalises itself); nothing is resized to a default")
    size = _pair(input_size)
    out = []
    for name, given, default in (("mean", mean, 0.0), ("std", std, 1.0)):
        vals = list(given) if given is not None else list(data_cfg.get(name, [default]))
        if len(vals) == 1:
            vals = vals * channels
        elif len(vals) != channels:
            if channels == 1:
                vals = [sum(vals) / len(vals)]
            else:
                raise ValueError(f"{name} has {len(vals)} values but images have {channels} "
                                 f"channels; pass {name}=[...] with {channels} values")
        out.append([float(v) for v in vals])
    if any(v <= 0 for v in out[1]):
        raise ValueError(f"std values must be > 0, got {out[1]}")
    return size, out[0], out[1]


# -- the wrapper -------------------------------------------------------------------------------
class RobustClassifier(nn.Module):
    """SSNI-purified classifier; forward(x [B,C,H,W] in [0,1], seeds=None) -> logits [B,n].

    seeds (LongTensor [B]) makes a call repeatable and each sample independent of its batch
    companions; None draws fresh seeds from torch's global RNG (so torch.manual_seed repeats).

    The wrapper uses the given modules themselves, not copies: it puts the classifier and the score
    network in eval mode and, with freeze=True (the default), sets requires_grad=False on their
    parameters (attacks need gradients with respect to the input only). Pass copies if you go on
    training those modules elsewhere. The classifier's preprocessing (input size, mean, std) is
    stated explicitly or read from timm's config; see `resolve_preprocessing`.
    """

    def __init__(self, *, classifier: nn.Module, score_model: nn.Module, purifier: nn.Module,
                 reweight: Reweight, calibration: Optional[Calibration] = None,
                 attack_purifier: Optional[nn.Module] = None,
                 score_norm: Optional[ScoreNormConfig] = None,
                 input_size: Union[int, Sequence[int], None] = None,
                 mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None,
                 ensemble: int = 1, vote: str = "mean_prob", purifier_grad: Optional[str] = None,
                 freeze: bool = True):
        super().__init__()
        sn = score_norm or ScoreNormConfig()
        if calibration is not None:
            calibration.check_model(score_model, sn)
        if ensemble < 1:
            raise ValueError(f"ensemble must be >= 1, got {ensemble}")
        VOTES.get(vote)  # unknown names fail here, listing the choices
        self.scorer = ScoreNorm.from_config(score_model, sn)
        self.reweight = reweight
        self.calibration = calibration
        self.purifier = purifier
        self.attack_purifier = attack_purifier if attack_purifier is not None else purifier
        self.classifier = classifier
        self.channels = int(score_model.input_shape[0])
        size, m, s = resolve_preprocessing(classifier, self.channels, input_size, mean, std)
        self.input_size = size
        self.register_buffer("mean", torch.tensor(m).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(s).view(1, -1, 1, 1), persistent=False)
        self.ensemble, self.vote, self.purifier_grad = int(ensemble), vote, purifier_grad
        self.freeze = freeze
        self.last_t_star: Optional[Tensor] = None
        self.last_score_norm: Optional[Tensor] = None
        self.eval()
        if freeze:
            self.requires_grad_(False)

    @property
    def score_model(self) -> nn.Module:
        """The score network used for the score norm."""
        return self.scorer.model

    @property
    def dtype(self) -> torch.dtype:
        """The floating type images must have: the score network's (else the classifier's) weights'."""
        tensors = itertools.chain(self.score_model.parameters(), self.score_model.buffers(),
                                  self.classifier.parameters())
        return next((p.dtype for p in tensors if p.is_floating_point()), torch.get_default_dtype())

    # -- stages ----------------------------------------------------------------------------
    def preprocess(self, x: Tensor) -> Tensor:
        """Resize to the classifier's input size and normalise; [B,C,H,W] in [0,1] -> [B,C,h,w]."""
        if tuple(x.shape[-2:]) != self.input_size:
            down = x.shape[-1] > self.input_size[-1]
            x = F.interpolate(x, size=self.input_size, mode="bilinear", align_corners=False,
                              antialias=down)
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def classify(self, x: Tensor) -> Tensor:
        """The bare classifier with this wrapper's preprocessing; x [B,C,H,W] in [0,1] -> [B,n]."""
        return self.classifier(self.preprocess(x))

    def _seeds(self, x: Tensor, seeds: Optional[Tensor]) -> Tensor:
        b = x.shape[0]
        if seeds is None:
            return draw_seeds(b)
        seeds = torch.as_tensor(seeds, dtype=torch.long).reshape(-1).cpu()
        if seeds.numel() != b:
            raise ValueError(f"seeds must have one entry per sample ({b}), got {seeds.numel()}")
        return seeds

    def noise_levels(self, x: Tensor, seeds: Optional[Tensor] = None,
                     smooth: bool = False) -> Tuple[Tensor, Tensor]:
        """Per-sample noise level and score norm; x [B,C,H,W] in [0,1] -> (t* [B], s [B])."""
        seeds = self._seeds(x, seeds)
        # The rounded t* has zero gradient, so its score norm needs no autograd graph.
        with torch.set_grad_enabled(smooth and torch.is_grad_enabled()):
            s = self.scorer(x, seeds=mix_seeds(seeds, 0))
        return self.reweight(s, smooth=smooth), s

    def _members(self, x: Tensor, seeds: Optional[Tensor], smooth: bool, need_norm: bool = True
                 ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """What the purifier gets for the ensemble (shared by run and run_steps): the images, their t*(x),
        every member's seeds, and the score norms; x [B,C,H,W] -> ([K*B,C,H,W], [K*B], [K*B], [B]);
        records last_t_star / norm.

        need_norm=False with a reweight whose t* does not depend on x (DBP): the score norm is not
        computed (NaN): an attack view needs t* only, and the norm is most of a DBP attack step's cost
        (10 score-network calls per step at 10 time steps). The purifier's seeds are the same either way.
        """
        check_images(x, self.score_model.input_shape, dtype=self.dtype)
        seeds = self._seeds(x, seeds)
        if not need_norm and not self.reweight.sample_specific:
            t = self.reweight(torch.zeros(x.shape[0], device=x.device), smooth=smooth)
            s = torch.full_like(t, float("nan"))
        else:
            t, s = self.noise_levels(x, seeds, smooth=smooth)
        self.last_t_star, self.last_score_norm = t.detach(), s.detach()
        k = self.ensemble
        member_seeds = torch.cat([mix_seeds(seeds, 1 + i) for i in range(k)])
        return (x.repeat(k, 1, 1, 1) if k > 1 else x), (t.repeat(k) if k > 1 else t), member_seeds, s

    def run(self, x: Tensor, seeds: Optional[Tensor] = None, view: Optional[ViewSpec] = None) -> Tensor:
        """The pipeline as `view` says (None: the defense's own); x [B,C,H,W] in [0,1] -> logits [B,n]."""
        return self.run_with_t_star(x, seeds, view)[0]

    def _view_parts(self, view: Optional[ViewSpec]) -> Tuple[nn.Module, Optional[str], str, bool]:
        """(purifier, its gradient mode, vote rule, smooth t*) of a view; None: the defense's forward."""
        if view is None:
            return self.purifier, self.purifier_grad, self.vote, False
        purifier = self.purifier if view.purifier == "defense" else self.attack_purifier
        return purifier, view.grad, (self.vote if view.vote == "defense" else view.vote), view.through_t_star

    def run_with_t_star(self, x: Tensor, seeds: Optional[Tensor] = None, view: Optional[ViewSpec] = None
                        ) -> Tuple[Tensor, Tensor, Tensor]:
        """`run`'s logits, the t*(x) it purified with and the score norm s(x) behind it, from one pass;
        x [B,C,H,W] -> ([B,n], [B], [B]).

        In a view through t* (and with autograd recording) t* and s carry gradients (through the score
        network and the smooth reweight), so an attack can lower them (attacks/lownoise.py).
        """
        purifier, grad, vote, smooth = self._view_parts(view)
        xk, tk, member_seeds, s = self._members(x, seeds, smooth, need_norm=view is None or smooth)
        k, b = self.ensemble, x.shape[0]
        xp = purifier(xk, tk, seeds=member_seeds, grad=grad)
        logits = self.classify(xp).reshape(k, b, -1)
        return (logits[0] if k == 1 else VOTES.get(vote)(logits)), tk[:b], s

    def run_steps(self, x: Tensor, seeds: Optional[Tensor] = None, view: Optional[ViewSpec] = None) -> Tensor:
        """`run`'s logits at every reverse step; x [B,C,H,W] in [0,1] -> [S,B,n], [-1] = run's logits.

        Step s is the purifier's s-th global reverse step (Purifier.trajectory: a sample whose own
        grid has not started yet is classified on its diffused image). Same seeds, t*(x), members
        and vote as `run`; each step's classifier call is checkpointed while autograd records, so
        activation memory holds one classifier pass, not S.
        """
        purifier, grad, vote, smooth = self._view_parts(view)
        if not callable(getattr(purifier, "trajectory", None)):
            raise TypeError(f"per-step logits need a purifier with trajectory() (ssni's Purifier), "
                            f"got {type(purifier).__name__}")
        xk, tk, member_seeds, _ = self._members(x, seeds, smooth, need_norm=view is None or smooth)
        k, b = self.ensemble, x.shape[0]
        states = purifier.trajectory(xk, tk, seeds=member_seeds, grad=grad)
        recompute = torch.is_grad_enabled() and any(st.requires_grad for st in states)
        out = []
        for st in states:
            z = _checkpoint(self.classify, st, use_reentrant=False) if recompute else self.classify(st)
            z = z.reshape(k, b, -1)
            out.append(z[0] if k == 1 else VOTES.get(vote)(z))
        return torch.stack(out)

    def forward(self, x: Tensor, seeds: Optional[Tensor] = None) -> Tensor:
        """Defense logits [B,n] for images x [B,C,H,W] in [0,1] (the defense purifier)."""
        return self.run(x, seeds)

    def stepwise(self, x: Tensor, seeds: Optional[Tensor] = None) -> Tensor:
        """Defense logits at every reverse step; x [B,C,H,W] in [0,1] -> [S,B,n], [-1] = forward's."""
        return self.run_steps(x, seeds)

    def attack_module(self, view: Union[str, ViewSpec] = "full") -> nn.Module:
        """The differentiable module to hand to another attack library (torchattacks, AutoAttack): view(view)."""
        return self.view(view)

    def surrogate(self, view: Union[str, ViewSpec] = "full") -> nn.Module:
        """Old name of `attack_module` ("surrogate" now names only the recipe's cheaper purifier)."""
        import warnings

        warnings.warn("RobustClassifier.surrogate() is now attack_module(); 'surrogate' names the recipe's "
                      "cheaper attack purifier only", DeprecationWarning, stacklevel=2)
        return self.attack_module(view)

    def view(self, spec: Union[str, ViewSpec], seeds: Optional[Tensor] = None) -> nn.Module:
        """The attacker's view as a plain nn.Module: a ViewSpec, or a VIEWS name (full, adaptive, bpda,
        bare). seeds [B]: every call uses these per-sample seeds (`BoundSeeds`; a fixed_seeds view needs them)."""
        spec = VIEWS.get(spec) if isinstance(spec, str) else spec
        if spec.fixed_seeds and seeds is None:
            raise ValueError("a fixed_seeds view needs the seeds the defense will use: view(spec, seeds=...) with "
                             "one seed per sample [B]")
        module = BareView(self) if spec.grad == "none" else AttackView(self, spec)
        return BoundSeeds(module, seeds) if seeds is not None else module

    def replace(self, **changes: Any) -> "RobustClassifier":
        """A new wrapper sharing this one's networks, with some parts changed (e.g. reweight=...)."""
        kw: Dict[str, Any] = dict(
            classifier=self.classifier, score_model=self.score_model, purifier=self.purifier,
            reweight=self.reweight, calibration=self.calibration,
            attack_purifier=self.attack_purifier, score_norm=self.scorer.cfg,
            input_size=self.input_size, mean=self.mean.flatten().tolist(),
            std=self.std.flatten().tolist(), ensemble=self.ensemble, vote=self.vote,
            purifier_grad=self.purifier_grad, freeze=self.freeze)
        unknown = sorted(set(changes) - set(kw))
        if unknown:
            raise ValueError(f"replace: unknown part {unknown[0]!r}; parts: {', '.join(sorted(kw))}")
        dev = self.mean.device
        return RobustClassifier(**{**kw, **changes}).to(dev)

    def extra_repr(self) -> str:
        return (f"input_size={self.input_size}, ensemble={self.ensemble}, vote={self.vote!r}, "
                f"reweight={type(self.reweight).__name__}")

    # -- construction from a recipe --------------------------------------------------------
    @classmethod
    def from_recipe(cls, recipe: Union[str, os.PathLike, "DefenseConfig", None],
                    overrides: Sequence[str] = (), device: Union[str, torch.device, None] = None
                    ) -> "RobustClassifier":
        """Build from a YAML recipe (+ key=value overrides) or a DefenseConfig."""
        cfg = recipe if isinstance(recipe, DefenseConfig) else load_config(
            DefenseConfig, recipe, overrides)
        return build_defense(cfg, device=device)


class AttackView(nn.Module):
    """A RobustClassifier as an attack sees it: forward(x [B,C,H,W] in [0,1], seeds=None) -> logits [B,n],
    the defense's pipeline run as its ViewSpec says."""

    def __init__(self, parent: RobustClassifier, spec: ViewSpec):
        super().__init__()
        self.parent, self.spec = parent, spec
        # eval from the start: libraries such as torchattacks save `.training`, call eval(), attack, and
        # call train() again if it was True, which would put the wrapped defense's BatchNorm in training mode
        self.eval()

    @property
    def purifier(self) -> nn.Module:
        """The purifier this view runs and differentiates."""
        return self.parent._view_parts(self.spec)[0]

    def forward(self, x: Tensor, seeds: Optional[Tensor] = None) -> Tensor:
        """Logits [B,n]; differentiable in x as the view's settings say."""
        return self.parent.run(x, seeds, self.spec)

    def stepwise(self, x: Tensor, seeds: Optional[Tensor] = None) -> Tensor:
        """Logits at every reverse step, this view's settings; [B,C,H,W] -> [S,B,n], [-1] = forward's."""
        return self.parent.run_steps(x, seeds, self.spec)

    def with_t_star(self, x: Tensor, seeds: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
        """forward's logits, the t*(x) it used and its score norm, one pass; [B,C,H,W] -> ([B,n], [B], [B]);
        t* and s are differentiable in x in a view through t* (adaptive), gradient-free (t* rounded) otherwise
        (and s is NaN there when t* does not depend on x: it is not computed, see `_members`)."""
        return self.parent.run_with_t_star(x, seeds, self.spec)


class BareView(nn.Module):
    """The wrapped classifier without purification; x [B,C,H,W] in [0,1] -> logits."""

    def __init__(self, parent: RobustClassifier):
        super().__init__()
        self.parent = parent
        self.eval()  # see AttackView

    def forward(self, x: Tensor, seeds: Optional[Tensor] = None) -> Tensor:
        """Bare classifier logits [B,n] (seeds unused: nothing is random)."""
        return self.parent.classify(x)

    def stepwise(self, x: Tensor, seeds: Optional[Tensor] = None) -> Tensor:
        """No purification, so one step: the bare logits as [1,B,n]."""
        return self.parent.classify(x)[None]

    def with_t_star(self, x: Tensor, seeds: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
        """The bare logits, and the smooth t*(x) and score norm the defense would give x (differentiable in
        x: a low-noise attack lowers them while the classifier stays fooled); [B,C,H,W] -> ([B,n], [B], [B])."""
        return (self.parent.classify(x), *self.parent.noise_levels(x, seeds, smooth=True))


class BoundSeeds(nn.Module):
    """A view called with fixed per-sample seeds [B]; x [R*B,...] (EOT copies) -> logits [R*B,n]."""

    def __init__(self, view: nn.Module, seeds: Tensor):
        super().__init__()
        self.view, self.seeds = view, seeds

    def forward(self, x: Tensor) -> Tensor:
        """Logits of the view with every copy of sample i drawn with seeds[i]."""
        return self.view(x, seeds=self._repeat(x))

    def stepwise(self, x: Tensor) -> Tensor:
        """Logits at every reverse step [S,R*B,n], seeded as forward (for the per-step loss)."""
        return self.view.stepwise(x, seeds=self._repeat(x))

    def with_t_star(self, x: Tensor) -> tuple:
        """Logits [R*B,n], t* and score norms [R*B], seeded as forward (for a loss on t*, attacks/lownoise.py)."""
        return self.view.with_t_star(x, seeds=self._repeat(x))

    def _repeat(self, x: Tensor) -> Tensor:
        b = self.seeds.numel()
        if x.shape[0] % b:
            raise ValueError(f"fixed seeds: {x.shape[0]} inputs are not copies of the {b} seeded samples")
        return self.seeds.repeat(x.shape[0] // b)


VIEWS.add("full", ViewSpec(grad="full"))  # full gradients through the attack purifier; t*(x) without
VIEWS.add("adaptive", ViewSpec(grad="full", through_t_star=True))  # also through score norm and smooth t*(x)
VIEWS.add("bpda", ViewSpec(grad="bpda"))  # identity backward through the purifier; t*(x) without
VIEWS.add("bare", ViewSpec(grad="none"))  # the classifier alone (transfer attacks, the undefended row)
# the defense's own pipeline with full gradients: with the defense's seeds, the same output as its forward
FIXED = ViewSpec(purifier="defense", grad="full", vote="defense", fixed_seeds=True)


def full_view(defense: RobustClassifier) -> nn.Module:
    """Full gradients through the attack purifier; t*(x) without gradients."""
    return defense.view("full")


def adaptive_view(defense: RobustClassifier) -> nn.Module:
    """Full gradients through the attack purifier, the score norm and the smooth t*(x)."""
    return defense.view("adaptive")


def bpda_view(defense: RobustClassifier) -> nn.Module:
    """Identity backward through the purifier (BPDA); t*(x) without gradients."""
    return defense.view("bpda")


def bare_view(defense: RobustClassifier) -> nn.Module:
    """The classifier alone (transfer attacks, the undefended row)."""
    return defense.view("bare")


def fixed_view(defense: RobustClassifier) -> nn.Module:
    """The defense's own pipeline with full gradients, unbound (`BoundSeeds` gives it the defense's seeds)."""
    return AttackView(defense, FIXED)


# -- recipes -----------------------------------------------------------------------------------
@dataclass
class DefenseConfig:
    """Everything that defines an SSNI defense (saved with evaluations)."""

    # an ssni checkpoint/run directory, or a public checkpoint {format: ..., path: ..., options}
    score_model: Union[str, Dict[str, Any]] = "runs/score-digits"
    score_weights: str = "auto"  # ssni checkpoints: auto (EMA when present) | ema | model
    calibration: Optional[str] = None  # calibration.json; needed by linear / sigmoid
    score_norm: ScoreNormConfig = field(default_factory=ScoreNormConfig)
    reweight: ReweightConfig = field(default_factory=ReweightConfig)
    purifier: PurifierConfig = field(default_factory=PurifierConfig)
    attack_purifier: Optional[PurifierConfig] = None  # None: the defense purifier
    purifier_grad: Optional[str] = None  # grad mode of the defense purifier's forward
    classifier: ClassifierRef = field(default_factory=ClassifierRef)
    input_size: Optional[int] = setting(None, ge=1)
    mean: Optional[List[float]] = None  # null: timm's data config
    std: Optional[List[float]] = setting(None, gt=0)
    ensemble: int = setting(1, ge=1)
    vote: str = "mean_prob"
    precision: str = "fp32"  # score network in fp32 | bf16 | fp16 autocast (eps returned in float32)
    channels_last: bool = False  # score network in channels_last memory format (GPUs)
    compile: bool = False  # torch.compile the score network (dynamic batch); see tools/bench_reference.py
    device: str = "auto"


def _purifier(score_model: nn.Module, cfg: Union[PurifierConfig, Dict[str, Any], None]) -> nn.Module:
    """build_purifier from a PurifierConfig or a plain dict of its fields."""
    if cfg is None or isinstance(cfg, dict):
        cfg = from_dict(PurifierConfig, dict(cfg or {}), "purifier")
    return build_purifier(score_model, cfg)


def build_defense(cfg: DefenseConfig, device: Union[str, torch.device, None] = None
                  ) -> RobustClassifier:
    """Build a RobustClassifier from a DefenseConfig (loads networks and the calibration)."""
    dev = resolve_device(device or cfg.device)
    score_model = load_score_model(cfg.score_model, cfg.score_weights).to(dev).eval()
    if cfg.precision != "fp32" or cfg.channels_last or cfg.compile:
        score_model.set_speed(cfg.precision, cfg.channels_last, compile=cfg.compile)
    calibration = Calibration.load(cfg.calibration) if cfg.calibration else None
    reweight = build_reweight(cfg.reweight.name, calibration, **cfg.reweight.kwargs)
    purifier = _purifier(score_model, cfg.purifier)
    attack = _purifier(score_model, cfg.attack_purifier) if cfg.attack_purifier is not None else None
    c, h, _ = score_model.input_shape
    classifier = load_classifier(cfg.classifier, c, cfg.input_size or h).to(dev).eval()
    model = RobustClassifier(classifier=classifier, score_model=score_model, purifier=purifier,
                             reweight=reweight, calibration=calibration, attack_purifier=attack,
                             score_norm=cfg.score_norm, input_size=cfg.input_size, mean=cfg.mean,
                             std=cfg.std, ensemble=cfg.ensemble, vote=cfg.vote,
                             purifier_grad=cfg.purifier_grad)
    model.recipe = to_dict(cfg)
    return model.to(dev)


def wrap_timm(classifier: Union[str, nn.Module], *, score_model: Union[nn.Module, str],
              calibration: Union[Calibration, str, os.PathLike, None] = None,
              reweight: Union[str, Reweight] = "sigmoid",
              reweight_kwargs: Optional[Dict[str, Any]] = None,
              purifier: Optional[nn.Module] = None,
              purifier_config: Optional[Dict[str, Any]] = None,
              attack_purifier: Optional[nn.Module] = None,
              attack_purifier_config: Optional[Dict[str, Any]] = None,
              score_norm: Optional[ScoreNormConfig] = None, num_classes: Optional[int] = None,
              pretrained: bool = False, checkpoint: Optional[str] = None,
              input_size: Union[int, Sequence[int], None] = None,
              mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None,
              ensemble: int = 1, vote: str = "mean_prob", **timm_kwargs: Any) -> RobustClassifier:
    """Wrap any timm model (name or instance) as an SSNI-purified nn.Module, [0,1] in, logits out.

    A name builds the timm model with the score model's channel count and `num_classes`;
    the purifier is built from `purifier_config` (PurifierConfig fields) unless given.

    Example::

        >>> import torch
        >>> from ssni import calibrate, create_model, wrap_timm
        >>> _ = torch.manual_seed(0)
        >>> net = create_model("unet_tiny")  # 8x8 grey; an untrained net's last layer is zero: perturb it
        >>> with torch.no_grad():
        ...     _ = [p.add_(0.02 * torch.randn_like(p)) for p in net.parameters()]
        >>> cal, _ = calibrate(net, torch.rand(16, 1, 8, 8), batch_size=16)
        >>> model = wrap_timm("resnet10t", score_model=net, calibration=cal, num_classes=3,
        ...                   mean=[0.0], std=[1.0], purifier_config={"sampler": "ddpm", "steps": 2})
        >>> with torch.no_grad():
        ...     logits = model(torch.rand(4, 1, 8, 8))         # [0, 1] images in, logits out
        >>> tuple(logits.shape), tuple(model.last_t_star.shape)   # and a t* per image
        ((4, 3), (4,))
    """
    score_model = load_score_model(score_model)
    if isinstance(calibration, (str, os.PathLike)):
        calibration = Calibration.load(calibration)
    if isinstance(classifier, str):
        if num_classes is None:
            raise ValueError("wrap_timm with a model name needs num_classes=...")
        size = _pair(input_size)[0] if input_size is not None else score_model.input_shape[-1]
        classifier = create_classifier(classifier, in_chans=score_model.input_shape[0],
                                       num_classes=num_classes, image_size=size,
                                       pretrained=pretrained, checkpoint=checkpoint,
                                       **timm_kwargs)
    elif timm_kwargs:
        raise ValueError(f"timm keyword arguments {sorted(timm_kwargs)} only apply when the "
                         f"classifier is given by name")
    if not isinstance(reweight, Reweight):
        reweight = build_reweight(reweight, calibration, **(reweight_kwargs or {}))
    if purifier is None:
        purifier = _purifier(score_model, purifier_config)
    if attack_purifier is None and attack_purifier_config is not None:
        attack_purifier = _purifier(score_model, attack_purifier_config)
    dev = next(iter(score_model.parameters()), torch.empty(0)).device
    return RobustClassifier(classifier=classifier.to(dev).eval(), score_model=score_model,
                            purifier=purifier, reweight=reweight, calibration=calibration,
                            attack_purifier=attack_purifier, score_norm=score_norm,
                            input_size=input_size, mean=mean, std=std, ensemble=ensemble,
                            vote=vote)
