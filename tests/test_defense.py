"""The SSNI defense wrapper: timm families, gradients, calibration checks, seeds, votes, recipes."""
import pytest
import torch
import yaml

from ssni.defense import VOTES, RobustClassifier, build_defense, resolve_preprocessing, wrap_timm
from ssni.io import atomic_save_safetensors, atomic_write_json
from ssni.models import classifier_spec, create_classifier, create_model, save_model
from ssni.models.analytic import GaussianScoreModel
from ssni.purify import PurifierConfig, build_purifier
from ssni.scoring import CalibrationMismatchError, ScoreNormConfig, build_reweight, calibrate
from ssni.seeding import mix_seeds

SHAPE = (1, 8, 8)
SN = ScoreNormConfig(timesteps=4)
PURIFY = {"sampler": "ddpm", "steps": 2}


def _score_model(mean=0.1):
    return GaussianScoreModel(mean=mean, std=0.4, shape=SHAPE)


def _images(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (0.55 + 0.15 * torch.randn(n, *SHAPE, generator=g)).clamp(0, 1)


def _calibration(model):
    cal, _ = calibrate(model, _images(32, seed=1), SN, batch_size=16)
    return cal


# (timm name, its keyword arguments, classifier input size): one of each family, tiny
FAMILIES = {
    "resnet": ("resnet10t", {}, 16),
    "vit": ("vit_tiny_patch16_224", {"img_size": 16, "patch_size": 4, "depth": 2}, 16),
    "convnext": ("convnext_atto", {}, 32),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_wrapper_around_timm_families(family):
    name, kw, size = FAMILIES[family]
    sm = _score_model()
    torch.manual_seed(0)
    wrapper = wrap_timm(name, score_model=sm, calibration=_calibration(sm), reweight="sigmoid",
                        reweight_kwargs={"t_base": 0.1}, purifier_config=PURIFY, score_norm=SN,
                        num_classes=5, input_size=size, **kw)
    assert isinstance(wrapper, torch.nn.Module) and wrapper.input_size == (size, size)
    # 1-channel input: timm's 3-value normalisation is averaged to one value
    assert wrapper.mean.shape == (1, 1, 1, 1) and wrapper.std.min() > 0
    x = _images(3)
    seeds = torch.tensor([7, 8, 9])
    with torch.no_grad():
        out = wrapper(x, seeds=seeds)
        again = wrapper(x, seeds=seeds)
    assert out.shape == (3, 5) and torch.isfinite(out).all()
    torch.testing.assert_close(out, again)  # per-call seeds repeat exactly
    assert wrapper.last_t_star.shape == (3,) and wrapper.last_score_norm.shape == (3,)
    assert ((wrapper.last_t_star >= 0) & (wrapper.last_t_star <= 0.105 + 1e-6)).all()


def test_wrap_timm_takes_an_instance_and_plain_attack_code_works():
    sm = _score_model()
    clf = create_classifier("resnet10t", in_chans=1, num_classes=4, image_size=8)
    wrapper = wrap_timm(clf, score_model=sm, calibration=_calibration(sm), reweight="linear",
                        purifier_config=PURIFY, score_norm=SN, mean=[0.5], std=[0.25])
    assert wrapper.input_size == (8, 8)  # from the classifier's own config
    x = _images(2).requires_grad_(True)
    # what attack code does: model(x), a loss, backward to the input
    loss = torch.nn.functional.cross_entropy(wrapper(x), torch.tensor([0, 1]))
    loss.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_gradients_reach_input_through_whole_wrapper():
    torch.manual_seed(0)
    sm = create_model("unet_tiny").eval()
    with torch.no_grad():  # nudge the zero-initialised output layers so the score is not zero
        for p in sm.parameters():
            p.add_(0.02 * torch.randn_like(p))
    wrapper = wrap_timm("resnet10t", score_model=sm, calibration=_calibration(sm),
                        reweight="sigmoid", purifier_config=PURIFY,
                        attack_purifier_config={"sampler": "ddpm", "steps": 1}, score_norm=SN,
                        num_classes=3, input_size=16)
    surrogate = wrapper.view("adaptive")
    x = _images(2).requires_grad_(True)
    seeds = torch.tensor([1, 2])
    surrogate(x, seeds=seeds).logsumexp(1).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    # the t*(x) branch alone carries gradient too (smooth reweight through the score norm)
    x2 = x.detach().clone().requires_grad_(True)
    t, s = wrapper.noise_levels(x2, seeds=seeds, smooth=True)
    (g,) = torch.autograd.grad(t.sum(), x2)
    assert torch.isfinite(g).all() and g.abs().sum() > 0
    # ... while the defense's own rounded t* has none
    x3 = x.detach().clone().requires_grad_(True)
    t_hard, _ = wrapper.noise_levels(x3, seeds=seeds, smooth=False)
    g_hard = (torch.autograd.grad(t_hard.sum(), x3, allow_unused=True)[0]
              if t_hard.requires_grad else None)
    assert g_hard is None or (g_hard == 0).all()
    torch.testing.assert_close(t_hard, torch.round(t.detach() * 1000) / 1000, atol=1.5e-3, rtol=0)


def test_calibration_from_another_network_is_refused():
    a, b = _score_model(mean=0.1), _score_model(mean=-0.3)
    cal = _calibration(a)
    clf = create_classifier("resnet10t", in_chans=1, num_classes=3, image_size=8)
    with pytest.raises(CalibrationMismatchError, match="another score network"):
        RobustClassifier(classifier=clf, score_model=b, purifier=build_purifier(b),
                         reweight=build_reweight("sigmoid", cal), calibration=cal,
                         score_norm=SN)
    with pytest.raises(CalibrationMismatchError, match="timesteps"):
        wrap_timm(clf, score_model=a, calibration=cal, purifier_config=PURIFY,
                  score_norm=ScoreNormConfig(timesteps=20))


def test_samples_do_not_depend_on_batch_companions():
    sm = _score_model()
    wrapper = wrap_timm("resnet10t", score_model=sm, calibration=_calibration(sm),
                        purifier_config=PURIFY, score_norm=SN, num_classes=3, input_size=8)
    x, seeds = _images(4), torch.tensor([5, 6, 7, 8])
    with torch.no_grad():
        full = wrapper(x, seeds=seeds)
        t_full = wrapper.last_t_star
        alone = torch.cat([wrapper(x[i:i + 1], seeds=seeds[i:i + 1]) for i in range(4)])
        torch.manual_seed(0)
        a = wrapper(x)
        torch.manual_seed(0)
        b = wrapper(x)  # unseeded calls follow torch's global RNG
    torch.testing.assert_close(alone, full, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(a, b)
    assert t_full.shape == (4,)
    assert len(set(mix_seeds(torch.tensor([1, 1, 2]), 0).tolist())) == 2
    assert mix_seeds(torch.tensor([1]), 0) != mix_seeds(torch.tensor([1]), 1)


def test_mix_seeds_takes_any_salt():
    # salts of ensemble members 6 and up (and of other streams) overflowed int64 before
    seeds = torch.tensor([0, 1, 2 ** 61])
    out = torch.stack([mix_seeds(seeds, salt) for salt in range(1000)])
    assert out.min() >= 0 and out.max() < 2 ** 62
    assert len(set(out[:, 1].tolist())) == 1000  # every salt its own stream


def test_votes_and_ensemble():
    logits = torch.log(torch.tensor([
        [[0.6, 0.3, 0.1]], [[0.1, 0.5, 0.4]], [[0.2, 0.45, 0.35]]]))  # [K=3, B=1, n=3]
    mean = VOTES.get("mean_prob")(logits)
    torch.testing.assert_close(mean.exp(), torch.softmax(logits, -1).mean(0))
    assert VOTES.get("majority")(logits).argmax(-1).item() == 1  # two votes for class 1
    tie = torch.log(torch.tensor([[[0.9, 0.1]], [[0.4, 0.6]]]))  # one vote each
    assert VOTES.get("majority")(tie).argmax(-1).item() == 0  # broken by mean probability
    sm = _score_model()
    cal = _calibration(sm)
    for vote in VOTES.names():
        w = wrap_timm("resnet10t", score_model=sm, calibration=cal, purifier_config=PURIFY,
                      score_norm=SN, num_classes=3, input_size=8, ensemble=3, vote=vote)
        with torch.no_grad():
            out = w(_images(2), seeds=torch.tensor([0, 1]))
        assert out.shape == (2, 3) and torch.isfinite(out).all()
        assert torch.allclose(out.exp().sum(1), torch.ones(2), atol=1e-4)
    with pytest.raises(KeyError, match="valid choices"):
        wrap_timm("resnet10t", score_model=sm, purifier_config=PURIFY, num_classes=3,
                  calibration=cal, score_norm=SN, vote="best")


def test_preprocessing_resizes_and_normalises():
    clf = create_classifier("resnet10t", in_chans=1, num_classes=3, image_size=8)
    size, mean, std = resolve_preprocessing(clf, 1, input_size=12, mean=[0.5], std=[0.5])
    assert size == (12, 12) and mean == [0.5] and std == [0.5]
    _, mean3, _ = resolve_preprocessing(clf, 1)
    assert len(mean3) == 1 and 0.4 < mean3[0] < 0.5  # timm's ImageNet mean, averaged
    with pytest.raises(ValueError, match="channels"):
        resolve_preprocessing(clf, 3, mean=[0.1, 0.2])
    sm = _score_model()
    w = RobustClassifier(classifier=clf, score_model=sm, purifier=build_purifier(sm),
                         reweight=build_reweight("constant"), input_size=16, mean=[0.5],
                         std=[0.5], score_norm=SN)
    y = w.preprocess(torch.full((1, *SHAPE), 0.75))
    assert y.shape == (1, 1, 16, 16)
    torch.testing.assert_close(y, torch.full_like(y, 0.5))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        w(torch.full((1, *SHAPE), 1.5))
    with pytest.raises(ValueError, match="shape"):
        w(torch.rand(1, 1, 16, 16))


def test_build_from_recipe(tmp_path):
    torch.manual_seed(0)
    sm = create_model("unet_tiny")
    with torch.no_grad():
        for p in sm.parameters():
            p.add_(0.02 * torch.randn_like(p))
    save_model(tmp_path / "score", sm)
    cal = _calibration(sm.eval())
    cal.save(tmp_path / "calibration.json")
    clf = create_classifier("resnet10t", in_chans=1, num_classes=10, image_size=8)
    atomic_save_safetensors(tmp_path / "clf" / "model.safetensors", clf.state_dict())
    atomic_write_json(tmp_path / "clf" / "model.json", classifier_spec(clf))
    recipe = {"score_model": str(tmp_path / "score"), "calibration": str(tmp_path),
              "score_norm": {"timesteps": 4}, "reweight": {"name": "linear",
                                                           "kwargs": {"t_base": 0.05}},
              "purifier": PURIFY, "attack_purifier": {"sampler": "ddim", "steps": 1},
              "classifier": {"checkpoint": str(tmp_path / "clf")}, "mean": [0.0], "std": [1.0],
              "ensemble": 2, "vote": "majority", "device": "cpu"}
    path = tmp_path / "defense.yaml"
    path.write_text(yaml.safe_dump(recipe))
    w = RobustClassifier.from_recipe(path, ["reweight.kwargs.t_base=0.08"])
    assert w.reweight.t_base == 0.08 and w.recipe["vote"] == "majority"
    assert w.attack_purifier is not w.purifier
    x = _images(3)
    with torch.no_grad():
        out = w(x, seeds=torch.arange(3))
    assert out.shape == (3, 10) and torch.isfinite(out).all()
    assert w.last_t_star.max() <= 0.085 + 1e-6
    loaded = w.classifier.state_dict()  # the classifier came from the checkpoint directory
    assert all(torch.equal(loaded[k], v) for k, v in clf.state_dict().items())
    torch.testing.assert_close(w.mean.flatten(), torch.zeros(1))
    with pytest.raises(Exception, match="unknown config key"):
        RobustClassifier.from_recipe(path, ["nonsense=1"])
    recipe["calibration"] = None
    recipe["reweight"] = {"name": "sigmoid"}
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(ValueError, match="needs a calibration"):
        RobustClassifier.from_recipe(path)


def _tiny_defense_recipe(tmp_path):
    """A complete defense on 8x8 digits: perturbed unet_tiny, its calibration, resnet10t."""
    torch.manual_seed(0)
    sm = create_model("unet_tiny")
    with torch.no_grad():
        for p in sm.parameters():
            p.add_(0.02 * torch.randn_like(p))
    save_model(tmp_path / "score", sm)
    _calibration(sm.eval()).save(tmp_path / "calibration.json")
    clf = create_classifier("resnet10t", in_chans=1, num_classes=10, image_size=8)
    atomic_save_safetensors(tmp_path / "clf" / "model.safetensors", clf.state_dict())
    atomic_write_json(tmp_path / "clf" / "model.json", classifier_spec(clf))
    recipe = {"score_model": str(tmp_path / "score"),
              "calibration": str(tmp_path / "calibration.json"), "score_norm": {"timesteps": 4},
              "reweight": {"name": "sigmoid", "kwargs": {"t_base": 0.05}}, "purifier": PURIFY,
              "classifier": {"checkpoint": str(tmp_path / "clf")}, "mean": [0.0], "std": [1.0],
              "device": "cpu"}
    path = tmp_path / "defense.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_finetune_classifier_cli(tmp_path):
    from ssni.cli import main
    from ssni.config import load_config
    from ssni.defense import DefenseConfig

    recipe = _tiny_defense_recipe(tmp_path)
    out = tmp_path / "ft"
    rc = main(["finetune-classifier", f"run_dir={out}", f"defense_recipe={recipe}",
               "data.image_size=8", "copies=1", "loop.steps=3", "loop.batch_size=16",
               "eval_count=32", "progress=false", "loop.progress=false", "device=cpu"])
    assert rc == 0
    summary = yaml.safe_load((out / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["eval_count"] == 32
    assert summary["train_images"] == 2 * 1438  # one purified copy + the clean images
    assert 0.0 < summary["mean_t_star_train"] <= 0.055
    # the written recipe rebuilds the defense with the fine-tuned weights
    cfg = load_config(DefenseConfig, out / "defense.yaml")
    assert cfg.classifier.checkpoint == str(out)
    w = build_defense(cfg)
    with torch.no_grad():
        assert w(_images(2), seeds=torch.arange(2)).shape == (2, 10)


def test_shipped_recipes_load():
    from pathlib import Path

    from ssni.commands.calibrate import CalibrateConfig
    from ssni.commands.finetune import FinetuneConfig
    from ssni.commands.fit_reweight import FitReweightConfig
    from ssni.config import load_config
    from ssni.defense import DefenseConfig

    root = Path(__file__).resolve().parents[1] / "recipes"
    for cls, rel in [(DefenseConfig, "defense/digits.yaml"), (CalibrateConfig, "calibrate/digits.yaml"),
                     (FitReweightConfig, "reweight/digits.yaml"),
                     (FinetuneConfig, "classifier/digits_finetune.yaml")]:
        cfg = load_config(cls, root / rel)
        assert cfg is not None
    d = load_config(DefenseConfig, root / "defense/digits.yaml")
    assert d.mean == [0.0] and d.std == [1.0] and d.reweight.name == "sigmoid"
    assert isinstance(d.purifier, PurifierConfig) and isinstance(d.attack_purifier, PurifierConfig)
