"""Attack strength against attack cost: robust accuracy of a trained digits defense under each attack
family at a few iteration counts, against the score-network evaluations the attack spent.

    .venv/bin/python tools/bench_attacks.py --run-dir runs/demo            # after `ssni demo`
    .venv/bin/python tools/bench_attacks.py --run-dir runs/demo --n 8 --iters 2 --draws 2   # a quick look

Defense: recipes/defense/digits.yaml with the run directory's networks (score_model=RUN/score,
calibration=RUN/calibration/calibration.json, classifier.checkpoint=RUN/classifier, as `ssni demo`
links them), then --defense-overrides (default: the demo's defense settings, a 5-step DDPM
purifier and a 5-step score norm), and the reweight of --defense (dbp: constant t* = 0.1; ssni-n: sigmoid; ssni-l:
linear; t_base 0.1 as in recipes/eval/digits.yaml).

Attack families (Linf, --eps, PGD step --step-size): PGD with EOT 1 and EOT --eot; selective EOT
(DiffHammer: only the draws that still resist); APGD-CE and APGD with the margin loss (EOT --eot);
low-frequency PGD (EOT --eot); PGD-EOT through the BPDA view (identity backward through the purifier)
and the adaptive view (also through the score norm and the smooth t*(x); sample-specific defenses
only); fixed seeds (PGD, no EOT, on the defense itself called with the seeds of evaluation draw 0:
the white-box attacker who knows the randomness). The full / adaptive / BPDA views differentiate the
defense's own purifier (--attack-purifier defense) or the recipe's cheaper attack_purifier (surrogate).

Robust accuracy: every adversarial set is classified by the defense under the same --draws seeded
draws (the same seeds for every attack); "expected" is the mean over images and draws, "worst" counts
an image only if every draw is right (worst-of-draws).

Cost convention (NFE per image): the score network's image-evaluations during the attack divided by
the number of images. Every forward row counts 1 (score-norm and purifier calls, and the forward
recomputations that gradient checkpointing makes during the backward pass); every row whose output
receives a gradient counts 1 more for its backward pass (in wall time a backward costs about two
forwards). The classifier is not counted. BPDA has no backward through the score network; the
adaptive view also back-propagates through the score norm.

Cost on one CPU thread (unet_digits, 20-step DDPM defense purifier): --n 8 --iters 2 5 takes about
8 minutes; the default --n 48 --iters 5 20 about 6x(25/7) that (roughly 3 hours): use a GPU, or
--threads, or fewer --families.

Writes, atomically, under --out: results.json (every number and the settings), table.md and
acc_vs_nfe.png (accuracy against NFE per image, log x axis, one line per family).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "toolkit"))

from ssni.attacks import ATTACKS, EOT  # noqa: E402
from ssni.commands.demo import DemoConfig  # noqa: E402
from ssni.config import load_config  # noqa: E402
from ssni.data import DataConfig, build_dataset  # noqa: E402
from ssni.defense import DefenseConfig, RobustClassifier, build_defense, fixed_view  # noqa: E402
from ssni.evaluate.metrics import draw_accuracy  # noqa: E402
from ssni.evaluate.runner import BoundSeeds, purifier_label  # noqa: E402
from ssni.io import atomic_write_json, atomic_write_text  # noqa: E402
from ssni.plotting import pyplot, save_figure  # noqa: E402
from ssni.scoring import build_reweight  # noqa: E402
from ssni.seeding import derive_seed  # noqa: E402

DEFENSES = {  # --defense -> (reweight name, its options), as in recipes/eval/digits.yaml
    "dbp": ("constant", {"t_base": 0.1}),
    "ssni-n": ("sigmoid", {"t_base": 0.1, "b": 0.005}),
    "ssni-l": ("linear", {"t_base": 0.1}),
}
# the demo's evaluation settings: a 20-step DDPM defense purifier, a 5-step DDPM surrogate
DEMO_OVERRIDES = list(DemoConfig().defense_overrides)  # the demo's defense: its runs were calibrated with it
FAMILIES = ["pgd-eot1", "pgd-eot", "selective", "apgd-ce", "apgd-margin", "lowfreq", "bpda", "adaptive",
            "fixed-seeds"]
CONVENTION = ("NFE per image = score-network image-evaluations during the attack / images: forward rows "
              "(incl. checkpoint recomputations) + backward rows (1 each)")


class NFECounter:
    """Counts a network's image-evaluations: rows of every forward call, and rows whose output later
    receives a gradient (the backward pass through that call). Use as a context manager."""

    def __init__(self, *modules: nn.Module):
        self.modules = list({id(m): m for m in modules}.values())  # each network once
        self.forward = 0
        self.backward = 0
        self._handles: List[Any] = []

    @staticmethod
    def _rows(args: tuple) -> int:
        return int(args[0].shape[0]) if args and torch.is_tensor(args[0]) else 0

    def _pre_hook(self, module: nn.Module, args: tuple) -> None:
        # counted on entry: a checkpoint recomputation may stop before the forward returns (early stop)
        self.forward += self._rows(args)

    def _hook(self, module: nn.Module, args: tuple, output: Any) -> None:
        if torch.is_tensor(output) and output.requires_grad:
            rows = self._rows(args)
            output.register_hook(lambda grad: self._back(rows))

    def _back(self, rows: int) -> None:
        self.backward += rows

    @property
    def total(self) -> int:
        return self.forward + self.backward

    def __enter__(self) -> "NFECounter":
        self._handles = [h for m in self.modules
                         for h in (m.register_forward_pre_hook(self._pre_hook), m.register_forward_hook(self._hook))]
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def family_spec(family: str, iters: int, args: argparse.Namespace) -> Dict[str, Any]:
    """(attack name, kwargs, EOT samples, selective, view) of one family at `iters` iterations."""
    pgd = {"eps": args.eps, "norm": "linf", "steps": iters, "step_size": args.step_size}
    apgd = {"eps": args.eps, "norm": "linf", "steps": iters}
    specs = {
        "pgd-eot1": ("pgd", pgd, 1, False, "full"),
        "pgd-eot": ("pgd", pgd, args.eot, False, "full"),
        "selective": ("pgd", pgd, args.eot, True, "full"),
        "apgd-ce": ("apgd", {**apgd, "loss": "ce"}, args.eot, False, "full"),
        "apgd-margin": ("apgd", {**apgd, "loss": "margin"}, args.eot, False, "full"),
        "lowfreq": ("lowfreq", pgd, args.eot, False, "full"),
        "bpda": ("pgd", pgd, args.eot, False, "bpda"),
        "adaptive": ("pgd", pgd, args.eot, False, "adaptive"),
        "fixed-seeds": ("pgd", pgd, 1, False, "fixed"),
    }
    attack, kwargs, eot, selective, view = specs[family]
    return {"family": family, "attack": attack, "kwargs": kwargs, "eot": eot, "selective": selective,
            "view": view, "iterations": iters}


def make_attack(spec: Dict[str, Any]):
    attack = ATTACKS.create(spec["attack"], **spec["kwargs"])
    if spec["eot"] > 1 or spec["selective"]:
        attack = EOT(attack, spec["eot"], selective=spec["selective"])
    return attack


def build(args: argparse.Namespace, device: str) -> RobustClassifier:
    """The defense under test, attacked through its own purifier unless --attack-purifier surrogate."""
    run = Path(args.run_dir)
    links = [f"score_model={run / 'score'}", f"calibration={run / 'calibration' / 'calibration.json'}",
             f"classifier.checkpoint={run / 'classifier'}"]
    cfg = load_config(DefenseConfig, args.recipe, links + list(args.defense_overrides))
    base = build_defense(cfg, device=device)
    name, kw = DEFENSES[args.defense]
    model = base.replace(reweight=build_reweight(name, base.calibration, **kw))
    if args.attack_purifier == "defense":
        model = model.replace(attack_purifier=model.purifier)
    return model


def draw_seeds_for(seed: int, first: int, b: int, m: int) -> Tensor:
    """Defense seeds [b] of evaluation draw m for images first..first+b-1 (shared by every attack)."""
    return torch.tensor([derive_seed(seed, "bench-attacks", i, m) for i in range(first, first + b)])


def correct_matrix(model: nn.Module, x: Tensor, y: Tensor, first: int, draws: int, seed: int) -> Tensor:
    """[B, draws] bool: the defense's seeded draws on x."""
    with torch.no_grad():
        cols = [(model(x, seeds=draw_seeds_for(seed, first, x.shape[0], m)).argmax(1) == y).cpu()
                for m in range(draws)]
    return torch.stack(cols, 1)


def run_attack(model: RobustClassifier, spec: Dict[str, Any], x: Tensor, y: Tensor, args: argparse.Namespace,
               counter: NFECounter, bar) -> Dict[str, Any]:
    """Attack all images (in batches) with one spec; accuracy over the shared draws and the cost."""
    label = f"{spec['family']}@{spec['iterations']}"
    correct, t0 = [], time.perf_counter()
    counter.forward = counter.backward = 0
    for bi, k in enumerate(range(0, x.shape[0], args.batch_size)):
        xb, yb = x[k:k + args.batch_size], y[k:k + args.batch_size]
        view = (BoundSeeds(fixed_view(model), draw_seeds_for(args.seed, k, xb.shape[0], 0))
                if spec["view"] == "fixed" else model.view(spec["view"]))
        view.eval()
        attack = make_attack(spec)
        torch.manual_seed(derive_seed(args.seed, label, bi, "view"))
        with counter:
            x_adv = attack(view, xb, yb, seed=derive_seed(args.seed, label, bi, "start"))
        if (x_adv - xb).abs().max() > args.eps + 1e-5 or x_adv.min() < 0 or x_adv.max() > 1:
            raise RuntimeError(f"{label}: the adversarial images left the eps-ball or [0, 1]")
        correct.append(correct_matrix(model, x_adv, yb, k, args.draws, args.seed))
        bar.update(1)
    m = draw_accuracy(torch.cat(correct))
    n = x.shape[0]
    return {**spec, "label": label, "nfe_per_image": counter.total / n, "forward_per_image": counter.forward / n,
            "backward_per_image": counter.backward / n, "expected": m["expected"], "expected_ci": m["expected_ci"],
            "worst": m["worst_of_n"], "worst_ci": m["worst_of_n_ci"],
            "per_draw": torch.cat(correct).float().mean(0).tolist(), "seconds": time.perf_counter() - t0}


def table(rows: List[Dict[str, Any]], clean: Dict[str, Any], draws: int) -> str:
    head = f"| attack | iterations | EOT | NFE / image | expected acc | worst-of-{draws} | seconds |"
    lines = [head, "|---|---|---|---|---|---|---|",
             f"| clean | 0 | - | 0 | {clean['expected']:.3f} | {clean['worst']:.3f} | - |"]
    for r in rows:
        eot = f"{r['eot']}{' sel' if r['selective'] else ''}"
        lines.append(f"| {r['family']} | {r['iterations']} | {eot} | {r['nfe_per_image']:.0f} | {r['expected']:.3f} "
                     f"| {r['worst']:.3f} | {r['seconds']:.1f} |")
    return "\n".join(lines)


def plot(rows: List[Dict[str, Any]], clean: Dict[str, Any], draws: int, title: str, path: Path) -> Path:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), sharey=True)
    markers = "osD^v<>ph*"
    for ax, key, name in ((axes[0], "expected", "expected accuracy"), (axes[1], "worst", f"worst-of-{draws}")):
        for i, fam in enumerate(f for f in FAMILIES if any(r["family"] == f for r in rows)):
            pts = sorted((r["nfe_per_image"], r[key]) for r in rows if r["family"] == fam)
            ax.plot([max(p[0], 1.0) for p in pts], [p[1] for p in pts], marker=markers[i % len(markers)],
                    color=f"C{i}", label=fam)
        ax.axhline(clean[key], color="k", ls=":", lw=1, label="clean")
        ax.set_xscale("log")
        ax.set_xlabel("NFE per image (score-network forward + backward rows, log)")
        ax.set_title(name)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("robust accuracy")
    axes[1].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", default="runs/demo", help="ssni demo run directory (score/, classifier/, "
                    "calibration/calibration.json)")
    ap.add_argument("--out", default="runs/bench-attacks")
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "defense" / "digits.yaml"))
    ap.add_argument("--defense-overrides", nargs="*", default=DEMO_OVERRIDES,
                    help="key=value overrides of the defense recipe (default: %(default)s)")
    ap.add_argument("--defense", choices=sorted(DEFENSES), default="ssni-n")
    ap.add_argument("--attack-purifier", choices=["defense", "surrogate"], default="defense",
                    help="what the full/adaptive/bpda views differentiate (fixed-seeds: always the defense's)")
    ap.add_argument("--families", nargs="*", choices=FAMILIES, default=FAMILIES)
    ap.add_argument("--iters", nargs="*", type=int, default=[5, 20])
    ap.add_argument("--eot", type=int, default=4, help="EOT samples of the EOT families")
    ap.add_argument("--eps", type=float, default=0.0627, help="Linf budget (default 16/255)")
    ap.add_argument("--step-size", type=float, default=None, help="PGD step (default eps / 4)")
    ap.add_argument("--n", type=int, default=48, help="test images")
    ap.add_argument("--draws", type=int, default=4, help="seeded defense draws per adversarial image")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = ap.parse_args(argv)
    args.step_size = args.eps / 4 if args.step_size is None else args.step_size
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # the adaptive view through a saturated reweight: denormals (see runner)
    from tqdm.auto import tqdm

    model = build(args, args.device)
    dev = model.mean.device
    c, h, w = model.score_model.input_shape
    ds = build_dataset(DataConfig(name="digits", image_size=h), "test")
    if not 1 <= args.n <= len(ds):
        raise SystemExit(f"--n must be in [1, {len(ds)}], got {args.n}")
    x, y = ds.images[:args.n].to(dev), ds.labels[:args.n].to(dev)
    counter = NFECounter(model.score_model, model.purifier.model, model.attack_purifier.model)
    clean_correct = torch.cat([correct_matrix(model, x[k:k + args.batch_size], y[k:k + args.batch_size], k,
                                              args.draws, args.seed).cpu()
                               for k in range(0, args.n, args.batch_size)])
    cm = draw_accuracy(clean_correct)
    clean = {"expected": cm["expected"], "worst": cm["worst_of_n"]}
    specs = [family_spec(f, it, args) for f in args.families for it in sorted(set(args.iters))]
    if not model.reweight.sample_specific:  # the adaptive view of a constant t* is the full view
        specs = [s for s in specs if s["family"] != "adaptive"]
    nb = -(-args.n // args.batch_size)
    rows = []
    bar = tqdm(total=len(specs) * nb, desc="bench-attacks", dynamic_ncols=True)
    for spec in specs:
        bar.set_postfix_str(f"{spec['family']}@{spec['iterations']}")
        rows.append(run_attack(model, spec, x, y, args, counter, bar))
    bar.close()
    purifier = purifier_label(model.purifier)
    title = (f"{args.defense} on digits ({args.n} images, {args.draws} draws, Linf eps {args.eps:.4f}, "
             f"defense purifier {purifier}, attacks through the {args.attack_purifier} purifier)\n{CONVENTION}")
    out = Path(args.out)
    text = table(rows, clean, args.draws)
    print(title)
    print(text, flush=True)
    settings = {k: v for k, v in vars(args).items()}
    atomic_write_text(out / "table.md", f"{title}\n\n{text}\n")
    png = plot(rows, clean, args.draws, title, out / "acc_vs_nfe.png")
    res = {"settings": settings, "convention": CONVENTION, "purifier": purifier, "clean": clean,
           "rows": rows, "plot": str(png)}
    atomic_write_json(out / "results.json", res)
    print(f"wrote {out / 'results.json'}, {out / 'table.md'}, {png}")
    return res


if __name__ == "__main__":
    main()
