"""tools/study_state.py: a real evaluation's finished batches carried to a fresh machine and resumed there."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import load_tool
from test_evaluate_plus import STEP, _config, tiny_setup  # noqa: F401  (the module fixture)

from ssni.evaluate.runner import Evaluation
from ssni.evaluate.state import StaleStateError
from ssni.io import atomic_save_safetensors, load_safetensors

REPO = Path(__file__).resolve().parents[1]
ATTACKS = [{"name": "pgd", "attack": "pgd", "eot": 2, "kwargs": STEP}]


def _tool():
    return load_tool("study_state")


def test_saved_batches_resume_on_a_fresh_machine_and_only_with_the_same_inputs(tiny_setup, tmp_path):  # noqa: F811
    runs, snap = tmp_path / "runs", tmp_path / "snapshot"
    (runs / "reweight").mkdir(parents=True)
    (runs / "reweight" / "reweight.json").write_text('{"name": "learned"}\n')
    with pytest.raises(KeyboardInterrupt):  # a session ends after 4 batches
        Evaluation(_config(tiny_setup, runs / "eval", attacks=ATTACKS, save_adversarial=True),
                   stop_after_batches=4).run()
    assert _tool().main(["save", "--runs", str(runs), "--into", str(snap)]) == 0
    saved = sorted(p.relative_to(snap).as_posix() for p in snap.rglob("*") if p.is_file())
    assert sum("/state/" in s and "/batch_" in s for s in saved) == 4 and "eval/state/fingerprint.json" in saved
    assert "reweight/reweight.json" in saved
    # of the adversarial images, the first batch of each attacked cell (the stop came after none/pgd's 2 batches)
    assert [s for s in saved if "/adv/" in s] == [
        p.relative_to(runs).as_posix() for p in sorted(runs.glob("eval/adv/*/*/batch_00000.safetensors"))]
    assert [s.split("/")[2] for s in saved if "/adv/" in s] == ["none_pgd"]
    # saving again adds nothing and changes nothing
    assert _tool().main(["save", "--runs", str(runs), "--into", str(snap)]) == 0
    assert sorted(p.relative_to(snap).as_posix() for p in snap.rglob("*") if p.is_file()) == saved

    # the machine is replaced: a fresh run dir, the snapshot restored, the evaluation resumed
    fresh = tmp_path / "fresh"
    assert _tool().main(["restore", "--runs", str(fresh), "--into", str(snap)]) == 0
    assert (fresh / "reweight" / "reweight.json").read_text() == '{"name": "learned"}\n'
    resumed = Evaluation(_config(tiny_setup, fresh / "eval", attacks=ATTACKS, save_adversarial=True)).run()
    assert resumed["reused_batches"] == 4 and resumed["computed_batches"] == 4  # 2 defenses x 2 cells x 2 batches
    (tmp_path / "whole").mkdir()
    whole = Evaluation(_config(tiny_setup, tmp_path / "whole" / "eval", attacks=ATTACKS)).run()
    # the same per-image results as an evaluation that ran in one piece
    per_sample = [json.loads(Path(r["results"]).read_text())["per_sample"] for r in (resumed, whole)]
    assert per_sample[0] == per_sample[1] and per_sample[0]
    # the carried images of batch 0 are found by their batch; batch 1 of none/pgd was computed on the
    # first machine and not carried, so it is absent rather than mistaken for another batch
    from ssni.evaluate import saved_adversarial
    first = load_safetensors(next(runs.glob("eval/adv/none_pgd/*/batch_00000.safetensors")))
    assert torch.equal(saved_adversarial(fresh / "eval", "none/pgd", batch=0)[0]["x_adv"], first["x_adv"])
    assert saved_adversarial(fresh / "eval", "none/pgd", batch=1) == []
    assert len(saved_adversarial(fresh / "eval", "dbp/pgd")) == 2  # computed on the new machine

    # restored onto networks that came out differently: the evaluation's own key refuses the batches
    other = tmp_path / "other_setup"
    shutil.copytree(tiny_setup, other)
    w = load_safetensors(other / "clf" / "model.safetensors")
    name = next(k for k, v in w.items() if v.is_floating_point() and k.endswith("weight"))
    w[name] = w[name] + 1e-3
    atomic_save_safetensors(other / "clf" / "model.safetensors", w)
    elsewhere = tmp_path / "elsewhere"
    assert _tool().main(["restore", "--runs", str(elsewhere), "--into", str(snap)]) == 0
    with pytest.raises(StaleStateError, match="classifier"):
        Evaluation(_config(other, elsewhere / "eval", attacks=ATTACKS)).run()


def _state(runs, batches, fingerprint="a"):
    """A hand-made evaluation state: {relative path under state/: batch dict}."""
    state = runs / "eval" / "state"
    state.mkdir(parents=True, exist_ok=True)
    (state / "fingerprint.json").write_text(json.dumps({"fingerprint": fingerprint}))
    for rel, data in batches.items():
        (state / rel).parent.mkdir(parents=True, exist_ok=True)
        (state / rel).write_text(json.dumps(data))
    return state


def test_a_file_with_other_content_is_never_overwritten(tmp_path, capsys):
    runs, snap = tmp_path / "runs", tmp_path / "snapshot"
    state = _state(runs, {"dbp_pgd/k1/batch_00000.json": {"correct": [[True]], "seconds": 90.0}})
    assert _tool().main(["save", "--runs", str(runs), "--into", str(snap)]) == 0
    # the same batch computed again from the same inputs: only its wall time differs, not a clash
    _state(runs, {"dbp_pgd/k1/batch_00000.json": {"correct": [[True]], "seconds": 95.5}})
    assert _tool().main(["save", "--runs", str(runs), "--into", str(snap)]) == 0
    # another machine computed the batch from other inputs
    _state(runs, {"dbp_pgd/k1/batch_00000.json": {"correct": [[False]], "seconds": 90.0},
                  "dbp_pgd/k1/batch_00001.json": {"correct": [[True]], "seconds": 90.0}})
    assert _tool().main(["save", "--runs", str(runs), "--into", str(snap)]) == 1
    err = capsys.readouterr().err
    assert "eval/state/dbp_pgd/k1/batch_00000.json" in err and "Nothing was copied" in err
    assert json.loads((snap / "eval/state/dbp_pgd/k1/batch_00000.json").read_text())["correct"] == [[True]]
    assert not (snap / "eval/state/dbp_pgd/k1/batch_00001.json").exists()
    # restoring the snapshot over that state: refused as a whole, even the file only the snapshot has
    (snap / "eval/state/dbp_pgd/k1/batch_00002.json").write_text('{"correct": [[true]]}')
    assert _tool().main(["restore", "--runs", str(runs), "--into", str(snap)]) == 1
    assert json.loads((state / "dbp_pgd/k1/batch_00000.json").read_text())["correct"] == [[False]]
    assert not (state / "dbp_pgd/k1/batch_00002.json").exists()
    assert not list(runs.rglob("*.tmp")) and not list(snap.rglob("*.tmp"))


def test_images_written_before_their_batch_are_not_carried_and_status_counts(tmp_path, capsys):
    runs, snap = tmp_path / "runs", tmp_path / "snapshot"
    _state(runs, {"dbp_pgd/k1/batch_00000.json": {"correct": [[True]]}})
    for cell in ("dbp_pgd", "dbp_apgd"):  # dbp_apgd: killed between its images and its results
        adv = runs / "eval" / "adv" / cell / "k1"
        adv.mkdir(parents=True)
        atomic_save_safetensors(adv / "batch_00000.safetensors", {"x_adv": torch.zeros(1, 1, 2, 2)})
    assert _tool().main(["save", "--runs", str(runs), "--into", str(snap)]) == 0
    assert (snap / "eval/adv/dbp_pgd/k1/batch_00000.safetensors").is_file()
    assert not (snap / "eval/adv/dbp_apgd").exists()
    capsys.readouterr()
    _state(runs, {"dbp_pgd/k1/batch_00001.json": {"correct": [[True]]}})
    assert _tool().main(["status", "--runs", str(runs), "--into", str(snap)]) == 0
    assert capsys.readouterr().out == f"eval: 2 batch(es) in {runs}, 1 in {snap}\n"
    # nothing to save where there is no evaluation state: an error, not "saved 0 files"
    assert _tool().main(["save", "--runs", str(tmp_path / "elsewhere"), "--into", str(snap)]) == 1
    assert "no evaluation state" in capsys.readouterr().err


def test_a_finished_training_carries_its_ema_weights_and_is_not_redone_on_a_fresh_machine(tmp_path, capsys):
    from ssni.cli import main
    from ssni.models import load_network

    runs, snap, fresh = tmp_path / "runs", tmp_path / "snapshot", tmp_path / "fresh"
    _state(runs, {"dbp_pgd/k1/batch_00000.json": {"correct": [[True]]}})
    args = ["train-score", str(REPO / "recipes/score/digits.yaml"), "model.name=unet_tiny", "data.image_size=8",
            "loop.steps=4", "loop.ckpt_every=2", "loop.batch_size=8", "loop.device=cpu", "loop.progress=false",
            "eval_draws=1", "sample_count=2", "sample_steps=2"]
    # a training in flight (no summary.json yet) is not carried: its checkpoints are not final
    assert main(args + [f"run_dir={runs / 'score'}", "loop.steps=2"]) == 0
    (runs / "score" / "summary.json").unlink()
    assert _tool().main(["save", "--runs", str(runs), "--into", str(snap)]) == 0
    assert not (snap / "score").exists()
    assert main(args + [f"run_dir={runs / 'score'}"]) == 0
    assert _tool().main(["save", "--runs", str(runs), "--into", str(snap)]) == 0
    carried = sorted(p.name for p in (snap / "score").rglob("*") if p.is_file())
    assert carried == ["config.yaml", "ema.safetensors", "model.json", "samples.png", "summary.json"]
    assert (snap / "score" / "ema.safetensors").read_bytes() == (
        runs / "score" / "checkpoints" / "step_00000004" / "ema.safetensors").read_bytes()  # the final step's

    assert _tool().main(["restore", "--runs", str(fresh), "--into", str(snap)]) == 0
    capsys.readouterr()
    assert main(args + [f"run_dir={fresh / 'score'}"]) == 0  # finds the finished run: nothing trained
    assert "already holds a finished run of 4 steps" in capsys.readouterr().out
    assert not (fresh / "score" / "checkpoints").exists()
    # what the study loads from the run dir (weights=auto: the EMA) is the same network
    a, b = (load_network(r / "score", kind="score").state_dict() for r in (runs, fresh))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):  # the raw weights were not carried
        load_network(fresh / "score", kind="score", weights="model")
    # saving from the restored machine finds the same files: nothing new, no clash
    assert _tool().main(["save", "--runs", str(fresh), "--into", str(snap)]) == 0
    assert "saved 0 new file(s)" in capsys.readouterr().out
