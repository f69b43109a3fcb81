"""EOT copies of one batch split across ranks (torchrun, gloo on CPU) give the one-process gradient and,
in `ssni evaluate` with eot_across_ranks, the one-process per-sample results.

Run as a script, this file is the worker that torchrun starts:
    python -m torch.distributed.run --nproc_per_node 2 tests/test_distributed_eot.py OUT_DIR
"""
from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from ssni.attacks import LOSSES, EOTGradient
from ssni.seeding import draw_seeds, seeded
from ssni.training.dist import DistContext

sys.path.insert(0, str(Path(__file__).parent))  # the worker imports the tiny evaluation of test_distributed
from test_distributed import _eval_config, _results, eval_setup, launch_and_wait  # noqa: E402,F401  (eval_setup: a fixture)

# (samples, max_batch, selective) with 4 samples per batch: several rounds of 2 copies per call and
# rank; one copy (rank 1 has none); every copy in one round; selective EOT
CASES = [(5, 8, False), (1, 4096, False), (6, 4096, False), (5, 8, True)]
EOT_ATTACKS = [{"name": "pgd", "attack": "pgd", "eot": 1, "view": "full",
                "kwargs": {"eps": 0.1, "steps": 1, "step_size": 0.05}},
               {"name": "pgd-eot", "attack": "pgd", "eot": 3, "view": "full",
                "kwargs": {"eps": 0.1, "steps": 2, "step_size": 0.05}},
               {"name": "sel", "attack": "pgd", "eot": 2, "selective": True, "view": "full",
                "kwargs": {"eps": 0.1, "steps": 1, "step_size": 0.05}}]


class SeededNoise(nn.Module):
    """A linear classifier on x plus Gaussian noise drawn per row from seeds [B] (or the global RNG)."""

    def __init__(self):
        super().__init__()
        with seeded(1):
            self.net = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor, seeds: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B,3] of x [B,1,4,4] with row i's noise from seeds[i]."""
        seeds = draw_seeds(x.shape[0]) if seeds is None else seeds
        noise = torch.stack([torch.randn(x.shape[1:], generator=torch.Generator().manual_seed(int(s)))
                             for s in seeds])
        return self.net((x + 0.5 * noise).flatten(1))


def _toy():
    g = torch.Generator().manual_seed(4)
    return torch.rand(4, 1, 4, 4, generator=g), torch.randint(0, 3, (4,), generator=g)


def _gradients(dist=None) -> list:
    """Every case's (loss [B], gradient [B,1,4,4], log-probabilities [B,3]), and a dropout model's."""
    x, y = _toy()
    out = []
    for i, (samples, max_batch, selective) in enumerate(CASES):
        torch.manual_seed(10 + i)
        out.append(EOTGradient(samples, max_batch, selective=selective, dist=dist)(
            SeededNoise(), x, y, LOSSES.get("ce")))
    # a model drawing its own randomness (no seeds): the ranks must still agree and stay in step
    torch.manual_seed(20)
    with seeded(2):
        drop = nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(16, 3)).train()
    out.append(EOTGradient(4, 8, dist=dist)(drop, x, y, LOSSES.get("ce")))
    out.append(torch.rand(3))  # the global RNG after the oracle calls
    return out


def _worker(out: Path) -> None:
    from ssni.config import load_config
    from ssni.evaluate.runner import EvaluateConfig, Evaluation

    dist = DistContext.from_env("cpu")
    torch.save(_gradients(dist), out / f"grad-rank{dist.rank}.pt")
    exchanges = []  # rounds of copies this rank exchanged (0: the evaluation did not split the copies)
    split = EOTGradient._exchange

    def counted(self, *args):
        exchanges.append(1)
        return split(self, *args)

    EOTGradient._exchange = counted
    for _ in range(2):  # the second run resumes every batch of the first
        Evaluation(load_config(EvaluateConfig, out / "two.yaml", [])).run()
    (out / f"exchanges-rank{dist.rank}.json").write_text(json.dumps(len(exchanges)))
    dist.close()


# -- helpers of the tests ------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def launch(eval_setup, tmp_path_factory):  # noqa: F811
    """The one-process references, then one 2-process launch."""
    from ssni.evaluate.runner import Evaluation

    out = tmp_path_factory.mktemp("dist-eot")
    extra = {"attacks": EOT_ATTACKS, "sweep": {"attack": "pgd-eot", "defenses": ["ssni-n"], "eps": [0.05],
                                               "num_samples": 4}}
    Evaluation(_eval_config(eval_setup, out / "one", extra)).run()
    _eval_config(eval_setup, out / "two", {**extra, "eot_across_ranks": True})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
           "127.0.0.1", "--master_port", str(_free_port()), __file__, str(out)]
    proc = launch_and_wait(cmd, env, 150)
    return {"out": out, "proc": proc, "log": proc.stdout[-3000:] + proc.stderr[-3000:]}


def test_copy_seeds_do_not_depend_on_how_the_copies_are_chunked():
    x, y = _toy()
    got = []
    for max_batch in (4096, 4, 12):  # all copies in one call, one per call, three per call
        torch.manual_seed(3)
        got.append(EOTGradient(7, max_batch, selective=True)(SeededNoise(), x, y, LOSSES.get("ce")))
    for other in got[1:]:
        for a, b in zip(got[0], other):
            torch.testing.assert_close(a, b)
    torch.manual_seed(4)  # other seeds, another gradient: the comparison above can fail
    assert not torch.allclose(EOTGradient(7)(SeededNoise(), x, y, LOSSES.get("ce"))[1], got[0][1])
    # a one-process context is ignored
    torch.manual_seed(3)
    one = EOTGradient(7, selective=True, dist=DistContext())(SeededNoise(), x, y, LOSSES.get("ce"))
    torch.testing.assert_close(one[1], got[0][1])


def test_bad_dist_context_is_refused():
    class NoReduce:
        rank, world_size = 0, 2

    with pytest.raises(TypeError, match="all_reduce"):
        EOTGradient(4, dist=NoReduce())
    bad = DistContext(rank=2, world_size=2)
    with pytest.raises(ValueError, match="rank 2"):
        EOTGradient(4, dist=bad)


def test_two_process_eot_gradient_equals_one_process(launch):
    out = launch["out"]
    assert (out / "grad-rank1.pt").is_file(), launch["log"]
    ranks = [torch.load(out / f"grad-rank{r}.pt") for r in range(2)]
    ref = _gradients()
    for i in range(len(CASES)):
        for got, want in zip(ranks[0][i], ref[i]):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for i in range(len(ref)):  # every rank holds the same answer, bit for bit, and the same global RNG
        for a, b in zip(ranks[0][i], ranks[1][i]):
            assert torch.equal(a, b), i


def test_two_process_evaluation_with_eot_across_ranks_equals_one_process(launch):
    out, proc = launch["out"], launch["proc"]
    assert proc.returncode == 0, launch["log"]
    assert _results(out / "two") == _results(out / "one")
    files = sorted(p.relative_to(out / "one" / "state") for p in (out / "one" / "state").rglob("batch_*.json"))
    assert files == sorted(p.relative_to(out / "two" / "state") for p in (out / "two" / "state").rglob("batch_*.json"))
    # EOT cells ran every batch on both ranks, copies split, one round per step: pgd-eot (2 steps) on
    # 4 batches x 2 defenses + 2 sweep batches, 20; sel (1 step) on 4 batches x 2 defenses, 8
    assert [json.loads((out / f"exchanges-rank{r}.json").read_text()) for r in range(2)] == [28, 28]
    # the second run resumed every batch (the main rank's for EOT cells, each rank's own otherwise)
    assert f"reused {len(files)} finished batches" in proc.stdout, launch["log"]


if __name__ == "__main__":
    torch.set_num_threads(1)
    _worker(Path(sys.argv[1]))
