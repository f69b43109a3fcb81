"""AutoAttack (Croce & Hein, 2020) as a registered attack: the `pyautoattack` package run on a view.

The attacked module is the view itself, a plain nn.Module from [0,1] images to logits. AutoAttack
takes its own gradients and, in its `rand` version, its own EOT (eot_iter 20), so ssni's EOT and
per-step wrappers refuse it. Its cascade attacks only the points the view still gets right, one draw
at a time (a point its first draw misclassifies comes back unperturbed), on subsets of the batch, so
it cannot attack with the defense's fixed seeds. Its seed comes from the attack's generator, so a
seeded call repeats: AutoAttack reseeds torch's global RNG with it, from which the view draws its
randomness, and the caller's RNG state is restored afterwards.
Needs the optional extra: pip install 'ssni[autoattack]'.
"""
from __future__ import annotations

import typing
from typing import Any, List, Optional, Sequence

import torch
from torch import Tensor, nn

from .base import ATTACKS, Attack

EXTRA = "the autoattack attack needs the optional extra: pip install 'ssni[autoattack]'"
NORMS = {"linf": "Linf", "l2": "L2"}  # ours -> AutoAttack's spelling
VERSIONS = ("standard", "plus", "rand", "custom")


def import_autoattack() -> Any:
    """pyautoattack's AutoAttack class; an ImportError naming the extra when it is missing, or carrying
    its own import error when it is installed but does not import."""
    try:
        from pyautoattack import AutoAttack
    except ImportError as e:
        if isinstance(e, ModuleNotFoundError) and e.name == "pyautoattack":
            raise ImportError(EXTRA) from None
        raise ImportError(f"pyautoattack is installed but does not import: {type(e).__name__}: {e}") from e
    return AutoAttack


def attack_names() -> List[str]:
    """The attacks AutoAttack's custom version can run (its AttackName type); [] if it does not say."""
    import pyautoattack.autoattack as aa

    return list(typing.get_args(getattr(aa, "AttackName", None)))


def set_apgd_iterations(apgd: Any, n: int) -> None:
    """Give an APGD of pyautoattack n iterations, with its step-size checkpoints in step.

    pyautoattack derives the checkpoint schedule (APGD's p1 = 0.22, at least 0.06, shrinking by 0.03)
    from n_iter in its constructor, so setting n_iter alone would keep the 100-iteration schedule.
    """
    apgd.n_iter = apgd.n_iter_orig = n
    apgd.n_iter_2, apgd.n_iter_min, apgd.size_decr = (max(int(f * n), 1) for f in (0.22, 0.06, 0.03))


@ATTACKS.register("autoattack")
class AutoAttackClient(Attack):
    """pyautoattack's AutoAttack on a view; version standard | plus | rand | custom (with `attacks`).

    n_iter (APGD, APGD-T and FAB), n_queries (Square) and eot_iter (APGD's EOT: 20 in rand, 1 otherwise)
    default to AutoAttack's own settings. Untargeted only (APGD-T and FAB-T choose their own targets).
    """

    own_gradients = "AutoAttack takes its own gradients, and its rand version does its own EOT (eot_iter); use eot: 1"

    def __init__(self, model: Optional[nn.Module] = None, eps: float = 8 / 255, norm: str = "linf",
                 version: str = "standard", attacks: Optional[Sequence[str]] = None,
                 n_iter: Optional[int] = None, n_queries: Optional[int] = None,
                 eot_iter: Optional[int] = None, seed: Optional[int] = None, targeted: bool = False):
        super().__init__(eps, norm, "ce", model=model, seed=seed)
        if targeted:
            raise ValueError("autoattack runs untargeted (its apgd-t and fab-t choose their own targets); "
                             "drop targeted")
        if version not in VERSIONS:
            raise ValueError(f"autoattack version must be one of {', '.join(VERSIONS)}, got {version!r}")
        if (version == "custom") != bool(attacks):
            raise ValueError("autoattack: list `attacks` exactly with version custom (e.g. attacks: [apgd-ce, "
                             f"apgd-dlr]); got version {version!r} with attacks {attacks!r}")
        for name, value in (("n_iter", n_iter), ("n_queries", n_queries), ("eot_iter", eot_iter)):
            if value is not None and int(value) < 1:
                raise ValueError(f"autoattack {name} must be >= 1 (or null: AutoAttack's own), got {value}")
        self.version, self.attacks = version, list(attacks) if attacks else None
        self.n_iter, self.n_queries, self.eot_iter = n_iter, n_queries, eot_iter
        self._autoattack = import_autoattack()  # fails here, not halfway through an evaluation
        if self.attacks:
            known = attack_names()
            unknown = [a for a in self.attacks if known and a not in known]
            if unknown:
                raise ValueError(f"autoattack: unknown attack {unknown[0]!r}; valid choices: {', '.join(known)}")
        probe = self.build(None, torch.device("cpu"), 0)  # what it will run, for reports
        self.runs = list(probe.attacks_to_run)
        self.iterations, self.restarts = int(probe.apgd.n_iter), int(probe.apgd.n_restarts)
        self.queries = int(probe.square.n_queries)
        self.eot_samples = int(probe.apgd.eot_iter)  # its own EOT, for the randomness self-check

    def check_view(self, view: str) -> None:
        """Every view but the fixed-seed one: AutoAttack calls the view on subsets of the batch."""
        if view == "fixed":
            raise ValueError("autoattack cannot attack with fixed_seeds: its cascade calls the view on subsets of "
                             "the batch, which the seeds of draw 0 do not follow")

    def build(self, model: Optional[nn.Module], device: torch.device, seed: int) -> Any:
        """A pyautoattack AutoAttack on `model` with this attack's settings."""
        aa = self._autoattack(model, norm=NORMS[self.norm], eps=self.eps, version=self.version, seed=seed,
                              device=device, attacks=self.attacks)
        if self.n_iter is not None:
            set_apgd_iterations(aa.apgd, int(self.n_iter))
            set_apgd_iterations(aa.apgd_targeted, int(self.n_iter))
            aa.fab.n_iter = int(self.n_iter)
        if self.n_queries is not None:
            aa.square.n_queries = int(self.n_queries)
        if self.eot_iter is not None:
            aa.apgd.eot_iter = aa.apgd_targeted.eot_iter = int(self.eot_iter)
        return aa

    def run(self, model: nn.Module, x: Tensor, y: Tensor, generator) -> Tensor:
        """AutoAttack's run_standard_evaluation on the batch, seeded from `generator`; x [B,C,H,W] -> x_adv."""
        device = x.device if generator is None else generator.device
        seed = int(torch.randint(0, 2 ** 31 - 1, (1,), generator=generator, device=device))
        # AutoAttack reseeds torch's global RNG (the view's randomness): leave the caller's state as it was
        with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
            out = self.build(model, x.device, seed).run_standard_evaluation(x, y, batch_size=x.shape[0])
        x_adv = out[0] if isinstance(out, tuple) else out
        return x_adv.to(x.dtype)

    def describe(self) -> dict:
        return {"attack": type(self).__name__, "eps": self.eps, "norm": self.norm, "version": self.version,
                "attacks": self.runs, "n_iter": self.iterations, "restarts": self.restarts,
                "n_queries": self.queries if "square" in self.runs else None, "eot": self.eot_samples,
                "targeted": False}

    def budget_head(self) -> str:
        parts = [f"{self.version} ({', '.join(self.runs)})", f"{self.iterations} it"]
        if self.restarts > 1:
            parts.append(f"{self.restarts} restarts")
        if "square" in self.runs:
            parts.append(f"square {self.queries} queries")
        parts.append(f"EOT {self.eot_samples} (AutoAttack's own)")
        return ", ".join(parts)
