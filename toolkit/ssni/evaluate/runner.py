"""Evaluation of defenses x attacks on a data split, resumable, with self-checks and a report
(the engine of `ssni evaluate`)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from torch import Tensor, nn

from ..config import ConfigError, load_config, setting, to_dict
from ..data import DataConfig, build_dataset
from ..defense import BoundSeeds, DefenseConfig, build_defense
from ..device import resolve_device
from ..dist import DistContext
from ..io import atomic_save_safetensors, atomic_write_json, atomic_write_text, remove_stale_temps
from ..models import weights_fingerprint
from ..scoring import build_reweight
from ..seeding import derive_seed
from .checks import epsilon_checks, gradient_check, randomness_check
from .jobs import Batch, BatchRunner, EvalState
from .metrics import draw_accuracy, majority_vote_accuracy, paired_difference, wilson_interval, worst_case
from .report import ResultRow, markdown_table, paired_table, plot_accuracy_vs_eps, plot_histograms
from .specs import (
    NEW_ATTACK_FIELDS,
    AttackSpec,
    DefenseSpec,
    attack_budget,
    check_attack_options,
    check_attacks,
    expand_attacks,
    make_attack,
    purifier_label,
)
from .state import config_fingerprint, slug, tensor_fingerprint, without

# settings that change no result (left out of the state's key, so changing them does not block a resume)
NO_RESULT_KEYS = ("run_dir", "progress", "device", "defense", "defense_recipe", "defense_overrides", "data.root",
                  "paired_with", "eot_max_batch")
DEFENSE_NO_RESULT_KEYS = ("device", "score_model.path", "calibration", "classifier.checkpoint")
# with more draws than this, rows also give worst-of-this-many (over the first draws) beside worst-of-all
WORST_OF_FEW = 4
# re-exported: recipes' and tools' names for these stay ssni.evaluate.runner.*
__all__ = ["AttackSpec", "DefenseSpec", "EvaluateConfig", "SweepConfig", "Evaluation", "expand_attacks",
           "purifier_label", "BoundSeeds", "WORST_OF_FEW"]


@dataclass
class SweepConfig:
    """Accuracy against epsilon for one attack (and the broken-gradient check at a huge eps)."""

    attack: Optional[str] = None  # label of an entry of `attacks`; null: no sweep
    defenses: List[str] = field(default_factory=list)
    eps: List[float] = setting(default_factory=list, ge=0)
    num_samples: int = setting(32, ge=1)
    huge_eps: Optional[float] = setting(None, gt=0)
    # the attack's step size scales with eps (step * eps / the attack's own eps), so every
    # sweep point can reach the edge of its ball in the same number of steps
    scale_step: bool = True


@dataclass
class EvaluateConfig:
    """Everything `ssni evaluate` needs."""

    run_dir: str = setting("runs/eval-digits", directory=True)
    data: DataConfig = field(default_factory=DataConfig)
    split: str = "test"
    num_samples: int = setting(128, ge=1)
    batch_size: int = setting(64, ge=1)
    seed: int = 0
    draws: int = setting(4, ge=1)  # defense draws per sample: expected accuracy and worst-of-N
    defense: DefenseConfig = field(default_factory=DefenseConfig)  # shared by every defense
    defense_recipe: Optional[str] = None  # or: a defense recipe (replaces `defense`) ...
    defense_overrides: List[str] = field(default_factory=list)  # ... with key=value overrides
    defenses: List[DefenseSpec] = field(default_factory=list)
    attacks: List[AttackSpec] = field(default_factory=list)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    checks: bool = True
    progress: bool = True
    device: str = "auto"
    save_adversarial: bool = False  # x_adv of every attacked batch: run_dir/adv/<cell>/batch_XXXXX.safetensors
    # under torchrun: cells of EOT attacks run every batch on every rank with the EOT copies split across
    # ranks (for inputs too big for all copies on one GPU), not one batch per rank; same results.
    # One process: no effect
    eot_across_ranks: bool = False
    # None: every copy of a batch in one call. Lower it when the copies' autograd graph does not fit (the
    # adaptive view through the score norm holds ~11 GB at 128 rows on Fashion-MNIST); the copies' seeds
    # and sums stay the same, so it is left out of the state key
    eot_max_batch: Optional[int] = setting(None, ge=1)  # rows (images x EOT copies) per EOT call: memory only
    # the differences (clean, each attack both faced, worst case) are paired on the same images, 95% intervals
    paired_with: Optional[str] = None  # a defense: every other one's per-image difference against it


def check_config(cfg: EvaluateConfig) -> None:
    """One-line errors for settings that cannot work, before any network is loaded or image attacked."""
    for name, value in (("batch_size", cfg.batch_size), ("num_samples", cfg.num_samples),
                        ("draws", cfg.draws)):
        if value < 1:
            raise ConfigError(f"{name} must be >= 1, got {value}")
    names = [d.name for d in cfg.defenses]
    if not names:
        raise ConfigError("evaluate: `defenses` is empty; list at least one (e.g. name: none)")
    if len(set(names)) != len(names):
        raise ConfigError(f"defense names must be unique, got {names}")
    attacks, groups = expand_attacks(cfg.attacks)
    labels = [a.name for a in attacks] + list(groups)
    if len(set(labels)) != len(labels):
        raise ConfigError(f"attack labels must be unique, got {labels}")
    if cfg.paired_with is not None and cfg.paired_with not in names:
        raise ConfigError(f"paired_with {cfg.paired_with!r} is not one of the defenses {names}")
    labels = [a.name for a in attacks]
    for i, a in enumerate(attacks):
        unknown = [d for d in a.defenses or [] if d not in names]
        if unknown or a.defenses == []:
            raise ConfigError(f"attacks[{i}] ({a.name!r}): defenses {a.defenses} must name some of the "
                              f"defenses {names}" + (f"; unknown: {unknown}" if unknown else ""))
        if a.name in ("clean", "worst-case"):  # <defense>/clean is the clean cell; worst-case a summary row
            raise ConfigError(f"attacks[{i}] ({a.name!r}): the label {a.name!r} is reserved for "
                              f"{'clean accuracy' if a.name == 'clean' else 'the worst over attacks'}; "
                              "rename the attack")
    sw = cfg.sweep
    if sw.attack is not None:
        if sw.attack not in labels:
            raise ConfigError(f"sweep.attack {sw.attack!r} is not one of the attacks {labels}")
        for d in sw.defenses:
            if d not in names:
                raise ConfigError(f"sweep.defenses: {d!r} is not one of the defenses {names}")
        shown = [f"{e:g}" for e in sw.eps]  # sweep cells are named by eps: two names alike would share results
        if len(set(shown)) != len(shown):
            raise ConfigError(f"sweep.eps {sw.eps} has values that print alike ({shown}); make them distinct")
        if not 1 <= sw.num_samples <= cfg.num_samples:
            raise ConfigError(f"sweep.num_samples must be in [1, num_samples={cfg.num_samples}], got "
                              f"{sw.num_samples}")
    check_attack_options(attacks)
    check_attacks(attacks)  # last: it builds every attack from its settings


def _same_eps(spec: AttackSpec, eps: float) -> bool:
    """Whether a sweep epsilon is the attack's own (so its main cell can be reused)."""
    own = spec.kwargs.get("eps")
    return own is not None and abs(float(own) - float(eps)) <= 1e-9 * max(1.0, abs(float(eps)))


def _maj(cell: Dict[str, Any]) -> tuple:
    """(majority accuracy, its interval) of a cell, or (None, None) when its predictions were not saved."""
    m = cell.get("majority")
    return (None, None) if m is None else (m["majority"], m["majority_ci"])


class Evaluation:
    """Runs the cells of an EvaluateConfig batch by batch, saving each batch as it finishes.

    Under torchrun each batch is done by one rank (round robin over all batches of the run); the
    ranks share them through the state directory and the main rank writes the report. With
    `eot_across_ranks`, the batches of EOT cells are instead run by every rank, the copies split.
    """

    def __init__(self, cfg: EvaluateConfig, stop_after_batches: Optional[int] = None,
                 dist: Optional[DistContext] = None):
        check_config(cfg)
        self.cfg = cfg
        self.dist = dist or DistContext.from_env(cfg.device)
        # one process: the device as before; several: each rank's own (cuda:LOCAL_RANK or cpu)
        self.device = resolve_device(cfg.device) if self.dist.world_size == 1 else self.dist.device
        self.base_cfg = base_cfg = (load_config(DefenseConfig, cfg.defense_recipe, cfg.defense_overrides)
                    if cfg.defense_recipe else cfg.defense)
        self.base = build_defense(base_cfg, device=self.device)
        self.bare = self.base.view("bare")
        self.attacks, self.groups = expand_attacks(cfg.attacks)
        self.defenses: Dict[str, Optional[nn.Module]] = {}
        for spec in cfg.defenses:
            rw = spec.reweight
            self.defenses[spec.name] = None if rw is None else self.base.replace(
                reweight=build_reweight(rw.name, self.base.calibration, **rw.kwargs))
        if not self.defenses:
            raise ValueError("evaluate: `defenses` is empty; list at least one (e.g. name: none)")
        self.budgets: Dict[str, str] = {}
        self.bare_budgets: Dict[str, str] = {}
        for i, spec in enumerate(self.attacks):  # bad attack settings fail here, not after hours of work
            if spec.purifier == "surrogate" and base_cfg.attack_purifier is None:
                raise ConfigError(f"attacks[{i}] ({spec.name!r}): purifier: surrogate needs an attack_purifier "
                                  "in the defense recipe (e.g. defense_overrides: [attack_purifier.sampler=ddpm, "
                                  "attack_purifier.steps=10]), or purifier: defense")
            try:
                attack = self._make_attack(spec)
            except (TypeError, ValueError) as e:
                raise ConfigError(f"attacks[{i}] ({spec.name!r}): {e}") from None
            except ImportError as e:  # an optional extra missing (one line naming it), or broken (its error)
                raise ConfigError(f"attacks[{i}] ({spec.name!r}): {e}") from e
            self.budgets[spec.name] = self.budget(spec, attack)
            # the undefended classifier ("none") is attacked alone, whatever the spec's view
            self.bare_budgets[spec.name] = self.budget(replace(spec, view="bare"), attack)
        ds = build_dataset(cfg.data, cfg.split)
        if cfg.num_samples > len(ds):
            raise ConfigError(f"num_samples={cfg.num_samples}, but the {cfg.split!r} split of "
                              f"{cfg.data.name!r} has {len(ds)} images; set num_samples <= {len(ds)}")
        n = cfg.num_samples
        self.x, self.y = ds.images[:n].to(self.device), ds.labels[:n].to(self.device)
        self.num_classes = ds.num_classes
        self.run_dir = Path(cfg.run_dir)
        if self.dist.is_main:  # temp files of writes a killed run did not finish (only dead writers'),
            remove_stale_temps(self.run_dir, depth=3)  # down to state/<cell>/<key>/ and adv/<cell>/<key>/
        for i, spec in enumerate(self.attacks):  # an attack its filters leave without a defense is a mistake
            if not any(spec in self._attacks_of(d, m) for d, m in self.defenses.items()):
                raise ConfigError(f"attacks[{i}] ({spec.name!r}) faces none of the defenses {list(self.defenses)} "
                                  f"(defenses: {spec.defenses}, only_sample_specific: {spec.only_sample_specific}, "
                                  f"view: {spec.view}); widen its filters or remove it")
        self.cell_keys = self._cell_keys()
        self.state = EvalState(self.run_dir, self.input_fingerprints(base_cfg), self.cell_keys,
                               legacy=self._legacy_fingerprints(base_cfg), dist=self.dist)
        self.jobs = BatchRunner(self.state, self.dist, stop_after=stop_after_batches)

    def _config_parts(self, base_cfg: DefenseConfig) -> tuple:
        """The config as its key sees it (settings that change no result left out) and the resolved
        defense recipe."""
        # the resolved defense stands for `defense` / `defense_recipe` / `defense_overrides`; paths of files
        # whose content is fingerprinted, and how the run is shown or where it runs, change no result
        cfg = without(to_dict(self.cfg), NO_RESULT_KEYS)
        cfg["defenses"] = [without(d, ["reweight.kwargs.path"]) for d in cfg.get("defenses", [])]
        resolved = without(to_dict(base_cfg), DEFENSE_NO_RESULT_KEYS)
        if isinstance(resolved.get("score_model"), str):  # a path (a public checkpoint: its format stays)
            resolved.pop("score_model")
        # options added later are left out at their defaults, so older run directories still resume
        for key in ("save_adversarial", "eot_across_ranks"):
            if not cfg.get(key):
                cfg.pop(key, None)
        for a in cfg.get("attacks", []):
            for k, v in NEW_ATTACK_FIELDS.items():
                if a.get(k, v) == v:
                    a.pop(k, None)
        return cfg, resolved

    @cached_property
    def _shared_inputs(self) -> Dict[str, str]:
        """Fingerprints of the images and labels, the weights and the calibration (hashed once: both
        the state's key and the legacy one use them)."""
        b = self.base
        return {"data": tensor_fingerprint(self.x, self.y),
                "score_model": weights_fingerprint(b.score_model),
                "classifier": weights_fingerprint(b.classifier),
                "calibration": config_fingerprint(None if b.calibration is None else b.calibration.to_dict())}

    def _reweights(self) -> Dict[str, Any]:
        """Each defense's reweight as it computes (its class and parameters, a learned curve's values)."""
        return {name: None if m is None else {"name": type(m.reweight).__name__, **m.reweight.config()}
                for name, m in self.defenses.items()}

    def input_fingerprints(self, base_cfg: DefenseConfig) -> Dict[str, str]:
        """Fingerprints of what every cell's results depend on: the config but for its defenses,
        attacks and sweep (each cell's own key holds those: `_cell_keys`), the resolved defense recipe,
        the images and labels, the weights it loads and the calibration."""
        cfg, resolved = self._config_parts(base_cfg)
        for key in ("defenses", "attacks", "sweep"):
            cfg.pop(key, None)
        return {"config": config_fingerprint({**cfg, "resolved_defense": resolved}), **self._shared_inputs}

    def _legacy_fingerprints(self, base_cfg: DefenseConfig) -> Dict[str, str]:
        """The whole-run key of states written before cells had their own (see EvalState)."""
        cfg, resolved = self._config_parts(base_cfg)
        return {"config": config_fingerprint({**cfg, "resolved_defense": resolved}), **self._shared_inputs,
                "reweights": config_fingerprint(self._reweights())}

    def _cell_keys(self) -> Dict[str, str]:
        """{cell: key} for every cell this config computes: the key holds the cell's defense (its spec and
        reweight) and attack (its spec; for a sweep point also its eps and images), so changing one
        attack recomputes its cells only and a new defense or attack leaves the finished cells valid."""
        cfg = self.cfg
        reweights = self._reweights()
        specs = {d.name: without(to_dict(d), ["reweight.kwargs.path"]) for d in cfg.defenses}

        def attack(spec: AttackSpec) -> Dict[str, Any]:
            a = to_dict(spec)
            a.pop("defenses", None)  # who faces the attack changes no cell's result: widening it reuses cells
            return {k: v for k, v in a.items() if not (k in NEW_ATTACK_FIELDS and v == NEW_ATTACK_FIELDS[k])}

        def key(dname: str, spec: Optional[AttackSpec], **extra: Any) -> str:
            return config_fingerprint({"defense": specs[dname], "reweight": reweights[dname],
                                       "attack": None if spec is None else attack(spec), **extra})
        keys = {}
        for dname, model in self.defenses.items():
            keys[f"{dname}/clean"] = key(dname, None)
            for spec in self._attacks_of(dname, model):
                keys[f"{dname}/{spec.name}"] = key(dname, spec)
        sweep = next((a for a in self.attacks if a.name == cfg.sweep.attack), None)
        if sweep is not None:
            ns = min(cfg.sweep.num_samples, self.x.shape[0])
            for dname in cfg.sweep.defenses:
                for eps in cfg.sweep.eps:
                    if dname in self.defenses and not (f"{dname}/{sweep.name}" in keys and _same_eps(sweep, eps)):
                        keys[f"sweep/{dname}/{eps:g}"] = key(dname, sweep, eps=eps, num_samples=ns,
                                                             scale_step=cfg.sweep.scale_step)
        return keys

    def _attacks_of(self, dname: str, model: Optional[nn.Module]) -> List[AttackSpec]:
        """The attacks defense `dname` faces: those its attack's `defenses` name (all when null), not
        the sample-specific ones when its t* is fixed, and only the full and bare views of an undefended
        classifier (there is nothing else to differentiate)."""
        sample_specific = model is not None and model.reweight.sample_specific
        return [spec for spec in self.attacks
                if not ((spec.only_sample_specific and not sample_specific)
                        or (model is None and spec.view not in ("full", "bare"))
                        or (spec.defenses is not None and dname not in spec.defenses))]

    # -- pieces ------------------------------------------------------------------------------
    def _seeds(self, cell: str, first: int, b: int, m: int) -> Tensor:
        """The defense's per-sample seeds [b] of draw m for samples first..first+b-1 of a cell."""
        return torch.tensor([derive_seed(self.cfg.seed, cell, i, m) for i in range(first, first + b)])

    def _draw_correct(self, model: Optional[nn.Module], x: Tensor, y: Tensor, first: int,
                      cell: str) -> Dict[str, Any]:
        """Defense outputs over `draws` seeded draws: correctness and predicted class [B, M], t*, score norms."""
        out: Dict[str, Any] = {"correct": [], "pred": [], "t_star": None, "score_norm": None}
        with torch.no_grad():
            for m in range(self.cfg.draws):
                if model is None:
                    logits = self.bare(x)
                else:
                    logits = model(x, seeds=self._seeds(cell, first, x.shape[0], m))
                    if m == 0:
                        out["t_star"] = model.last_t_star.cpu().tolist()
                        out["score_norm"] = model.last_score_norm.cpu().tolist()
                pred = logits.argmax(1)
                out["correct"].append((pred == y).cpu().tolist())
                out["pred"].append(pred.cpu().tolist())
        out["correct"] = [list(c) for c in zip(*out["correct"])]  # [B, M]
        out["pred"] = [list(c) for c in zip(*out["pred"])]  # [B, M]
        return out

    def _make_attack(self, spec: AttackSpec, eps: Optional[float] = None):
        dist = self.dist if self.cfg.eot_across_ranks else None  # copies split across ranks (one rank: ignored)
        return make_attack(spec, eps, scale_step=self.cfg.sweep.scale_step, source=self.bare, dist=dist,
                           eot_max_batch=self.cfg.eot_max_batch)

    def budget(self, spec: AttackSpec, attack) -> str:
        """One line saying what the attack spent and what it differentiated, for every report line."""
        return attack_budget(spec, attack, self.base)

    def _targets(self, y: Tensor, cell: str, bi: int) -> Tensor:
        """Target labels [B] of a targeted attack: a seeded class other than y, per sample."""
        g = torch.Generator().manual_seed(derive_seed(self.cfg.seed, cell, bi, "target"))
        shift = torch.randint(1, self.num_classes, (y.shape[0],), generator=g).to(y.device)
        return (y + shift) % self.num_classes

    def _batch(self, cell: str, model: Optional[nn.Module], attack_spec: Optional[AttackSpec], x: Tensor,
               y: Tensor, b: Batch, eps: Optional[float], write: bool) -> Dict[str, Any]:
        """One batch of a cell: attack it (when the cell has an attack), then the defense's draws."""
        t0 = time.perf_counter()
        flags: List[str] = []
        x_in = x
        if attack_spec is not None:
            vs = attack_spec.view_spec()
            if model is None:  # the undefended classifier: attacked alone, whatever the spec's view
                view = check_view = self.bare
            elif vs.fixed_seeds:  # the attacker knows the defense's randomness: the seeds of draw 0
                seeds0 = self._seeds(cell, b.start, x.shape[0], 0)
                view, check_view = model.view(vs, seeds=seeds0), model.view(vs, seeds=seeds0[:8])
            else:
                view = check_view = model.view(vs)
            attack = self._make_attack(attack_spec, eps)
            if self.cfg.checks and b.index == 0 and eps is None:
                flags += self._self_check(check_view, x[:8], y[:8], attack_spec, attack.eot_samples)
            target = self._targets(y, cell, b.index) if attack.targeted else y
            torch.manual_seed(derive_seed(self.cfg.seed, cell, b.index))  # view randomness
            x_in = attack(view, x, target, seed=derive_seed(self.cfg.seed, cell, b.index, "start"))
            if self.cfg.save_adversarial and write:
                # beside the cell's batches, under its key: another budget's images never pass for these
                atomic_save_safetensors(self.run_dir / "adv" / slug(cell) / self.cell_keys[cell]
                                        / f"batch_{b.index:05d}.safetensors",
                                        {"x_adv": x_in.detach().cpu().contiguous(), "y": y.cpu().contiguous()})
        saved = self._draw_correct(model, x_in, y, b.start, cell)
        saved["seconds"] = time.perf_counter() - t0
        saved["flags"] = flags
        return saved

    def _cell(self, cell: str, model: Optional[nn.Module], attack_spec: Optional[AttackSpec],
              x_all: Tensor, y_all: Tensor, eps: Optional[float] = None) -> Dict[str, Any]:
        """All batches of one (defense, attack) cell, resuming from saved batches."""
        if cell not in self.cell_keys:  # its batches would be saved under no key of their inputs
            raise RuntimeError(f"cell {cell!r} is not one of the evaluation's keyed cells")
        # eot_across_ranks: every rank runs every batch of an EOT cell, its copies split across the ranks
        # (the attack's EOT oracle all-reduces them); the main rank alone reads and writes the state
        every = (self.cfg.eot_across_ranks and self.dist.world_size > 1 and attack_spec is not None
                 and (attack_spec.eot > 1 or attack_spec.selective))

        def batch(b: Batch) -> Dict[str, Any]:
            return self._batch(cell, model, attack_spec, x_all[b.start:b.stop], y_all[b.start:b.stop], b, eps,
                               write=self.dist.is_main or not every)
        parts = self.jobs.run(cell, x_all.shape[0], self.cfg.batch_size, batch,
                              on_batch=lambda b: self._bar.update(1), every=every)
        correct = torch.tensor([row for p in parts for row in p["correct"]], dtype=torch.bool)
        res = draw_accuracy(correct)
        pred = None  # batches saved before predictions were stored have none: no majority vote then
        if all(p.get("pred") is not None for p in parts):
            pred = [row for p in parts for row in p["pred"]]
        maj = None if pred is None else majority_vote_accuracy(torch.tensor(pred, dtype=torch.long), y_all.cpu())
        ts = [v for p in parts for v in (p["t_star"] or [])]
        sn = [v for p in parts for v in (p["score_norm"] or [])]
        return {"metrics": res, "t_star": ts, "score_norm": sn, "correct": correct.tolist(),
                "majority": None if maj is None else {"majority": maj["majority"], "majority_ci": maj["majority_ci"],
                                                      "correct": maj["correct"].tolist()},
                "seconds": sum(p["seconds"] for p in parts),
                "flags": [f for p in parts for f in p["flags"]]}

    def _self_check(self, view: nn.Module, x: Tensor, y: Tensor, spec: AttackSpec, eot: int) -> List[str]:
        """Flags of the attacked view: vanishing gradients, randomness the attack's EOT (`eot`: its
        own for AutoAttack's rand version) does not average."""
        flags = []
        g = gradient_check(view, x, y)
        if g["flag"]:
            flags.append(f"{spec.name}: {g['flag']}")
        r = randomness_check(view, x, eot)
        if r["flag"]:
            flags.append(f"{spec.name}: {r['flag']}")
        return flags

    # -- the whole run -------------------------------------------------------------------------
    def run(self) -> Dict[str, Any]:
        """Evaluate every cell; write results.json, report.md, plots and TensorBoard scalars.

        Turns on torch's flush-denormal mode (values below ~1e-38 become zero): an adaptive attack
        through a saturated smooth reweight otherwise back-propagates denormals through the score
        network, measured 17x slower on CPU (87 s vs 5 s for one gradient on 48 digits).
        """
        from tqdm.auto import tqdm

        torch.set_flush_denormal(True)

        cfg = self.cfg
        nb = -(-self.x.shape[0] // cfg.batch_size)
        sweep_attack = next((a for a in self.attacks if a.name == cfg.sweep.attack), None)
        if cfg.sweep.attack and sweep_attack is None:
            raise ValueError(f"sweep.attack {cfg.sweep.attack!r} is not one of the attacks "
                             f"{[a.name for a in self.attacks]}")
        ns = min(cfg.sweep.num_samples, self.x.shape[0])
        nb_sweep = -(-ns // cfg.batch_size)  # batches per sweep point
        n_sweep = nb_sweep * len(cfg.sweep.eps) * len(cfg.sweep.defenses)
        total = nb * len(self.defenses) * (1 + len(self.attacks)) + (n_sweep if sweep_attack else 0)
        self._bar = tqdm(total=total, desc="evaluate", disable=not (cfg.progress and self.dist.is_main),
                         dynamic_ncols=True)
        rows: List[ResultRow] = []
        cells: Dict[str, Any] = {}
        worst_rows: List[ResultRow] = []
        for dname, model in self.defenses.items():
            mine = self._defense_rows(dname, model, cells, nb)
            rows += mine
            attacked = [r for r in mine if r.robust_expected is not None]  # not a clean-only row
            worst_rows += self._worst_rows(dname, cells[f"{dname}/clean"], cells, attacked)
        flags = sorted({f for r in rows for f in r.flags})
        curves = self._sweep(sweep_attack, cells, flags, nb_sweep) if sweep_attack is not None else {}
        self._bar.close()
        reused = sum(self.dist.all_gather_object(self.state.reused))  # every rank's own share
        computed = sum(self.dist.all_gather_object(self.state.computed))
        if reused and self.dist.is_main:
            print(f"[evaluate] reused {reused} finished batches from {self.state.root} "
                  f"(same config, weights and calibration)", flush=True)
        if not self.dist.is_main:  # the main rank writes the report; the others only wait for it
            self.dist.barrier()
            return {"table": markdown_table(rows + worst_rows), "flags": flags, "report": str(self.run_dir / "report.md"),
                    "results": str(self.run_dir / "results.json"), "computed_batches": computed,
                    "reused_batches": reused}
        result = {**self._write(rows, cells, curves, flags, worst_rows, self._paired(cells)), "computed_batches": computed,
                  "reused_batches": reused}
        self.dist.barrier()
        return result

    def _defense_rows(self, dname: str, model: Optional[nn.Module], cells: Dict[str, Any], nb: int
                      ) -> List[ResultRow]:
        """The clean cell and every attack cell of one defense (into `cells`), and its table rows."""
        mean = lambda v: (sum(v) / len(v)) if v else None  # noqa: E731
        clean = cells[f"{dname}/clean"] = self._cell(f"{dname}/clean", model, None, self.x, self.y)
        rows = []
        mine = self._attacks_of(dname, model)
        for spec in self.attacks:
            if spec not in mine:
                self._bar.update(nb)  # not this defense's attack (one view of an undefended classifier)
                continue
            res = cells[f"{dname}/{spec.name}"] = self._cell(f"{dname}/{spec.name}", model, spec, self.x, self.y)
            budget = (self.budgets if model is not None else self.bare_budgets)[spec.name]
            rows.append(ResultRow.of(dname, spec.name, budget, clean["metrics"], res["metrics"], _maj(res),
                                     mean_t_clean=mean(clean["t_star"]), mean_t_adv=mean(res["t_star"]),
                                     seconds=clean["seconds"] + res["seconds"], flags=res["flags"],
                                     **self._first_draws({spec.name: res["correct"]})))
        if not rows:  # no attack ran on this defense: still report its clean accuracy
            rows.append(ResultRow.of(dname, "clean", "no attack", clean["metrics"], None, _maj(clean),
                                     mean_t_clean=mean(clean["t_star"]), seconds=clean["seconds"]))
        return rows

    def _sweep(self, spec: AttackSpec, cells: Dict[str, Any], flags: List[str], nb_sweep: int
               ) -> Dict[str, Dict[str, List[float]]]:
        """Accuracy against epsilon of the sweep's defenses on its first images ({defense: {eps, acc}});
        the broken-gradient checks' flags are appended to `flags`."""
        cfg, curves = self.cfg, {}
        ns = min(cfg.sweep.num_samples, self.x.shape[0])
        for dname in cfg.sweep.defenses:
            if dname not in self.defenses:
                raise ValueError(f"sweep.defenses: {dname!r} is not one of {list(self.defenses)}")
            acc = []
            for eps in cfg.sweep.eps:
                main = cells.get(f"{dname}/{spec.name}")
                if main is not None and _same_eps(spec, eps):
                    # the main cell already ran this attack at this epsilon: reuse its images
                    acc.append(draw_accuracy(torch.tensor(main["correct"][:ns]))["expected"])
                    self._bar.update(nb_sweep)
                    continue
                r = self._cell(f"sweep/{dname}/{eps:g}", self.defenses[dname], spec, self.x[:ns], self.y[:ns], eps=eps)
                acc.append(r["metrics"]["expected"])
            curves[dname] = {"eps": list(cfg.sweep.eps), "acc": acc}
            flags += [f"{dname}: {f}" for f in epsilon_checks(cfg.sweep.eps, acc, 1.0 / self.num_classes,
                                                              huge_eps=cfg.sweep.huge_eps)]
        return curves

    def _paired(self, cells: Dict[str, Any]) -> List[Dict[str, Any]]:
        """Each defense's per-image difference against `paired_with`: clean, every attack both faced, and
        each one's worst case over its own attacks (expected accuracy per image, mean over draws)."""
        ref = self.cfg.paired_with
        if ref is None:
            return []

        def scores(dname: str) -> Dict[str, Tensor]:
            own = {a.name: torch.tensor(cells[f"{dname}/{a.name}"]["correct"], dtype=torch.bool)
                   for a in self.attacks if f"{dname}/{a.name}" in cells}
            out = {"clean": torch.tensor(cells[f"{dname}/clean"]["correct"]).float().mean(1)}
            out.update({a: c.float().mean(1) for a, c in own.items()})
            if own:
                out["worst-case"] = worst_case(own)["per_sample"]
            return out
        base, rows = scores(ref), []
        for dname in self.defenses:
            if dname == ref:
                continue
            mine = scores(dname)
            for what in [k for k in mine if k in base]:
                rows.append({"defense": dname, "against": ref, "what": what,
                             **paired_difference(mine[what], base[what])})
        return rows

    def _worst_rows(self, dname: str, clean: Dict[str, Any], cells: Dict[str, Any],
                    rows: List[ResultRow]) -> List[ResultRow]:
        """Worst over attacks (AutoAttack style) of one defense: a row per preset group, and a
        "worst-case" row over all its attack cells when there are >= 2 (and they are not one group)."""
        names = [r.attack for r in rows]
        sets = [(g, [a for a in members if a in names]) for g, members in self.groups.items()]
        sets = [(g, m) for g, m in sets if len(m) >= 2]
        if len(names) >= 2 and not any(set(m) == set(names) for _, m in sets):
            sets.append(("worst-case", names))
        out = []
        for label, members in sets:
            parts = [cells[f"{dname}/{a}"] for a in members]
            wc = worst_case({a: torch.tensor(p["correct"], dtype=torch.bool) for a, p in zip(members, parts)})
            maj = maj_ci = None
            if all(p.get("majority") is not None for p in parts):  # the vote survives every attack
                hits = torch.tensor([p["majority"]["correct"] for p in parts], dtype=torch.bool).all(0)
                maj, maj_ci = int(hits.sum()) / max(wc["n"], 1), wilson_interval(int(hits.sum()), wc["n"])
            out.append(ResultRow.of(dname, label, f"worst over {', '.join(members)}", clean["metrics"], wc,
                                    (maj, maj_ci), attacks=members, seconds=sum(p["seconds"] for p in parts),
                                    flags=sorted({f for p in parts for f in p["flags"]}),
                                    **self._first_draws({a: p["correct"] for a, p in zip(members, parts)})))
        return out

    def _first_draws(self, correct_by_attack: Dict[str, Any], k: int = WORST_OF_FEW) -> Dict[str, Any]:
        """Worst-of-k over the first k draws (when more were taken), per-sample worst over the attacks given:
        {robust_worst_k, robust_worst_k_ci, worst_k}; {} when draws <= k."""
        if self.cfg.draws <= k:
            return {}
        wc = worst_case({a: torch.tensor(c, dtype=torch.bool)[:, :k] for a, c in correct_by_attack.items()})
        return {"worst_k": k, "robust_worst_k": wc["worst_of_n"], "robust_worst_k_ci": wc["worst_of_n_ci"]}

    def _write(self, rows, cells, curves, flags, worst_rows, paired) -> Dict[str, Any]:
        out = self.run_dir
        hist_s, hist_t = {}, {}
        for dname, model in self.defenses.items():
            if model is None or not model.reweight.sample_specific:
                continue
            clean = cells.get(f"{dname}/clean", {})
            groups_s = {"clean": clean.get("score_norm", [])}
            groups_t = {"clean": clean.get("t_star", [])}
            for spec in self.attacks:
                c = cells.get(f"{dname}/{spec.name}")
                if c:
                    groups_s[spec.name] = c["score_norm"]
                    groups_t[spec.name] = c["t_star"]
            hist_s[dname], hist_t[dname] = groups_s, groups_t
        plots = {}
        for key, path in (("score_norms", plot_histograms(hist_s, out / "score_norms.png", "score norm",
                                                          "score norms: clean vs adversarial")),
                          ("t_star", plot_histograms(hist_t, out / "t_star.png", "t*",
                                                     "per-sample t*")),
                          ("accuracy_vs_eps", plot_accuracy_vs_eps(
                              curves, out / "accuracy_vs_eps.png",
                              f"{self.cfg.sweep.attack}: accuracy vs epsilon\n(the first "
                              f"{self.cfg.sweep.num_samples} of the table's {int(self.x.shape[0])} images)"))):
            if path is not None:
                plots[key] = str(path)
        table = markdown_table(rows + worst_rows)
        # worst-over-attacks rows stay apart from the per-cell rows (one row per cell there)
        results = {"rows": [r.as_dict() for r in rows], "worst_case": [r.as_dict() for r in worst_rows],
                   "paired": paired, "curves": curves, "flags": flags, "plots": plots,
                   "n": int(self.x.shape[0]), "draws": self.cfg.draws,
                   "attacks": [to_dict(a) for a in self.cfg.attacks],
                   "per_sample": {k: {"t_star": v["t_star"], "score_norm": v["score_norm"]}
                                  for k, v in cells.items()},
                   "cell_keys": self.cell_keys}  # where each cell's batches are: state/<cell>/<key>/
        atomic_write_json(out / "results.json", results)
        md = ["# Evaluation report", "", f"{results['n']} images of `{self.cfg.data.name}` "
              f"({self.cfg.split}), {self.cfg.draws} defense draws per image; intervals are 95% "
              "Wilson intervals over images.", "", table, "## Self-checks", ""]
        md += [f"- FLAG: {f}" for f in flags] or ["- no flags raised"]
        md += paired_table(paired)
        md += ["", "## Attacks", ""]
        md += [f"- `{a.name}`: {self.budgets[a.name]}; view `{a.view}`; settings {a.kwargs}" for a in self.attacks]
        md += [f"- `{g}` (worst of {', '.join(m)}): preset rand, AutoAttack's randomized-defense version"
               for g, m in self.groups.items()]
        if curves:  # the sweep runs on fewer images than the table: say so beside its plot
            md += ["", f"Accuracy vs epsilon (`accuracy_vs_eps.png`): `{self.cfg.sweep.attack}` on the first "
                       f"{self.cfg.sweep.num_samples} of the {results['n']} images, so its point at the table's "
                       "epsilon may differ from the table's row."]
        md += [""] + [f"![{k}]({Path(v).name})" for k, v in plots.items()]
        atomic_write_text(out / "report.md", "\n".join(md) + "\n")
        try:
            from torch.utils.tensorboard import SummaryWriter

            w = SummaryWriter(str(out / "tb"))
            for r in rows:
                tag = f"{r.defense}/{r.attack}"
                w.add_scalar(f"clean/{r.defense}", r.clean, 0)
                if r.robust_expected is not None:  # None: a clean-only row
                    w.add_scalar(f"robust_expected/{tag}", r.robust_expected, 0)
                    w.add_scalar(f"robust_worst/{tag}", r.robust_worst, 0)
            w.close()
        except Exception:  # TensorBoard is a convenience; results are already on disk
            pass
        return {"table": table, "flags": flags, "report": str(out / "report.md"),
                "results": str(out / "results.json")}
