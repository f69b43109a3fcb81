"""evaluate/jobs.py: the keyed, resumable batch store and runner under `ssni evaluate` and the reweight fit."""
import pytest
import torch

from ssni.dist import DistContext, owner
from ssni.evaluate.jobs import BatchRunner, BatchStore, batches
from ssni.evaluate.state import StaleStateError


def _square(calls):
    def compute(b):
        calls.append(b.index)
        return {"y": torch.arange(b.start, b.stop, dtype=torch.float32) ** 2}
    return compute


def test_batches_cover_every_sample_once_in_order():
    got = batches(10, 4)
    assert [(b.index, b.start, b.size) for b in got] == [(0, 0, 4), (1, 4, 4), (2, 8, 2)]
    assert batches(0, 4) == []
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        batches(3, 0)
    assert [owner(j, 3) for j in range(7)] == [0, 1, 2, 0, 1, 2, 0]


def test_a_stopped_job_resumes_from_its_last_saved_batch(tmp_path):
    calls = []
    store = BatchStore(tmp_path, {"config": "a"})
    with pytest.raises(KeyboardInterrupt):
        BatchRunner(store, DistContext(), stop_after=2).run("set", 10, 4, _square(calls))
    assert calls == [0, 1]
    again = BatchStore(tmp_path, {"config": "a"})
    parts = BatchRunner(again, DistContext()).run("set", 10, 4, _square(calls))
    assert calls == [0, 1, 2] and again.reused == 2 and again.computed == 1  # only the missing batch ran
    assert torch.equal(torch.cat([p["y"] for p in parts]), torch.arange(10, dtype=torch.float32) ** 2)
    assert sorted(f.name for f in (tmp_path / "set").iterdir()) == [f"batch_0000{i}.safetensors" for i in range(3)]


def test_json_results_round_trip_and_another_global_key_is_refused(tmp_path):
    store = BatchStore(tmp_path, {"config": "a", "data": "x"})
    BatchRunner(store, DistContext()).run("cell/one", 3, 2, lambda b: {"correct": [[True]] * b.size})
    assert BatchStore(tmp_path, {"config": "a", "data": "x"}).get("cell/one", 1) == {"correct": [[True]]}
    with pytest.raises(StaleStateError, match=r"changed: data\)"):
        BatchStore(tmp_path, {"config": "a", "data": "y"})


def test_a_job_bound_to_another_key_recomputes_and_drops_the_old_results(tmp_path):
    calls = []
    store = BatchStore(tmp_path)
    with pytest.raises(KeyError, match="bind"):  # no global key: every job needs its own
        store.get("set", 0)
    store.bind("set", "k1")
    BatchRunner(store, DistContext()).run("set", 4, 2, _square(calls))
    store.bind("set", "k1")  # the same inputs: reused
    BatchRunner(store, DistContext()).run("set", 4, 2, _square(calls))
    assert calls == [0, 1]
    store.bind("set", "k2")  # other inputs (e.g. another curve attacked): computed again, k1's files removed
    BatchRunner(store, DistContext()).run("set", 4, 2, _square(calls))
    assert calls == [0, 1, 0, 1]
    assert [p.name for p in (tmp_path / "set").iterdir()] == ["k2"]
