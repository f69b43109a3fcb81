"""Denoisers: models, photo data, patches, PSNR/SSIM, attacks, training and evaluation jobs."""
import math

import numpy as np
import pytest
import torch

from ssni.attacks.denoiser import (
    DENOISER_ATTACKS,
    DenoisePGD,
    RandomPerturbation,
    delta_norm,
    denoising_error,
    project_delta,
    random_on_sphere,
)
from ssni.data import DATASETS, DataConfig, build_dataset
from ssni.data.photos import PHOTO_TEST, photo_names, squares
from ssni.denoise.metrics import psnr, ssim
from ssni.denoise.patches import RandomPatches
from ssni.models import create_model, list_models, load_model, save_model


@pytest.fixture(autouse=True)
def one_thread():
    # small convolutions: a second thread only adds scheduling overhead on a shared machine
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _small(name):
    return {"depth": 4, "width": 8} if name.startswith("dncnn") else {"ch": 8}


# -- models ------------------------------------------------------------------------------------
def test_denoisers_are_not_score_models():
    assert set(list_models(kind="denoiser")).isdisjoint(list_models(kind="score"))
    assert {"dncnn", "dncnn_small", "unet_denoiser"} <= set(list_models(kind="denoiser"))


@pytest.mark.parametrize("name", list_models(kind="denoiser"))
def test_every_denoiser_shapes_batches_and_roundtrip(name, tmp_path):
    torch.manual_seed(0)
    m = create_model(name, **_small(name))
    with torch.no_grad():  # move away from the near-identity start so outputs are distinctive
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    m.eval()
    y = torch.rand(3, 1, 21, 18, requires_grad=True)  # odd sizes: U-Nets pad internally
    out = m(y)
    assert out.shape == y.shape
    for k in range(3):  # each sample's output equals the output computed alone
        torch.testing.assert_close(m(y[k:k + 1]), out[k:k + 1], atol=1e-5, rtol=1e-4)
    out.square().sum().backward()
    assert y.grad is not None and torch.isfinite(y.grad).all() and y.grad.abs().sum() > 0
    save_model(tmp_path / "ck", m)
    m2 = load_model(tmp_path / "ck")
    assert m2.config == m.config and m2.sigma == m.sigma
    torch.testing.assert_close(m2(y.detach()), m(y.detach()))
    with pytest.raises(ValueError, match=r"\[B, 1, H, W\]"):
        m(torch.rand(2, 3, 16, 16))


def test_dncnn_depth_and_width_are_configurable():
    m = create_model("dncnn_small", depth=5, width=12)
    convs = [c for c in m.body if isinstance(c, torch.nn.Conv2d)]
    assert len(convs) == 5 and convs[1].out_channels == 12
    with pytest.raises(ValueError, match="sigma"):
        create_model("dncnn_tiny", sigma=0)


def test_unet_denoiser_maps_sigma_to_the_matching_vp_time():
    m = create_model("unet_denoiser_tiny", sigma=25)
    s = 25 / 255
    ab = m.net.diffusion.alpha_bar(torch.tensor([m.t]))
    torch.testing.assert_close(ab, torch.tensor([1 / (1 + 4 * s * s)]))
    # x_hat = y - s * eps: with an eps-network that returns the true eps, denoising is exact
    x = torch.rand(2, 1, 16, 16)
    n = torch.randn(2, 1, 16, 16)
    m.net.forward = lambda xt, t: n.expand_as(xt)
    torch.testing.assert_close(m(x + s * n), x, atol=1e-6, rtol=0)


# -- data -------------------------------------------------------------------------------------
def test_photos_split_and_shapes():
    assert "photos" in DATASETS and "photofolder" in DATASETS
    assert set(photo_names("train", 1)).isdisjoint(PHOTO_TEST)
    assert set(photo_names("test", 1)) == set(PHOTO_TEST)
    assert set(photo_names("test", 3)) < set(PHOTO_TEST)  # grey photos drop out in colour
    cfg = DataConfig(name="photos", image_size=64, channels=1)
    te = build_dataset(cfg, "test")
    assert te.images.shape == (len(PHOTO_TEST), 1, 64, 64)
    assert 0 <= te.images.min() and te.images.max() <= 1 and te.images.std() > 0.05
    col = build_dataset(DataConfig(name="photos", image_size=64, channels=3), "test")
    assert col.images.shape[1] == 3
    assert (col.images[:, 0] - col.images[:, 1]).abs().mean() > 0.01  # real colour
    with pytest.raises(ValueError, match="channels"):
        build_dataset(DataConfig(name="photos", channels=2), "test")


def test_squares_tile_and_centre_crop():
    img = torch.arange(2 * 10 * 13, dtype=torch.float32).view(2, 10, 13)
    tiles = squares(img, 4, "train")
    assert tiles.shape == (2 * 3, 2, 4, 4)
    torch.testing.assert_close(tiles[0], img[:, 1:5, 0:4])  # centred grid: offsets (1, 0)
    centre = squares(img, 4, "test")
    torch.testing.assert_close(centre[0], img[:, 3:7, 4:8])


def test_photofolder_flat_and_split(tmp_path):
    from PIL import Image

    rng = np.random.RandomState(0)
    for split in ("train", "test"):
        (tmp_path / split).mkdir()
        for i in range(2):
            Image.fromarray(rng.randint(0, 255, (40, 50), dtype=np.uint8)).save(
                tmp_path / split / f"im{i}.png")
    cfg = DataConfig(name="photofolder", root=str(tmp_path), image_size=16, channels=1)
    assert build_dataset(cfg, "train").images.shape == (2 * 2 * 3, 1, 16, 16)
    assert build_dataset(cfg, "test").images.shape == (2, 1, 16, 16)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no image files"):
        build_dataset(DataConfig(name="photofolder", root=str(tmp_path / "empty")), "train")
    with pytest.raises(ValueError, match="data.root"):
        build_dataset(DataConfig(name="photofolder"), "train")


def test_random_patches_are_fixed_by_seed_and_index():
    g = torch.Generator().manual_seed(0)
    imgs = [torch.rand(1, 30, 20, generator=g), torch.rand(1, 12, 40, generator=g)]
    p = RandomPatches(imgs, 10, 50, seed=3)
    q = RandomPatches(imgs, 10, 50, seed=3)
    idx = torch.tensor([5, 0, 49, 5])
    batch = p.images[idx]
    assert batch.shape == (4, 1, 10, 10)
    torch.testing.assert_close(batch, q.images[idx])
    torch.testing.assert_close(batch[0], batch[3])
    torch.testing.assert_close(batch[1], p[0][0])
    # every patch is a crop of its source image up to a flip / rotation
    for k in range(50):
        src = imgs[int(p.which[k])]
        t, left = int(p.top[k]), int(p.left[k])
        crop = src[:, t:t + 10, left:left + 10]
        variants = [torch.rot90(c, r, dims=(-2, -1)) for c in (crop, crop.flip(-1)) for r in range(4)]
        assert any(torch.equal(p.images[[k]][0], v) for v in variants)
    assert not torch.equal(RandomPatches(imgs, 10, 50, seed=4).images[idx], batch)
    with pytest.raises(ValueError, match="larger than images"):
        RandomPatches(imgs, 13, 5)


# -- metrics ----------------------------------------------------------------------------------
def test_psnr_by_hand_and_against_skimage():
    from skimage.metrics import peak_signal_noise_ratio

    x = torch.zeros(1, 1, 4, 4)
    y = x.clone()
    y[..., 0, 0] = 0.4  # MSE = 0.16 / 16 = 0.01 -> 20 dB
    assert psnr(x, y).item() == pytest.approx(20.0, abs=1e-5)
    assert psnr(x, x).item() == math.inf
    g = torch.Generator().manual_seed(0)
    a = torch.rand(3, 3, 17, 19, generator=g)
    b = (a + 0.05 * torch.randn(a.shape, generator=g)).clamp(0, 1)
    want = [peak_signal_noise_ratio(a[i].numpy(), b[i].numpy(), data_range=1.0) for i in range(3)]
    torch.testing.assert_close(psnr(a, b), torch.tensor(want, dtype=torch.float32))


@pytest.mark.parametrize("shape", [(2, 1, 16, 16), (2, 3, 20, 23), (1, 1, 7, 9)])
def test_ssim_matches_skimage(shape):
    from skimage.metrics import structural_similarity

    g = torch.Generator().manual_seed(sum(shape))
    a = torch.rand(shape, generator=g)
    b = (0.7 * a + 0.3 * torch.rand(shape, generator=g)).clamp(0, 1)
    ours = ssim(a, b)
    want = [structural_similarity(a[i].numpy(), b[i].numpy(), data_range=1.0, channel_axis=0)
            for i in range(shape[0])]
    torch.testing.assert_close(ours, torch.tensor(want, dtype=torch.float32), atol=1e-5, rtol=1e-5)
    assert ssim(a, a).tolist() == pytest.approx([1.0] * shape[0])
    with pytest.raises(ValueError, match="same shape"):
        ssim(a, b[..., :-1])


# -- attacks ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained_tiny_dncnn():
    """A tiny DnCNN trained for a few seconds on photo patches at sigma 25 (a real denoiser)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    photos = build_dataset(DataConfig(name="photos", image_size=64, channels=1), "train").images
    patches = RandomPatches(photos, 24, 40 * 32, seed=0)
    m = create_model("dncnn_small", depth=4, width=16)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for step in range(40):
        x = patches.images[torch.arange(step * 32, (step + 1) * 32)]
        y = x + (25 / 255) * torch.randn(x.shape, generator=g)
        loss = (m(y) - x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.set_num_threads(old)
    m.eval()
    test = build_dataset(DataConfig(name="photos", image_size=48, channels=1), "test").images[:3]
    y = test + (25 / 255) * torch.randn(test.shape, generator=torch.Generator().manual_seed(1))
    return m, test, y


def test_trained_denoiser_beats_the_noise(trained_tiny_dncnn):
    m, x, y = trained_tiny_dncnn
    with torch.no_grad():
        assert psnr(m(y).clamp(0, 1), x).mean() > psnr(y.clamp(0, 1), x).mean() + 2.0


@pytest.mark.parametrize("norm,eps", [("linf", 4 / 255), ("l2", 4 / 255 * 48)])
@pytest.mark.parametrize("zero_mean", [False, True])
def test_pgd_stays_in_budget_and_beats_random(trained_tiny_dncnn, norm, eps, zero_mean):
    m, x, y = trained_tiny_dncnn
    atk = DenoisePGD(eps=eps, norm=norm, steps=8, zero_mean=zero_mean)
    delta = atk(m, x, y, torch.Generator().manual_seed(0))
    assert delta.shape == x.shape
    assert (delta_norm(delta, norm) <= eps * (1 + 1e-5)).all()
    if zero_mean:
        assert delta.mean((2, 3)).abs().max() < 1e-6
    with torch.no_grad():
        err_adv = denoising_error(m, x, y + delta)
        err_clean = denoising_error(m, x, y)
        rnd = random_on_sphere(tuple(x.shape), delta_norm(delta, norm), norm,
                               torch.Generator().manual_seed(1), zero_mean=zero_mean)
        err_rnd = denoising_error(m, x, y + rnd)
    assert torch.allclose(delta_norm(rnd, norm), delta_norm(delta, norm), rtol=1e-4)
    assert (err_adv > err_rnd).all() and (err_adv > 1.2 * err_clean).all()
    # repeatable with the same generator
    torch.testing.assert_close(atk(m, x, y, torch.Generator().manual_seed(0)), delta)


def test_projection_is_exact_and_idempotent():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(3, 2, 8, 8, generator=g) * 0.1
    eps = 0.05
    p = project_delta(v, eps, "linf", zero_mean=True)
    assert p.abs().max() <= eps + 1e-7 and p.mean((2, 3)).abs().max() < 1e-7
    torch.testing.assert_close(project_delta(p, eps, "linf", zero_mean=True), p)
    # the projection is the closest feasible point: no feasible random point is closer
    for _ in range(20):
        q = project_delta(torch.randn(v.shape, generator=g) * 0.05, eps, "linf", zero_mean=True)
        q = p + 0.1 * (q - p)  # feasible: the set is convex
        assert ((q - v).flatten(1).norm(dim=1) >= (p - v).flatten(1).norm(dim=1) - 1e-6).all()
    pl2 = project_delta(v, 0.2, "l2", zero_mean=True)
    assert (pl2.flatten(1).norm(dim=1) <= 0.2 + 1e-6).all() and pl2.mean((2, 3)).abs().max() < 1e-7
    with pytest.raises(ValueError, match="linf, l2"):
        project_delta(v, eps, "l1")


def test_attack_registry_and_random_baseline():
    assert {"pgd", "random"} <= set(DENOISER_ATTACKS.names())
    x = torch.rand(2, 1, 8, 8)
    d = DENOISER_ATTACKS.create("random", eps=0.1, norm="linf")(None, x, x)
    assert torch.allclose(d.abs(), torch.full_like(d, 0.1))
    d2 = RandomPerturbation(eps=0.3, norm="l2", zero_mean=True)(None, x, x)
    torch.testing.assert_close(d2.flatten(1).norm(dim=1), torch.full((2,), 0.3))
    with pytest.raises(ValueError, match="eps"):
        DenoisePGD(eps=0.0)


# -- jobs -------------------------------------------------------------------------------------
def _train(tmp_path, name, noise, steps=4, extra=()):
    from ssni.commands.train_denoiser import DenoiserTrainConfig, train_denoiser
    from ssni.config import load_config

    cfg = load_config(DenoiserTrainConfig, None, [
        f"run_dir={tmp_path / name}", "data.image_size=32", "model.name=dncnn_tiny",
        f"noise.name={noise}", "patch_size=16", f"loop.steps={steps}", "loop.batch_size=4",
        "loop.progress=false", "loop.ckpt_every=0", "eval_batch=8", *extra])
    return train_denoiser(cfg)


def test_train_denoiser_gaussian_and_ts_then_evaluate(tmp_path):
    from ssni.commands.evaluate_denoiser import DenoiserEvalConfig, evaluate_denoiser
    from ssni.config import load_config

    a = _train(tmp_path, "a", "gaussian")
    b = _train(tmp_path, "b", "typical_set", extra=["noise.kwargs.off_shell_fraction=1.0"])
    for r in (a, b):
        assert r["steps"] == 4 and math.isfinite(r["test_psnr_ema"])
    assert load_model(tmp_path / "a").sigma == 25.0
    # resume: the same run directory continues from step 4
    assert _train(tmp_path, "a", "gaussian", steps=6)["steps"] == 6
    cfg = load_config(DenoiserEvalConfig, None, [
        f"run_dir={tmp_path / 'ev'}", f"models.a={tmp_path / 'a'}", f"models.b={tmp_path / 'b'}",
        "data.image_size=32", "max_images=2", "progress=false",
        "attacks=[{norm: linf, eps: 4, steps: 2}, {norm: l2, eps: 4, steps: 2, zero_mean: true}]"])
    out = evaluate_denoiser(cfg)
    import json

    res = json.loads((tmp_path / "ev" / "results.json").read_text())
    t = res["transfer"]
    assert t["attack"] == "l2-4-zm" and np.asarray(t["psnr"]).shape == (2, 2)
    assert t["psnr"][0][0] == pytest.approx(res["models"]["a"]["attacks"]["l2-4-zm"]["psnr"])
    for m in res["models"].values():
        for k in ("linf-4", "l2-4-zm"):
            assert m["attacks"][k]["psnr"] < m["clean"]["psnr"]
            assert m["attacks"][k]["delta_norm_mean"] <= m["attacks"][k]["budget"] * (1 + 1e-5)
    assert res["noisy"]["in_typical"] == 1.0
    for key in ("report", "transfer_png", "examples_png", "ts_png"):
        assert (tmp_path / "ev" / out[key].split("/")[-1]).stat().st_size > 500
    assert "Transfer matrix" in (tmp_path / "ev" / "report.md").read_text()
    # a rerun reuses the cached deltas: attacks are not run again
    calls = []
    orig = DenoisePGD.__call__
    DenoisePGD.__call__ = lambda self, *a, **k: calls.append(1) or orig(self, *a, **k)
    try:
        evaluate_denoiser(cfg)
    finally:
        DenoisePGD.__call__ = orig
    assert calls == []


def test_train_denoiser_rejects_score_models(tmp_path):
    with pytest.raises(ValueError, match="not a denoiser"):
        _train(tmp_path, "c", "gaussian", extra=["model.name=unet_tiny"])


def test_cli_lists_denoiser_commands(capsys):
    from ssni.commands import COMMANDS

    assert {"train-denoiser", "evaluate-denoiser"} <= set(COMMANDS.names())
    from ssni.cli import main

    assert main(["evaluate-denoiser", "run_dir=/tmp/unused"]) == 2
    assert "models is empty" in capsys.readouterr().err
