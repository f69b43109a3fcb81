"""A generic, resumable training loop: AdamW with warm-up, clipping, EMA, bf16 on CUDA, logging."""
from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import Tensor, nn

from ..checkpoint import clean_stale, latest_checkpoint, load_checkpoint, save_checkpoint
from ..config import ConfigError, check_same_run, check_settings, setting
from ..dist import DistContext
from ..io import remove_stale_temps
from ..seeding import epoch_seed, step_seed

RESUME_FILES = ("ema.safetensors", "optimizer.pt")  # besides the weights: what a resume needs
SCHEDULES = ("constant", "cosine")  # learning-rate schedules after warm-up


@dataclass
class OptimConfig:
    """AdamW and its learning-rate schedule."""

    lr: float = setting(2e-4, gt=0)
    weight_decay: float = setting(0.0, ge=0)
    betas: List[float] = setting(default_factory=lambda: [0.9, 0.999], ge=0, lt=1)
    warmup_steps: int = setting(100, ge=0)
    schedule: str = "constant"  # constant | cosine (after warm-up)
    grad_clip: float = setting(1.0, ge=0, means="0: no clipping")

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Raise a one-line ConfigError for a setting that cannot work (nothing is clamped)."""
        check_settings(self, "optim")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"unknown lr schedule optim.schedule={self.schedule!r}; valid choices: "
                              f"{', '.join(SCHEDULES)}")
        if len(self.betas) != 2:
            raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {list(self.betas)}")


@dataclass
class LoopConfig:
    """How long to train and how often to log, sample and save."""

    steps: int = setting(1000, ge=1)
    batch_size: int = setting(64, ge=1)
    seed: int = 0
    ema_decay: float = setting(0.999, ge=0, le=1)
    log_every: int = setting(25, ge=1)
    sample_every: int = setting(0, ge=0, means="0: only at the end")
    ckpt_every: int = setting(500, ge=0, means="0: only at the end")
    keep_checkpoints: int = setting(2, ge=1)
    device: str = "auto"
    bf16: bool = True  # autocast in bf16 on CUDA; ignored on CPU
    resume: bool = True  # continue from <run_dir>/checkpoints when present (false: refused if there are any)
    progress: bool = True

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Raise a one-line ConfigError for a setting that cannot work (nothing is clamped)."""
        check_settings(self, "loop")


def refuse_earlier_checkpoints(ckpt_root: str | Path) -> None:
    """With loop.resume=false: refuse a checkpoints folder that already holds checkpoints (this run would
    publish its own among them, and keep theirs as if they were its own)."""
    root = Path(ckpt_root)
    if root.is_dir() and (any(root.glob("step_*")) or (root / "latest.json").exists()):
        raise ConfigError(f"{root} holds checkpoints of an earlier run; with loop.resume=false this run would "
                          f"publish its own among them (and keep theirs): use a new run_dir, delete {root}, or "
                          "set loop.resume=true to continue that run")


def check_run_dir(cfg: Any, run_dir: str | Path) -> None:
    """Before a training command writes anything into run_dir: with loop.resume, its checkpoints must
    come from this config (check_same_run); without, there must be none."""
    if cfg.loop.resume:
        check_same_run(cfg, run_dir, "checkpoints")
    else:
        refuse_earlier_checkpoints(Path(run_dir) / "checkpoints")


def finished_run(run_dir: str | Path, steps: int, command: str) -> Optional[Dict[str, Any]]:
    """The summary.json of a run in run_dir that already trained `steps` steps, announced on
    stdout (None when there is none or it trained fewer): a finished run is not redone."""
    import json

    path = Path(run_dir) / "summary.json"
    if not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # an unreadable summary: the run is redone from its checkpoints
    done = summary.get("steps") if isinstance(summary, dict) else None
    if not isinstance(done, int) or done < steps:
        return None
    print(f"[{command}] {run_dir} already holds a finished run of {done} steps (summary.json): nothing to "
          f"do; raise loop.steps to train further, or use a new run_dir", flush=True)
    return summary


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/Inf; the run stopped and the last good checkpoint was kept."""


def lr_factor(step: int, cfg: OptimConfig, total: int) -> float:
    """Multiplier of the base learning rate at `step` (0-based)."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "cosine":
        span = max(1, total - cfg.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - cfg.warmup_steps) / span)))
    raise ValueError(f"unknown lr schedule {cfg.schedule!r}; valid choices: constant, cosine")


class EpochBatches:
    """Deterministic batches: a fresh permutation per epoch from (seed, epoch), split by rank.

    `batch_size` is the global batch. `global_indices(step)` depends only on the step, so a resumed
    run sees exactly the batches an uninterrupted one would, and with `world` processes rank r takes
    the r-th contiguous part of the very batch one process would take (`rows` says which part).
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        if n < 1:
            raise ValueError("the data set is empty")
        self.n, self.seed, self.rank, self.world = n, seed, rank, world
        if batch_size > n:  # a documented conversion, not a silent one
            warnings.warn(f"batch_size {batch_size} is larger than the data set ({n} samples); "
                          f"using batches of {n}", stacklevel=2)
        self.batch_size = min(batch_size, n)
        if self.batch_size < world:
            raise ValueError(f"the global batch of {self.batch_size} samples is too small for {world} "
                             "processes; raise loop.batch_size to at least the number of processes")
        self.per_epoch = n // self.batch_size
        base, extra = divmod(self.batch_size, world)
        self.start = rank * base + min(rank, extra)
        self.count = base + (rank < extra)
        self._cache: Dict[int, Tensor] = {}

    def _perm(self, epoch: int) -> Tensor:
        if epoch not in self._cache:
            g = torch.Generator().manual_seed(epoch_seed(self.seed, epoch))
            self._cache = {epoch: torch.randperm(self.n, generator=g)}
        return self._cache[epoch]

    def global_indices(self, step: int) -> Tensor:
        """Indices [batch_size] of the whole (all ranks') batch at global step `step`."""
        epoch, k = divmod(step, self.per_epoch)
        return self._perm(epoch)[k * self.batch_size:(k + 1) * self.batch_size]

    def batch_indices(self, step: int) -> Tensor:
        """Indices [count] of this rank's rows of the batch at global step `step`."""
        return self.global_indices(step)[self.start:self.start + self.count]


class _Rows:
    """Calls `net` on this rank's rows only; the loss sees the whole global batch.

    A loss draws its randomness (noise, t, shifts) for every row of the global batch from the step's
    generator, exactly as one process would, and this stand-in for the network runs the network on
    this rank's rows and pads its output with zeros elsewhere (rows the caller then drops). The loss
    must call the network once, with the batch rows first; anything else raises.
    """

    def __init__(self, net: Callable, module: nn.Module, start: int, count: int, total: int):
        self.net, self.module = net, module
        self.start, self.count, self.total = start, count, total
        self.calls = 0

    def __getattr__(self, name: str) -> Any:  # e.g. `.training`, `.diffusion` of the network
        return getattr(self.module, name)

    def __call__(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        self.calls += 1
        if self.calls > 1 or x.shape[0] != self.total:
            raise RuntimeError("multi-process training needs a loss that calls the network once on the "
                               f"whole batch (got call {self.calls} with {x.shape[0]} rows, expected "
                               f"{self.total}); run this loss with one process")
        sl = slice(self.start, self.start + self.count)
        cut = lambda a: a[sl] if torch.is_tensor(a) and a.dim() and a.shape[0] == self.total else a  # noqa: E731
        out = self.net(x[sl], *[cut(a) for a in args], **{k: cut(v) for k, v in kwargs.items()})
        before = out.new_zeros((self.start, *out.shape[1:]))
        after = out.new_zeros((self.total - self.start - self.count, *out.shape[1:]))
        return torch.cat([before, out, after])


class Trainer:
    """Trains `model` by minimising the mean of `loss_fn(model, batch, generator)` ([B]).

    dataset: any indexable of (image, label) pairs, or an object with `.images`/`.labels`
    tensors (fast path). `spec` is the JSON that rebuilds the model (saved with checkpoints).
    Callbacks `on_sample(trainer, step)` run on the main process every `sample_every` steps.
    Under torchrun (world_size > 1) the model is wrapped in DistributedDataParallel, each rank
    takes its share of the global batch `loop.batch_size`, and the main rank logs and saves.
    """

    def __init__(self, model: nn.Module, loss_fn: Callable, dataset: Any, loop: LoopConfig,
                 optim: OptimConfig, run_dir: str | Path, spec: Dict[str, Any],
                 on_sample: Optional[Callable[["Trainer", int], None]] = None,
                 dist: Optional[DistContext] = None):
        loop.check()  # again: the configs may have been changed after they were made
        optim.check()
        self.dist = dist or DistContext.from_env(loop.device)
        self.device = self.dist.device
        self.model = model.to(self.device)
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.loss_fn, self.dataset, self.loop, self.optim_cfg = loss_fn, dataset, loop, optim
        self.run_dir = Path(run_dir)
        self.ckpt_root = self.run_dir / "checkpoints"
        self.spec, self.on_sample = spec, on_sample
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=optim.lr,
                                           betas=tuple(optim.betas), weight_decay=optim.weight_decay)
        self.batches = EpochBatches(len(dataset), loop.batch_size, loop.seed,
                                    self.dist.rank, self.dist.world_size)
        self.net: nn.Module = self.model  # what the loss calls: the model, or its DDP wrapper
        if self.dist.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = DistributedDataParallel(self.model, device_ids=ids)
        self.step = 0
        self.history: List[Dict[str, float]] = []
        self._writer = None
        if not loop.resume:
            refuse_earlier_checkpoints(self.ckpt_root)
        if self.dist.is_main:  # what a killed run left: temp files, unfinished or half-pruned checkpoints
            clean_stale(self.ckpt_root)
            remove_stale_temps(self.run_dir)

    # -- pieces ----------------------------------------------------------------------------
    @property
    def writer(self):
        """TensorBoard writer (main process only; None elsewhere)."""
        if self._writer is None and self.dist.is_main:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.run_dir / "tb"))
        return self._writer

    def _batch(self, step: int):
        """This rank's rows; with several ranks, placed in a zero batch of the global size."""
        idx = self.batches.batch_indices(step)
        if hasattr(self.dataset, "images") and hasattr(self.dataset, "labels"):
            x, y = self.dataset.images[idx], self.dataset.labels[idx]
        else:
            items = [self.dataset[int(i)] for i in idx]
            x = torch.stack([it[0] for it in items])
            y = torch.as_tensor([int(it[1]) for it in items])
        if self.dist.world_size > 1:
            # other ranks' rows are placeholders: the loss only draws randomness for them
            b, a = self.batches, self.batches.start
            gx, gy = x.new_zeros((b.batch_size, *x.shape[1:])), y.new_zeros((b.batch_size, *y.shape[1:]))
            gx[a:a + b.count], gy[a:a + b.count] = x, y
            x, y = gx, gy
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def _generator(self, step: int) -> torch.Generator:
        # seeded by the step alone (rank 0's seed): every rank draws the same global batch's randomness
        g = torch.Generator(device=self.device)
        g.manual_seed(step_seed(self.loop.seed, step, 0))
        return g

    def _loss(self, step: int) -> tuple[Tensor, Tensor]:
        """(objective to back-propagate, mean loss over the global batch) at `step`; both scalars."""
        batch = self._batch(step)
        if self.dist.world_size == 1:
            loss = self.loss_fn(self.net, batch, self._generator(step)).mean()
            return loss, loss.detach()
        b = self.batches
        rows = self.loss_fn(_Rows(self.net, self.model, b.start, b.count, b.batch_size), batch,
                            self._generator(step))[b.start:b.start + b.count].sum()
        # DDP averages gradients over ranks: scale so that the result is d(mean over the global batch)
        objective = rows * (self.dist.world_size / b.batch_size)
        total = self.dist.all_reduce(rows.detach().float().clone()) / b.batch_size
        return objective, total

    @torch.no_grad()
    def _update_ema(self) -> None:
        # warm-up of the decay so short runs are not dominated by the initial weights
        d = min(self.loop.ema_decay, (1.0 + self.step) / (10.0 + self.step))
        for pe, pm in zip(self.ema.parameters(), self.model.parameters()):
            pe.lerp_(pm.detach(), 1.0 - d)
        for be, bm in zip(self.ema.buffers(), self.model.buffers()):
            be.copy_(bm)

    def save(self) -> Optional[Path]:
        """Checkpoint the current state (the main process writes; the others wait until it is on disk)."""
        path = None
        if self.dist.is_main:
            path = save_checkpoint(self.ckpt_root, self.step, self.model, self.ema, self.optimizer,
                                   self.spec, {"history_tail": self.history[-5:]},
                                   keep=self.loop.keep_checkpoints)
        self.dist.barrier()  # a rank that resumes next must see the files
        return path

    def try_resume(self) -> bool:
        """Load the newest checkpoint of this run directory if there is one."""
        try:  # a checkpoint without its EMA or optimizer state would resume to other weights
            path = latest_checkpoint(self.ckpt_root, need=RESUME_FILES)
        except FileNotFoundError:
            return False
        state = load_checkpoint(path, self.model, self.ema, self.optimizer)
        self.step = int(state["step"])
        return True

    # -- the loop ----------------------------------------------------------------------------
    def fit(self, stop_at: Optional[int] = None) -> Dict[str, Any]:
        """Train to loop.steps (or stop early at `stop_at`, for tests); returns a summary."""
        from tqdm.auto import tqdm

        if self.loop.resume:
            self.try_resume()
        total, end = self.loop.steps, min(self.loop.steps, stop_at or self.loop.steps)
        use_bf16 = self.loop.bf16 and self.device.type == "cuda"
        bar = tqdm(total=total, initial=self.step, desc="train", dynamic_ncols=True,
                   disable=not (self.loop.progress and self.dist.is_main), mininterval=1.0)
        self.net.train()
        while self.step < end:
            step = self.step
            lr = self.optim_cfg.lr * lr_factor(step, self.optim_cfg, total)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            torch.manual_seed(step_seed(self.loop.seed, step))  # dropout etc.: repeatable on resume
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=use_bf16):
                objective, loss = self._loss(step)
            if not torch.isfinite(loss):  # the global mean: every rank stops together
                bar.close()
                where = self.ckpt_root if (self.ckpt_root / "latest.json").exists() else "none yet"
                raise NonFiniteLossError(
                    f"loss became {loss.item()} at step {step}; training stopped without saving "
                    f"this state. Last good checkpoint: {where}. Lower optim.lr or check the data.")
            self.optimizer.zero_grad(set_to_none=True)
            objective.backward()
            gnorm = torch.nn.utils.clip_grad_norm_(
                self.model.parameters(), self.optim_cfg.grad_clip if self.optim_cfg.grad_clip > 0
                else float("inf"))
            self.optimizer.step()
            self._update_ema()
            self.step += 1
            bar.update(1)
            rec = {"step": self.step, "loss": loss.item(), "lr": lr, "grad_norm": float(gnorm)}
            self.history.append(rec)
            if self.dist.is_main and (self.step % self.loop.log_every == 0 or self.step == end):
                bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{lr:.2e}")
                self.writer.add_scalar("train/loss", rec["loss"], self.step)
                self.writer.add_scalar("train/lr", lr, self.step)
                self.writer.add_scalar("train/grad_norm", rec["grad_norm"], self.step)
            if self.loop.ckpt_every and self.step % self.loop.ckpt_every == 0:
                self.save()
            if (self.on_sample and self.dist.is_main and self.loop.sample_every
                    and self.step % self.loop.sample_every == 0):
                self.on_sample(self, self.step)
        bar.close()
        self.save()
        if self._writer is not None:
            self._writer.flush()
        return {"steps": self.step, "final_loss": self.history[-1]["loss"] if self.history else None}

    def close(self) -> None:
        """Close the TensorBoard writer."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
