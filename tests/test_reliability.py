"""Reproducible runs that never get stuck and never report stale results.

- the same `ssni train-score` command, in two fresh processes, gives bit-identical weights;
- a checkpoint save interrupted at any step of its publish sequence resumes to the weights of an
  uninterrupted run (never stuck, never silently back to step 0);
- an evaluation whose classifier file changed refuses its old state instead of reusing it.
"""
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml

import ssni.checkpoint as ckpt
from ssni.checkpoint import CheckpointError, latest_checkpoint, save_checkpoint
from ssni.data import TensorImageDataset
from ssni.io import atomic_save_safetensors, atomic_write_json, load_safetensors
from ssni.models import classifier_spec, create_classifier, create_model, model_spec, save_model
from ssni.scoring import ScoreNormConfig, calibrate
from ssni.seeding import seeded
from ssni.training import DSMLoss, LoopConfig, OptimConfig, Trainer

REPO = Path(__file__).resolve().parents[1]


def _weights(run: Path, name: str = "model"):
    return load_safetensors(latest_checkpoint(run / "checkpoints") / f"{name}.safetensors")


def _same(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- 1. same command, same weights --------------------------------------------------------------
def test_two_fresh_processes_of_the_same_command_give_identical_weights(tmp_path):
    runs = []
    for name in ("a", "b"):
        run = tmp_path / name
        cmd = [sys.executable, "-m", "ssni.cli", "train-score", str(REPO / "recipes/score/digits.yaml"),
               f"run_dir={run}", "model.name=unet_tiny", "data.image_size=8", "loop.steps=3",
               "loop.batch_size=8", "loop.ckpt_every=0", "loop.device=cpu", "loop.progress=false",
               "eval_draws=1", "sample_count=2", "sample_steps=2"]
        # nothing seeds these processes but the recipe
        env = {k: v for k, v in os.environ.items() if k != "PYTHONHASHSEED"}
        subprocess.run(cmd, check=True, capture_output=True, env=env, cwd=tmp_path)
        runs.append(run)
    for w in ("model", "ema"):
        assert _same(_weights(runs[0], w), _weights(runs[1], w)), w


def test_seeded_block_fixes_initial_weights_and_restores_the_callers_rng():
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    with seeded(7):
        a = create_model("unet_tiny").state_dict()
    assert torch.equal(torch.random.get_rng_state(), before)
    with seeded(7):
        b = create_model("unet_tiny").state_dict()
    assert _same(a, b)


# -- 2. a checkpoint save killed at any step of the publish sequence --------------------------------
def _data():
    g = torch.Generator().manual_seed(0)
    return TensorImageDataset(torch.rand(32, 1, 8, 8, generator=g), torch.zeros(32, dtype=torch.long), 1)


def _trainer(run: Path, steps: int = 6, ckpt_every: int = 3, keep: int = 1) -> Trainer:
    with seeded(0):
        model = create_model("unet_tiny")
    loop = LoopConfig(steps=steps, batch_size=8, seed=3, ema_decay=0.9, ckpt_every=ckpt_every,
                      log_every=100, progress=False, device="cpu", keep_checkpoints=keep)
    return Trainer(model, DSMLoss(), _data(), loop, OptimConfig(lr=2e-3, warmup_steps=2), run,
                   model_spec(model))


class Killed(BaseException):
    """Stands for SIGKILL: nothing catches it."""


PRIMITIVES = ["atomic_save_safetensors", "atomic_torch_save", "atomic_write_json", "fsync_dir",
              "rmtree", "rename"]


def _counting(monkeypatch, kill_at=None):
    """Wrap the publish primitives of ssni.checkpoint; raise Killed at call (name, k)."""
    calls = {n: 0 for n in PRIMITIVES}
    targets = {"rmtree": (ckpt.shutil, "rmtree"), "rename": (ckpt.os, "rename")}
    for name in PRIMITIVES:
        owner, attr = targets.get(name, (ckpt, name))
        real = getattr(owner, attr)

        def wrapped(*a, _real=real, _name=name, **kw):
            calls[_name] += 1
            if kill_at == (_name, calls[_name]):
                raise Killed(f"killed at {_name} #{calls[_name]}")
            return _real(*a, **kw)

        monkeypatch.setattr(owner, attr, wrapped)
    return calls


def test_a_save_killed_at_every_step_of_publishing_resumes_to_the_same_weights(tmp_path, monkeypatch):
    # steps is a multiple of ckpt_every (as in the shipped recipes): the final step is reached by
    # the periodic save and again by the closing save
    ref_run = tmp_path / "ref"
    with monkeypatch.context() as m:
        counts = _counting(m)
        _trainer(ref_run).fit()
    ref = {w: _weights(ref_run, w) for w in ("model", "ema")}
    cases = [(n, k) for n in PRIMITIVES for k in range(1, counts[n] + 1)]
    assert len(cases) >= 15
    for name, k in cases:
        run = tmp_path / f"{name}_{k}"
        with monkeypatch.context() as m:
            _counting(m, kill_at=(name, k))
            with pytest.raises(Killed):
                _trainer(run).fit()
        done = [int(d.name[5:]) for d in (run / "checkpoints").glob("step_*")
                if all((d / f).is_file() for f in ("model.safetensors", "model.json", "state.json"))]
        rerun = _trainer(run)  # the rerun: same command, same run directory
        rerun.try_resume()
        assert rerun.step == max(done, default=0), (name, k)  # from the newest complete one, not 0
        out = rerun.fit()
        assert out["steps"] == 6, (name, k)
        for w in ("model", "ema"):
            assert _same(_weights(run, w), ref[w]), (name, k, w)
        # nothing the killed run left stays behind: temp dirs and files, half-pruned or unfinished steps
        root = run / "checkpoints"
        left = [p.name for p in root.iterdir() if p.name.startswith(".")]
        left += [p.name for p in root.glob("step_*") if not (p / "optimizer.pt").is_file()]
        assert not left, (name, k, left)


def test_the_final_step_is_not_published_twice(tmp_path, monkeypatch):
    with monkeypatch.context() as m:
        calls = _counting(m)
        _trainer(tmp_path / "r", steps=6, ckpt_every=3).fit()
    # publishing steps 3 and 6, and moving step 3 aside to prune it; the closing save finds step 6 published
    assert calls["rename"] == 3


def test_stale_temporary_dirs_of_dead_processes_are_removed(tmp_path):
    root = tmp_path / "checkpoints"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    stale = root / f".tmp_step_00000003_{dead}"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"partial")
    model = create_model("unet_tiny")
    save_checkpoint(root, 1, model, None, None, model_spec(model))
    assert not stale.exists()


def test_unreadable_latest_falls_back_to_the_newest_complete_checkpoint_and_says_so(tmp_path):
    root = tmp_path / "checkpoints"
    model = create_model("unet_tiny")
    for step in (1, 2):
        save_checkpoint(root, step, model, None, None, model_spec(model), keep=3)
    (root / "latest.json").write_text('{"step": 2, "di')  # torn write
    with pytest.warns(UserWarning, match="newest complete checkpoint step_00000002"):
        assert latest_checkpoint(root).name == "step_00000002"
    atomic_write_json(root / "latest.json", {"step": 3, "dir": "step_00000003"})
    with pytest.warns(UserWarning, match="step_00000003, which is missing"):
        assert latest_checkpoint(root).name == "step_00000002"


def test_checkpoints_with_none_complete_are_an_error_not_a_fresh_start(tmp_path):
    root = tmp_path / "checkpoints"
    (root / "step_00000005").mkdir(parents=True)
    atomic_write_json(root / "latest.json", {"step": 5, "dir": "step_00000005"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(CheckpointError, match="no complete"):
            latest_checkpoint(root)


def test_published_files_are_readable_by_the_group_like_ordinary_files(tmp_path):
    model = create_model("unet_tiny")
    final = save_checkpoint(tmp_path / "checkpoints", 1, model, None, None, model_spec(model))
    umask = os.umask(0)
    os.umask(umask)
    for f in final.iterdir():
        assert f.stat().st_mode & 0o777 == 0o666 & ~umask, f


# -- 3. an evaluation never reuses results made from other weights ------------------------------
def _eval_setup(root: Path):
    with seeded(0):
        sm = create_model("unet_tiny")
    save_model(root / "score", sm)
    from ssni.data import DataConfig, build_dataset

    train = build_dataset(DataConfig(image_size=8), "train")
    cal, _ = calibrate(sm.eval(), train.images[:16], ScoreNormConfig(timesteps=2), batch_size=16)
    cal.save(root / "calibration.json")


def _save_classifier(root: Path, seed: int):
    with seeded(seed):
        clf = create_classifier("resnet10t", in_chans=1, num_classes=10, image_size=8)
    atomic_save_safetensors(root / "clf" / "model.safetensors", clf.state_dict())
    atomic_write_json(root / "clf" / "model.json", classifier_spec(clf))


def test_a_changed_classifier_file_makes_evaluate_refuse_its_old_state(tmp_path, capsys):
    from ssni.cli import main

    _eval_setup(tmp_path)
    _save_classifier(tmp_path, seed=1)
    recipe = tmp_path / "eval.yaml"
    recipe.write_text(yaml.safe_dump({
        "run_dir": str(tmp_path / "run"), "data": {"name": "digits", "image_size": 8},
        "num_samples": 4, "batch_size": 4, "draws": 1, "progress": False, "device": "cpu",
        "defense": {"score_model": str(tmp_path / "score"), "calibration": str(tmp_path / "calibration.json"),
                    "score_norm": {"timesteps": 2}, "purifier": {"sampler": "ddpm", "steps": 1},
                    "reweight": {"name": "constant"},
                    "classifier": {"checkpoint": str(tmp_path / "clf")}, "mean": [0.0], "std": [1.0],
                    "device": "cpu"},
        "defenses": [{"name": "dbp", "reweight": {"name": "constant", "kwargs": {"t_base": 0.02}}}],
        "attacks": [{"name": "pgd", "attack": "pgd", "view": "bare",
                     "kwargs": {"eps": 0.05, "steps": 1, "step_size": 0.05}}]}))
    assert main(["evaluate", str(recipe)]) == 0
    assert main(["evaluate", str(recipe)]) == 0  # unchanged: reuses, and says so
    assert "reused 2 finished batches" in capsys.readouterr().out
    _save_classifier(tmp_path, seed=2)  # new weights at the same path
    assert main(["evaluate", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "changed: classifier" in err and "refusing to reuse" in err
    rows = json.loads((tmp_path / "run" / "results.json").read_text())["rows"]
    assert rows  # the old results are still there, untouched


# -- 4. a run directory holds one config ----------------------------------------------------------
def test_a_run_dir_of_another_config_is_refused_not_resumed(tmp_path):
    from ssni.cli import main

    run = tmp_path / "score"
    args = ["train-score", str(REPO / "recipes/score/digits.yaml"), f"run_dir={run}", "model.name=unet_tiny",
            "data.image_size=8", "loop.steps=2", "loop.batch_size=8", "loop.device=cpu", "loop.progress=false",
            "eval_draws=1", "sample_count=2", "sample_steps=2"]
    assert main(args) == 0
    before = _weights(run)
    # another training set in the same run dir: resuming its checkpoints would mix the two runs
    assert main(args + ["data.reserve=100"]) == 2
    assert _same(_weights(run), before)
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["reserve"] == 384  # the recipe's, kept
    # more steps of the same run: resumes
    assert main(args + ["loop.steps=3"]) == 0
    assert json.loads((run / "checkpoints" / "latest.json").read_text())["step"] == 3


# -- 5. damaged runs: incomplete checkpoints, what killed runs left ----------------------------------
@pytest.mark.parametrize("lost", ["optimizer.pt", "ema.safetensors"])
def test_a_checkpoint_that_lost_a_file_is_skipped_with_a_message(tmp_path, lost):
    ref = _trainer(tmp_path / "ref", steps=6, ckpt_every=2, keep=2)
    ref.fit()
    run = tmp_path / "run"
    _trainer(run, steps=6, ckpt_every=2, keep=2).fit(stop_at=4)  # step_2 and step_4 kept
    (run / "checkpoints" / "step_00000004" / lost).unlink()
    rerun = _trainer(run, steps=6, ckpt_every=2, keep=2)
    with pytest.warns(UserWarning, match=f"step_00000004, which lacks {lost}; resuming from the newest complete "
                                         "checkpoint step_00000002"):
        rerun.fit()
    for w in ("model", "ema"):  # as if never damaged: the steps after step 2 ran again
        assert _same(_weights(run, w), _weights(tmp_path / "ref", w)), w


def test_resume_false_into_a_run_with_checkpoints_is_refused(tmp_path):
    run = tmp_path / "run"
    _trainer(run, steps=2, ckpt_every=1).fit()
    trainer = _trainer(run, steps=2, ckpt_every=1)
    trainer.loop.resume = False
    with pytest.raises(ValueError, match="holds checkpoints of an earlier run; with loop.resume=false"):
        Trainer(trainer.model, DSMLoss(), _data(), trainer.loop, trainer.optim_cfg, run, {})


def _left_by_killed_writers(paths, monkeypatch) -> None:
    """The temp files atomic writes of `paths` leave when their process is killed before the rename."""
    import ssni.io

    p = subprocess.Popen(["true"])
    p.wait()  # its pid: a process that no longer runs
    with monkeypatch.context() as m:
        m.setattr(ssni.io.os, "getpid", lambda: p.pid)
        m.setattr(ssni.io.os, "replace", lambda src, dst: None)  # killed just before the rename
        for path in paths:
            ssni.io.atomic_write_bytes(path, b"half")


def test_a_rerun_removes_what_killed_runs_left(tmp_path, monkeypatch):
    run = tmp_path / "run"
    _trainer(run, steps=2, ckpt_every=1, keep=2).fit()
    _left_by_killed_writers([run / "samples.png", run / "summary.json", run / "checkpoints" / "latest.json"],
                            monkeypatch)
    (run / "checkpoints" / "step_00000001" / "model.safetensors").unlink()  # a prune killed half-way
    assert len(list(run.rglob(".*.tmp"))) == 3
    _trainer(run, steps=4, ckpt_every=1, keep=2).fit()  # the rerun
    assert not list(run.rglob(".*.tmp")) and not list(run.rglob(".tmp_step_*")) and not list(run.rglob(".old_*"))
    steps = sorted(p.name for p in (run / "checkpoints").glob("step_*"))
    assert steps == ["step_00000003", "step_00000004"], steps


# -- 6. the evaluation state is keyed on the images, not on settings that change no result -----------
def _image_folder(root: Path, seed: int) -> Path:
    """root/{train,test}/{a,b}/*.png: 8x8 grey images, 2 per class and split."""
    import numpy as np
    from PIL import Image

    rng = np.random.RandomState(seed)
    for split in ("train", "test"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(2):
                Image.fromarray(rng.randint(0, 256, (8, 8), dtype=np.uint8), "L").save(root / split / c / f"{i}.png")
    return root


def _folder_eval(tmp_path: Path) -> list:
    _eval_setup(tmp_path)
    _save_classifier(tmp_path, seed=1)
    (tmp_path / "defense.yaml").write_text(yaml.safe_dump({
        "score_model": str(tmp_path / "score"), "calibration": str(tmp_path / "calibration.json"),
        "score_norm": {"timesteps": 2}, "purifier": {"sampler": "ddpm", "steps": 1}, "reweight": {"name": "constant"},
        "classifier": {"checkpoint": str(tmp_path / "clf")}, "mean": [0.0], "std": [1.0]}))
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump({
        "data": {"name": "imagefolder", "root": str(tmp_path / "images"), "image_size": 8, "channels": 1},
        "num_samples": 4, "batch_size": 2, "draws": 1, "progress": False, "device": "cpu",
        "defense_recipe": str(tmp_path / "defense.yaml"),
        "defenses": [{"name": "dbp", "reweight": {"name": "constant", "kwargs": {"t_base": 0.02}}}]}))
    return ["evaluate", str(tmp_path / "eval.yaml"), f"run_dir={tmp_path / 'run'}"]


def test_replaced_test_images_are_not_reused(tmp_path, capsys):
    from ssni.cli import main

    _image_folder(tmp_path / "images", seed=0)
    argv = _folder_eval(tmp_path)
    assert main(argv) == 0
    _image_folder(tmp_path / "images", seed=1)  # the same file names, other pixels
    assert main(argv) == 2
    assert "changed: data" in capsys.readouterr().err


def test_settings_that_change_no_result_do_not_block_a_resume(tmp_path, capsys):
    from ssni.cli import main

    _image_folder(tmp_path / "images", seed=0)
    argv = _folder_eval(tmp_path)
    assert main(argv) == 0
    capsys.readouterr()
    spelt = tmp_path / "images" / ".." / "defense.yaml"  # the same file, spelt otherwise
    assert main(argv + ["progress=true", "device=auto", f"defense_recipe={spelt}"]) == 0
    assert "reused 2 finished batches" in capsys.readouterr().out
