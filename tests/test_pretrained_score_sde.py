"""The "score_sde" checkpoint format: score_sde's VP DDPM++ checkpoints load as EpsModels.

The fixtures hold the parameter names and shapes of the original's state dicts (written from the
original model, not from ours): a tiny configuration and the deep CIFAR-10 model. Random weights in
those shapes, saved in the original checkpoint layout (optimizer / model with `module.` names / ema
with shadow_params in parameters() order / step), stand in for the real files. Checkpoints written the
way score_sde's training writes them (a real Adam step with its numpy warmup learning rate, numpy 1.x's
pickle names as in the released checkpoint_8.pth) check the weights-only reading of what they hold.
"""
import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ssni.models import PRETRAINED_FORMATS, VPBackbone, load_pretrained
from ssni.models.ddpmpp import build_ddpmpp, ddpmpp_timestep_embedding, score_sde_config
from ssni.purify import Purifier
from ssni.scoring import ScoreNorm

FIXTURES = Path(__file__).parent / "fixtures"
TINY = "score_sde_tiny_keys.json"  # nf 16, ch_mult (1, 2), one block per level, attention at 8x8, 16x16 images
UNCOND = "score_sde_tiny_uncond_keys.json"  # unconditional: its blocks still hold (unused) Dense_0 layers
DEEP = "score_sde_cifar10_deep_keys.json"  # the deep CIFAR-10 model (checkpoint_8.pth)


class _Payload:
    """A pickled Python object that a weights-only load must refuse."""


def _fixture(name):
    return json.loads((FIXTURES / name).read_text())


def _random_state(shapes, seed):
    """Random weights with the given names and shapes (GroupNorm scales near 1 so activations stay sane)."""
    g = torch.Generator().manual_seed(seed)
    state = {k: (1.0 if "GroupNorm" in k and k.endswith("weight") else 0.0) + 0.05 * torch.randn(s, generator=g)
             for k, s in shapes.items() if k != "sigmas"}
    # the float64 noise-level buffer comes first in the original's state dict
    return {"sigmas": torch.exp(torch.linspace(3.9, -4.6, shapes["sigmas"][0], dtype=torch.float64)), **state}


def _checkpoint(state, ema_state):
    """The original layout: DataParallel names in `model`, EMA weights as a list in parameters() order."""
    shadow = [v for k, v in ema_state.items() if k != "sigmas"]  # the only buffer; parameters keep their order
    return {"optimizer": {"state": {}, "param_groups": [{"lr": 2e-4, "betas": (0.9, 0.999), "params": [0]}]},
            "model": {"module." + k: v for k, v in state.items()},
            "ema": {"decay": 0.9999, "num_updates": 7, "shadow_params": shadow}, "step": 5}


def _write(tmp_path, mutate=None, name="ckpt.pth", fixture=TINY):
    fix = _fixture(fixture)
    raw, ema = _random_state(fix["shapes"], 0), _random_state(fix["shapes"], 1)
    ckpt = _checkpoint(raw, ema)
    if mutate:
        mutate(ckpt)
    path = tmp_path / name
    torch.save(ckpt, path)
    return path, fix, raw, ema


def test_format_is_registered():
    assert "score_sde" in PRETRAINED_FORMATS.names()


@pytest.mark.parametrize("fixture", [TINY, UNCOND])
def test_checkpoint_loads_strictly_with_ema_weights(tmp_path, fixture):
    path, fix, raw, ema = _write(tmp_path, fixture=fixture)
    model = load_pretrained(path, "score_sde", **fix["config"])
    assert isinstance(model, VPBackbone) and not model.training
    own = model.backbone.state_dict()
    assert {k: list(v.shape) for k, v in own.items()} == fix["shapes"]  # same names, same order, same shapes
    assert len(own) == fix["num_entries"] and len(list(model.backbone.parameters())) == fix["num_parameter_tensors"]
    assert sum(p.numel() for p in model.parameters()) == fix["num_parameters"]
    assert all(torch.equal(own[k], ema[k]) for k in ema if k != "sigmas")  # EMA parameters ...
    assert torch.equal(own["sigmas"], raw["sigmas"]) and own["sigmas"].dtype == torch.float64  # ... buffers from model
    assert model.input_shape == (3, 16, 16) and model.time_input == "t999" and model.config["weights"] == "ema"
    assert load_pretrained(path, "score_sde", weights="model", **fix["config"]).config["weights"] == "model"


def test_weights_model_picks_the_raw_weights(tmp_path):
    path, fix, raw, _ = _write(tmp_path)
    ema_model = load_pretrained(path, "score_sde", **fix["config"])
    raw_model = load_pretrained(path, "score_sde", weights="model", **fix["config"])
    own = raw_model.backbone.state_dict()
    assert all(torch.equal(own[k], raw[k]) for k in raw)
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    t = torch.tensor([0.1, 0.7])
    with torch.no_grad():
        assert not torch.allclose(ema_model(x, t), raw_model(x, t), atol=1e-3)


def test_plain_state_dict_loads_and_says_so(tmp_path):
    fix = _fixture(TINY)
    state = _random_state(fix["shapes"], 3)
    for i, prefix in enumerate(("", "module.")):
        path = tmp_path / f"plain{i}.pt"
        torch.save({prefix + k: v for k, v in state.items()}, path)
        for weights in ("auto", "state_dict"):
            model = load_pretrained(path, "score_sde", weights=weights, **fix["config"])
            own = model.backbone.state_dict()
            assert all(torch.equal(own[k], state[k]) for k in state)
            assert model.config["weights"] == "state_dict"  # what it is, not "ema"
    for weights in ("ema", "model"):  # a plain state dict has neither entry
        assert "plain state dict" in _one_line_error(path, fix, weights=weights)
    checkpoint, _, _, _ = _write(tmp_path)
    assert "is score_sde's checkpoint" in _one_line_error(checkpoint, fix, weights="state_dict")


def test_time_input_is_t_times_999(tmp_path):
    path, fix, _, _ = _write(tmp_path)
    model = load_pretrained(path, "score_sde", **fix["config"])
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(4)) * 2 - 1
    t = torch.tensor([0.001, 0.5, 1.0])
    with torch.no_grad():
        eps = model(x, t)
        torch.testing.assert_close(eps, model.backbone(x, t * 999), rtol=0, atol=0)
        assert not torch.allclose(eps, model.backbone(x, t * 1000), atol=1e-4)  # a 0.1% time shift is seen
        assert not torch.allclose(eps[0], model(x, t.flip(0))[0])  # the time matters
    assert eps.shape == x.shape and model.diffusion.N == 1000


@pytest.mark.parametrize("options, entries, parameters", [
    ({}, 957, 106_632_579),                       # the deep model (checkpoint_8.pth)
    ({"num_res_blocks": 4}, 565, 61_804_419),     # the non-deep DDPM++
])
def test_cifar10_layouts_on_meta_device(options, entries, parameters):
    """The defaults build the deep CIFAR-10 model: 106.6M parameters in 957 entries, as the original."""
    with torch.device("meta"):  # names and shapes without allocating the weights
        net = build_ddpmpp(score_sde_config(**options))
    own = net.state_dict()
    assert len(own) == entries and sum(p.numel() for p in net.parameters()) == parameters
    if not options:
        fix = _fixture(DEEP)
        assert {k: list(v.shape) for k, v in own.items()} == fix["shapes"]
        assert fix["num_entries"] == entries and fix["num_parameters"] == parameters
        assert len(list(net.parameters())) == fix["num_parameter_tensors"] == 956


def test_purifier_and_score_norm_run(tmp_path):
    path, fix, _, _ = _write(tmp_path)
    model = load_pretrained(path, "score_sde", **fix["config"])
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    seeds = torch.tensor([3, 4])
    with torch.no_grad():
        out = Purifier(model, "ddpm", steps=2)(x, 0.1, seeds=seeds)
        norms = ScoreNorm(model, timesteps=2)(x, seeds=seeds)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert norms.shape == (2,) and torch.isfinite(norms).all() and (norms > 0).all()
    x.requires_grad_(True)  # full gradients flow through the purifier into the input
    Purifier(model, "ddpm", steps=2)(x, 0.1, seeds=seeds).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_options_accept_string_forms_and_round_trip():
    a = score_sde_config(nf="16", ch_mult="1,2", num_res_blocks="1", attn_resolutions="8", image_size=16,
                         conditional="true", num_channels=3)
    b = score_sde_config(nf=16, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=(8,), image_size=16)
    assert a == b and a["ch_mult"] == (1, 2) and a["attn_resolutions"] == (8,) and a["in_channels"] == 3
    assert score_sde_config(**a) == a  # the resolved options rebuild the same model
    assert score_sde_config(resblock_type="BigGAN", normalization="groupnorm")["num_res_blocks"] == 8


@pytest.mark.parametrize("options, match", [
    (dict(num_res_block=4), r"unknown score_sde option.*valid options: .*num_res_blocks"),
    (dict(fir=True), r"fir=True is not supported: only the VP DDPM\+\+ variant \(fir=False\)"),
    (dict(progressive="output_skip"), r"progressive='output_skip' is not supported"),
    (dict(embedding_type="fourier"), r"embedding_type='fourier' is not supported"),
    (dict(scale_by_sigma=True), r"scale_by_sigma=True is not supported"),
    (dict(resblock_type="ddpm"), r"resblock_type='ddpm' is not supported"),
    (dict(attn_resolutions=(12,)), r"\[12\] are not resolutions of the U-Net levels \[32, 16, 8, 4\]"),
    (dict(image_size=20), r"image_size=20 must be divisible by 2\^3"),
    (dict(conditional="maybe"), r"conditional: cannot read 'maybe' as a boolean"),
    (dict(num_channels=1, in_channels=3), r"disagree"),
    (dict(weights="best"), r"weights='best'; choose one of \['auto', 'ema', 'model', 'state_dict'\]"),
])
def test_bad_options_are_clear(tmp_path, options, match):
    with pytest.raises(ValueError, match=match):
        load_pretrained(tmp_path / "never_read.pth", "score_sde", **options)


def _error(path, fix, exc=ValueError, **extra):
    """The error of loading path: the file and what does not fit on a short first line."""
    with pytest.raises(exc) as info:
        load_pretrained(path, "score_sde", **fix["config"], **extra)
    message = str(info.value)
    first = message.splitlines()[0]
    assert str(path) in first and len(first) - len(str(path)) <= 300, first
    return message


def _one_line_error(path, fix, exc=ValueError, **extra):
    message = _error(path, fix, exc, **extra)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("weights", ["ema", "model"])
def test_wrong_key_comes_first_then_the_options(tmp_path, weights):
    def rename(ckpt):
        ckpt["model"]["module.all_modules.2.weight_typo"] = ckpt["model"].pop("module.all_modules.2.weight")

    path, fix, _, _ = _write(tmp_path, rename)
    first, rest = _error(path, fix, weights=weights).split("\n", 1)
    assert "does not fit the score_sde model" in first and "unexpected ['all_modules.2.weight_typo']" in first
    if weights == "model":  # the EMA list fills every parameter name, so only the raw weights miss one
        assert "missing ['all_modules.2.weight']" in first
    assert "'score_sde'" in rest and "'nf': 16" in rest  # the assumed format and options after


@pytest.mark.parametrize("weights", ["ema", "model"])
def test_wrong_shape_in_model_is_refused_with_either_weights(tmp_path, weights):
    """score_sde's restore_checkpoint loads `model` (strict=False) before the EMA: a wrong shape stops it."""
    def widen(ckpt):
        ckpt["model"]["module.all_modules.0.weight"] = torch.zeros(64, 32)

    path, fix, _, _ = _write(tmp_path, widen)
    first = _error(path, fix, weights=weights).splitlines()[0]
    assert "shape mismatches" in first and "all_modules.0.weight (64, 32) vs (64, 16)" in first
    if weights == "ema":
        assert "'model' entry does not fit" in first


def test_keys_first_even_with_long_names(tmp_path):
    """Many long mismatching names: the first line stays short, listing fewer of them."""
    def rename_all(ckpt):
        ckpt["model"] = {k + "_of_a_much_longer_parameter_name_than_usual": v for k, v in ckpt["model"].items()}

    path, fix, _, _ = _write(tmp_path, rename_all)
    first = _error(path, fix, weights="model").splitlines()[0]
    assert "missing [" in first and "unexpected [" in first and "(155)" in first


def test_options_that_do_not_fit_the_file_are_clear(tmp_path):
    path, fix, _, _ = _write(tmp_path)
    wider = {"config": {**fix["config"], "nf": 32}}  # as many parameters, other shapes
    message = _error(path, wider)
    assert "shape mismatches" in message.splitlines()[0] and "'nf': 32" in message
    deeper = {"config": {**fix["config"], "num_res_blocks": 2}}  # more parameters, shifted names
    message = _error(path, deeper, weights="ema")  # the `model` entry stops it, as in restore_checkpoint
    assert "'model' entry does not fit" in message.splitlines()[0] and "'num_res_blocks': 2" in message


def test_ema_of_another_model_is_clear(tmp_path):
    path, fix, _, _ = _write(tmp_path, lambda ckpt: ckpt["ema"]["shadow_params"].pop())
    assert "EMA holds 153 parameters" in _one_line_error(path, fix)
    load_pretrained(path, "score_sde", weights="model", **fix["config"])  # the raw weights still fit


def test_pickled_object_is_refused(tmp_path):
    path = tmp_path / "pickled.pth"
    torch.save({"model": {"module.sigmas": torch.zeros(1)}, "payload": _Payload()}, path)
    with pytest.raises(RuntimeError, match="refusing to load") as info:
        load_pretrained(path, "score_sde", **_fixture(TINY)["config"])
    assert "\n" not in str(info.value) and "the Python object test_pretrained_score_sde._Payload" in str(info.value)


# -- checkpoints as score_sde's training writes them -------------------------------------------------


def _training_checkpoint(path, pickle_module=None, step=1, warmup=5000, lr=2e-4):
    """A checkpoint as score_sde's run_lib.train writes it after `step` steps (utils.save_checkpoint).

    Adam as losses.get_optimizer builds it, one real step through losses.optimization_manager's
    optimize_fn (the learning rate set to lr * np.minimum(step / warmup, 1.0), a numpy float64, and
    gradients clipped at 1), the EMA updated as models/ema.py does, the model under DataParallel's
    `module.` names. pickle_module: e.g. the numpy1_pickle fixture, to write numpy 1.x's names.
    Returns (path, raw weights, EMA weights) with the names of the network.
    """
    fix = _fixture(TINY)
    net = build_ddpmpp(score_sde_config(**fix["config"]))
    net.load_state_dict(_random_state(fix["shapes"], 0))
    shadow = [p.detach().clone() for p in net.parameters()]
    optimizer = torch.optim.Adam(net.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0)
    g = torch.Generator().manual_seed(5)
    x, labels = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1, torch.rand(2, generator=g) * 999
    net(x, labels).pow(2).mean().backward()
    for group in optimizer.param_groups:
        group["lr"] = lr * np.minimum(step / warmup, 1.0)
    torch.nn.utils.clip_grad_norm_(net.parameters(), max_norm=1.0)
    optimizer.step()
    num_updates = 1
    decay = min(0.9999, (1 + num_updates) / (10 + num_updates))
    with torch.no_grad():
        for s, p in zip(shadow, net.parameters()):
            s.sub_((1 - decay) * (s - p))
    raw = {k: v.detach().clone() for k, v in net.state_dict().items()}
    ckpt = {"optimizer": optimizer.state_dict(), "model": {"module." + k: v for k, v in raw.items()},
            "ema": {"decay": 0.9999, "num_updates": num_updates, "shadow_params": shadow}, "step": step}
    assert isinstance(ckpt["optimizer"]["param_groups"][0]["lr"], np.float64)
    torch.save(ckpt, path, **({"pickle_module": pickle_module} if pickle_module else {}))
    names = [n for n, _ in net.named_parameters()]
    return path, raw, {**raw, **dict(zip(names, shadow))}


@pytest.mark.parametrize("numpy1", [False, True], ids=["numpy2-names", "numpy1-names"])
@pytest.mark.parametrize("weights", ["ema", "model"])
def test_a_checkpoint_written_by_score_sde_training_loads(tmp_path, numpy1_pickle, numpy1, weights):
    path, raw, ema = _training_checkpoint(tmp_path / "checkpoint_1.pth", numpy1_pickle if numpy1 else None)
    scalar = "numpy.core.multiarray.scalar" if numpy1 else "numpy._core.multiarray.scalar"
    assert scalar in torch.serialization.get_unsafe_globals_in_checkpoint(path)  # numpy scalars inside
    with pytest.raises(Exception, match="scalar"):  # which plain weights_only loading refuses
        torch.load(path, weights_only=True)
    model = load_pretrained(path, "score_sde", weights=weights, **_fixture(TINY)["config"])
    own, want = model.backbone.state_dict(), (ema if weights == "ema" else raw)
    assert all(torch.equal(own[k], want[k]) for k in want) and model.config["weights"] == weights
    with pytest.raises(Exception, match="scalar"):  # the allowlist was for that load only
        torch.load(path, weights_only=True)


def test_a_file_written_by_numpy1_is_read():
    """tests/fixtures/score_sde_numpy1_state.pt was written by numpy 1.26 and torch as score_sde's training
    writes its checkpoint (Adam after one step with lr 2e-4 * np.minimum(1 / 5000, 1.0), EMA, step) for
    a Linear(3, 2); our numpy1_pickle writer produces the same globals."""
    from ssni.io import safe_torch_load

    path = FIXTURES / "score_sde_numpy1_state.pt"
    assert sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path)) == [
        "numpy.core.multiarray.scalar", "numpy.dtype"]
    ckpt = safe_torch_load(path)
    lr = ckpt["optimizer"]["param_groups"][0]["lr"]
    assert isinstance(lr, np.float64) and lr == 2e-4 * np.minimum(1 / 5000, 1.0)
    assert ckpt["step"] == 1 and ckpt["model"]["module.weight"].shape == (2, 3)
    assert len(ckpt["ema"]["shadow_params"]) == 2 and set(ckpt["optimizer"]["state"]) == {0, 1}


def test_numpy1_writer_writes_what_numpy1_writes(tmp_path, numpy1_pickle):
    path = tmp_path / "mine.pt"
    torch.save({"lr": 2e-4 * np.minimum(1 / 5000, 1.0), "w": torch.ones(1)}, path, pickle_module=numpy1_pickle)
    assert sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path)) == sorted(
        torch.serialization.get_unsafe_globals_in_checkpoint(FIXTURES / "score_sde_numpy1_state.pt"))


@pytest.mark.parametrize("numpy1", [False, True], ids=["numpy2-names", "numpy1-names"])
@pytest.mark.parametrize("payload, named", [
    (argparse.Namespace(lr=0.1), "argparse.Namespace"),
    (np.zeros(3), "multiarray._reconstruct"),  # numpy arrays are not scalars: refused
    (_Payload(), "test_pretrained_score_sde._Payload"),
])
def test_any_other_global_beside_numpy_scalars_is_refused_and_named(tmp_path, numpy1_pickle, numpy1, payload, named):
    path, _, _ = _training_checkpoint(tmp_path / "ckpt.pth")
    ckpt = torch.load(path, weights_only=False)  # our own file: add the foreign object to it
    ckpt["config"] = payload
    torch.save(ckpt, path, **({"pickle_module": numpy1_pickle} if numpy1 else {}))
    for weights in ("ema", "model"):
        message = _one_line_error(path, _fixture(TINY), RuntimeError, weights=weights)
        assert message.startswith(f"refusing to load {path}: it holds the Python object ") and named in message
        assert "not tensors" in message


@pytest.mark.parametrize("content, match", [
    ({"state": {"w": torch.zeros(1)}, "step": 3}, r"expected score_sde's checkpoint .* the file holds a dict with keys"),
    ({"model": {"module.sigmas": torch.zeros(1)}, "step": 3}, r"no 'ema' entry .* pass weights=\"model\""),
    ({"model": {"module.other": torch.zeros(1)}, "ema": {"decay": 0.9}}, r"'ema' entry has no list of tensors"),
    ({"model": [1, 2], "ema": {}}, r"'model' entry is not a state dict"),
    ([torch.zeros(1)], r"the file holds list"),
])
def test_other_file_contents_are_clear(tmp_path, content, match):
    path = tmp_path / "other.pth"
    torch.save(content, path)
    assert "\n" not in _one_line_error(path, _fixture(TINY))
    with pytest.raises(ValueError, match=match):
        load_pretrained(path, "score_sde", **_fixture(TINY)["config"])


def test_missing_file_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_pretrained(tmp_path / "absent.pth", "score_sde", **_fixture(TINY)["config"])


def test_timestep_embedding_is_sin_then_cos():
    emb = ddpmpp_timestep_embedding(torch.tensor([0.0, 2.0]), 8)
    assert emb.shape == (2, 8)
    torch.testing.assert_close(emb[0], torch.tensor([0.0] * 4 + [1.0] * 4))
    freqs = torch.exp(-torch.log(torch.tensor(10000.0)) * torch.arange(4) / 3)  # 10000^(-k / (half - 1))
    torch.testing.assert_close(emb[1], torch.cat([torch.sin(2 * freqs), torch.cos(2 * freqs)]))


def test_the_cifar10_defense_recipe_builds_on_a_public_layout_checkpoint(tmp_path):
    """recipes/cifar10/defense_linf.yaml with its score model pointed at a tiny checkpoint in the
    original layout, a calibration of it, and a non-timm classifier: the wrapper runs end to end."""
    import yaml

    from ssni.config import load_config
    from ssni.defense import DefenseConfig, build_defense
    from ssni.io import atomic_save_safetensors, atomic_write_json
    from ssni.models import classifier_spec, create_classifier
    from ssni.scoring import ScoreNormConfig, calibrate

    path, fix, _, _ = _write(tmp_path)
    model = load_pretrained(path, "score_sde", **fix["config"])
    cal, _ = calibrate(model, torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(0)),
                       ScoreNormConfig(timesteps=2), batch_size=8)
    cal.save(tmp_path / "cal.json")
    clf = create_classifier("resnet10t", in_chans=3, num_classes=10, image_size=16)
    atomic_save_safetensors(tmp_path / "clf" / "model.safetensors", clf.state_dict())
    atomic_write_json(tmp_path / "clf" / "model.json", classifier_spec(clf))
    spec = {"format": "score_sde", "path": str(path), **fix["config"]}
    cfg = load_config(DefenseConfig, "recipes/cifar10/defense_linf.yaml", [
        f"score_model={yaml.safe_dump(spec, default_flow_style=True).strip()}",
        f"calibration={tmp_path / 'cal.json'}", "score_norm.timesteps=2", "purifier.steps=2",
        "attack_purifier.steps=1", "classifier={source: timm, checkpoint: " + str(tmp_path / "clf") + "}",
        "input_size=16", "device=cpu"])
    defense = build_defense(cfg)
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = defense(x, seeds=torch.tensor([1, 2]))
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()
    assert defense.last_t_star.shape == (2,)
    x.requires_grad_(True)  # the adaptive view differentiates through the public network
    defense.view("adaptive")(x, seeds=torch.tensor([1, 2])).logsumexp(1).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
