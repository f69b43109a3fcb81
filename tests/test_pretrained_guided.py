"""The "guided_diffusion" checkpoint format: guided-diffusion's UNetModel state dicts load as EpsModels.

The fixtures hold the parameter names and shapes of the original's state dicts (written from the
original model, not from ours): two tiny configurations and the 256x256 unconditional ImageNet
model. Random weights in those shapes stand in for the real files.
"""
import json
from pathlib import Path

import pytest
import torch

from ssni.models import PRETRAINED_FORMATS, VPBackbone, load_pretrained
from ssni.models.guided import build_guided_unet, guided_flags, guided_timestep_embedding
from ssni.purify import Purifier
from ssni.scoring import ScoreNorm

FIXTURES = Path(__file__).parent / "fixtures"
TINY = "guided_tiny_keys.json"            # learn_sigma, resblock up/down, scale-shift norm, attention at 16
TINY_CONV = "guided_tiny_conv_keys.json"  # conv up/down, additive time embedding, new attention order


class _Payload:
    """A pickled Python object that a weights-only load must refuse."""


def _fixture(name):
    return json.loads((FIXTURES / name).read_text())


def _random_state(shapes, seed=0):
    """Random weights with the given names and shapes (norm scales near 1 so activations stay sane)."""
    g = torch.Generator().manual_seed(seed)
    # the only 1-D weights are GroupNorm scales
    return {k: (1.0 if len(s) == 1 and k.endswith("weight") else 0.0) + 0.05 * torch.randn(s, generator=g)
            for k, s in shapes.items()}


def _write_checkpoint(tmp_path, name, mutate=None):
    fix = _fixture(name)
    state = _random_state(fix["shapes"])
    if mutate:
        mutate(state)
    path = tmp_path / f"{Path(name).stem}.pt"
    torch.save(state, path)
    return path, fix, state


def test_format_is_registered():
    assert "guided_diffusion" in PRETRAINED_FORMATS.names()


@pytest.mark.parametrize("name", [TINY, TINY_CONV])
def test_original_state_dict_loads_strictly(tmp_path, name):
    path, fix, state = _write_checkpoint(tmp_path, name)
    model = load_pretrained(path, "guided_diffusion", **fix["flags"])
    assert isinstance(model, VPBackbone) and not model.training
    own = model.backbone.state_dict()
    assert {k: list(v.shape) for k, v in own.items()} == fix["shapes"]  # same names, same order, same shapes
    assert sum(p.numel() for p in model.parameters()) == fix["num_parameters"]
    assert all(torch.equal(own[k], state[k]) for k in state)
    assert model.input_shape == (3, 32, 32) and model.time_input == "step_index"


def test_learn_sigma_output_is_cut_to_eps(tmp_path):
    path, fix, _ = _write_checkpoint(tmp_path, TINY)
    model = load_pretrained(path, "guided_diffusion", **fix["flags"])
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    steps = torch.tensor([0, 250, 999])
    t = (steps + 1).float() / 1000  # discrete step i is t = (i + 1) / N
    with torch.no_grad():
        raw = model.backbone(x, t * 1000 - 1)  # the step index, up to float32 rounding of t
        eps = model(x, t)
        flipped = model.backbone(x, steps.flip(0))
    assert raw.shape == (3, 6, 32, 32) and eps.shape == (3, 3, 32, 32)
    torch.testing.assert_close(eps, raw[:, :3], rtol=0, atol=0)
    torch.testing.assert_close(t * 1000 - 1, steps.float(), rtol=0, atol=1e-4)
    assert not torch.allclose(raw[0], flipped[0])  # the step index matters


def test_time_input_of_diffpure_sde_runner_is_an_option(tmp_path):
    """step_index (guided-diffusion's sampler): t N - 1; step_floor (DiffPure's SDE runner): (t * N).long()."""
    path, fix, _ = _write_checkpoint(tmp_path, TINY)
    own = load_pretrained(path, "guided_diffusion", **fix["flags"])
    sde = load_pretrained(path, "guided_diffusion", time_input="step_floor", **fix["flags"])
    assert (own.time_input, sde.time_input, sde.config["time_input"]) == ("step_index", "step_floor", "step_floor")
    t = torch.tensor([0.0, 0.0004, 0.1, 0.1005, 0.25, 0.999, 1.0])
    diffpure = (t.float() * 1000).long()  # DiffPure's RevVPSDE._scale_timesteps
    torch.testing.assert_close(sde.network_time(t), diffpure.float(), rtol=0, atol=0)
    grid = torch.tensor([1, 100, 1000]) / 1000  # steps 0, 99, 999 at t = (i + 1) / N
    torch.testing.assert_close(own.network_time(grid), torch.tensor([0.0, 99.0, 999.0]), rtol=0, atol=1e-4)
    torch.testing.assert_close(sde.network_time(grid), torch.tensor([1.0, 100.0, 1000.0]), rtol=0, atol=0)
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1
    t3 = torch.tensor([0.1, 0.1005, 0.5])
    with torch.no_grad():
        torch.testing.assert_close(sde(x, t3), sde.backbone(x, (t3 * 1000).long())[:, :3], rtol=0, atol=0)
        assert not torch.allclose(sde(x, t3), own(x, t3), atol=1e-4)  # one step apart
    with pytest.raises(ValueError, match=r"time_input='t999'; choose one of \['step_index', 'step_floor'\]"):
        load_pretrained(path, "guided_diffusion", time_input="t999", **fix["flags"])


@pytest.mark.parametrize("name", [TINY, TINY_CONV])
def test_fp16_runs_the_torso_in_half_as_the_original(tmp_path, name):
    """precision="fp16" is guided-diffusion's convert_to_fp16: the torso's convolutions in float16; time
    embedding, linear layers, norm parameters and the output head stay float32; eps comes back float32."""
    path, fix, _ = _write_checkpoint(tmp_path, name)
    m32 = load_pretrained(path, "guided_diffusion", **fix["flags"])
    m16 = load_pretrained(path, "guided_diffusion", precision="fp16", **fix["flags"])
    assert m16.config["precision"] == "fp16" and m32.config["precision"] == "fp32"
    net = m16.backbone
    for part in (net.input_blocks, net.middle_block, net.output_blocks):
        for module in part.modules():
            if isinstance(module, (torch.nn.Conv1d, torch.nn.Conv2d)):
                assert module.weight.dtype == torch.float16 and module.bias.dtype == torch.float16
            elif isinstance(module, (torch.nn.Linear, torch.nn.GroupNorm)):
                assert module.weight.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in [*net.time_embed.parameters(), *net.out.parameters()])
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(4)) * 2 - 1
    t = torch.tensor([0.05, 0.6])
    with torch.no_grad():
        eps16, eps32 = m16(x, t), m32(x, t)
    assert eps16.dtype == torch.float32 and torch.isfinite(eps16).all()
    rel = ((eps16 - eps32).norm() / eps32.norm()).item()
    assert 1e-6 < rel < 2e-2, rel  # half precision, not another function
    x.requires_grad_(True)  # gradients reach the input through the fp16 torso
    m16(x, t).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"precision='bf16'; choose one of \['fp32', 'fp16'\]"):
        load_pretrained(path, "guided_diffusion", precision="bf16", **fix["flags"])


def test_full_imagenet_layout_on_meta_device():
    """The default flags build the 256x256 unconditional model: 552.8M parameters in 566 entries."""
    fix = _fixture("guided_256_uncond_keys.json")
    with torch.device("meta"):  # names and shapes without allocating 2.2 GB
        net = build_guided_unet(guided_flags())
    own = net.state_dict()
    assert {k: list(v.shape) for k, v in own.items()} == fix["shapes"]
    assert len(own) == fix["num_entries"] == 566
    assert sum(p.numel() for p in net.parameters()) == fix["num_parameters"] == 552_814_086
    assert guided_flags() == guided_flags(**fix["flags"])


def test_purifier_and_score_norm_run(tmp_path):
    path, fix, _ = _write_checkpoint(tmp_path, TINY)
    model = load_pretrained(path, "guided_diffusion", **fix["flags"])
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = Purifier(model, "ddpm", steps=2)(x, 0.1, seeds=torch.tensor([3, 4]))
        norms = ScoreNorm(model, timesteps=2)(x, seeds=torch.tensor([3, 4]))
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert norms.shape == (2,) and torch.isfinite(norms).all() and (norms > 0).all()
    x.requires_grad_(True)  # full gradients flow through the purifier into the input
    Purifier(model, "ddpm", steps=2)(x, 0.1, seeds=torch.tensor([3, 4])).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_string_and_typed_flags_agree():
    a = guided_flags(image_size="32", num_channels="32", channel_mult="1,2", num_res_blocks="1",
                     attention_resolutions="16", num_head_channels="16", learn_sigma="True", use_fp16="False")
    b = guided_flags(image_size=32, num_channels=32, channel_mult=[1, 2], num_res_blocks=1,
                     attention_resolutions=[16], num_head_channels=16, learn_sigma=True, use_fp16=False)
    assert a == b and a["attention_resolutions"] == [16] and a["channel_mult"] == [1, 2]
    assert guided_flags()["channel_mult"] == [1, 1, 2, 2, 4, 4]  # "" = the default for 256x256
    assert guided_flags(**a) == a  # the resolved flags rebuild the same model


@pytest.mark.parametrize("flags, match", [
    (dict(num_chanels=64), r"unknown guided_diffusion flag.*valid flags: .*num_channels"),
    (dict(attention_resolutions="12"), r"not resolutions of the U-Net levels"),
    (dict(image_size=96), r"no default channel_mult for image_size 96"),
    (dict(learn_sigma="maybe"), r"learn_sigma: expected a boolean"),
    (dict(noise_schedule="cosine"), r"noise_schedule"),
    (dict(class_cond=True), r"class-conditional"),
])
def test_bad_flags_are_clear(tmp_path, flags, match):
    with pytest.raises(ValueError, match=match):
        load_pretrained(tmp_path / "never_read.pt", "guided_diffusion", **flags)


def _error(path, fix, exc=ValueError, **extra):
    """The error of loading path: the file and what does not fit on a short first line."""
    with pytest.raises(exc) as info:
        load_pretrained(path, "guided_diffusion", **{**fix["flags"], **extra})
    message = str(info.value)
    first = message.splitlines()[0]
    assert str(path) in first and len(first) - len(str(path)) <= 300, first
    return message


def _one_line_error(path, fix, exc=ValueError):
    message = _error(path, fix, exc)
    assert "\n" not in message
    return message


def test_wrong_key_comes_first_then_the_flags(tmp_path):
    def rename(state):
        state["out.2.weight_typo"] = state.pop("out.2.weight")

    path, fix, _ = _write_checkpoint(tmp_path, TINY, rename)
    first, rest = _error(path, fix).split("\n", 1)
    assert "missing ['out.2.weight']" in first and "unexpected ['out.2.weight_typo']" in first
    assert "'guided_diffusion'" in rest and "'num_channels': 32" in rest


def test_wrong_shape_is_on_the_first_line(tmp_path):
    def widen(state):
        state["time_embed.0.weight"] = torch.zeros(128, 64)

    path, fix, _ = _write_checkpoint(tmp_path, TINY, widen)
    first = _error(path, fix).splitlines()[0]
    assert "shape mismatches" in first and "time_embed.0.weight (128, 64) vs (128, 32)" in first


def test_flags_that_do_not_fit_the_file_are_clear(tmp_path):
    path, fix, _ = _write_checkpoint(tmp_path, TINY)
    message = _error(path, fix, learn_sigma=False)
    assert "does not fit the guided_diffusion model" in message and "out.2.weight" in message.splitlines()[0]
    assert "'learn_sigma': False" in message.splitlines()[1]


def test_pickled_object_is_refused(tmp_path):
    path = tmp_path / "pickled.pt"
    torch.save({"time_embed.0.weight": torch.zeros(1), "payload": _Payload()}, path)
    with pytest.raises(RuntimeError, match="refusing to load") as info:
        load_pretrained(path, "guided_diffusion", **_fixture(TINY)["flags"])
    assert "\n" not in str(info.value) and "the Python object test_pretrained_guided._Payload" in str(info.value)


def test_wrapped_state_dict_is_clear(tmp_path):
    path = tmp_path / "wrapped.pt"
    torch.save({"model": {"w": torch.zeros(1)}, "step": torch.tensor(3)}, path)
    message = _one_line_error(path, _fixture(TINY))
    assert "expected a plain state dict" in message and "'model'" in message


def test_missing_file_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_pretrained(tmp_path / "absent.pt", "guided_diffusion", **_fixture(TINY)["flags"])


def test_timestep_embedding_is_cos_then_sin():
    emb = guided_timestep_embedding(torch.tensor([0.0, 2.0]), 8)
    assert emb.shape == (2, 8)
    torch.testing.assert_close(emb[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    freqs = torch.exp(-torch.log(torch.tensor(10000.0)) * torch.arange(4) / 4)  # 10000^(-k / half)
    torch.testing.assert_close(emb[1], torch.cat([torch.cos(2 * freqs), torch.sin(2 * freqs)]))
