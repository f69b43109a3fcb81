"""`ssni purify`: a user's own images (a file or a folder) in, purified PNGs out."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ssni.cli import main
from ssni.models import create_model, save_model

RECIPE = str(Path(__file__).resolve().parents[1] / "recipes" / "purify" / "digits.yaml")


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    m = create_model("unet_tiny")
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return save_model(tmp_path / "ckpt", m)


@pytest.fixture
def images(tmp_path):
    """A folder with an 8x8 grayscale PNG, a 12x12 RGB PNG (converted, resized) and a JPEG."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.RandomState(0)
    Image.fromarray(rng.randint(0, 256, (8, 8), dtype=np.uint8), "L").save(folder / "a.png")
    Image.fromarray(rng.randint(0, 256, (12, 12, 3), dtype=np.uint8), "RGB").save(folder / "b.png")
    Image.fromarray(rng.randint(0, 256, (8, 8, 3), dtype=np.uint8), "RGB").save(folder / "c.jpg")
    (folder / "notes.txt").write_text("not an image")
    return folder


def _run(*args):
    return main(["purify", RECIPE, *args])


def test_purify_folder_writes_pngs_and_repeats_exactly(tmp_path, checkpoint, images, capsys):
    out = tmp_path / "out"
    args = [f"checkpoint={checkpoint}", f"input={images}", f"output={out}", "t_star=0.05",
            "device=cpu", "purifier.sampler=ddpm", "purifier.steps=5", "progress=false"]
    assert _run(*args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["images"] == 3 and summary["weights"] == "model"
    assert summary["network_evaluations"] == 3 * 5
    names = sorted(p.name for p in out.glob("*.png"))
    assert names == ["a.png", "b.png", "c.png"]
    for name in names:
        with Image.open(out / name) as im:
            assert im.size == (8, 8) and im.mode == "L"
    first = {n: (out / n).read_bytes() for n in names}
    assert (out / "purify.json").is_file() and (out / "purify_config.yaml").is_file()
    # same settings -> the same files byte for byte
    assert _run(*args) == 0
    assert {n: (out / n).read_bytes() for n in names} == first
    # per-image seeds: another batch size changes nothing beyond float rounding (one gray level)
    before = {n: np.asarray(Image.open(out / n), dtype=np.int16) for n in names}
    assert _run(*args, "batch_size=1") == 0
    for n in names:
        assert np.abs(np.asarray(Image.open(out / n), dtype=np.int16) - before[n]).max() <= 1
    # the output differs from the input (it was purified) but stays close at a small t*
    a_in = np.asarray(Image.open(images / "a.png"), dtype=np.float32)
    a_out = np.asarray(Image.open(out / "a.png"), dtype=np.float32)
    assert 0 < np.abs(a_out - a_in).mean() < 60


def test_purify_single_file_and_t_star_zero_is_identity(tmp_path, checkpoint, images, capsys):
    out = tmp_path / "single"
    assert _run(f"checkpoint={checkpoint}", f"input={images / 'a.png'}", f"output={out}",
                "t_star=0", "device=cpu", "progress=false") == 0
    assert np.array_equal(np.asarray(Image.open(out / "a.png")), np.asarray(Image.open(images / "a.png")))


def test_purify_errors_are_clear(tmp_path, checkpoint, images, capsys):
    assert _run(f"checkpoint={checkpoint}", f"input={tmp_path / 'missing'}", "device=cpu") == 2
    assert "input does not exist" in capsys.readouterr().err
    assert _run(f"checkpoint={checkpoint}", f"input={images}", "t_star=1.5", "device=cpu",
                f"output={tmp_path / 'o'}", "progress=false") == 2
    assert "[0, 1]" in capsys.readouterr().err
    assert _run(f"checkpoint={checkpoint}", f"input={images}", "resize=false", "device=cpu",
                f"output={tmp_path / 'o'}", "progress=false") == 2
    assert "takes 8x8" in capsys.readouterr().err
    assert _run(f"checkpoint={tmp_path / 'nope'}", f"input={images}", "device=cpu") == 2
    assert "does not exist" in capsys.readouterr().err


def test_purify_with_a_calibration_gives_each_image_its_own_t_star(tmp_path, checkpoint, images,
                                                                   capsys):
    from ssni.models import load_model
    from ssni.scoring import ScoreNormConfig, calibrate

    model = load_model(checkpoint)
    clean = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    cal, _ = calibrate(model, clean, ScoreNormConfig(timesteps=5))
    cal.save(tmp_path / "cal" / "calibration.json")
    out = tmp_path / "ssni"
    assert _run(f"checkpoint={checkpoint}", f"input={images}", f"output={out}", "device=cpu",
                f"calibration={tmp_path / 'cal'}", "score_norm.timesteps=5", "reweight.name=sigmoid",
                "t_star=0.05", "purifier.sampler=ddpm", "progress=false") == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["images"] == 3 and summary["t_star"] == "per image (calibration)"
    per_image = json.loads((out / "purify.json").read_text())["t_star_per_image"]
    ts = list(per_image.values())
    assert len(ts) == 3 and all(0 <= t <= 0.05 + 0.005 + 1e-9 for t in ts)
    assert len(set(ts)) > 1  # sample-specific
    assert summary["network_evaluations"] == sum(round(t * 1000) for t in ts)
    # a calibration made with other score-norm settings is refused, naming the setting
    assert _run(f"checkpoint={checkpoint}", f"input={images}", f"output={out}", "device=cpu",
                f"calibration={tmp_path / 'cal'}", "progress=false") == 2
    assert "timesteps" in capsys.readouterr().err


def test_purify_says_what_it_resized_and_skipped(tmp_path, checkpoint, images, capsys):
    """No silent conversion: resized images and non-image files are named on stderr and in purify.json."""
    out = tmp_path / "out"
    assert _run(f"checkpoint={checkpoint}", f"input={images}", f"output={out}", "t_star=0.05", "device=cpu",
                "purifier.sampler=ddpm", "purifier.steps=2", "progress=false") == 0
    err = capsys.readouterr().err
    assert "resized 1 image(s) (12x12) to the network's 8x8" in err
    assert "skipping 1 file(s) that are not images (notes.txt)" in err
    saved = json.loads((out / "purify.json").read_text())
    assert saved["resized"] == {str(images / "b.png"): "12x12"}
    assert saved["skipped"] == [str(images / "notes.txt")]


def test_purify_missing_checkpoint_says_where_the_demo_puts_it(tmp_path, images, capsys):
    assert _run(f"checkpoint={tmp_path / 'nothing'}", f"input={images}", "device=cpu") == 2
    err = capsys.readouterr().err
    assert err.startswith("ssni purify: error:") and "runs/demo/score" in err and len(err.splitlines()) == 1
