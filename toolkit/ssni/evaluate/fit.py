"""The engine of `ssni fit-reweight`: learn a monotone reweight against the attacks the defense will face.

From clean training images only; with `split: reserve`, from those held back from training the
classifier and score network (`data.reserve`), since on their own training images the networks are
surer than on unseen ones, most at small t*. The images are split into a fit set and a held-out set.

1. Round 0: the first attack of `attacks` (e.g. full-gradient PGD-EOT through the defense's own
   purifier) attacks the fit images through plain DBP at each noise level of `start_t` (by
   default every t_grid point the curve can reach, t = 0 included: the bare classifier), so the
   fit sees what an attacker aiming at each t* does.
2. Every attacked copy and every clean image gets its score norm and an accuracy table: how
   often purification at each t of `t_grid` keeps the classifier right (`draws` draws).
3. A monotone curve t*(s) is fitted to maximise robust + clean_weight * clean
   (`ssni.scoring.learned`). With `fit.robust: per_attack` (the default) robust is the worst
   attack's accuracy, as `ssni evaluate` reports it: round 0's sets count as one attack (aimed at
   each t*), and each attack of `attacks` as another, over its alternations' sets; `worst_copy`
   counts an image only as far as it survives every set. With `cap` (the default), an attacked
   copy sent to t counts at most as much as the copy crafted against t itself survives at t (round
   0's diagonal): a copy aimed at t = 0.1 that looks harmless at 0.04 does not make 0.04 safe,
   because an attacker facing 0.04 aims at 0.04.
4. Each alternation attacks the fit images with every attack of `attacks` (full and adaptive
   views) through the defense with the current curve, adds those copies and refits: the
   attacker moves, the curve answers.
5. The learned curve and the compared reweights (SSNI-L, SSNI-N) are attacked with every attack on
   the held-out images and evaluated with `verify_draws` draws; the table goes into report.md
   and reweight.json, and reweight.png draws the curves over the score-norm histograms (clean,
   noisy, attacked through the defense).

Every attack is an `ssni.attacks` attack built from the same spec as `ssni evaluate`'s. Each
attacked set is saved batch by batch under members/ with a key of everything it depends on
(weights fingerprints, settings, the attacked curve), through the same store as the evaluation's
(`jobs.py`), so a rerun reuses it and a stopped fit resumes from its last finished batch. Under
torchrun the batches are split across ranks (per-batch seeds, so the results equal one process's);
rank 0 fits, and every rank uses its curve. `fit_reweight` returns the result; the command writes it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from ..config import ConfigError, from_dict, load_config, read_run_config, setting, to_dict
from ..data import DataConfig, build_dataset
from ..defense import DefenseConfig, RobustClassifier
from ..dist import DistContext
from ..io import load_safetensors, read_json, remove_stale_temps
from ..models import weights_fingerprint
from ..scoring import (
    LearnedReweight,
    ReweightConfig,
    RobustFitConfig,
    build_reweight,
    fit_robust,
    oracle_t_star,
    table_scores,
)
from ..scoring.learned import check_robust_mode
from ..scoring.reweight import ConstantReweight
from ..seeding import derive_seed, mix_seeds
from .jobs import BatchRunner, BatchStore
from .metrics import draw_accuracy
from .specs import (
    AttackSpec,
    DefenseSpec,
    attack_budget,
    check_attack_options,
    check_attacks,
    make_attack,
)
from .state import config_fingerprint, slug, tensor_fingerprint, without

EPS_16 = 16 / 255


def _default_attacks() -> List[AttackSpec]:
    kw = {"eps": EPS_16, "norm": "linf", "steps": 5, "step_size": 4 / 255}
    return [AttackSpec(name="pgd-eot", attack="pgd", kwargs=dict(kw), eot=2, view="full"),
            AttackSpec(name="adaptive", attack="pgd", kwargs=dict(kw), eot=2, view="adaptive")]


def _default_compare() -> List[DefenseSpec]:
    return [DefenseSpec("ssni-l", ReweightConfig("linear", {"t_base": 0.1})),
            DefenseSpec("ssni-n", ReweightConfig("sigmoid", {"t_base": 0.1, "b": 0.005}))]


@dataclass
class FitReweightConfig:
    """Everything `ssni fit-reweight` needs."""

    output: str = setting("runs/reweight-digits", directory=True)
    defense_recipe: str = "recipes/defense/digits.yaml"
    defense_overrides: List[str] = field(default_factory=list)
    data: DataConfig = field(default_factory=DataConfig)
    # train, or reserve: training images held back from the classifier's and score network's
    # training (data.reserve); on their own training images the networks are surer than on unseen
    # ones, most at small t*, which pulls the fitted t* down
    split: str = "train"
    count: int = setting(128, ge=2)  # clean training images: the first count - holdout are fitted, the rest held out
    holdout: int = setting(32, ge=0)
    # the threat model, as in `ssni evaluate` (purifier: defense = the defense's own purifier)
    attacks: List[AttackSpec] = field(default_factory=_default_attacks)
    # round 0: DBP at these t*; None: every t_grid point the curve can reach (what `cap` needs)
    start_t: Optional[List[float]] = setting(None, ge=0, le=1)
    # credit an attacked copy at t at most what the attack crafted against t leaves there (module doc)
    cap: bool = True
    alternations: int = setting(1, ge=0)  # rounds that attack the current curve and refit
    t_grid: List[float] = setting(default_factory=lambda: [0.0, 0.02, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25, 0.3],
                                  ge=0, le=1)
    draws: int = setting(2, ge=1)  # purifications per (image, grid t) in the accuracy tables
    noise_std: float = setting(0.1, gt=0)  # noisy copies of the fit images: the plot's histogram only
    fit: RobustFitConfig = field(default_factory=RobustFitConfig)
    compare: List[DefenseSpec] = field(default_factory=_default_compare)  # beside the learned curve
    # held-out check: draws per attacked image
    verify_draws: int = setting(4, ge=0, means="0 skips the held-out check")
    batch_size: int = setting(64, ge=1)
    seed: int = 0
    device: str = "auto"
    progress: bool = True


def check_fit_config(cfg: FitReweightConfig) -> None:
    """One-line errors for settings that cannot work, before anything is loaded or attacked."""
    if cfg.split not in FIT_SPLITS:
        raise ConfigError(f"split must be one of {', '.join(FIT_SPLITS)} (clean training images only), "
                          f"got {cfg.split!r}")
    if cfg.split == "reserve" and cfg.data.reserve < 1:
        raise ConfigError("split: reserve needs data.reserve >= 1 (the training images held back from "
                          f"training the networks), got data.reserve={cfg.data.reserve}")
    if cfg.count < 2:
        raise ConfigError(f"count must be >= 2 clean training images, got {cfg.count}")
    if not 0 <= cfg.holdout <= cfg.count - 1:
        raise ConfigError(f"holdout must be in [0, count - 1 = {cfg.count - 1}], got {cfg.holdout}")
    for name in ("batch_size", "draws"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.alternations < 0 or cfg.verify_draws < 0:
        raise ConfigError(f"alternations and verify_draws must be >= 0, got {cfg.alternations}, {cfg.verify_draws}")
    if not cfg.attacks:
        raise ConfigError("fit-reweight: `attacks` is empty; list the attacks the defense will face")
    check_attacks(cfg.attacks)
    check_attack_options(cfg.attacks)
    for i, a in enumerate(cfg.attacks):
        if a.fixed_seeds or a.preset is not None or a.view == "bare" or a.attack == "transfer":
            raise ConfigError(f"attacks[{i}] ({a.name!r}): fit-reweight attacks through the defense "
                              "(view full, adaptive or bpda; no fixed_seeds, preset or transfer)")
    grid = cfg.t_grid
    if len(grid) < 2 or grid[0] < 0 or grid[-1] > 1 or any(b <= a for a, b in zip(grid, grid[1:])):
        raise ConfigError(f"t_grid must be >= 2 increasing noise levels in [0, 1], got {grid}")
    if cfg.start_t is not None and not cfg.start_t:
        raise ConfigError("start_t is empty; give the constant t* that round 0 attacks through (e.g. [0.1]), "
                          "or leave it out for every t_grid point the curve can reach")
    for t in cfg.start_t or []:
        if not grid[0] <= t <= grid[-1]:
            raise ConfigError(f"start_t {t} is outside t_grid [{grid[0]}, {grid[-1]}]")
    if not grid[0] <= cfg.fit.t_min <= cfg.fit.t_max <= grid[-1]:
        raise ConfigError(f"fit.t_min/t_max = {cfg.fit.t_min}/{cfg.fit.t_max} must lie inside t_grid "
                          f"[{grid[0]}, {grid[-1]}] (accuracy is only known there)")
    try:
        check_robust_mode(cfg.fit.robust)
    except ValueError as e:
        raise ConfigError(f"fit.{e}") from None
    if cfg.cap and cfg.start_t is not None:
        missing = [t for t in reachable_grid(cfg) if not _among(t, cfg.start_t)]
        if missing:
            raise ConfigError(f"cap needs round 0 at every t_grid point the curve can reach; start_t lacks "
                              f"{missing} (leave start_t out, or set cap: false)")


FIT_SPLITS = ("train", "reserve")
_SPLIT_KEYS = ("test_fraction", "split_seed", "reserve")  # what decides which images are the reserve


def _run_data(path: Any) -> Optional[DataConfig]:
    """The data config of the training run that made the weights at `path` (a run dir, a checkpoint
    dir in it, or a file in one of those); None where no training run's config is found."""
    if not isinstance(path, (str, Path)) or not path:
        return None
    p = Path(path).expanduser()
    for d in [p, *p.parents][:3]:  # run dir, run/checkpoints, run/checkpoints/<step>
        saved = read_run_config(d)
        if saved is not None:
            if not isinstance(saved.get("data"), dict) or "loop" not in saved:
                return None  # not a training run's config (train-score, train-classifier, ...)
            try:  # through the dataclass: fields added since (e.g. reserve) get their defaults
                return from_dict(DataConfig, saved["data"], "data")
            except ConfigError:
                return None
    return None


def check_fit_images_unseen(cfg: FitReweightConfig) -> None:
    """With split: reserve, a one-line error when the classifier's or score network's own run says it
    trained on the reserve images (another data.reserve, split_seed or test_fraction)."""
    if cfg.split != "reserve":
        return
    dcfg = load_config(DefenseConfig, cfg.defense_recipe, cfg.defense_overrides)
    for what, path in (("classifier", dcfg.classifier.checkpoint), ("score network", dcfg.score_model)):
        theirs = _run_data(path)
        if theirs is None or theirs.name != cfg.data.name:
            continue  # weights from elsewhere (e.g. a public checkpoint): nothing recorded to check
        diff = [k for k in _SPLIT_KEYS if getattr(theirs, k) != getattr(cfg.data, k)]
        if diff:
            raise ConfigError(f"split: reserve, but the {what} at {path} was trained with "
                              + ", ".join(f"data.{k}={getattr(theirs, k)}" for k in diff)
                              + ", so its training images may include the fit images; train it with "
                              + ", ".join(f"data.{k}={getattr(cfg.data, k)}" for k in diff)
                              + " or fit on split: train")


def _among(t: float, levels: List[float]) -> bool:
    """Whether noise level t is one of `levels` (up to float noise from YAML)."""
    return any(abs(t - u) < 1e-9 for u in levels)


def reachable_grid(cfg: FitReweightConfig) -> List[float]:
    """The t_grid points whose accuracy a curve in [fit.t_min, fit.t_max] can use (interpolation
    reads the grid point at or below each end and the one at or above)."""
    g = cfg.t_grid
    lo = max([t for t in g if t <= cfg.fit.t_min + 1e-9], default=g[0])
    hi = min([t for t in g if t >= cfg.fit.t_max - 1e-9], default=g[-1])
    return [t for t in g if lo - 1e-9 <= t <= hi + 1e-9]


def start_levels(cfg: FitReweightConfig) -> List[float]:
    """Round 0's constant t*: `start_t`, or every t_grid point the curve can reach."""
    return list(cfg.start_t) if cfg.start_t is not None else reachable_grid(cfg)


def diagonal_cap(cfg: FitReweightConfig, round0: Dict[float, Tensor]) -> Tensor:
    """cap [N, G]: at each reachable grid t, the accuracy there of the copy crafted against t;
    1 (no cap) at grid points the curve cannot reach. round0: {t: table [N, G]}."""
    reach = reachable_grid(cfg)
    n = next(iter(round0.values())).shape[0]
    cap = torch.ones(n, len(cfg.t_grid))
    for k, t in enumerate(cfg.t_grid):
        if _among(t, reach):
            cap[:, k] = next(v for u, v in round0.items() if _among(t, [u]))[:, k]
    return cap


@dataclass
class Member:
    """One attacked set of the fit images: what attacked it, and through which reweight."""

    name: str
    spec: AttackSpec
    reweight: Any  # the attacked defense's Reweight


class Fit:
    """The state of one fit-reweight run (defense, images, tables, rank context)."""

    def __init__(self, cfg: FitReweightConfig, dist: DistContext):
        self.cfg, self.dist = cfg, dist
        self.out = Path(cfg.output)
        if dist.is_main:  # temp files of writes a killed run did not finish (only dead writers')
            remove_stale_temps(self.out)
        self.defense = RobustClassifier.from_recipe(cfg.defense_recipe, cfg.defense_overrides, device=dist.device)
        self.images, self.labels = training_images(cfg, dist.device)
        n_fit = cfg.count - cfg.holdout
        self.fit_x, self.fit_y = self.images[:n_fit], self.labels[:n_fit]
        self.hold_x, self.hold_y = self.images[n_fit:], self.labels[n_fit:]
        self.grid = torch.tensor(cfg.t_grid, dtype=torch.float32)
        self.computed = 0  # sets computed (not reused from members/) by this run
        self.store = BatchStore(self.out / "members")  # each rank saves the batches it computes
        self.jobs = BatchRunner(self.store, dist)
        self._attackers: Dict[str, Any] = {}  # member name -> (the view it attacks, its attack)
        d = self.defense
        self.inputs = {"score_model": weights_fingerprint(d.score_model),
                       "classifier": weights_fingerprint(d.classifier),
                       "calibration": None if d.calibration is None else config_fingerprint(d.calibration.to_dict()),
                       "purifier": repr(d.purifier),
                       # the images' content: the same file names with other pixels are other inputs
                       "images": tensor_fingerprint(self.images, self.labels)}

    # -- pieces ------------------------------------------------------------------------------
    def _sample_seeds(self, tag: str, first: int, b: int) -> Tensor:
        return torch.tensor([derive_seed(self.cfg.seed, tag, i) for i in range(first, first + b)])

    def measure(self, x: Tensor, y: Tensor, tag: str, first: int) -> Dict[str, Tensor]:
        """Score norms [b] and accuracy table [b, G] of images x [b,C,H,W] (samples first.. of set `tag`)."""
        seeds = self._sample_seeds(tag, first, x.shape[0])
        d = self.defense
        with torch.no_grad():  # the norm the defense computes for these seeds
            s = d.noise_levels(x, seeds)[1].float().cpu()
        purify = lambda xb, tb, seeds: d.purifier(xb, tb, seeds=seeds)  # noqa: E731
        table = oracle_t_star(purify, d.classify, x, y, self.cfg.t_grid, seeds, self.cfg.draws,
                              self.cfg.batch_size * 4)["correct"]
        return {"norm": s, "table": table.float().cpu()}

    def attack(self, member: Member, x: Tensor, y: Tensor, first: int) -> Tensor:
        """x_adv [b,C,H,W] of one batch: the member's attack through the defense with its reweight."""
        if member.name not in self._attackers:  # built once per member, not per batch
            d = self.defense.replace(reweight=member.reweight)
            self._attackers[member.name] = (d.view(member.spec.view_spec()), make_attack(member.spec))
        view, attack = self._attackers[member.name]
        torch.manual_seed(derive_seed(self.cfg.seed, member.name, first))  # the view's randomness
        return attack(view, x, y, seed=derive_seed(self.cfg.seed, member.name, first, "start"))

    def key(self, what: str, extra: Any) -> str:
        """Fingerprint of everything a saved set depends on."""
        c = to_dict(self.cfg)
        keep = {k: c[k] for k in ("data", "split", "count", "holdout", "t_grid", "draws", "batch_size", "seed")}
        keep = without(keep, ["data.root"])  # where the images are: their fingerprint is in the inputs
        return config_fingerprint({"what": what, "inputs": self.inputs, "cfg": keep, "extra": extra})

    def cached(self, name: str, key: str, batch: Callable[[int, int], Dict[str, Tensor]], n: int
               ) -> Dict[str, Tensor]:
        """A set of n samples, batch(first, b) per batch: batches saved under members/ with this key are
        reused, the others computed (spread over the ranks) and saved as each finishes; {name: [n, ...]}."""
        from tqdm.auto import tqdm

        whole = self.out / "members" / f"{slug(name)}.safetensors"  # a whole set, as earlier versions saved it
        meta = whole.with_suffix(".json")
        if whole.is_file() and meta.is_file() and read_json(meta).get("key") == key:
            return load_safetensors(whole)
        # a bar with an ETA per set: a fit runs for many minutes between its stage lines
        bar = tqdm(total=n, desc=f"[fit-reweight] {name}", unit="img", dynamic_ncols=True,
                   disable=not (self.cfg.progress and self.dist.is_main))
        before, t0 = self.store.computed, time.perf_counter()
        self.store.bind(name, key)
        try:
            parts = self.jobs.run(name, n, self.cfg.batch_size, lambda b: batch(b.start, b.size),
                                  on_batch=lambda b: bar.update(b.size))
        finally:
            bar.close()
        if any(self.dist.all_gather_object(self.store.computed > before)):
            self.computed += 1
            if self.cfg.progress and self.dist.is_main:
                print(f"[fit-reweight] {name}: done in {time.perf_counter() - t0:.0f} s", flush=True)
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    def member_set(self, member: Member) -> Dict[str, Tensor]:
        """Norms [n] and tables [n, G] of the fit images attacked as `member` says."""
        def batch(a: int, b: int) -> Dict[str, Tensor]:
            x, y = self.fit_x[a:a + b], self.fit_y[a:a + b]
            return self.measure(self.attack(member, x, y, a), y, member.name, a)
        key = self.key("member", {"name": member.name, "spec": to_dict(member.spec),
                                  "reweight": [type(member.reweight).__name__, member.reweight.config()]})
        return self.cached(member.name, key, batch, self.fit_x.shape[0])

    def clean_set(self) -> Dict[str, Tensor]:
        """Norms and tables of the clean fit images, and norms of their noisy copies."""
        std = self.cfg.noise_std

        def batch(a: int, b: int) -> Dict[str, Tensor]:
            x, y = self.fit_x[a:a + b], self.fit_y[a:a + b]
            res = self.measure(x, y, "clean", a)
            seeds = self._sample_seeds("noise", a, b)
            z = torch.cat([torch.randn((1, *x.shape[1:]), generator=torch.Generator().manual_seed(int(s)))
                           for s in seeds]).to(x)
            noisy = (x + std * z).clamp(0.0, 1.0)  # a noisy image: pixels stay images
            with torch.no_grad():
                res["noisy_norm"] = self.defense.noise_levels(noisy, seeds)[1].float().cpu()
            return res
        return self.cached("clean", self.key("clean", {"noise_std": std}), batch, self.fit_x.shape[0])

    def verify(self, name: str, reweight: Any) -> Dict[str, Any]:
        """Clean and attacked accuracy of the defense with `reweight` on the held-out images:
        {"clean": metrics, attack name: metrics} (expected, worst-of-draws, intervals)."""
        m, n = self.cfg.verify_draws, self.hold_x.shape[0]
        d = self.defense.replace(reweight=reweight)
        out: Dict[str, Any] = {}
        for spec in [None] + list(self.cfg.attacks):
            label = "clean" if spec is None else spec.name
            tag = f"verify/{name}/{label}"

            def batch(a: int, b: int, spec=spec, tag=tag) -> Dict[str, Tensor]:
                x, y = self.hold_x[a:a + b], self.hold_y[a:a + b]
                if spec is not None:
                    x = self.attack(Member(tag, spec, reweight), x, y, a)
                seeds = self._sample_seeds(tag, a, b)
                with torch.no_grad():
                    right = torch.stack([d(x, seeds=mix_seeds(seeds, 100 + k)).argmax(1) == y for k in range(m)], 1)
                return {"correct": right.cpu()}
            key = self.key("verify", {"label": label, "spec": None if spec is None else to_dict(spec),
                                      "reweight": [type(reweight).__name__, reweight.config()], "draws": m})
            res = self.cached(tag.replace("/", "_"), key, batch, n)
            out[label] = draw_accuracy(res["correct"].bool())
        return out

    def broadcast_curve(self, fit: Callable[[], Tuple[LearnedReweight, Dict[str, Any]]]):
        """Rank 0 fits; every rank gets its curve (and info) or the error."""
        payload, error = None, None
        if self.dist.is_main:
            try:
                curve, info = fit()
                payload = (curve.config(), info)
            except Exception as e:
                if self.dist.world_size == 1:
                    raise
                error = f"{type(e).__name__}: {e}"
        if self.dist.world_size > 1:
            payload, error = self.dist.all_gather_object((payload, error))[0]
        if error is not None:
            raise RuntimeError(f"fit-reweight failed on rank 0: {error}")
        config, info = payload
        return LearnedReweight(**config).to(self.dist.device).requires_grad_(False), info


def training_images(cfg: FitReweightConfig, device: torch.device) -> Tuple[Tensor, Tensor]:
    """`count` clean training images (a seeded subset, in index order) and their labels."""
    ds = build_dataset(cfg.data, cfg.split)  # clean training data only
    if len(ds) < cfg.count:
        raise ConfigError(f"count={cfg.count}, but the {cfg.split} split of {cfg.data.name!r} has {len(ds)} "
                          f"images; set count <= {len(ds)}")
    g = torch.Generator().manual_seed(cfg.seed)
    idx = torch.randperm(len(ds), generator=g)[:cfg.count]  # random, so the held-out part is too
    return ds.images[idx].to(device), ds.labels[idx].to(device)


def _stack(sets: List[Dict[str, Tensor]]) -> Tuple[Tensor, Tensor]:
    """Norms [n, J] and tables [n, J, G] of J attacked sets."""
    return torch.stack([s["norm"] for s in sets], 1), torch.stack([s["table"] for s in sets], 1)


def attack_groups(cfg: FitReweightConfig, members: List[Member]) -> Tuple[List[int], List[str]]:
    """The attack each set counts for (round 0's sets: one attack aimed at each t*; later rounds: their
    spec's attack) and the names of the attacks that have sets, in index order: ([J] indices, names)."""
    names = [f"{cfg.attacks[0].name} through DBP (round 0)"] + [a.name for a in cfg.attacks]
    groups = [0 if m.name.startswith("round0-") else names.index(m.spec.name, 1) for m in members]
    present = set(groups)
    return groups, [name for k, name in enumerate(names) if k in present]


@dataclass
class FitResult:
    """What a fit found: the curve, the compared reweights and every table behind the report."""

    fit: "Fit"
    curve: LearnedReweight
    info: Dict[str, Any]
    rounds: List[Dict[str, Any]]
    compare: Dict[str, Any]
    on_tables: Dict[str, Any]
    heldout: Dict[str, Any]
    levels: List[float]
    attack_names: List[str]
    clean: Dict[str, Tensor]
    members: List[Member]
    sets: List[Dict[str, Tensor]]

    def budgets(self) -> Dict[str, str]:
        """{attack name: one line of what it spent and differentiated}."""
        return {a.name: attack_budget(a, make_attack(a), self.fit.defense) for a in self.fit.cfg.attacks}


def fit_reweight(cfg: FitReweightConfig, dist: Optional[DistContext] = None) -> FitResult:
    """Attack, tabulate and fit (module doc); every rank returns the same curve."""
    check_fit_config(cfg)
    check_fit_images_unseen(cfg)
    fit = Fit(cfg, dist or DistContext.from_env(cfg.device))
    clean = fit.clean_set()
    first, levels = cfg.attacks[0], start_levels(cfg)
    members = [Member(f"round0-{first.name}-t{t:g}", first, ConstantReweight(t_base=t)) for t in levels]
    sets = [fit.member_set(m) for m in members]
    cap = diagonal_cap(cfg, {t: s["table"] for t, s in zip(levels, sets)}) if cfg.cap else None
    curve, info, rounds = None, {}, []
    for r in range(cfg.alternations + 1):
        if r > 0:  # the attacker answers the current curve
            new = [Member(f"round{r}-{a.name}", a, curve) for a in cfg.attacks]
            members += new
            sets += [fit.member_set(m) for m in new]
        adv_s, adv_t = _stack(sets)
        groups, attack_names = attack_groups(cfg, members)
        curve, info = fit.broadcast_curve(lambda: fit_robust(fit.grid, clean["norm"], clean["table"], adv_s, adv_t,
                                                             cfg.fit, init=curve, seed=cfg.seed + r, cap=cap,
                                                             groups=groups))
        rounds.append({"round": r, "attacked_sets": [m.name for m in members], **info})
    compare = {c.name: build_reweight(c.reweight.name, fit.defense.calibration, **c.reweight.kwargs)
               for c in cfg.compare}
    on_tables = {name: table_scores(rw, fit.grid, clean["norm"], clean["table"], adv_s, adv_t, cap,
                                    cfg.fit.robust, groups)
                 for name, rw in {"learned": curve, **compare}.items()}
    heldout = {}
    if cfg.verify_draws > 0 and fit.hold_x.shape[0] > 0:
        heldout = {name: fit.verify(name, rw) for name, rw in {"learned": curve, **compare}.items()}
    return FitResult(fit, curve, info, rounds, compare, on_tables, heldout, levels, attack_names, clean,
                     members, sets)
