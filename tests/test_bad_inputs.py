"""Bad settings, files and networks: each gets one line naming the cause (`ssni CMD: error: ...`,
exit 2); numbers parse as people write them; duplicated YAML keys are refused.

The table BAD lists one case per row: (case id, command line, expected fragment of the error line).
`{name}` in a command line stands for a path from the `files` fixture (small data the tests make).
"""
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from ssni.cli import main
from ssni.commands.train_score import ScoreTrainConfig
from ssni.config import ConfigError, load_config
from ssni.io import atomic_save_safetensors, atomic_write_json
from ssni.models import classifier_spec, create_classifier, create_model, save_model
from ssni.scoring import ScoreNormConfig, calibrate

ROOT = Path(__file__).resolve().parents[1]
SCORE = str(ROOT / "recipes" / "score" / "digits.yaml")
EVAL = str(ROOT / "recipes" / "eval" / "digits.yaml")
# a tiny run: if a bad setting were accepted, the command would finish in seconds
TINY = ["model.name=unet_tiny", "data.image_size=8", "sample_count=2", "sample_steps=2", "eval_draws=1",
        "loop.steps=1", "loop.batch_size=8", "loop.device=cpu", "loop.progress=false"]
TINY_CLF = ["model.name=resnet10t", "data.image_size=8", "loop.steps=1", "loop.batch_size=4", "loop.device=cpu",
            "loop.progress=false"]


def _png(path: Path, mode: str, seed: int = 0) -> None:
    rng = np.random.RandomState(seed)
    bands = len(Image.new(mode, (1, 1)).getbands())
    arr = rng.randint(0, 256, (8, 8, bands), dtype=np.uint8)
    if mode.endswith("A"):
        arr[..., -1] = np.where(arr[..., -1] > 128, 255, 0)  # half the pixels transparent
    Image.fromarray(arr if bands > 1 else arr[..., 0], mode).save(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Paths for the table: a score checkpoint, a classifier, a calibration, an evaluation recipe,
    image folders (one class; RGBA with transparency) and a scratch directory."""
    root = tmp_path_factory.mktemp("bad")
    torch.manual_seed(0)
    sm = create_model("unet_tiny")
    with torch.no_grad():  # as after training: its output layer starts at zero, which makes every norm 0
        for p in sm.parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_model(root / "score", sm)
    x = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    cal, _ = calibrate(sm.eval(), x, ScoreNormConfig(timesteps=2), batch_size=16)
    cal.save(root / "calibration.json")
    clf = create_classifier("resnet10t", in_chans=1, num_classes=10, image_size=8)
    atomic_save_safetensors(root / "clf" / "model.safetensors", clf.state_dict())
    atomic_write_json(root / "clf" / "model.json", classifier_spec(clf))
    (root / "eval.yaml").write_text(yaml.safe_dump({
        "data": {"name": "digits", "image_size": 8}, "num_samples": 4, "batch_size": 4, "draws": 1,
        "progress": False, "device": "cpu", "checks": False,
        "defense": {"score_model": str(root / "score"), "score_weights": "model",
                    "calibration": str(root / "calibration.json"), "score_norm": {"timesteps": 2},
                    "purifier": {"sampler": "ddpm", "steps": 1}, "reweight": {"name": "constant"},
                    "classifier": {"name": "resnet10t", "checkpoint": str(root / "clf"), "weights": "model"},
                    "mean": [0.0], "std": [1.0], "device": "cpu"},
        "defenses": [{"name": "none"}], "attacks": []}))
    for c in ("only",):
        (root / "one_class" / c).mkdir(parents=True)
        for i in range(6):
            _png(root / "one_class" / c / f"{i}.png", "L", i)
    for c in ("a", "b"):
        (root / "rgba_classes" / c).mkdir(parents=True)
        for i in range(3):
            _png(root / "rgba_classes" / c / f"{i}.png", "RGBA", i)
    (root / "rgba").mkdir()
    _png(root / "rgba" / "x.png", "RGBA")
    return {"score": root / "score", "score_weights": root / "score" / "model.safetensors",
            "eval": root / "eval.yaml", "one_class": root / "one_class", "rgba": root / "rgba",
            "rgba_classes": root / "rgba_classes", "tmp": root / "scratch", "readme": ROOT / "README.md"}


BAD = [
    # diffusion times, iterations, draws and counts, sizes
    ("t_eps below 0", ["train-score", SCORE, *TINY, "t_eps=-0.5"], "t_eps must be in (0, 1)"),
    ("t_eps above 1", ["train-score", SCORE, *TINY, "t_eps=1.5"], "t_eps must be in (0, 1)"),
    ("no sampling steps", ["train-score", SCORE, *TINY, "sample_steps=0"], "sample_steps must be >= 1, got 0"),
    ("no eval draws", ["train-score", SCORE, *TINY, "eval_draws=0"], "eval_draws must be >= 1, got 0"),
    ("no samples", ["train-score", SCORE, *TINY, "sample_count=0"], "sample_count must be >= 1, got 0"),
    ("infinite steps", ["train-score", SCORE, *TINY, "loop.steps=.inf"], "loop.steps: expected an integer, got inf"),
    ("NaN learning rate", ["train-score", SCORE, *TINY, "optim.lr=.nan"], "optim.lr: expected a finite number, got nan"),
    ("image size 0", ["train-score", SCORE, *TINY, "data.image_size=0"], "data.image_size must be >= 1, got 0"),
    ("calibrate count 0", ["calibrate", "count=0", "output={tmp}/cal"], "count must be >= 1, got 0"),
    ("calibrate batch 0", ["calibrate", "batch_size=0", "output={tmp}/cal"], "batch_size must be >= 1, got 0"),
    # attack settings
    ("negative attack steps", ["evaluate", EVAL, "run_dir={tmp}/e", "attacks.0.kwargs.steps=-3"],
     "attacks[0] ('pgd-eot'): steps must be >= 1, got -3"),
    ("negative step size", ["evaluate", EVAL, "run_dir={tmp}/e", "attacks.0.kwargs.step_size=-0.007"],
     "attacks[0] ('pgd-eot'): step_size must be > 0, got -0.007"),
    ("eps not a number", ["evaluate", EVAL, "run_dir={tmp}/e", "attacks.0.kwargs.eps=abc"],
     "attacks[0] ('pgd-eot'): eps must be a number >= 0 (the perturbation budget), got 'abc'"),
    ("NaN eps", ["evaluate", EVAL, "run_dir={tmp}/e", "attacks.0.kwargs.eps=.nan"],
     "attacks[0] ('pgd-eot'): eps must be a finite number >= 0"),
    # reweights whose curve leaves [0, t_max]
    ("sigmoid b below -t_base", ["evaluate", "{eval}", "run_dir={tmp}/e",
                                 "defenses=[{name: n, reweight: {name: sigmoid, kwargs: {b: -0.5}}}]"],
     "sigmoid reweight (t_base=0.1, b=-0.5): its t* curve spans [-0.4, 0]"),
    ("linear b above t_max", ["evaluate", "{eval}", "run_dir={tmp}/e",
                              "defenses=[{name: l, reweight: {name: linear, kwargs: {b: 2.0}}}]"],
     "every image would get t* = 1"),
    # keys and YAML
    ("misspelt reweight key", ["evaluate", EVAL, "run_dir={tmp}/e", "defenses.1.reweight.kwargz={b: 1}"],
     "unknown config key 'defenses[1].reweight.kwargz'; valid keys of defenses[1].reweight: kwargs, name"),
    ("duplicate key in an override", ["evaluate", EVAL, "run_dir={tmp}/e", "attacks.0.kwargs={eps: 0.1, eps: 0.2}"],
     "duplicate key 'eps' at line 1, column 12 (first at line 1, column 2)"),
    # paths
    ("empty run_dir", ["train-score", SCORE, *TINY, "run_dir="], "run_dir is empty; expected a directory path"),
    ("purify output is a file", ["purify", "checkpoint={score}", "input={rgba}", "output={readme}"],
     "is an existing file; expected a directory"),
    # data
    ("digits in 3 channels", ["train-score", SCORE, *TINY, "run_dir={tmp}/d", "data.channels=3"],
     "data.channels=3, but the 'digits' data set has 1-channel images"),
    ("one-class image folder", ["train-classifier", *TINY_CLF, "run_dir={tmp}/c", "data.name=imagefolder",
                                "data.root={one_class}", "data.channels=1"],
     "training data has 1 class; a classifier needs at least 2"),
    ("RGBA into a 1-channel network", ["purify", "checkpoint={score}", "input={rgba}", "output={tmp}/p",
                                       "device=cpu", "progress=false"], "x.png: RGBA image with transparent pixels"),
    ("RGBA image folder, grey", ["train-score", SCORE, *TINY, "run_dir={tmp}/r", "data.name=imagefolder",
                                 "data.root={rgba_classes}", "data.channels=1"], "RGBA image with transparent pixels"),
    # networks in the wrong place
    ("unknown timm keyword", ["train-classifier", *TINY_CLF, "run_dir={tmp}/k", "model.kwargs.colour=1"],
     "timm model 'resnet10t' does not take the keyword arguments ['colour']"),
    ("score network as classifier", ["evaluate", "{eval}", "run_dir={tmp}/e", "defense.classifier.checkpoint={score}"],
     "holds a score network (unet_tiny), not a classifier"),
    ("another model's weights", ["evaluate", "{eval}", "run_dir={tmp}/e",
                                 "defense.classifier.checkpoint={score_weights}"],
     "does not fit the timm model: missing"),
]


@pytest.mark.parametrize("case,argv,expected", BAD, ids=[row[0] for row in BAD])
def test_bad_input_is_one_line_naming_the_cause(case, argv, expected, files, capsys):
    for name, path in files.items():
        argv = [a.replace(f"{{{name}}}", str(path)) for a in argv]
    assert main(argv) == 2, case
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"ssni {argv[0]}: error: "), err
    assert expected in err, (expected, err)


NUMBERS = [("2e-4", 2e-4), ("1e-4", 1e-4), ("1E-3", 1e-3), ("1.5e3", 1500.0),
           ("+2E+2", 200.0), ("1.0e5", 1e5), ("1e5", 1e5), ("-3e5", -3e5)]


@pytest.mark.parametrize("text,value", NUMBERS, ids=[t for t, _ in NUMBERS])
def test_numbers_as_people_write_them(text, value, tmp_path):
    """In a recipe and in an override, an exponent needs no dot and no sign (YAML 1.1 reads 2e-4 as text)."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"noise:\n  name: typical_set\n  kwargs: {{off_shell_fraction: {text}}}\n"
                      + (f"optim:\n  lr: {text}\n" if value > 0 else ""))
    cfg = load_config(ScoreTrainConfig, recipe)
    got = cfg.noise.kwargs["off_shell_fraction"]
    assert got == value and isinstance(got, float)
    assert cfg.optim.lr == (value if value > 0 else 2e-4)
    over = load_config(ScoreTrainConfig, None, ["noise.name=typical_set", f"noise.kwargs.off_shell_fraction={text}",
                                                f"model.kwargs={{attn_resolutions: [{text}]}}"])
    assert over.noise.kwargs["off_shell_fraction"] == value and over.model.kwargs["attn_resolutions"] == [value]


def test_a_recipe_with_a_duplicated_key_names_it_and_both_lines(tmp_path, capsys):
    recipe = tmp_path / "dup.yaml"
    recipe.write_text("loop:\n  steps: 10\nrun_dir: runs/x\nloop:\n  steps: 20\n")
    with pytest.raises(ConfigError, match=r"dup.yaml: duplicate key 'loop' at line 4 \(first at line 1\)"):
        load_config(ScoreTrainConfig, recipe)
    assert main(["train-score", str(recipe)]) == 2
    assert "duplicate key 'loop' at line 4 (first at line 1)" in capsys.readouterr().err
    # merge keys (<<) may still be overridden: that is what they are for
    recipe.write_text("base: &b {steps: 3}\nloop:\n  <<: *b\n  steps: 4\n")
    with pytest.raises(ConfigError, match="unknown config key 'base'"):
        load_config(ScoreTrainConfig, recipe)


def test_colour_made_grey_is_a_logged_conversion(tmp_path):
    from ssni.images import read_image

    _png(tmp_path / "rgb.png", "RGB")
    with pytest.warns(UserWarning, match=r"colour images converted to grey \(ITU-R 601 luma\)"):
        grey = read_image(tmp_path / "rgb.png", 1)
    rgb = np.asarray(Image.open(tmp_path / "rgb.png").convert("L"), dtype=np.float32) / 255.0
    np.testing.assert_array_equal(grey[0].numpy(), rgb)
