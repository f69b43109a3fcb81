"""Bad input gets one clear line: from the library as an exception, from the CLI as
`ssni COMMAND: error: ...` on stderr with exit status 2 and no traceback (unless --debug)."""
import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from ssni.cli import error_line, main
from ssni.config import ConfigError, load_config
from ssni.evaluate.runner import EvaluateConfig, Evaluation
from ssni.images import ImageReadError, read_image
from ssni.io import UnsafeCheckpointError, atomic_save_safetensors, atomic_write_json, load_safetensors, safe_torch_load
from ssni.models import classifier_spec, create_classifier, create_model, save_model
from ssni.registry import UnknownNameError
from ssni.scoring import ScoreNormConfig, calibrate
from ssni.training import DSMLoss, LoopConfig, OptimConfig, Trainer

ROOT = Path(__file__).resolve().parents[1]
SCORE_RECIPE = str(ROOT / "recipes" / "score" / "digits.yaml")
PURIFY_RECIPE = str(ROOT / "recipes" / "purify" / "digits.yaml")
TINY_TRAIN = ["model.name=unet_tiny", "data.image_size=8", "sample_count=2", "sample_steps=2",
              "eval_draws=1", "loop.batch_size=8", "loop.device=cpu", "loop.progress=false"]


def cli_error(capsys, argv, *words):
    """Run the CLI, expect exit 2 and one `ssni CMD: error:` line holding every word; return it."""
    assert main(list(argv)) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    command = next(a for a in argv if not a.startswith("-"))
    assert len(lines) == 1, err
    assert lines[0].startswith(f"ssni {command}: error: "), err
    assert "Traceback" not in err
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def _write_yaml(path, data):
    path.write_text(yaml.safe_dump(data))
    return str(path)


# -- fixtures -------------------------------------------------------------------------------
@pytest.fixture
def score_ckpt(tmp_path):
    """A unet_tiny checkpoint directory (model.json + model.safetensors)."""
    torch.manual_seed(0)
    return save_model(tmp_path / "ckpt", create_model("unet_tiny"))


@pytest.fixture
def png_folder(tmp_path):
    """A folder with one readable 8x8 grayscale PNG."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.RandomState(0)
    Image.fromarray(rng.randint(0, 256, (8, 8), dtype=np.uint8), "L").save(folder / "a.png")
    return folder


@pytest.fixture(scope="module")
def score_run(tmp_path_factory):
    """A train-score run directory: unet_tiny trained 2 steps, one checkpoint."""
    run = tmp_path_factory.mktemp("train") / "score"
    assert main(["train-score", SCORE_RECIPE, f"run_dir={run}", "loop.steps=2", *TINY_TRAIN]) == 0
    return run


@pytest.fixture(scope="module")
def eval_setup(tmp_path_factory):
    """A unet_tiny score model, its calibration and a resnet10t classifier for 8x8 digits."""
    root = tmp_path_factory.mktemp("evalsetup")
    torch.manual_seed(0)
    sm = create_model("unet_tiny")
    save_model(root / "score", sm)
    x = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    cal, _ = calibrate(sm.eval(), x, ScoreNormConfig(timesteps=2), batch_size=16)
    cal.save(root / "calibration.json")
    clf = create_classifier("resnet10t", in_chans=1, num_classes=10, image_size=8)
    atomic_save_safetensors(root / "clf" / "model.safetensors", clf.state_dict())
    atomic_write_json(root / "clf" / "model.json", classifier_spec(clf))
    return root


def _eval_recipe(root, run_dir, **over):
    rec = {
        "run_dir": str(run_dir), "data": {"name": "digits", "image_size": 8},
        "num_samples": 4, "batch_size": 4, "draws": 1, "progress": False, "device": "cpu",
        "checks": False,
        "defense": {"score_model": str(root / "score"), "score_weights": "model",
                    "calibration": str(root / "calibration.json"), "score_norm": {"timesteps": 2},
                    "purifier": {"sampler": "ddpm", "steps": 1}, "reweight": {"name": "constant"},
                    "classifier": {"checkpoint": str(root / "clf"), "weights": "model"},
                    "mean": [0.0], "std": [1.0], "device": "cpu"},
        "defenses": [{"name": "none"},
                     {"name": "dbp", "reweight": {"name": "constant", "kwargs": {"t_base": 0.02}}}],
        "attacks": [{"name": "pgd", "attack": "pgd", "view": "full",
                     "kwargs": {"eps": 0.05, "steps": 1, "step_size": 0.05}}],
    }
    rec.update(over)
    return _write_yaml(Path(str(run_dir) + ".yaml"), rec)


# -- the CLI's error handling ---------------------------------------------------------------------
def test_debug_flag_anywhere_or_env_shows_the_traceback(tmp_path, capsys, monkeypatch):
    cli_error(capsys, ["train-score", "loop.steps=-5"], "loop.steps must be >= 1")
    for argv in (["--debug", "train-score", "loop.steps=-5"], ["train-score", "loop.steps=-5", "--debug"]):
        with pytest.raises(ConfigError, match="loop.steps"):
            main(argv)
    monkeypatch.setenv("SSNI_DEBUG", "1")
    with pytest.raises(ConfigError, match="loop.steps"):
        main(["train-score", "loop.steps=-5"])
    monkeypatch.setenv("SSNI_DEBUG", "0")
    cli_error(capsys, ["train-score", "loop.steps=-5"], "loop.steps")


def test_error_line_joins_a_multiline_message():
    assert error_line(RuntimeError("first\n\n  second\n")) == "first second"
    assert error_line(EOFError()) == "EOFError"
    long = error_line(ValueError("x" * 1000 + "\nmore"), limit=50)
    assert long.endswith("(run with --debug for the whole message)") and "\n" not in long


# -- 1. truncated safetensors ---------------------------------------------------------------------
def test_truncated_safetensors_checkpoint(tmp_path, score_ckpt, png_folder, capsys):
    weights = score_ckpt / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"model.safetensors is not a complete safetensors file.*truncated"):
        load_safetensors(weights)
    cli_error(capsys, ["purify", PURIFY_RECIPE, f"checkpoint={score_ckpt}", f"input={png_folder}",
                       f"output={tmp_path / 'out'}", "device=cpu", "progress=false"],
              str(weights), "not a complete safetensors file", "truncated")
    weights.write_bytes(b"")
    with pytest.raises(ValueError, match="not a complete safetensors file"):
        load_safetensors(weights)
    # a truncated torch file (optimizer state) likewise
    torch.save({"a": torch.ones(4)}, tmp_path / "opt.pt")
    blob = (tmp_path / "opt.pt").read_bytes()
    (tmp_path / "opt.pt").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ValueError, match=r"opt.pt is not a readable torch file.*truncated"):
        safe_torch_load(tmp_path / "opt.pt")


# -- 2. malformed YAML recipe -------------------------------------------------------------------
def test_malformed_yaml_recipe(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("loop:\n  steps: [1, 2\n  batch_size: 3\n")
    with pytest.raises(ConfigError, match=r"recipe .*bad.yaml is not valid YAML: .*line 3, column \d+"):
        load_config(LoopConfig, bad)
    line = cli_error(capsys, ["train-score", str(bad)], str(bad), "not valid YAML", "line 3")
    assert "expected ',' or ']'" in line
    cli_error(capsys, ["train-score", "loop.steps=[1,"], "override 'loop.steps=[1,'", "not valid YAML")
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"a: \xff\xfe\x00\n")
    cli_error(capsys, ["train-score", str(binary)], str(binary), "not a UTF-8 text file")


# -- 3. Python tags ---------------------------------------------------------------------------------
def test_python_tags_are_refused_in_one_line(tmp_path, capsys):
    evil = tmp_path / "evil.yaml"
    evil.write_text('run_dir: !!python/object/apply:os.system ["echo hi"]\n')
    with pytest.raises(ConfigError, match=r"Python tags are not allowed in recipes .*line 1, column 10"):
        load_config(LoopConfig, evil)
    cli_error(capsys, ["train-score", str(evil)], str(evil), "Python tags are not allowed in recipes",
              "!!python/object/apply:os.system")
    cli_error(capsys, ["train-score", 'run_dir=!!python/object/apply:os.system ["echo hi"]'],
              "override 'run_dir=", "Python tags are not allowed in recipes")
    # a plain value that YAML reads as a mapping or a boolean is not turned into a string
    with pytest.raises(ConfigError, match="run_dir: expected a string, got {'a': 'b'}"):
        load_config(EvaluateConfig, None, ["run_dir=a: b"])
    with pytest.raises(ConfigError, match="run_dir: expected a string, got True.*quote it"):
        load_config(EvaluateConfig, None, ["run_dir=yes"])


# -- 4. a non-image file named .png ------------------------------------------------------------------
def test_non_image_png_in_purify_folder(tmp_path, score_ckpt, png_folder, capsys):
    fake = png_folder / "fake.png"
    fake.write_text("not an image")
    with pytest.raises(ImageReadError, match="fake.png is not a readable image file"):
        read_image(fake, 1)
    cli_error(capsys, ["purify", PURIFY_RECIPE, f"checkpoint={score_ckpt}", f"input={png_folder}",
                       f"output={tmp_path / 'out'}", "device=cpu", "progress=false"],
              str(fake), "is not a readable image file")


# -- 5. batch_size 0 ------------------------------------------------------------------------------
def test_batch_size_zero_in_training_and_evaluation(tmp_path, tiny_images, capsys):
    for bs in (0, -3):
        with pytest.raises(ConfigError, match=f"loop.batch_size must be >= 1, got {bs}"):
            LoopConfig(batch_size=bs)
    loop = LoopConfig(steps=2, batch_size=8, device="cpu", progress=False)
    loop.batch_size = 0  # changed after it was made: the Trainer checks again
    x, y = tiny_images
    with pytest.raises(ConfigError, match="loop.batch_size must be >= 1, got 0"):
        Trainer(create_model("unet_tiny"), DSMLoss(), list(zip(x, y)), loop, OptimConfig(),
                tmp_path / "run", {})
    cli_error(capsys, ["train-score", f"run_dir={tmp_path / 's'}", "loop.batch_size=0", *TINY_TRAIN[:-4],
                       "loop.device=cpu"], "loop.batch_size must be >= 1, got 0")
    with pytest.raises(ConfigError, match="batch_size must be >= 1, got 0"):
        Evaluation(load_config(EvaluateConfig, None, ["batch_size=0"]))
    cli_error(capsys, ["evaluate", f"run_dir={tmp_path / 'e'}", "batch_size=0"],
              "batch_size must be >= 1, got 0")
    cli_error(capsys, ["evaluate", f"run_dir={tmp_path / 'e'}", "draws=0"], "draws must be >= 1")


# -- 6. resuming with another model -------------------------------------------------------------------
def test_resume_with_another_model_is_one_line(tmp_path, score_run, capsys):
    run = tmp_path / "run"
    shutil.copytree(score_run, run)
    argv = ["train-score", SCORE_RECIPE, f"run_dir={run}", "loop.steps=4", "model.kwargs.ch=8", *TINY_TRAIN]
    cli_error(capsys, argv, "holds a run made with another config (model.kwargs.ch: None -> 8)")
    (run / "config.yaml").unlink()  # no saved config: the checkpoint itself says so
    cli_error(capsys, argv, "holds weights of another network", "step_00000002")


# -- 7. dtypes and empty batches given to the wrapper ----------------------------------------------
def test_wrapper_refuses_int_float64_and_empty_batches():
    from ssni.defense import wrap_timm
    from ssni.models.analytic import GaussianScoreModel

    torch.manual_seed(0)
    wrapper = wrap_timm("resnet10t", score_model=create_model("unet_tiny"), reweight="constant",
                        reweight_kwargs={"t_base": 0.02}, purifier_config={"sampler": "ddpm", "steps": 1},
                        num_classes=3, input_size=8)
    x = torch.rand(2, 1, 8, 8)
    assert wrapper(x, seeds=torch.tensor([1, 2])).shape == (2, 3)
    with pytest.raises(ValueError, match=r"must be a floating-point tensor \[B, 1, 8, 8\] in \[0, 1\].*int64"):
        wrapper((x * 255).long())
    with pytest.raises(ValueError, match=r"images are torch.float64; expected torch.float32 .*x.to\(torch.float32\)"):
        wrapper(x.double())
    with pytest.raises(ValueError, match=r"non-empty batch \[B, 1, 8, 8\].*got shape \[0, 1, 8, 8\]"):
        wrapper(x[:0])
    # a float64 model takes float64 images as they are
    sm = GaussianScoreModel(mean=0.1, std=0.4, shape=(1, 8, 8))
    w64 = wrap_timm("resnet10t", score_model=sm, reweight="constant", reweight_kwargs={"t_base": 0.02},
                    purifier_config={"sampler": "ddpm", "steps": 1}, num_classes=3, input_size=8).double()
    out = w64(x.double(), seeds=torch.tensor([1, 2]))
    assert out.dtype == torch.float64 and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="images are torch.float32; expected torch.float64"):
        w64(x)


# -- 8. pickled checkpoint --------------------------------------------------------------------------
def test_pickled_optimizer_state_is_refused_in_one_line(tmp_path, score_run, capsys):
    run = tmp_path / "run"
    shutil.copytree(score_run, run)
    opt = run / "checkpoints" / "step_00000002" / "optimizer.pt"
    torch.save({"state": argparse.Namespace(cmd="echo hi")}, opt)
    with pytest.raises(UnsafeCheckpointError, match="refusing to load .*: it holds the Python object argparse.Namespace"):
        safe_torch_load(opt)
    cli_error(capsys, ["train-score", SCORE_RECIPE, f"run_dir={run}", "loop.steps=4", *TINY_TRAIN],
              f"refusing to load {opt}", "the Python object argparse.Namespace, not tensors")


# -- 9. t_base outside [0, 1] ------------------------------------------------------------------------
def test_reweight_t_base_outside_unit_interval(tmp_path, eval_setup, capsys):
    recipe = _eval_recipe(eval_setup, tmp_path / "ev", defenses=[
        {"name": "dbp", "reweight": {"name": "constant", "kwargs": {"t_base": 1.5}}}])
    cli_error(capsys, ["evaluate", recipe], "reweight t_base must be a noise level in [0, 1], got 1.5")


# -- 10. 16-bit and float images ----------------------------------------------------------------------
def test_16_bit_png_and_float_tiff_keep_their_values(tmp_path, score_ckpt, capsys):
    folder = tmp_path / "hi"
    folder.mkdir()
    a16 = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)  # up to 63000: not saturated
    Image.fromarray(a16).save(folder / "deep.png")
    with Image.open(folder / "deep.png") as im:
        assert im.mode == "I;16"
    with pytest.warns(UserWarning, match="16-bit"):
        t = read_image(folder / "deep.png", 1)
    assert t.shape == (1, 8, 8) and t.dtype == torch.float32
    np.testing.assert_allclose(t[0].numpy(), a16 / 65535.0, rtol=1e-6)
    assert 0 < float(t.max()) < 1 and float(t[0, 0, 1]) > 0
    with pytest.warns(UserWarning, match="16-bit"):
        rgb = read_image(folder / "deep.png", 3)
    assert rgb.shape == (3, 8, 8) and torch.equal(rgb[0], t[0]) and torch.equal(rgb[2], t[0])

    f = (np.arange(64, dtype=np.float32).reshape(8, 8) / 70.0)
    Image.fromarray(f).save(folder / "float.tif")
    tf = read_image(folder / "float.tif", 1)
    np.testing.assert_array_equal(tf[0].numpy(), f)
    Image.fromarray(f * 2).save(tmp_path / "over.tif")
    with pytest.raises(ImageReadError, match=r"over.tif: floating-point pixels in \[0, 1.8.*must hold values in \[0, 1\]"):
        read_image(tmp_path / "over.tif", 1)

    # `ssni purify` at t*=0 writes them back unchanged (up to 8-bit rounding)
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match="deep.png: uint16 image read as 16-bit"):
        assert main(["purify", PURIFY_RECIPE, f"checkpoint={score_ckpt}", f"input={folder}", f"output={out}",
                     "t_star=0", "device=cpu", "progress=false"]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 2
    np.testing.assert_array_equal(np.asarray(Image.open(out / "deep.png")), np.round(a16 / 65535.0 * 255))
    np.testing.assert_array_equal(np.asarray(Image.open(out / "float.png")), np.round(f * 255))


# -- 11. more samples than the split has -----------------------------------------------------------------
def test_num_samples_larger_than_the_split(tmp_path, eval_setup, capsys):
    recipe = _eval_recipe(eval_setup, tmp_path / "ev", num_samples=100000)
    with pytest.raises(ConfigError, match=r"num_samples=100000, but the 'test' split of 'digits' has 359 images"):
        Evaluation(load_config(EvaluateConfig, recipe))
    cli_error(capsys, ["evaluate", recipe], "num_samples=100000", "has 359 images")
    sweep = {"attack": "pgd", "defenses": ["dbp"], "eps": [0.1], "num_samples": 8}
    recipe = _eval_recipe(eval_setup, tmp_path / "sw", sweep=sweep)
    cli_error(capsys, ["evaluate", recipe], "sweep.num_samples must be in [1, num_samples=4], got 8")


# -- 12. loop settings that cannot work ----------------------------------------------------------------
def test_negative_loop_steps_and_intervals(tmp_path, capsys):
    run = tmp_path / "s"
    cli_error(capsys, ["train-score", SCORE_RECIPE, f"run_dir={run}", "loop.steps=-5", *TINY_TRAIN],
              "loop.steps must be >= 1, got -5")
    assert not (run / "checkpoints").exists()
    for key, msg in (("steps=0", "loop.steps must be >= 1"), ("ckpt_every=-1", "loop.ckpt_every must be >= 0"),
                     ("log_every=-1", "loop.log_every must be >= 1"), ("log_every=0", "loop.log_every must be >= 1"),
                     ("sample_every=-2", "loop.sample_every must be >= 0"),
                     ("keep_checkpoints=0", "loop.keep_checkpoints must be >= 1")):
        with pytest.raises(ConfigError, match=msg):
            load_config(LoopConfig, None, [key])
    with pytest.raises(ConfigError, match="optim.schedule='cosinus'; valid choices: constant, cosine"):
        OptimConfig(schedule="cosinus")
    cli_error(capsys, ["train-score", f"run_dir={run}", "loop.ckpt_every=-1"], "loop.ckpt_every must be >= 0")


# -- 13. attack names and views checked up front ----------------------------------------------------------
def test_unknown_attack_view_and_name_fail_before_any_work(tmp_path, eval_setup, capsys):
    # checked before anything is loaded: the default score model path need not exist
    cfg = load_config(EvaluateConfig, None, ["defenses=[{name: none}]",
                                             "attacks=[{name: a, attack: pgd, view: nonsense}]"])
    with pytest.raises(UnknownNameError, match=r"attacks\[0\] \('a'\): unknown attack view 'nonsense'; "
                                               r"valid choices: adaptive, bare, bpda, full"):
        Evaluation(cfg)
    cfg = load_config(EvaluateConfig, None, ["defenses=[{name: none}]", "attacks=[{name: a, attack: pgdd}]"])
    with pytest.raises(UnknownNameError, match="unknown attack 'pgdd'; valid choices: apgd, autoattack, lowfreq, "
                                               "lownoise, pgd, transfer"):
        Evaluation(cfg)
    recipe = _eval_recipe(eval_setup, tmp_path / "ev", defenses=[{"name": "none"}],
                          attacks=[{"name": "a", "attack": "pgd", "view": "nonsense"}])
    cli_error(capsys, ["evaluate", recipe], "unknown attack view 'nonsense'", "adaptive, bare, bpda, full")
    assert not (tmp_path / "ev" / "state").exists()
    # a misspelt attack setting fails when the evaluation is set up, not at its first batch
    recipe = _eval_recipe(eval_setup, tmp_path / "ev2", attacks=[
        {"name": "a", "attack": "pgd", "kwargs": {"eps": 0.05, "stepz": 2}}])
    cli_error(capsys, ["evaluate", recipe], "attacks[0] ('a'):", "stepz")
    cli_error(capsys, ["evaluate", recipe, "attacks.0.kwargs={eps: 0.1}", "attacks.0.eot=0"],
              "eot must be >= 1")
    cli_error(capsys, ["evaluate", recipe, "sweep.attack=nope"], "sweep.attack 'nope' is not one of the attacks")
    cli_error(capsys, ["evaluate", recipe, "attacks.0.kwargs={eps: 0.1}", "attacks.0.name=clean"],
              "'clean' is reserved")


# -- 14. no attacks: clean rows -------------------------------------------------------------------------
def test_no_attacks_still_reports_clean_accuracy(tmp_path, eval_setup, capsys):
    recipe = _eval_recipe(eval_setup, tmp_path / "ev", attacks=[])
    assert main(["evaluate", recipe]) == 0
    out = capsys.readouterr().out
    rows = json.loads((tmp_path / "ev" / "results.json").read_text())["rows"]
    assert [(r["defense"], r["attack"]) for r in rows] == [("none", "clean"), ("dbp", "clean")]
    for r in rows:
        assert r["n"] == 4 and 0 <= r["clean"] <= 1 and r["robust_expected"] is None
    report = (tmp_path / "ev" / "report.md").read_text()
    assert "| none | clean | 4 |" in report and "| dbp | clean | 4 |" in report
    assert "| none | clean | 4 |" in out
