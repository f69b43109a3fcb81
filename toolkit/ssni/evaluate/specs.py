"""What an evaluation (or a fit against attacks) is made of: defense and attack specs, presets, and
building an attack from its spec, with the one-line budget every report line carries."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Dict, List, Optional

from torch import nn

from ..attacks import ATTACKS, EOT, per_step
from ..config import ConfigError, setting
from ..defense import FIXED, VIEWS, ViewSpec
from ..registry import UnknownNameError
from ..scoring import ReweightConfig


@dataclass
class DefenseSpec:
    """One row group: a label and its reweight (null reweight = the undefended classifier)."""

    name: str = "ssni-n"
    reweight: Optional[ReweightConfig] = None  # {name: sigmoid, kwargs: {...}}; null: no defense


@dataclass
class AttackSpec:
    """One attack: a registered attack, its settings, EOT samples and the view it attacks."""

    name: str = "pgd-eot"
    attack: str = "pgd"
    kwargs: Dict[str, Any] = field(default_factory=dict)
    eot: int = setting(1, ge=1, means="gradient samples per step")
    view: str = "full"  # full | adaptive | bpda | bare (transfer)
    # attack the defense itself (its own purifier, full gradients) with the seeds it uses for draw 0
    fixed_seeds: bool = False
    only_sample_specific: bool = False  # skip defenses whose t* does not depend on x
    selective: bool = False  # EOT over the draws that still resist only (DiffHammer)
    preset: Optional[str] = None  # rand: AutoAttack's rand version, APGD-CE + APGD-DLR with EOT 20
    # what the full / adaptive / bpda views differentiate: the defense's own purifier, or (an explicit,
    # cheaper choice) the defense recipe's attack_purifier; every report line names the one used
    purifier: str = "defense"  # defense | surrogate
    per_step: bool = False  # the loss at every reverse step of the purification (DiffAttack style)
    # only these defenses (by name) face it, e.g. a costlier budget for the one defense whose attack had
    # not converged; null: every defense (within only_sample_specific)
    defenses: Optional[List[str]] = None

    def view_spec(self) -> ViewSpec:
        """What this attack differentiates, as one value (`RobustClassifier.view` builds it): the named
        view through the purifier it names, or with fixed_seeds the defense itself (`FIXED`)."""
        if self.fixed_seeds:
            return FIXED
        named = VIEWS.get(self.view)
        return named if named.grad == "none" else replace(named, purifier=self.purifier)


# preset -> (label suffix, loss) of the APGD runs it expands into
PRESETS: Dict[str, List[tuple]] = {"rand": [("apgd-ce", "ce"), ("apgd-dlr", "dlr")]}
# left out of the fingerprint at their defaults
NEW_ATTACK_FIELDS = {"selective": False, "preset": None, "fixed_seeds": False, "per_step": False, "defenses": None}
ATTACK_PURIFIERS = ("defense", "surrogate")


def expand_attacks(attacks: List[AttackSpec]) -> tuple:
    """Presets expanded into plain specs -> (specs, {preset label: [its expanded labels]})."""
    out, groups = [], {}
    for i, a in enumerate(attacks):
        if a.preset is None:
            out.append(a)
            continue
        if a.preset not in PRESETS:
            raise ConfigError(f"attacks[{i}] ({a.name!r}): unknown preset {a.preset!r}; valid choices: "
                              f"{', '.join(sorted(PRESETS))}")
        groups[a.name] = []
        for suffix, loss in PRESETS[a.preset]:
            label = f"{a.name}-{suffix}"
            # AutoAttack's rand version: 100 APGD steps, EOT 20 (eot > 1 in the spec overrides it)
            out.append(AttackSpec(name=label, attack="apgd", kwargs={"steps": 100, **a.kwargs, "loss": loss},
                                  eot=a.eot if a.eot > 1 else 20, view=a.view,
                                  only_sample_specific=a.only_sample_specific, selective=a.selective,
                                  fixed_seeds=a.fixed_seeds, purifier=a.purifier, per_step=a.per_step,
                                  defenses=a.defenses))
            groups[a.name].append(label)
    return out, groups


def purifier_label(purifier: nn.Module) -> str:
    """A purifier in a few words, e.g. 'ddpm(steps=20, clip=True)' or 'diffpure(dt=0.001)' (t*/dt steps)."""
    sampler = getattr(purifier, "sampler", None)
    if sampler is None:
        return type(purifier).__name__
    opts = ", ".join(f"{k}={v}" for k, v in sampler.options().items() if v is not None)
    return f"{getattr(purifier, 'sampler_name', type(sampler).__name__)}({opts})"


def check_attacks(attacks: List[AttackSpec], where: str = "attacks") -> None:
    """One-line errors for attack specs that cannot work (unknown names, eot < 1, bad purifier)."""
    for i, a in enumerate(attacks):
        at = f"{where}[{i}] ({a.name!r})"
        for registry, value in ((ATTACKS, a.attack), (VIEWS, a.view)):
            if value not in registry:
                raise UnknownNameError(f"{at}: unknown {registry.kind} {value!r}; valid choices: "
                                       f"{', '.join(registry.names())}")
        if a.eot < 1:
            raise ConfigError(f"{at}: eot must be >= 1 (gradient samples per step), got {a.eot}")
        if a.purifier not in ATTACK_PURIFIERS:
            raise ConfigError(f"{at}: purifier must be one of {', '.join(ATTACK_PURIFIERS)} (the defense's "
                              f"own, or the defense recipe's attack_purifier), got {a.purifier!r}")
        if a.preset is None:  # its settings (eps, steps, step size, names) fail here, before any work
            try:
                make_attack(a)
            except (TypeError, ValueError) as e:
                raise ConfigError(f"{at}: {e}") from None
            except ImportError as e:  # an optional extra missing (one line naming it), or broken (its error)
                raise ConfigError(f"{at}: {e}") from e


def check_attack_options(attacks: List[AttackSpec], where: str = "attacks") -> None:
    """A misspelt attack option fails in one line listing the attack's options, before any network loads."""
    for i, a in enumerate(attacks):
        ATTACKS.check_options(a.attack, a.kwargs, f"{where}[{i}] ({a.name!r})", internal=("model", "source"))


def make_attack(spec: AttackSpec, eps: Optional[float] = None, scale_step: bool = True,
                source: Optional[nn.Module] = None, dist: Any = None, eot_max_batch: Optional[int] = None):
    """The attack a spec describes (per-step and EOT wrappers applied); eps overrides the spec's own
    (scaling step_size with it when scale_step); `source` is the transfer attack's model; `dist`
    splits EOT copies across ranks; `eot_max_batch` caps the rows (images x copies) of one EOT call."""
    kwargs = dict(spec.kwargs)
    if eps is not None:
        own = kwargs.get("eps")
        if scale_step and own and "step_size" in kwargs and float(eps) > 0:  # at eps 0 no step moves
            kwargs["step_size"] = float(kwargs["step_size"]) * float(eps) / float(own)
        kwargs["eps"] = eps
    if spec.attack == "transfer":
        kwargs["source"] = source
    attack = ATTACKS.create(spec.attack, **kwargs)
    attack.check_view("fixed" if spec.fixed_seeds else spec.view)  # e.g. lownoise needs a t* with gradients
    if spec.per_step:  # under EOT, so every copy ascends its own loss at every reverse step
        attack = per_step(attack)
    if not (spec.eot > 1 or spec.selective):
        return attack
    cap = {} if eot_max_batch is None else {"max_batch": int(eot_max_batch)}  # else EOT's own default
    return EOT(attack, spec.eot, selective=spec.selective, dist=dist, **cap)


def attack_budget(spec: AttackSpec, attack, base: nn.Module) -> str:
    """One line saying what the attack spent and what it differentiated (base: the defense recipe's
    RobustClassifier, for its purifiers), for every report line."""
    parts = [f"{spec.attack} {attack.budget_head()}"]  # its loss, iterations and EOT, in its own words
    if spec.per_step:
        parts.append("loss at every step")
    if spec.view == "bare" or spec.attack == "transfer":
        parts.append("no purifier (bare classifier)")
    elif spec.fixed_seeds:
        parts.append(f"own purifier {purifier_label(base.purifier)}, fixed seeds")
    else:
        p = base.attack_purifier if spec.purifier == "surrogate" else base.purifier
        how = {"bpda": "BPDA (identity backward) through", "adaptive": "through score norm, t*(x) and"}
        parts.append(f"{how.get(spec.view, 'through')} {spec.purifier} purifier {purifier_label(p)}")
    return ", ".join(parts)
